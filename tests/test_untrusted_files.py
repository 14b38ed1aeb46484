"""Nothing read from a file runs code: a model spec naming a function (the teacher, a file for
``load_model``, the CLI's teacher), a planted pickle as ``ckpt_path=`` or as a run folder's
``last.ckpt``, a planted CIFAR pickle, and a run lock that is a link to a file elsewhere.

Each fault is planted for real: the file would create a marker file, or truncate a file
outside the run, if kdlight ran what it names; the tests check that it did not and that the
refusal is one line naming what was refused.
"""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdlight.data.sources import CIFAR100_SPEC, load_torchvision
from kdlight.errors import KDLightError, find_user_error
from kdlight.lit import load_teacher
from kdlight.lit.loading import load_model
from kdlight.models.registry import check_recorded_spec, trust_targets
from kdlight.runs.guard import hold_run_lock
from kdlight.runs.identity import identify
from kdlight.teacher.find import resolve_teacher
from kdlight.train import resume_checkpoint, train
from kdlight.trainer.checkpointing import AtomicCheckpointIO, UnreadableCheckpoint
from tests.conftest import TINY, compose_config, run_cli
from tests.test_data_cifar100 import write_official

pytestmark = pytest.mark.fault  # each test plants a file that would run code or harm one

PRECIOUS = b"a file outside the run, which nothing of kdlight's may change\n"


@pytest.fixture(autouse=True)
def no_trusted_targets():
    """Each test starts, and leaves the process, with no targets trusted by setting."""
    trust_targets(None)
    yield
    trust_targets(None)


