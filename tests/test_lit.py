"""ClassifierModule learns, reports over the whole test set, and works from plain Python."""

import json
import re
from pathlib import Path

import lightning as L
import torch

from kdlight.lit import ClassifierModule
from kdlight.models import create_model
from tests.conftest import cpu_trainer, synthetic_datamodule

README = Path(__file__).resolve().parents[1] / "README.md"


def test_classifier_learns_synthetic_data(tmp_path: Path, capsys):
    torch.manual_seed(0)
    datamodule = synthetic_datamodule(train=2000, test=500, val=200, batch=64)
    module = ClassifierModule(create_model("resnet8"))
    trainer = cpu_trainer(tmp_path, epochs=3)
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_images"] == 500
    assert metrics["accuracy"] > 40.0, "10 classes: chance is 10%"
    assert set(metrics["per_class_accuracy"]) == set(datamodule.classes)
    per_class = list(metrics["per_class_accuracy"].values())
    assert min(per_class) <= metrics["accuracy"] <= max(per_class)
    assert metrics["val_acc_best"] > 30.0

    report = capsys.readouterr().out
    assert re.search(r"Accuracy of the network on the 500 test images: \d+\.\d{6} %", report)
    assert len(re.findall(r"^Accuracy of +\w+ : \d+ %$", report, re.MULTILINE)) == 10


def test_training_scalars_reach_the_loggers(tmp_path: Path):
    """Step values every ``log_every_n_steps`` steps, epoch means once per epoch."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    datamodule = synthetic_datamodule(train=500, test=100, val=100, batch=50)  # 8 steps an epoch
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=3,
        logger=CSVLogger(tmp_path, name="csv", version=0),
    )  # fmt: skip
    trainer.fit(ClassifierModule(create_model("resnet8")), datamodule=datamodule)

    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    logged = {(int(row["step"]), key) for row in rows for key, value in row.items() if value}
    assert sorted(s for s, key in logged if key == "train/loss_step") == [0, 3, 6, 9, 12, 15]
    epoch_means = [row for row in rows if row.get("train/loss")]
    assert len(epoch_means) == 2 and all(0.0 <= float(r["train/acc"]) <= 1.0 for r in epoch_means)
    assert set(trainer.callback_metrics) >= {"train/loss", "train/acc", "val/acc"}


def test_checkpoint_records_the_model(tmp_path: Path):
    """A checkpoint holds the model's name and arguments, to rebuild a teacher from it."""
    module = ClassifierModule(create_model("resnet20", width=0.5))
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["kdlight"]["model_spec"] == {
        "name": "resnet20",
        "num_classes": 10,
        "width": 0.5,
    }


def test_readme_python_snippet_runs(tmp_path: Path, monkeypatch):
    text = README.read_text()
    snippet = text.split("<!-- api-snippet")[1].split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, str(README), "exec"), {})
    metrics = json.loads((tmp_path / "outputs" / "api-demo" / "metrics.json").read_text())
    assert metrics["model"] == "small_cnn" and metrics["test_images"] == 2000
