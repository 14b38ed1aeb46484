"""The experiment trackers (``logger=mlflow``, ``logger=wandb``) beside the CSV log: the
choices compose with CSV kept, instantiate as ``kdlight-train`` does, a missing package is
one line, and a multirun writes each run into MLflow's SQLite store, an offline W&B run
and its CSV log (real MLflow and W&B, nothing mocked, nothing leaves the machine)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import OmegaConf

from kdlight.config.settings import check_extras, validate_settings
from kdlight.errors import KDLightError
from kdlight.runs.identity import identify
from kdlight.train import build_trainer
from kdlight.trainer.loggers import MLFlowLogger, WandbLogger, log_run_settings
from tests.conftest import TINY, compose_config, finish, run_cli
from tests.test_settings import error_lines, start_without

KINDS = {"csv": CSVLogger, "tensorboard": TensorBoardLogger}
KINDS |= {"mlflow": MLFlowLogger, "wandb": WandbLogger}


def logger_config(choice: str, tmp_path: Path):
    return compose_config([*TINY, f"logger={choice}", f"paths.root={tmp_path}"], tmp_path / "run")


@pytest.mark.parametrize(
    ("choice", "loggers"),
    [
        ("csv", ["csv"]),
        ("mlflow", ["csv", "mlflow"]),
        ("wandb", ["csv", "wandb"]),
        ("tensorboard", ["csv", "tensorboard"]),
        ("[mlflow,wandb]", ["csv", "mlflow", "wandb"]),
        ("[csv,tensorboard,mlflow,wandb]", ["csv", "tensorboard", "mlflow", "wandb"]),
    ],
)
def test_each_choice_keeps_the_csv_log(choice: str, loggers: list[str], tmp_path: Path):
    """Several trackers at once with ``logger=[...]``; the CSV log comes with each one, first
    (Lightning's ``trainer.log_dir`` is the first logger's)."""
    cfg = logger_config(choice, tmp_path)
    assert list(cfg.logger) == loggers
    validate_settings(cfg)
    OmegaConf.resolve(cfg)
    trainer = build_trainer(cfg)  # the loggers made as kdlight-train makes them
    assert [type(logger) for logger in trainer.loggers] == [KINDS[k] for k in loggers]
    assert not (tmp_path / "mlflow.db").exists()  # the store is opened when a run logs


def test_trackers_name_their_runs_by_the_run(tmp_path: Path):
    cfg = logger_config("[mlflow,wandb]", tmp_path)
    trackers = OmegaConf.to_container(cfg.logger, resolve=True)
    mlflow, wandb = trackers["mlflow"], trackers["wandb"]
    assert mlflow["tracking_uri"] == f"sqlite:///{tmp_path}/mlflow.db"  # under paths.root
    assert mlflow["experiment_name"] == wandb["group"] == "train"  # the `name` setting
    assert mlflow["run_name"] == wandb["name"] == identify(cfg).folder  # the run folder
    assert wandb["offline"] is True and wandb["save_dir"] == str(tmp_path / "run")


@pytest.mark.parametrize(
    ("choice", "blocked", "package"),
    [("mlflow", "mlflow", "mlflow"), ("mlflow", "alembic", "alembic"), ("wandb", "wandb", "wandb")],
)
def test_a_missing_package_names_the_extra(
    choice: str, blocked: str, package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setitem(sys.modules, blocked, None)  # as if it were not installed
    with pytest.raises(KDLightError) as error:
        check_extras(logger_config(choice, tmp_path))
    assert str(error.value) == (
        f"logger={choice} needs {package}, which is not installed: pip install 'kdlight[{choice}]'"
    )


def test_the_command_line_says_it_in_one_line_before_any_work(tmp_path: Path):
    args = [*TINY, "logger=[wandb,mlflow]"]
    result = finish(start_without("mlflow", "kdlight.train", args, tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_lines(result) == [
        "error: logger=mlflow needs mlflow, which is not installed: pip install 'kdlight[mlflow]'"
    ]
    assert not (tmp_path / "run" / "outputs").exists()


def test_runs_that_start_together_share_a_new_store(tmp_path: Path):
    """Processes that create a new SQLite store at once fail in MLflow's own table set-up
    (``duplicate column name``) unless they take turns."""
    uri = f"sqlite:///{tmp_path}/outputs/mlflow.db"
    script = (
        "import sys\nfrom kdlight.trainer.loggers import MLFlowLogger\n"
        f"logger = MLFlowLogger(experiment_name='together', tracking_uri={uri!r})\n"
        "logger.log_metrics({'val/acc': float(sys.argv[1])})\n"
    )
    starts = [
        subprocess.Popen([sys.executable, "-c", script, str(i)], stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    errors = [p.communicate(timeout=300)[1] for p in starts]
    assert [p.returncode for p in starts] == [0, 0], errors
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert sorted(run.data.metrics["val/acc"] for run in runs) == [0.0, 1.0]


def test_a_multirun_logs_each_run_to_mlflow_wandb_and_csv(tmp_path: Path):
    wandb_home = {f"WANDB_{key}_DIR": str(tmp_path / "wandb-home") for key in ("CACHE", "CONFIG")}
    args = ["-m", *TINY, "model=small_cnn", "model.width=0.25", "logger=[mlflow,wandb]"]
    result = run_cli([*args, "seed=0,1"], tmp_path, **wandb_home)
    assert result.returncode == 0, result.stderr[-3000:]
    root = tmp_path / "outputs"
    runs = {
        str(path.parent.relative_to(root / "train")): json.loads(path.read_text())
        for path in root.rglob("metrics.json")
    }
    assert len(runs) == 2

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("train")  # the `name` setting
    tracked = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_name for run in tracked) == sorted(runs)  # their run folders
    for run in tracked:
        metrics, params = run.data.metrics, run.data.params
        record = runs[run.info.run_name]
        assert run.info.status == "FINISHED"
        assert params["run.id"] == record["run"]["id"] and params["run.seed"] == str(
            record["run"]["seed"]
        )
        assert params["model.name"] == "small_cnn" and params["model.width"] == "0.25"
        assert params["optimizer.lr"] == "0.1" and params["batch_size"] == "50"  # Lightning's
        assert {"train/loss", "val/acc", "val/acc_best"} <= set(metrics)
        assert metrics["test/acc"] == pytest.approx(record["accuracy"] / 100)

    for folder in runs:
        run_dir = root / "train" / folder
        offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(offline) == 1  # one W&B run per run, not the multirun's first one
        uploaded = offline[0].read_bytes()  # by `wandb sync`: the metrics, the settings
        assert b"val/acc" in uploaded and b"model.name" in uploaded
        header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"val/acc", "test/acc"} <= set(header)


def test_each_mlflow_run_is_tagged_to_be_found_and_grouped(tmp_path: Path):
    """The tags a researcher filters by (``tags.method = 'dkd'``) and groups seeds by,
    read back from the real SQLite store with MLflow's client, and with
    ``mlflow.search_runs`` (a pandas DataFrame) as the README does: the ``mlflow`` extra
    brings pandas."""
    import mlflow
    from mlflow import MlflowClient

    zoo = ["experiment=zoo_distill", "pair=resnet32x4_resnet8x4", "distiller=dkd"]
    launches = {
        "dkd0": [*zoo, "seed=0"],
        "dkd1": [*zoo, "seed=1"],
        "baseline": ["experiment=student_baseline", "name=baseline"],
    }
    for key, overrides in launches.items():
        cfg = compose_config(
            [*TINY, *overrides, "logger=mlflow", f"paths.root={tmp_path}"], tmp_path / key
        )
        trainer = build_trainer(cfg)
        log_run_settings(trainer.loggers, identify(cfg))
        trainer.loggers[1].finalize("success")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, filter_string="tags.method = 'dkd'")
    assert len(found) == 2
    tags = {run.data.tags["seed"]: run.data.tags for run in found}
    for seed, tag in tags.items():
        assert {k: tag[k] for k in ("method", "model", "teacher", "pair", "seed")} == {
            "method": "dkd",
            "model": "resnet8x4",
            "teacher": "resnet32x4",
            "pair": "resnet32x4_resnet8x4",
            "seed": seed,
        }
        assert tag["accuracy_unit"].startswith("fraction")
    assert tags["0"]["group"] == tags["1"]["group"]  # the seeds the report averages
    assert tags["0"]["run_id"] != tags["1"]["run_id"]
    (baseline,) = client.search_runs(experiments, filter_string="tags.method = 'none'")
    assert baseline.data.tags["teacher"] == baseline.data.tags["pair"] == "none"
    assert baseline.data.tags["model"] == "small_cnn"
    assert baseline.data.tags["group"] != tags["0"]["group"]
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"pandas>=2"]' in pyproject.split("\nmlflow = [", 1)[1].split("\n", 1)[0]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.pair != 'none'")
    finally:
        mlflow.set_tracking_uri(previous)
    assert sorted(runs["tags.seed"]) == ["0", "1"] and set(runs["tags.method"]) == {"dkd"}
