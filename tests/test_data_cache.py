"""The decoded-archive cache: one per user by default, keyed on what the archive holds, and
trustworthy after damage, kills, read-only and full folders (real ones, not mocks)."""

import io
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from kdlight.data import CIFAR10DataModule, Split, default_data_dir, load_archive, sources
from kdlight.data.cache import STALE_AFTER_S, cache_file
from kdlight.errors import KDLightError
from kdlight.runs.files import TEMP_SUFFIX
from tests.conftest import TINY, can_unshare, compose_config
from tests.test_data import (
    TEST_PER_CLASS,
    TRAIN_PER_CLASS,
    check_fake_splits,
    colour_label,
    write_image_tree,
)

CACHE_LOG = "kdlight.data.cache"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_image_tree(tmp_path / "cifar10")


def colours_of(split: Split, label: int) -> list[int]:
    """The class whose colour each image labelled ``label`` has."""
    return [colour_label(image) for image in split.images[split.labels == label]]


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(f".*{TEMP_SUFFIX}"))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == CACHE_LOG]


def run_python(script: str, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """``script`` in a new Python process (after ``prefix``, e.g. ``unshare``)."""
    return subprocess.Popen(
        [*prefix, sys.executable, "-c", textwrap.dedent(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# ------------------------------------------------------------------- one cache per user


def test_default_data_dir_is_one_cache_per_user(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KDLIGHT_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_data_dir() == tmp_path / "home" / ".cache" / "kdlight"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored (XDG spec)
    assert default_data_dir() == tmp_path / "home" / ".cache" / "kdlight"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "kdlight"

    for launch_folder in (tmp_path / "a", tmp_path / "b"):  # not relative to the launch folder
        launch_folder.mkdir()
        monkeypatch.chdir(launch_folder)
        cfg = compose_config(TINY, tmp_path / "out")
        assert cfg.paths.data_dir == cfg.data.data_dir == str(tmp_path / "xdg" / "kdlight")
        assert CIFAR10DataModule(source="synthetic").data_dir == tmp_path / "xdg" / "kdlight"

    monkeypatch.setenv("KDLIGHT_DATA", str(tmp_path / "mine"))
    assert default_data_dir() == tmp_path / "mine"
    assert compose_config(TINY, tmp_path / "out").paths.data_dir == str(tmp_path / "mine")


def test_importing_kdlight_data_registers_the_resolver_without_torch(tmp_path: Path):
    """``kdlight/__init__.py`` imports ``kdlight.data`` for the resolver: that must stay light."""
    script = """
        import sys
        from omegaconf import OmegaConf
        import kdlight.data
        print(OmegaConf.create({"d": "${kdlight.data_cache:}"}).d)
        print("torch" in sys.modules)
    """
    env = {**os.environ, "KDLIGHT_DATA": str(tmp_path / "d")}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "d"), "False"]


# ------------------------------------------------------------- the cache notices changes


def test_a_deleted_class_folder_is_noticed(tree: Path, tmp_path: Path):
    """The tree's top folder keeps its size and time when a folder below it goes."""
    cache = tmp_path / "cache"
    load_archive(tree, cache)
    shutil.rmtree(tree / "test" / "frog")
    with pytest.raises(KDLightError, match="missing under 'test/': frog"):
        load_archive(tree, cache)


def test_deleted_and_replaced_images_are_noticed(tree: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    top = tree.stat()
    check_fake_splits(load_archive(tree, cache))

    (tree / "train" / "cat" / "1.jpg").unlink()
    os.utime(tree, ns=(top.st_atime_ns, top.st_mtime_ns))
    assert len(load_archive(tree, cache)["train"]) == 10 * TRAIN_PER_CLASS - 1

    # test/cat/0.png becomes a dog (same name, same folder), with another modification time
    dog = tree / "test" / "dog" / "0.png"
    cat = tree / "test" / "cat" / "0.png"
    cat_time = cat.stat().st_mtime_ns
    shutil.copyfile(dog, cat)
    os.utime(cat, ns=(cat_time + 10**9, cat_time + 10**9))
    cats = colours_of(load_archive(tree, cache)["test"], 3)
    assert sorted(cats) == [3] * (TEST_PER_CLASS - 1) + [5]


def test_a_rewritten_tar_gz_of_the_same_size_and_time_is_noticed(tree: Path, tmp_path: Path):
    """Cat and dog images swapped in a .tar.gz that keeps its size and modification time:
    the gzip trailer's CRC-32 (part of the fingerprint) tells them apart."""

    def write_tar_gz(path: Path) -> Path:
        # Level 0: the file's size depends on the tar's size only, which the swap keeps.
        with tarfile.open(path, "w:gz", compresslevel=0) as archive:
            archive.add(tree, arcname="cifar10")
        return path

    archive, cache = write_tar_gz(tmp_path / "cifar10.tar.gz"), tmp_path / "cache"
    before = archive.stat()
    check_fake_splits(load_archive(archive, cache))

    (tree / "train" / "cat").rename(tree / "train" / "tmp")
    (tree / "train" / "dog").rename(tree / "train" / "cat")
    (tree / "train" / "tmp").rename(tree / "train" / "dog")
    write_tar_gz(archive)
    os.utime(archive, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert archive.stat().st_size == before.st_size  # the case to catch

    cats = colours_of(load_archive(archive, cache)["train"], 3)
    assert cats == [5] * TRAIN_PER_CLASS  # the images in the cat folder are now dogs
    assert len(list(cache.glob("*.npz"))) == 2


# ----------------------------------------------------------------- a damaged cache file


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_a_pixel_byte(data: bytes) -> bytes:
    middle = len(data) // 3  # inside train_x's pixels
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


def _other_arrays(data: bytes) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, train_x=np.zeros((2, 8, 8), np.uint8), train_y=np.zeros(2, np.int64))
    return buffer.getvalue()


@pytest.mark.fault
@pytest.mark.parametrize(
    "damage",
    [_truncate, _flip_a_pixel_byte, _other_arrays, lambda data: b"", lambda data: b"junk" * 99],
    ids=["truncated", "flipped-byte", "other-arrays", "empty", "junk"],
)
def test_a_damaged_cache_is_decoded_again_and_replaced(
    tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch, damage
):
    cache_dir = tmp_path / "cache"
    load_archive(tree, cache_dir)
    (cache,) = cache_dir.glob("*.npz")
    cache.write_bytes(damage(cache.read_bytes()))

    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        check_fake_splits(load_archive(tree, cache_dir))
    (warning,) = warnings_of(caplog)
    assert warning.startswith(f"data cache {cache} cannot be read (") and "\n" not in warning

    def must_not_decode(path: Path):
        raise AssertionError("the replaced cache should have been read")

    monkeypatch.setattr(sources, "decode_archive", must_not_decode)
    caplog.clear()
    check_fake_splits(load_archive(tree, cache_dir))
    assert warnings_of(caplog) == [] and list(cache_dir.iterdir()) == [cache]


# ----------------------------------------------------------------- a writer killed mid-way

KILLED_WRITER = """
    import os, sys, time
    from kdlight.data import load_archive

    def stall(fd):  # the cache's bytes are in the temporary file, not yet renamed
        print("writing", flush=True)
        time.sleep(600)

    os.fsync = stall
    load_archive(sys.argv[1], sys.argv[2])
"""


@pytest.mark.fault
def test_a_writer_killed_during_the_write_leaves_nothing_that_lasts(tree: Path, tmp_path: Path):
    cache_dir = tmp_path / "cache"
    writer = run_python(KILLED_WRITER, str(tree), str(cache_dir))
    try:
        assert select.select([writer.stdout], [], [], 120)[0], "the writer never wrote"
        assert writer.stdout.readline() == "writing\n", writer.stderr.read()
        (temporary,) = temporaries(cache_dir)
        assert temporary.stat().st_size > 10 * (TRAIN_PER_CLASS + TEST_PER_CLASS) * 3072
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    assert writer.returncode == -signal.SIGKILL
    assert list(cache_dir.iterdir()) == [temporary]  # no cache, the killed writer's leftover

    # Just killed, it looks like a live writer's: the next load leaves it and caches.
    check_fake_splits(load_archive(tree, cache_dir))
    assert sorted(cache_dir.iterdir()) == [temporary, cache_file(tree, cache_dir)]

    # Once it is older than a writer could be, the next load removes it.
    stale = time.time() - STALE_AFTER_S - 1
    os.utime(temporary, (stale, stale))
    check_fake_splits(load_archive(tree, cache_dir))
    assert list(cache_dir.iterdir()) == [cache_file(tree, cache_dir)]


# ------------------------------------------------------- folders that cannot take a cache

IN_A_MOUNT = """
    import os, sys
    from kdlight.data import load_archive

    splits = load_archive(sys.argv[1], sys.argv[2])
    print(len(splits["train"]), len(splits["test"]), os.listdir(sys.argv[2]))
"""


# A user + mount namespace (unshare -rm) mounts a real read-only or full filesystem for one
# process, for any user, which root would not see with chmod.
@pytest.mark.fault
@pytest.mark.skipif(not can_unshare(), reason="needs unshare -rm (user and mount namespaces)")
@pytest.mark.parametrize(
    ("mount_options", "reason"),
    [("ro", "Read-only file system"), ("size=16k", "No space left on device")],
    ids=["read-only", "full"],
)
def test_a_folder_that_cannot_take_the_cache(
    tree: Path, tmp_path: Path, mount_options: str, reason: str
):
    """The data is decoded and used, with one warning line; nothing is left in the folder."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    mount = f'mount -t tmpfs -o {mount_options} tmpfs "$0" && exec "$@"'
    process = run_python(
        IN_A_MOUNT, str(tree), str(data_dir), prefix=("unshare", "-rm", "sh", "-c", mount, data_dir)
    )
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert stdout.split() == [str(10 * TRAIN_PER_CLASS), str(10 * TEST_PER_CLASS), "[]"]
    (warning,) = stderr.splitlines()  # one line, no traceback
    assert warning.startswith(f"cannot write the data cache in {data_dir} (") and reason in warning


def test_the_datamodule_loads_the_archive_once(tree: Path, tmp_path: Path, monkeypatch):
    """``kdlight-train`` calls ``prepare_data`` and ``setup`` on every process, and Lightning's
    ``fit`` calls ``prepare_data`` again: where the folder cannot hold a cache, each load would
    decode the whole archive (tens of seconds) again."""
    from kdlight.data import datamodule as datamodule_file

    loads = []

    def counted(path: Path, cache_dir: Path, dataset):
        loads.append(path)
        return load_archive(path, cache_dir, dataset)

    monkeypatch.setattr(datamodule_file, "load_archive", counted)
    datamodule = CIFAR10DataModule(archive_path=str(tree), data_dir=str(tmp_path), val_size=5)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.prepare_data()
    datamodule.setup("test")
    assert len(loads) == 1
    assert len(datamodule.train_set) + len(datamodule.val_set) == 10 * TRAIN_PER_CLASS
