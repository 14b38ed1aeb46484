"""Trackers that cannot be used: an ``mlflow.db`` that is garbage, a folder, or locked by
another process, and a W&B run asked to log online with no server to reach. Each is one
error line before training, with the real file, a real second process holding the SQLite
lock and a real W&B client (its server a closed port on this machine: nothing leaves it),
nothing mocked. The MLflow cases build the Trainer in this process, as kdlight-train does;
the W&B one runs kdlight-train, where the W&B run starts."""

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdlight.errors import KDLightError, find_user_error
from kdlight.train import build_trainer
from kdlight.trainer.loggers import ELSEWHERE, LOCK_WAIT_S, MLFlowLogger, check_sqlite_store
from tests.conftest import TINY, compose_config, run_cli
from tests.test_settings import error_lines

pytestmark = pytest.mark.fault

#: A second process that holds an exclusive SQLite lock on argv[1] until it is killed.
HOLD_LOCK = (
    "import sqlite3, sys, time\n"
    "store = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "store.execute('CREATE TABLE IF NOT EXISTS runs (id TEXT)')\n"
    "store.execute('BEGIN EXCLUSIVE')\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


def build_mlflow_trainer(root: Path) -> str | None:
    """Build the Trainer of a ``logger=mlflow`` run as kdlight-train does, before it trains;
    the one line it refuses with (``kdlight-train`` prints it as ``error: ...``, exit 2),
    or None if it does not refuse."""
    cfg = compose_config([*TINY, "logger=mlflow", f"paths.root={root}"], root / "run")
    OmegaConf.resolve(cfg)
    try:
        build_trainer(cfg)
    except Exception as err:  # Hydra's instantiate wraps the logger's error
        known = find_user_error(err)
        assert known is not None, f"not a one-line error: {err!r}"
        return str(known)
    return None


def test_a_garbage_mlflow_db_is_one_line(tmp_path: Path):
    garbage = os.urandom(4096)
    (tmp_path / "mlflow.db").write_bytes(garbage)
    assert build_mlflow_trainer(tmp_path) == (
        f"the MLflow store {tmp_path}/mlflow.db is not an SQLite database (file is not a "
        f"database): move it away, or {ELSEWHERE}"
    )
    assert (tmp_path / "mlflow.db").read_bytes() == garbage  # left as it was


def test_an_mlflow_db_that_is_a_folder_is_one_line(tmp_path: Path):
    (tmp_path / "mlflow.db").mkdir()
    assert build_mlflow_trainer(tmp_path) == (
        f"the MLflow store {tmp_path}/mlflow.db is a folder, not an SQLite file: "
        f"move it away, or {ELSEWHERE}"
    )


def test_a_locked_mlflow_db_is_one_line_after_a_bounded_wait(tmp_path: Path):
    store = tmp_path / "mlflow.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(store)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        start = time.monotonic()
        refused = build_mlflow_trainer(tmp_path)
        waited = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()
    assert refused == (
        f"the MLflow store {store} is locked by another process (waited {LOCK_WAIT_S:g} s): "
        f"let it finish, or {ELSEWHERE}"
    )
    assert LOCK_WAIT_S <= waited < LOCK_WAIT_S + 10  # not MLflow's two minutes of retries
    check_sqlite_store(f"sqlite:///{store}")  # the lock gone, the same store is usable


def test_a_store_in_use_by_a_run_is_not_refused(tmp_path: Path):
    """A run logging beside this one holds the lock for a few milliseconds at a time:
    the check waits for it, and changes nothing in the file."""
    store = tmp_path / "mlflow.db"
    with sqlite3.connect(store) as db:
        db.execute("CREATE TABLE runs (id TEXT)")
    before = store.read_bytes()
    db = sqlite3.connect(store, isolation_level=None, check_same_thread=False)
    db.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(1.0, db.rollback)  # a write that ends within the wait
    release.start()
    try:
        check_sqlite_store(f"sqlite:///{store}")
    finally:
        release.join()
        db.close()
    assert store.read_bytes() == before


def test_a_store_mlflow_cannot_use_is_one_line_when_first_used(tmp_path: Path):
    """An SQLite file whose tables a newer MLflow made passes the check (it is a database,
    not locked); MLflow's own refusal, when the run logs its settings before training, is
    one line too."""
    store = tmp_path / "mlflow.db"
    with sqlite3.connect(store) as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        db.execute("INSERT INTO alembic_version VALUES ('ffffffffffff')")
    uri = f"sqlite:///{store}"
    logger = MLFlowLogger(experiment_name="train", tracking_uri=uri)
    with pytest.raises(KDLightError) as error:
        logger.log_hyperparams({"model.name": "small_cnn"})
    assert str(error.value) == (
        f"cannot open the MLflow store {uri}: Can't locate revision identified by 'ffffffffffff'"
    )


def test_an_mlflow_db_on_a_read_only_mount_is_one_line(tmp_path: Path, mount_tmpfs):
    """A store shared read-only (a tracking_uri outside paths.root) cannot take a run."""
    folder = mount_tmpfs(tmp_path / "shared", 1)
    db = sqlite3.connect(folder / "mlflow.db")
    db.execute("CREATE TABLE runs (id TEXT)")
    db.commit()
    db.close()
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    with pytest.raises(KDLightError) as error:
        logger = MLFlowLogger(experiment_name="train", tracking_uri=f"sqlite:///{folder}/mlflow.db")
        logger.log_hyperparams({"model.name": "small_cnn"})
    assert str(error.value) == (
        f"cannot open the MLflow store {folder}/mlflow.db: Read-only file system"
    )


def closed_port() -> int:
    """A local TCP port that nothing listens on: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_wandb_online_without_a_server_is_one_line_before_training(tmp_path: Path):
    home = str(tmp_path / "wandb-home")
    env = {"WANDB_CACHE_DIR": home, "WANDB_CONFIG_DIR": home, "WANDB_DATA_DIR": home}
    env |= {"WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}"}
    env |= {"WANDB_INIT_TIMEOUT": "3"}  # W&B's own bound (90 s by default), shortened here
    start = time.monotonic()
    result = run_cli([*TINY, "logger=wandb", "logger.wandb.offline=false"], tmp_path, **env)
    took = time.monotonic() - start
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = error_lines(result)
    assert line.startswith("error: W&B could not start an online run (")
    assert line.endswith(
        "): log offline with logger.wandb.offline=true (the default) and upload the run "
        "later with `wandb sync`"
    )
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.json"))
    assert took < 60, took
