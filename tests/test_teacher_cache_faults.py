"""The teacher cache under faults, made for real: a full disk (a small tmpfs), a read-only
mount (both in a user + mount namespace, ``unshare -rm``), truncated files, a regular file
where its folder goes, logits overwritten with garbage or NaN, ``trainer=gpu`` without a
GPU. Each is one line (a warning, and the run goes on with the live teacher; or an error),
never a traceback or a SIGBUS. A test that cannot make its mount fails: it does not skip."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from kdlight.cli.cache_teacher import main as cache_teacher_main
from kdlight.errors import KDLightError
from kdlight.lit import DistillationModule
from kdlight.models import create_model
from kdlight.teacher.cache import VARIANTS, TeacherCache
from tests.conftest import REPO, cpu_trainer, synthetic_datamodule

IMAGES = 100  # the synthetic training split of the runs below (val=0)


def in_namespace(mounts: str, *command: str) -> subprocess.CompletedProcess:
    """``command`` in a new user + mount namespace after the shell lines ``mounts`` (run
    as the namespace's root, which may mount tmpfs and bind mounts). Fails the test, not
    skips it, where such a namespace cannot be made."""
    if shutil.which("unshare") is None:
        pytest.fail("this fault test needs unshare (util-linux) to mount a real filesystem")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"this fault test needs a user + mount namespace: {probe.stderr.strip()}")
    script = f'set -e\n{mounts}\nexec "$@"'
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", *command],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
             "PYTHONUNBUFFERED": "1"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def save_teacher(folder: Path) -> Path:
    torch.manual_seed(0)
    path = folder / "teacher.pt"
    torch.save(create_model("resnet8").state_dict(), path)
    return path


def distill(teacher: torch.nn.Module, root: Path, data_dir: Path, epochs: int = 1):
    """A small KD fit with the cache on, as each test's run: the module and its record."""
    L.seed_everything(0)
    student = create_model("small_cnn", width=0.25)
    module = DistillationModule(student, teacher=teacher, teacher_cache=True)
    data = synthetic_datamodule(IMAGES, 50, 0, 50, data_dir=data_dir)
    cpu_trainer(root, epochs=epochs, limit_val_batches=0).fit(module, datamodule=data)
    return module, module.frozen.cache_record()["teacher_cache"]


def kdlight_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------- a full disk
def command_line(tmp_path: Path, data_dir: Path) -> list[str]:
    """A tiny distillation run on synthetic data with the cache on, its data folder ``data_dir``."""
    return [
        "experiment=distill", "trainer=cpu", "data=synthetic",
        f"data.synthetic_train_size={IMAGES}", "data.synthetic_test_size=40", "data.val_size=0",
        "data.batch_size=50", "data.eval_batch_size=100", "model=small_cnn", "model.width=0.25",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
        f"distill.teacher_checkpoint={save_teacher(tmp_path)}", "distill.teacher_model=resnet8",
        "distill.teacher_cache=true", f"paths.data_dir={data_dir}",
        f"paths.root={tmp_path / 'outputs'}",
    ]  # fmt: skip


FULL_DISK = """
import os, sys
from kdlight.cli.cache_teacher import main as cache_teacher_main
from kdlight.train import main as train_main

data_dir, command = sys.argv[1], sys.argv[2:]
sys.argv = ["kdlight-train", *command]
try:
    train_main()
    status = 0
except SystemExit as stop:
    status = stop.code
print(f"=== kdlight-train: {status}", file=sys.stderr, flush=True)
status = cache_teacher_main(command)
print(f"=== kdlight-cache-teacher: {status}", file=sys.stderr, flush=True)
print("left:", os.listdir(os.path.join(data_dir, "teacher_cache")), file=sys.stderr)

# a cache an older kdlight made (sparse: its space not reserved) on the full disk
from kdlight.teacher.cache import TeacherCache
sparse = os.path.join(data_dir, "sparse")
os.mkdir(sparse)
for suffix, size in ((".logits", 64 * 162 * 10 * 4), (".filled", 64 * 162)):
    with open(os.path.join(sparse, "key" + suffix), "wb") as file:
        file.truncate(size)
cache = TeacherCache(sparse, "key", 64, 10)
print("=== sparse:", cache.writable, *cache.notes, file=sys.stderr)
"""


def test_a_full_disk_is_one_line_not_a_sigbus(tmp_path: Path):
    """The cache's folder on a 200 kB tmpfs, too small for its logits (650 kB): the files'
    space is reserved when they are made, so that fails at once, and kdlight-train trains
    with the live teacher after one warning; kdlight-cache-teacher says one error line.
    Before, both died of SIGBUS (exit -7) on the first write into the map. A sparse cache
    (made by an older kdlight) there is opened read-only. (Both commands' ``main`` in one
    process in the namespace: one start of Python and torch, not two.)"""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (tmp_path / "script.py").write_text(FULL_DISK)
    command = command_line(tmp_path, data_dir)
    mount = f"mount -t tmpfs -o size=200k tmpfs {data_dir}"
    result = in_namespace(mount, sys.executable, str(tmp_path / "script.py"), str(data_dir),
                          *command)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    train_log, cache_log, left, sparse = result.stderr.split("=== ")[-4:]
    output = result.stdout + train_log
    assert cache_log.startswith("kdlight-train: 0"), output[-3000:]
    assert "Traceback" not in output
    (warning,) = [line for line in output.splitlines() if "teacher_cache: not used" in line]
    assert "cannot be made here: No space left on device; the teacher runs live" in warning
    (metrics,) = (tmp_path / "outputs").rglob("metrics.json")  # the run finished
    record = json.loads(metrics.read_text())
    assert record["teacher_cache"] == {"used": False, "hit_rate": None, "path": None}

    assert left.startswith("kdlight-cache-teacher: 2"), cache_log
    assert "Traceback" not in cache_log
    (error,) = [line for line in cache_log.splitlines() if line.startswith("error:")]
    assert error.startswith("error: teacher cache ") and error.endswith(
        "cannot be made here: No space left on device"
    )
    assert left.endswith("left: []\n")  # no partial file is left in the folder
    assert sparse == (  # read-only: no write can fault
        f"sparse: False teacher cache {data_dir}/sparse/key cannot reserve its space on disk "
        "(No space left on device): its hits are used, the misses computed live and not stored\n"
    )


# ---------------------------------------------------------------- damaged or misplaced
@pytest.mark.parametrize("damaged", [".logits", ".filled"])
def test_a_truncated_file_is_made_again_with_one_note(tmp_path: Path, damaged: str):
    cache = TeacherCache(tmp_path, "key", 64, 10)
    index, params = torch.arange(4), torch.tensor([[0, 0, 0], [1, 2, 1], [8, 8, 1], [4, 4, 0]])
    cache.store(index, params, torch.ones(4, 10))
    path = cache.path.with_suffix(damaged)
    size = path.stat().st_size
    os.truncate(path, size // 2)

    again = TeacherCache(tmp_path, "key", 64, 10)
    (note,) = again.notes
    assert note == (
        f"teacher cache {again.path} was damaged (key{damaged} holds {size // 2} bytes, "
        f"not {size}): made again, empty"
    )
    assert again.writable and not again.lookup(index, params)[1].any()
    assert again.logits.shape == (64, VARIANTS, 10) and again.filled.shape == (64, VARIANTS)
    assert TeacherCache(tmp_path, "key", 64, 10).notes == []  # whole now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.filled", "key.logits"]


def test_a_run_on_a_damaged_cache_warns_once_and_fills_it_anew(tmp_path: Path, caplog):
    teacher = create_model("resnet8").eval()
    module, _ = distill(teacher, tmp_path / "first", tmp_path / "data")
    logits = module.frozen.cache.path.with_suffix(".logits")
    os.truncate(logits, 1000)
    with caplog.at_level(logging.INFO, logger="kdlight"):
        again, record = distill(teacher, tmp_path / "again", tmp_path / "data")
    (warning,) = kdlight_warnings(caplog)
    assert warning.startswith(f"teacher cache {again.frozen.cache.path} was damaged (")
    assert record["used"] and record["hit_rate"] < 0.05  # filled anew, as the first run did
    assert logits.stat().st_size == IMAGES * VARIANTS * 10 * 4


def test_a_regular_file_where_the_cache_folder_goes_keeps_the_teacher_live(tmp_path: Path, caplog):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "teacher_cache").write_text("not a folder")
    with caplog.at_level(logging.INFO, logger="kdlight"):
        module, record = distill(create_model("resnet8").eval(), tmp_path, tmp_path / "data")
    (warning,) = kdlight_warnings(caplog)
    assert warning.startswith(
        f"distill.teacher_cache: not used: cannot make the folder {tmp_path / 'data'}"
    ) and warning.endswith("; the teacher runs live")
    assert module.frozen.cache is None and record == {"used": False, "hit_rate": None, "path": None}


# ------------------------------------------------------------------------ read-only
READ_ONLY_RUNS = """
import json, logging, sys
from pathlib import Path
import torch
from kdlight.cli.cache_teacher import main as cache_teacher_main
from kdlight.models import create_model
from tests.test_teacher_cache_faults import distill

logging.basicConfig(level=logging.INFO, format="log: %(message)s")
folder = Path(sys.argv[1])
teacher = create_model("resnet8")
teacher.load_state_dict(torch.load(folder / "teacher.pt", weights_only=True))
teacher.eval()
warm, warm_record = distill(teacher, folder / "warm", folder / "data")
live, live_record = distill(teacher, folder / "live", folder / "empty")
print("records", json.dumps([warm_record, live_record]))
print("filled", int(warm.frozen.cache.filled.sum()))
print("status", cache_teacher_main(sys.argv[2:]))
"""


def test_a_read_only_cache_gives_its_hits_and_a_read_only_folder_keeps_the_teacher_live(
    tmp_path: Path,
):
    """A filled cache on a read-only mount (a shared data set) is read: its hits are used,
    the misses computed live and not stored, said once. A read-only data folder with no
    cache: one warning, the teacher live. kdlight-cache-teacher there: one error line.
    Before, opening the files for writing raised (a traceback)."""
    teacher_file = save_teacher(tmp_path)
    teacher = create_model("resnet8")
    teacher.load_state_dict(torch.load(teacher_file, weights_only=True))
    first, _ = distill(teacher.eval(), tmp_path / "first", tmp_path / "data")
    filled = int(first.frozen.cache.filled.sum())
    (tmp_path / "empty").mkdir()
    (tmp_path / "script.py").write_text(READ_ONLY_RUNS)
    mounts = "\n".join(
        f"mount --bind {d} {d}\nmount -o remount,bind,ro {d}"
        for d in (tmp_path / "data", tmp_path / "empty")
    )
    command = command_line(tmp_path, tmp_path / "empty")
    result = in_namespace(mounts, sys.executable, str(tmp_path / "script.py"), str(tmp_path),
                          *command)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    said = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    warm, live = json.loads(said["records"])
    assert warm["used"] and warm["hit_rate"] == 1.0  # the same draws as the filling run
    assert int(said["filled"]) == filled  # nothing was stored
    assert live == {"used": False, "hit_rate": None, "path": None}
    assert said["status"] == "2"

    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    notes = [line for line in lines if "teacher cache" in line or "teacher_cache" in line]
    assert notes[0] == (
        f"log: teacher cache {first.frozen.cache.path} is read-only (Read-only file system): its "
        "hits are used, the misses computed live and not stored"
    )
    assert notes[2] == (
        f"log: distill.teacher_cache: not used: cannot make the folder {tmp_path}/empty/"
        "teacher_cache: Read-only file system; the teacher runs live"
    )
    (error,) = [line for line in lines if line.startswith("error:")]
    assert error == (
        f"error: cannot make the folder {tmp_path}/empty/teacher_cache: Read-only file system"
    )


# ---------------------------------------------------------------------- wrong contents
@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda logits: np.random.default_rng(0).normal(0, 3, logits.shape), "differ from"),
        (lambda logits: np.full(logits.shape, np.nan), "holds NaN or infinite logits"),
    ],
    ids=["garbage", "nan"],
)
def test_logits_overwritten_stop_the_run_in_one_line_naming_the_cache(
    tmp_path: Path, damage, said: str
):
    """Finite garbage is found by the check of each epoch's first batch against the live
    teacher; NaN when read. Before, garbage was taught silently and NaN ended as a
    non-finite loss that did not name the cache."""
    teacher = create_model("resnet8").eval()
    module, _ = distill(teacher, tmp_path / "first", tmp_path / "data")
    cache = module.frozen.cache
    filled = cache.filled.astype(bool)
    cache.logits[filled] = damage(cache.logits[filled]).astype(np.float32)
    cache.logits.flush()
    with pytest.raises(KDLightError) as raised:
        distill(teacher, tmp_path / "again", tmp_path / "data")
    message = str(raised.value)
    assert message.startswith(f"teacher cache {cache.path}.logits") and said in message
    assert message.endswith(
        f"delete {cache.path.name}.logits and {cache.path.name}.filled in {cache.path.parent} "
        "and launch again (the runs, or kdlight-cache-teacher, fill it anew)"
    )
    assert "\n" not in message


# ---------------------------------------------------------------- kdlight-cache-teacher
def test_cache_teacher_on_a_device_that_is_not_here_says_one_line(tmp_path: Path, capsys):
    """As kdlight-train says it (its build_trainer): no traceback."""
    accelerator = "mps" if torch.cuda.is_available() else "gpu"  # one this machine lacks
    command = command_line(tmp_path, tmp_path / "data")
    assert cache_teacher_main([*command, f"trainer.accelerator={accelerator}"]) == 2
    (error,) = capsys.readouterr().err.splitlines()
    assert error.startswith(f"error: trainer settings (accelerator={accelerator}, devices=1): ")
