"""Shared fixtures: the real Hydra config composed for CPU and tiny data, the CLI in a
subprocess, the offline CIFAR-10 archive (decoded once per session), and what fault tests
need: a small real filesystem where mounting is not allowed, and a failure, not a skip, in
CI when one cannot run."""

import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from kdlight import config_dir
from kdlight.data import CIFAR10DataModule

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

#: Overrides that make any composed config a small CPU job on synthetic data.
TINY = [
    "trainer=cpu",
    "data=synthetic",
    "data.synthetic_train_size=600",
    "data.synthetic_test_size=300",
    "data.val_size=100",
    "data.batch_size=50",
    "data.eval_batch_size=100",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
]


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The real ``train`` config with ``overrides``, writing under ``output_dir``."""
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def synthetic_datamodule(
    train: int, test: int, val: int, batch: int, **overrides
) -> CIFAR10DataModule:
    """A ``CIFAR10DataModule`` on synthetic data of the given sizes."""
    return CIFAR10DataModule(
        source="synthetic", synthetic_train_size=train, synthetic_test_size=test, val_size=val,
        batch_size=batch, **overrides,
    )  # fmt: skip


def cpu_trainer(root: Path, epochs: int, **kwargs) -> L.Trainer:
    """A quiet CPU Trainer writing into ``root``: no logger, progress bar or summary, and no
    checkpoints unless ``enable_checkpointing=True`` is passed."""
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", default_root_dir=root, logger=False,
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )  # fmt: skip


def start_cli(
    args: list[str], cwd: Path, entry: str = "kdlight.train", **env: str
) -> subprocess.Popen:
    """Start ``python -m <entry> ARGS`` in ``cwd`` with outputs under ``cwd/outputs``, its
    output piped as text: runs started together share the cores while each imports torch
    (seconds of one core), and :func:`finish` waits for each."""
    environ = {
        **os.environ,
        "KDLIGHT_OUTPUTS": str(cwd / "outputs"),
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    environ.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [sys.executable, "-m", entry, *args],
        cwd=cwd,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(run: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait (10 minutes at most) for a run that :func:`start_cli` started; what it did."""
    try:
        stdout, stderr = run.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        run.kill()
        run.wait()
        raise
    return subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)


def run_cli(
    args: list[str], cwd: Path, entry: str = "kdlight.train", **env: str
) -> subprocess.CompletedProcess:
    """Run ``python -m <entry> ARGS`` in ``cwd`` with outputs under ``cwd/outputs``."""
    return finish(start_cli(args, cwd, entry, **env))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The test runs torch on one CPU thread, the suite's setting put back after it: a
    test of small steps (batch 8) gains little from a second thread, and where other
    processes share the 2 cores a second OpenMP thread spins waiting for the first
    (tests/test_fidelity_stages.py, measured under a load of about 3.5: 65 s on two
    threads, 12 s on one). Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _private_data_cache(tmp_path_factory: pytest.TempPathFactory):
    """No test writes into the user's data cache (~/.cache/kdlight)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("KDLIGHT_DATA", str(tmp_path_factory.mktemp("kdlight-data")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def archive() -> Path:
    if not ARCHIVE.exists():
        pytest.skip(f"offline CIFAR-10 archive not found at {ARCHIVE}")
    return ARCHIVE


@pytest.fixture(scope="session")
def archive_cache(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_dir holding the decoded archive, so each test does not decode it again."""
    from kdlight.data.sources import load_archive

    cache = tmp_path_factory.mktemp("cifar10-cache")
    load_archive(archive, cache)
    return cache


@pytest.fixture(scope="session")
def untrained_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ClassifierModule checkpoint of the default teacher (resnet18_half), untrained."""
    import torch

    from kdlight.lit import ClassifierModule
    from kdlight.models import create_model

    module = ClassifierModule(create_model("resnet18_half"))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path_factory.mktemp("teacher") / "last.ckpt"
    torch.save(checkpoint, path)
    return path


# ------------------------------------------------------------------------------ fault tests
# A test marked ``fault`` runs a fault for real: a full or read-only filesystem, a kill, a
# signal, a planted file. Where it cannot (no mount rights, no user namespaces), it skips
# with the reason; with --fault-skips-fail (.ci/run passes it) that skip is a failure, so
# CI never passes a fault it did not run.


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fault-skips-fail",
        action="store_true",
        help="a skipped test marked fault fails: CI must run every fault it promises",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and item.get_closest_marker("fault")
        and item.config.getoption("fault_skips_fail")
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"a fault test skipped, and --fault-skips-fail is set: {reason}"


#: ``KDLIGHT_TEST_MOUNTS``: unset, fault tests mount here where this process may, else in a
#: user and mount namespace; ``namespace`` always in a namespace (to check that way where
#: mounting is allowed); ``here`` never in one (set inside the namespace itself).
MOUNTS_ENV = "KDLIGHT_TEST_MOUNTS"
_RUN_IN_A_NAMESPACE = pytest.StashKey[bool]()


@cache
def can_unshare() -> bool:
    """Whether a user and mount namespace can be made here (``unshare -rm``): in it, any
    user may mount a tmpfs that only its own processes see."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@cache