@pytest.fixture
def precious(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere" / "precious.txt"
    path.parent.mkdir()
    path.write_bytes(PRECIOUS)
    return path


def opening(path: Path) -> dict:
    """A spec whose ``_target_`` opens ``path`` for writing: building it creates the file,
    or truncates it. (``builtins.open`` is not on the blocklist of the Hydra installed here,
    which refuses ``os.system`` and ``subprocess.run`` by itself.)"""
    return {"_target_": "builtins.open", "file": str(path), "mode": "w"}


def save_spec(path: Path, spec: dict, state_dict: dict | None = None) -> Path:
    """A checkpoint as kdlight writes it, recording ``spec`` as its model."""
    torch.save({"state_dict": state_dict or {}, "kdlight": {"model_spec": spec}}, path)
    return path


def one_line(error: BaseException) -> str:
    message = str(find_user_error(error) or error)
    assert "\n" not in message.strip(), message
    return message


# --------------------------------------------------------------------- model specs in files
@pytest.mark.parametrize("reader", ["load_teacher", "load_model"])
def test_a_planted_model_spec_is_refused_and_runs_nothing(tmp_path: Path, precious, reader):
    planted = save_spec(tmp_path / "planted.ckpt", opening(precious))
    read = load_teacher if reader == "load_teacher" else load_model
    with pytest.raises(KDLightError) as refused:
        read(planted)
    assert precious.read_bytes() == PRECIOUS  # not opened for writing, so not truncated
    message = one_line(refused.value)
    assert str(planted) in message and "built by builtins.open" in message
    assert "trusted_targets=[builtins.open]" in message


def test_every_nested_target_must_be_trusted(tmp_path: Path, precious):
    """Hydra builds nested configs (in ``_args_`` too) before the outer one: trusting the
    outer target trusts nothing inside it."""
    spec = {"_target_": "torch.nn.Sequential", "_args_": [opening(precious)]}
    planted = save_spec(tmp_path / "nested.ckpt", spec)
    with pytest.raises(KDLightError, match="built by builtins.open"):
        load_model(planted, trusted_targets=["torch.nn.Sequential"])
    with pytest.raises(KDLightError, match="built by builtins.open"):
        load_teacher(planted, {"_target_": "torch.nn.Sequential"})  # the user's: only the outer
    assert precious.read_bytes() == PRECIOUS
    interpolated = {"_target_": "torch.nn.Linear", "in_features": "${oc.env:HOME}"}
    with pytest.raises(KDLightError, match=r"interpolation '\$\{oc.env:HOME\}'"):
        check_recorded_spec(interpolated, "f.ckpt", ["torch.nn.Linear"])


def test_a_teacher_spec_planted_for_the_cli_is_refused(tmp_path: Path, precious):
    """The CLI's teacher (``distill.teacher_checkpoint``), with a spec whose registered name
    is the teacher's, so that it passes the name check: ``trusted_targets`` (the setting)
    trusts the outer target, and the nested one is still refused."""
    spec = {"name": "resnet8", "_target_": "torch.nn.Sequential", "_args_": [opening(precious)]}
    planted = save_spec(tmp_path / "teacher.ckpt", spec)
    cfg = compose_config(
        [
            "experiment=distill", *TINY, "model=resnet8", "distill.teacher_model=resnet8",
            f"distill.teacher_checkpoint={planted}", "trusted_targets=[torch.nn.Sequential]",
        ],
        tmp_path / "out",
    )  # fmt: skip
    with pytest.raises(Exception) as refused:
        train(cfg)
    assert precious.read_bytes() == PRECIOUS
    message = one_line(refused.value)
    assert f"teacher checkpoint {planted} records a model built by builtins.open" in message


def test_a_trusted_target_loads(tmp_path: Path):
    """A user model is rebuilt when its target is trusted: by ``trusted_targets=`` (code), by
    the setting (the CLI, for the process), by the user's own config or built module."""
    linear = nn.Linear(4, 3)
    spec = {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 3}
    weights = {f"model.{k}": v for k, v in linear.state_dict().items()}
    path = save_spec(tmp_path / "linear.ckpt", spec, weights)

    def same(model: nn.Module) -> bool:
        return isinstance(model, nn.Linear) and torch.equal(model.weight, linear.weight)

    with pytest.raises(KDLightError, match=r"trusted_targets=\[torch.nn.Linear\]"):
        load_teacher(path)
    assert same(load_teacher(path, trusted_targets=["torch.nn.Linear"]))
    assert same(load_model(path, trusted_targets=["torch.nn.Linear"]))
    assert same(load_teacher(path, dict(spec)))  # the user's own config
    mine = nn.Linear(4, 3)
    assert load_teacher(path, mine) is mine and same(mine)  # the user's own module, as it is

    cfg = compose_config(
        [
            "experiment=distill",
            f"distill.teacher_checkpoint={path}",
            "trusted_targets=[torch.nn.Linear]",
        ],
        tmp_path / "out",
    )
    resolve_teacher(cfg)  # what kdlight-train and kdlight-cache-teacher do first
    assert same(load_teacher(path)) and same(load_model(path))
    cfg.trusted_targets = "torch.nn.Linear"  # not a list
    with pytest.raises(KDLightError, match="trusted_targets=.* is not allowed: a list of dotted"):
        resolve_teacher(cfg)


def test_trusting_a_target_is_not_part_of_a_runs_identity(tmp_path: Path):
    """What may be built from a file changes no number: the same run, the same folder."""
    plain = compose_config(["experiment=teacher"], tmp_path)
    trusting = compose_config(["experiment=teacher", "trusted_targets=[torch.nn.Linear]"], tmp_path)
    assert identify(plain).id == identify(trusting).id


# -------------------------------------------------------------------- planted checkpoints
class Planted:
    """Unpickled, it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_pickle(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0, "x": Planted(marker)}, path)
    return path


def truncated(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:600])
    return path


@pytest.mark.parametrize("fault", ["planted pickle", "truncated"])
def test_an_unsafe_or_cut_checkpoint_to_evaluate_is_one_line(tmp_path: Path, fault):
    marker = tmp_path / "marker"
    file = tmp_path / "given.ckpt"
    plant_pickle(file, marker) if fault == "planted pickle" else truncated(file)
    cfg = compose_config(
        ["experiment=teacher", *TINY, "model=resnet8", "train=false", f"ckpt_path={file}"],
        tmp_path / "out",
    )
    with pytest.raises(Exception) as refused:
        train(cfg)
    assert not marker.exists()
    message = one_line(refused.value)
    assert message.startswith(f"cannot read checkpoint {file} (")
    if fault == "planted pickle":
        assert "posix.system" in message and "not loaded" in message


def test_a_planted_last_ckpt_is_not_resumed(tmp_path: Path):
    marker = tmp_path / "marker"
    cfg = compose_config(["experiment=teacher", *TINY], tmp_path / "run")
    last = plant_pickle(tmp_path / "run" / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(UnreadableCheckpoint) as refused:
        resume_checkpoint(tmp_path / "run", identify(cfg))
    assert not marker.exists()
    assert "posix.system" in one_line(refused.value) and "move it away" in str(refused.value)
    with pytest.raises(UnreadableCheckpoint):  # how Lightning's fit and test read a checkpoint
        AtomicCheckpointIO().load_checkpoint(last, weights_only=False)
    assert not marker.exists()


# ------------------------------------------------------------------------- CIFAR pickles
def test_a_planted_cifar_pickle_is_refused(tmp_path: Path):
    written = write_official(tmp_path, train_per_class=1)
    folder = tmp_path / "cifar-100-python"
    # the official files were written by Python 2's numpy: protocol 2, numpy.core's names
    entry = pickle.loads((folder / "test").read_bytes())
    old = pickle.dumps(entry, protocol=2).replace(b"cnumpy._core.", b"cnumpy.core.")
    assert b"cnumpy.core.multiarray\n_reconstruct" in old
    (folder / "test").write_bytes(old)
    splits = load_torchvision(tmp_path, False, CIFAR100_SPEC)
    assert np.array_equal(splits["test"].images, written["test"][0])

    marker = tmp_path / "marker"
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": Planted(marker)}))
    with pytest.raises(KDLightError) as refused:
        load_torchvision(tmp_path, False, CIFAR100_SPEC)
    assert not marker.exists()
    message = one_line(refused.value)
    assert f"cannot read {folder / 'meta'} (it names posix.system" in message


# ------------------------------------------------------------------------------ run lock
@pytest.mark.parametrize("kind", ["symbolic link", "hard link", "fifo"])
def test_a_run_lock_that_is_not_the_runs_own_file_is_left_alone(tmp_path: Path, precious, kind):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / ".lock"
    if kind == "symbolic link":
        lock.symlink_to(precious)
    elif kind == "hard link":
        os.link(precious, lock)
    else:
        os.mkfifo(lock)
    with pytest.raises(KDLightError) as refused, hold_run_lock(run):
        pass
    assert precious.read_bytes() == PRECIOUS
    assert f"the run lock {lock} " in one_line(refused.value)


def test_a_launch_with_a_linked_lock_says_one_line(tmp_path: Path, precious):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(precious)
    result = run_cli(["experiment=teacher", *TINY, f"paths.output_dir={run}"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert precious.read_bytes() == PRECIOUS
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: the run lock {run / '.lock'} is a symbolic link (to {precious}), which kdlight "
        "does not follow: it writes only into the run's own lock file; remove the link"
    ]
    assert "Traceback" not in result.stderr
