"""kdlight.runs.files: files written whole or not at all, with the permissions a plain write gives,
strict JSON, and the clean-up of what a killed writer left."""

import errno
import json
import stat
from pathlib import Path

import pytest

from kdlight.runs.files import atomic_open, atomic_write, remove_stale_temporaries, write_json
from tests.test_atomic import mount_tmpfs, temporaries  # noqa: F401  (a fixture)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_file_gets_the_permissions_of_a_plain_write(tmp_path: Path):
    """Not mkstemp's private 0600: a checkpoint on shared storage stays readable by the
    group, as one written by ``open(path, "w")`` would be."""
    plain, atomic = tmp_path / "plain", tmp_path / "atomic"
    plain.write_bytes(b"x")
    atomic_write(atomic, b"x")
    assert mode(atomic) == mode(plain)


def test_a_replaced_file_keeps_its_permissions(tmp_path: Path):
    path = tmp_path / "metrics.json"
    path.write_text("{}")
    path.chmod(0o640)
    write_json(path, {"accuracy": 0.5})
    assert mode(path) == 0o640 and json.loads(path.read_text()) == {"accuracy": 0.5}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text("old\n")

    def half_then_fail(file) -> None:
        file.write(b"new, but only ha")
        raise KeyboardInterrupt  # a signal that raises, in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old\n" and temporaries(tmp_path) == []


@pytest.mark.fault
def test_a_full_filesystem_leaves_the_old_file_and_no_temporary(tmp_path: Path, mount_tmpfs):  # noqa: F811
    folder = mount_tmpfs(tmp_path / "small", 1)
    path = folder / "report.csv"
    atomic_write(path, "old\n")
    with pytest.raises(OSError) as caught, atomic_open(path, "w") as file:
        file.write("x" * (2 << 20))
    assert caught.value.errno == errno.ENOSPC
    assert path.read_text() == "old\n" and temporaries(folder) == []


def test_write_json_is_strict(tmp_path: Path):
    path = tmp_path / "metrics.json"
    with pytest.raises(ValueError):
        write_json(path, {"loss": float("nan")})
    assert not path.exists() and temporaries(tmp_path) == []


def test_remove_stale_temporaries_removes_only_temporaries(tmp_path: Path):
    kept = ["last.ckpt", ".hydra", "notes.tmp", ".last.ckpt"]
    for name in [*kept, ".last.ckpt.k3j9x_2a.tmp", ".metrics.json.0qz8w1ab.tmp"]:
        (tmp_path / name).touch()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".best.ckpt.abc.tmp").touch()  # not this folder's
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "sub"])
    assert (tmp_path / "sub" / ".best.ckpt.abc.tmp").exists()
