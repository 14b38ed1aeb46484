"""SIGTERM and concurrent launches, for real: a ``kdlight-train`` subprocess is sent SIGTERM,
SIGSTOP or SIGKILL, or launched a second time while it runs, and its exit status and files
are checked; the lock and the SIGTERM handling are also checked on their own, with real
signals, forks and processes."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from kdlight.lit import ClassifierModule
from kdlight.models import create_model
from kdlight.runs.guard import (
    RunInUse,
    SaveLastOnSigterm,
    Terminated,
    hold_run_lock,
    stop_on_sigterm,
)
from kdlight.trainer.callbacks import SaveLastCheckpoint
from tests.conftest import TINY, cpu_trainer, run_cli, synthetic_datamodule

#: A CPU run of 8 epochs of 10 steps (500 training images in batches of 50): long enough to
#: be signalled while it trains, short enough to finish when launched again.
RECIPE = [*TINY, "model=small_cnn", "model.width=0.25", "trainer.max_epochs=8"]
RESUME_HINT = "launch the same command again to resume"
ONE_MINUTE = 60


def launch(args: list[str], cwd: Path) -> subprocess.Popen:
    """Start ``python -m kdlight.train ARGS`` in ``cwd`` (outputs under ``cwd/outputs``, as
    :func:`tests.conftest.run_cli` does), its output going to ``cwd/launch.out``/``.err``."""
    environ = {**os.environ, "KDLIGHT_OUTPUTS": str(cwd / "outputs"), "PYTHONUNBUFFERED": "1"}
    environ.pop("HYDRA_FULL_ERROR", None)
    with (cwd / "launch.out").open("w") as out, (cwd / "launch.err").open("w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "kdlight.train", *args],
            cwd=cwd,
            env=environ,
            stdout=out,
            stderr=err,
            preexec_fn=default_sigint,
        )


def default_sigint() -> None:
    """Ctrl-C's default handling in a child, as a terminal's command has it, wherever the
    tests run: a shell's background job, and so its children, ignores SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stderr_of(cwd: Path) -> str:
    return (cwd / "launch.err").read_text()


def wait_for_training(run: subprocess.Popen, cwd: Path) -> Path:
    """Wait until ``run`` has trained an epoch (its first ``last.ckpt``); return that file."""
    deadline = time.monotonic() + 5 * ONE_MINUTE
    while time.monotonic() < deadline:
        found = list((cwd / "outputs").rglob("checkpoints/last.ckpt"))
        if found:
            return found[0]
        if run.poll() is not None:
            pytest.fail(f"the run ended ({run.returncode}) before training: {stderr_of(cwd)}")
        time.sleep(0.05)
    run.kill()
    pytest.fail(f"the run did not train within 5 minutes: {stderr_of(cwd)[-3000:]}")


def run_dirs(cwd: Path) -> list[Path]:
    """The run directories under ``cwd/outputs``: each has Hydra's ``.hydra/``."""
    return sorted(hydra.parent for hydra in (cwd / "outputs").rglob(".hydra"))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def checkpoint_position(path: Path) -> tuple[int, int]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["epoch"], state["global_step"]


