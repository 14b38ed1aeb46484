"""ClassifierModule learns, reports over the whole test set, and works from plain Python."""

import json
import re
from pathlib import Path

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