def mount_rights() -> str:
    """Where this session's fault tests mount: ``here`` (root with the right, or inside the
    namespace), ``namespace`` (each such test is run again inside ``unshare -rm``), or the
    reason neither works."""
    wanted = os.environ.get(MOUNTS_ENV, "")
    if wanted != "namespace" and sys.platform == "linux" and shutil.which("mount"):
        with tempfile.TemporaryDirectory() as folder:
            command = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", folder]
            tried = subprocess.run(command, capture_output=True, text=True)
            if tried.returncode == 0:
                subprocess.run(["umount", folder], check=True)
                return "here"
    if wanted != "here" and can_unshare():
        return "namespace"
    return "cannot mount a tmpfs here, nor in a user and mount namespace (unshare -rm)"


def mounts_here(item: pytest.Item) -> bool:
    """Whether ``item`` mounts in this process. Where it cannot but a namespace can be
    made, it is marked to run again inside one (:func:`pytest_pyfunc_call`) and False is
    returned: the fixture must not mount here. Where neither works, it skips."""
    rights = mount_rights()
    if rights == "here":
        return True
    if rights == "namespace":
        item.stash[_RUN_IN_A_NAMESPACE] = True
        return False
    pytest.skip(rights)


def mount(folder: Path, options: str) -> None:
    """A fresh tmpfs with ``options`` (``size=2m``, ``ro``...) on ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"cannot mount a tmpfs on {folder}: {result.stderr.strip()}"


def unmount(folder: Path) -> None:
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


@pytest.fixture
def mount_tmpfs(request: pytest.FixtureRequest) -> Iterator[Callable[[Path, int | str], Path]]:
    """``mount(folder, megabytes)``: a fresh tmpfs of that size (or a tmpfs size such as
    ``"64k"``) on ``folder``, unmounted at
    the end of the test whatever happens. Where this process may not mount, the whole test
    runs again in a user and mount namespace and its outcome is this test's."""
    if not mounts_here(request.node):

        def elsewhere(folder: Path, megabytes: int) -> Path:
            raise AssertionError("this test runs in a user and mount namespace, not here")

        yield elsewhere
        return
    mounted: list[Path] = []

    def mount_one(folder: Path, megabytes: int | str) -> Path:
        mount(folder, f"size={megabytes}m" if isinstance(megabytes, int) else f"size={megabytes}")
        mounted.append(folder)
        return folder

    yield mount_one
    for folder in reversed(mounted):
        unmount(folder)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """A test marked to run in a namespace (:func:`mounts_here`) runs there instead."""
    if not pyfuncitem.stash.get(_RUN_IN_A_NAMESPACE, False):
        return None
    run_in_a_namespace(pyfuncitem)
    return True


def run_in_a_namespace(item: pytest.Item) -> None:
    """Run ``item`` again, alone, in a new pytest inside ``unshare -rm`` (where it may mount),
    and make its outcome this one's: a failure fails, a skip skips."""
    with tempfile.TemporaryDirectory(prefix="kdlight-namespace-") as folder:
        results = Path(folder) / "results.xml"
        command = [
            "unshare", "-rm", sys.executable, "-m", "pytest", item.nodeid, "-q",
            "-p", "no:cacheprovider", f"--basetemp={folder}/tmp", f"--junitxml={results}",
        ]  # fmt: skip
        environ = {**os.environ, MOUNTS_ENV: "here"}
        done = subprocess.run(
            command, cwd=REPO, env=environ, capture_output=True, text=True, timeout=900
        )
        output = f"{done.stdout}\n{done.stderr}"[-6000:]
        cases = ElementTree.parse(results).getroot().iter("testcase") if results.exists() else []
        case = next((c for c in cases if c.get("name") == item.name), None)
    assert case is not None, f"the namespace's pytest ran no test:\n{output}"
    if (skipped := case.find("skipped")) is not None:
        pytest.skip(f"in a user and mount namespace: {skipped.get('message')}")
    if case.find("failure") is not None or case.find("error") is not None:
        pytest.fail(f"failed in a user and mount namespace (unshare -rm):\n{output}", False)