def files_of(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file of a run with its size and modification time, but Hydra's ``.hydra/``
    (Hydra writes it for each launch before kdlight starts)."""
    return {
        str(path.relative_to(run_dir)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in run_dir.rglob("*")
        if path.is_file() and ".hydra" not in path.relative_to(run_dir).parts
    }


def processes_mentioning(text: str) -> list[int]:
    """The processes whose command line holds ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
    return found


def python(script: str, *args: str, **env: str) -> subprocess.Popen:
    """Start a Python ``script`` in a new process, its output piped as text, with ``env``
    over this one's environment (without the rank variables of any launcher around the
    tests)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK")}
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env={**environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# ------------------------------------------------------------------------------- SIGTERM
@pytest.mark.slow
@pytest.mark.fault
def test_sigterm_saves_last_ckpt_at_that_step_exits_143_and_resumes(tmp_path: Path):
    """SIGTERM while training: status 143, one line naming the step, last.ckpt saved at that
    step (not the epoch-end one from before), no metrics.json; the same command again
    resumes from there and finishes all 8 epochs."""
    run = launch(RECIPE, tmp_path)
    last = wait_for_training(run, tmp_path)
    before = checkpoint_position(last)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=5 * ONE_MINUTE) == 143, stderr_of(tmp_path)[-3000:]

    errors = error_lines(stderr_of(tmp_path))
    assert len(errors) == 1, stderr_of(tmp_path)[-3000:]
    stopped = re.fullmatch(
        rf"error: terminated by SIGTERM at step (\d+) \(epoch (\d+)\); last\.ckpt is current: "
        rf"{RESUME_HINT}",
        errors[0],
    )
    assert stopped, errors
    epoch, step = int(stopped[2]), int(stopped[1])
    assert checkpoint_position(last) == (epoch, step) != before
    (run_dir,) = run_dirs(tmp_path)
    assert not (run_dir / "metrics.json").exists()  # kdlight-report shows it as failed:
    assert f"error: {(run_dir / 'error.txt').read_text()}" == f"{errors[0]}\n"

    again = run_cli(RECIPE, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = f"resuming from {last}: saved at epoch {epoch}, step {step}"
    assert resumed in again.stdout + again.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 8
    assert checkpoint_position(last) == (7, 80)
    assert not (run_dir / "error.txt").exists()  # the finished run is no longer a failed one


@pytest.mark.slow
@pytest.mark.fault
def test_sigterm_under_local_ddp(tmp_path: Path):
    """Two DDP processes on the CPU, the second started by Lightning in the same directory
    (without taking its lock): SIGTERM to the first stops both at the same step with
    last.ckpt saved there, status 143 and one line, and leaves no process behind. The
    signal comes right after an epoch's save, where Lightning's own handling met a
    checkpoint's broadcast and crashed (gloo: "collective mismatch")."""
    ddp = [arg for arg in RECIPE if arg != "trainer=cpu"]
    ddp += ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    run = launch(ddp, tmp_path)
    last = wait_for_training(run, tmp_path)
    run.send_signal(signal.SIGTERM)
    try:
        status = run.wait(timeout=5 * ONE_MINUTE)
    finally:
        time.sleep(1)  # the second process ends beside the first
        left = [pid for pid in processes_mentioning(str(tmp_path)) if pid != os.getpid()]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert status == 143 and not left, stderr_of(tmp_path)[-3000:]

    errors = error_lines(stderr_of(tmp_path))
    assert len(errors) == 1 and "Traceback" not in stderr_of(tmp_path), stderr_of(tmp_path)
    stopped = re.fullmatch(
        rf"error: terminated by SIGTERM at step (\d+) \(epoch (\d+)\); last\.ckpt is current: "
        rf"{RESUME_HINT}",
        errors[0],
    )
    assert stopped, errors
    assert checkpoint_position(last) == (int(stopped[2]), int(stopped[1]))


@pytest.mark.slow
@pytest.mark.fault
def test_sigterm_stops_a_multirun(tmp_path: Path):
    """A multirun whose first job gets SIGTERM: that job's error.txt holds the line, the
    second job is never launched, and the multirun exits with status 143."""
    run = launch(["-m", *RECIPE, "seed=0,1"], tmp_path)
    wait_for_training(run, tmp_path)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=5 * ONE_MINUTE) == 143, stderr_of(tmp_path)[-3000:]

    (run_dir,) = run_dirs(tmp_path)  # the job of seed 1 never started
    errors = error_lines(stderr_of(tmp_path))
    assert len(errors) == 1 and errors[0].endswith(f"last.ckpt is current: {RESUME_HINT}")
    assert (run_dir / "error.txt").read_text() == errors[0].removeprefix("error: ") + "\n"
    assert not (run_dir / "metrics.json").exists()


@pytest.mark.fault
def test_sigterm_in_fit_saves_that_step(tmp_path: Path):
    """In process: a real SIGTERM during step 13 stops training after it; last.ckpt holds
    step 14, and the Trainer's SIGTERMException becomes Terminated (status 143)."""

    class SigtermAt(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 13:
                os.kill(os.getpid(), signal.SIGTERM)

    default_action = signal.getsignal(signal.SIGTERM)
    last = SaveLastCheckpoint(tmp_path, every_n_train_steps=0)
    trainer = cpu_trainer(
        tmp_path, 3, enable_checkpointing=True, callbacks=[last, SaveLastOnSigterm(), SigtermAt()]
    )
    module = ClassifierModule(create_model("small_cnn", width=0.25))
    with pytest.raises(Terminated) as stop, stop_on_sigterm():
        trainer.fit(module, datamodule=synthetic_datamodule(600, 300, 100, 50))
    assert stop.value.code == 143
    assert str(stop.value) == f"terminated by SIGTERM at step 14 (epoch 1); last.ckpt is current: {RESUME_HINT}"  # fmt: skip
    assert checkpoint_position(last.path) == (1, 14)
    assert signal.getsignal(signal.SIGTERM) == default_action  # as before the block


@pytest.mark.fault
def test_sigterm_outside_training_stops_at_once():
    """Outside Lightning's loops (reading data, say) SIGTERM raises Terminated at once; the
    default action (death by the signal, status -15 here) is back after the block."""
    script = """if True:
        import os, signal, time
        from kdlight.runs.guard import Terminated, stop_on_sigterm
        try:
            with stop_on_sigterm():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(60)
        except Terminated as stop:
            print(stop.code, stop)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    """
    run = python(script)
    stdout, stderr = run.communicate(timeout=5 * ONE_MINUTE)
    assert run.returncode == -signal.SIGTERM, stderr[-3000:]
    assert stdout.splitlines() == [f"143 terminated by SIGTERM outside training: {RESUME_HINT}"]


def handles(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler of its own for ``signum`` (the kernel's
    ``SigCgt`` mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.MULTILINE)[1], 16)
    return bool(caught >> (signum - 1) & 1)


@pytest.mark.fault
@pytest.mark.parametrize(
    ("signum", "command", "say"),
    [
        (signal.SIGTERM, "kdlight-train", "terminated by SIGTERM"),
        (signal.SIGINT, "python -m kdlight.train", "interrupted by SIGINT (Ctrl-C)"),
    ],
    ids=["sigterm-console-script", "sigint-python-m"],
)
def test_a_signal_while_kdlight_train_starts_is_one_line(
    tmp_path: Path, signum: int, command: str, say: str
):
    """SIGTERM or Ctrl-C in the first moments of a launch, while it still imports torch
    (seconds): one line, status 143 or 130, nothing written. The signal is sent as soon as
    the process handles SIGTERM, and that is checked to be before torch is loaded (the
    handling used to come after all the imports: a SIGTERM then killed it with no word,
    status -15; a Ctrl-C gave a traceback)."""
    if command == "kdlight-train":
        argv = [str(Path(sys.executable).with_name("kdlight-train"))]
    else:
        argv = [sys.executable, "-m", "kdlight.train"]
    environ = {**os.environ, "KDLIGHT_OUTPUTS": str(tmp_path / "outputs")}
    run = subprocess.Popen(
        [*argv, *RECIPE], cwd=tmp_path, env=environ, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint,
    )  # fmt: skip
    deadline = time.monotonic() + ONE_MINUTE
    while run.poll() is None and not handles(run.pid, signal.SIGTERM):
        assert time.monotonic() < deadline, "kdlight-train did not handle SIGTERM in a minute"
        time.sleep(0.002)
    assert run.poll() is None, f"it ended ({run.returncode}) before the signal"
    torch_loaded = "libtorch" in Path(f"/proc/{run.pid}/maps").read_text()
    run.send_signal(signum)
    _, stderr = run.communicate(timeout=ONE_MINUTE)
    assert not torch_loaded, "SIGTERM was handled only once torch was loaded"
    assert run.returncode == 128 + signum, stderr[-3000:]
    assert stderr.splitlines() == [
        f"error: {say} before the run started: launch the same command again"
    ]
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------------------------- lock
@pytest.mark.slow
def test_second_launch_of_a_running_run_says_so_and_touches_nothing(tmp_path: Path):
    """The first launch is paused (SIGSTOP) while it trains, so that it holds its directory
    for as long as the second launch takes: the second says who holds it in one line, exits
    with status 2 and changes no file; the first then finishes as if alone."""
    first = launch(RECIPE, tmp_path)
    wait_for_training(first, tmp_path)
    first.send_signal(signal.SIGSTOP)
    try:
        (run_dir,) = run_dirs(tmp_path)
        files = files_of(run_dir)
        second = run_cli(RECIPE, tmp_path)
        files_after = files_of(run_dir)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert error_lines(second.stderr) == [
        f"error: {run_dir} is in use by another kdlight-train (pid {first.pid} on host "
        f"{socket.gethostname()}); wait for it or stop it"
    ]
    assert files_after == files

    assert first.wait(timeout=5 * ONE_MINUTE) == 0, stderr_of(tmp_path)[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 8
    assert not (run_dir / "error.txt").exists()


@pytest.mark.slow
@pytest.mark.fault
def test_killed_run_leaves_no_lock_in_the_way(tmp_path: Path):
    """SIGKILL (no cleanup at all) leaves the lock file, but not the lock: the same command
    again runs and finishes."""
    run = launch(RECIPE, tmp_path)
    wait_for_training(run, tmp_path)
    run.kill()
    assert run.wait(timeout=ONE_MINUTE) == -signal.SIGKILL
    (run_dir,) = run_dirs(tmp_path)
    assert (run_dir / ".lock").exists()

    again = run_cli(RECIPE, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "metrics.json").exists()


def test_run_lock_is_exclusive_names_its_holder_and_is_released(tmp_path: Path):
    host = socket.gethostname()
    with hold_run_lock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text()) == {"pid": os.getpid(), "host": host}
        with pytest.raises(RunInUse) as refused, hold_run_lock(tmp_path):
            pass
        assert str(refused.value) == (
            f"{tmp_path} is in use by another kdlight-train (pid {os.getpid()} on host {host}); "
            "wait for it or stop it"
        )
    assert (tmp_path / ".lock").read_text() == ""  # no stale holder named
    with hold_run_lock(tmp_path):  # free again
        pass


TRY_LOCK = """if True:
    import sys
    from kdlight.runs.guard import RunInUse, hold_run_lock
    try:
        with hold_run_lock(sys.argv[1]):
            print("ran")
    except RunInUse:
        print("in use")
"""


def test_only_the_launching_process_takes_the_lock(tmp_path: Path):
    """While this process holds the lock, another launch is refused, but a process that
    Lightning's DDP (LOCAL_RANK=1) or another node (NODE_RANK=1) starts in the same
    directory runs: the run is theirs too."""
    with hold_run_lock(tmp_path):
        ranks = {"launch": {}, "ddp": {"LOCAL_RANK": "1"}, "node": {"NODE_RANK": "1"}}
        # all three at once: each spends seconds importing torch before it tries the lock
        runs = {rank: python(TRY_LOCK, str(tmp_path), **env) for rank, env in ranks.items()}
        outcomes = {
            rank: run.communicate(timeout=5 * ONE_MINUTE)[0].strip() for rank, run in runs.items()
        }
    assert outcomes == {"launch": "in use", "ddp": "ran", "node": "ran"}


def test_lock_goes_with_its_process_not_with_a_forked_child(tmp_path: Path):
    """A forked child (a DataLoader worker, say) that outlives the run's process, SIGKILLed,
    does not keep the run locked."""
    script = """if True:
        import os, sys, time
        from kdlight.runs.guard import hold_run_lock
        with hold_run_lock(sys.argv[1]):
            child = os.fork()
            if child == 0:
                time.sleep(120)
                os._exit(0)
            print(child, flush=True)
            time.sleep(120)
    """
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    child = int(holder.stdout.readline())
    try:
        holder.kill()
        holder.wait(timeout=ONE_MINUTE)
        os.kill(child, 0)  # the forked child lives on
        with hold_run_lock(tmp_path):
            pass
    finally:
        holder.stdout.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
