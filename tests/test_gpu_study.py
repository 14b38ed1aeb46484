"""``scripts/gpu_study.sh`` (``make gpu-study``) runs end to end: checked here on CPU at toy
size, because a session lent a GPU has minutes, not hours, to find a broken script."""

import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlight.train import train
from tests.conftest import REPO, compose_config

# data.eval_subset, not limit_*_batches: a debug run's teacher would never count as finished
TOY = "trainer.accelerator=cpu module.compile=false data.train_subset=256 data.eval_subset=100"


@pytest.mark.slow
def test_the_study_stage_trains_every_run_and_reports(
    tmp_path: Path, archive: Path, archive_cache: Path
):
    out, work = tmp_path / "gpu_study", tmp_path / "work"
    shutil.copytree(archive_cache, work / "data")  # the script's own cache, already decoded
    settings = {"STAGES": "study", "EPOCHS": "1", "EXTRA": TOY, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_study.sh")],
        env={**os.environ, **settings, "OUT": str(out), "WORK": str(work), "ARCHIVE": str(archive)},
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    figures = ["device.txt", "groups.csv", "heatmap.png", "report.csv", "report.md", "timings.txt"]
    assert sorted(path.name for path in out.iterdir()) == figures  # few, shallow: they travel
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [row["status"] for row in rows] == ["finished"] * 14  # teacher, baseline, 12 cells
    assert {(row["temperature"], row["alpha"]) for row in rows[2:]} == {
        (t, a) for t in ("1", "2", "4", "8") for a in ("0.1", "0.5", "0.9")
    }
    timings = (out / "timings.txt").read_text()
    assert re.search(r"teacher\+baseline \d+s, grid \d+s, study \d+s", timings)


# The zoo stage at toy size: resnet8 for both models of the pair (resnet32x4 takes about a
# minute per toy run on this CPU), 96 synthetic CIFAR-100 images in 6 batches, 2 epochs.
ZOO_TOY = {
    "STAGES": "zoo",
    "ZOO_EPOCHS": "2",
    "ZOO_TEACHER": "resnet8",
    "ZOO_STUDENT": "resnet8",
    "ZOO_MARGIN": "0",  # a toy launch's start-up and test are seconds, outside its limit
    "ZOO_SPEED": "trainer.accelerator=cpu",
    "ZOO_DATA": "data.source=synthetic data.synthetic_train_size=96 "
    "data.synthetic_test_size=100 data.val_size=0 data.batch_size=16 data.eval_batch_size=100",
}


def zoo_stage(folder: Path, chunk: str, **settings: str) -> subprocess.CompletedProcess:
    """One invocation of ``STAGES=zoo scripts/gpu_study.sh`` with a budget of ``chunk``
    seconds, its figures in ``folder/out`` and its runs in ``folder/work``."""
    env = {**os.environ, **ZOO_TOY, "CHUNK": chunk, "PYTHON": sys.executable, **settings}
    env |= {"OUT": str(folder / "out"), "WORK": str(folder / "work")}
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_study.sh")],
        env=env, cwd=folder.parent, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def final_weights(root: Path) -> dict[str, dict]:
    """The ``last.ckpt`` weights of the teacher, KD and DKD runs under ``root``, by run."""
    found = {}
    for path in root.glob("**/checkpoints/last.ckpt"):
        run = path.parent.parent.relative_to(root).parts
        kind = "teacher" if run[0] == "teacher" else run[2].split("_")[0]  # T4_alpha0.9: KD
        found[{"teacher": "teacher", "dkd": "dkd"}.get(kind, "kd")] = torch.load(
            path, weights_only=True
        )["state_dict"]
    return found


def train_never_stopped(root: Path) -> None:
    """The stage's three toy runs, each in one go, in this process (no start-ups to pay)."""
    common = [
        *ZOO_TOY["ZOO_DATA"].split(), ZOO_TOY["ZOO_SPEED"], "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false", "~callbacks.progress_bar", f"paths.root={root}",
    ]  # fmt: skip
    pair = ["experiment=zoo_distill", "pair=resnet32x4_resnet8x4", "model=resnet8"]
    pair.append("distill.teacher_model=resnet8")
    runs = {
        "teacher/resnet8/seed0-whole": ["experiment=zoo_teacher", "model=resnet8"],
        "zoo_distill/resnet8/T4_alpha0.9/seed0-whole": [*pair, "distiller=kd"],
        "zoo_distill/resnet8/dkd/seed0-whole": [*pair, "distiller=dkd"],
    }
    for folder, overrides in runs.items():
        train(compose_config([*overrides, *common], root / folder))


@pytest.mark.slow
def test_the_zoo_stage_adds_chunks_up_to_the_runs_never_stopped(tmp_path: Path):
    chunked = tmp_path / "chunked"
    # 1 s of training, and steps of at least 0.2 s (teacher: 12): the teacher stops mid-way
    slow = "+callbacks.slow_steps={_target_:tests.slow_steps.SlowSteps,seconds:0.2}"
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    first = zoo_stage(chunked, "1", EXTRA=slow, PYTHONPATH=pythonpath)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    progress = (chunked / "out" / "zoo_progress.txt").read_text()
    assert re.search(r"teacher: not finished: step \d+ \(epoch \d of 2\)", progress), progress
    assert "run STAGES=zoo again" in first.stdout and "zoo: kd" not in first.stdout
    for _ in range(4):  # one more invocation should do; a slow machine may need more
        later = zoo_stage(chunked, "600")
        assert later.returncode == 0, later.stdout[-2000:] + later.stderr[-2000:]
        if "zoo: done" in later.stdout:
            break
    else:
        pytest.fail(f"not done after 5 invocations:\n{later.stdout[-2000:]}")
    progress = (chunked / "out" / "zoo_progress.txt").read_text()
    for run in ("teacher", "kd", "dkd"):
        assert f" {run}: finished" in progress, progress

    table = (chunked / "out" / "zoo_table.md").read_text()
    for run, published in (("teacher", "79.42"), ("KD", "73.33"), ("DKD", "76.32")):
        row = rf"^\| {run} \| resnet8 \| 2 \| 100 \| [\d.]+ \| [\d.]+ \| {published} \|"
        assert re.search(row, table, re.M), table
    assert "published top-1" in table and "Not comparable with the published column" in table
    assert (chunked / "out" / "zoo_report.md").is_file()

    train_never_stopped(tmp_path / "whole")
    stopped, never_stopped = (
        final_weights(chunked / "work" / "zoo"),
        final_weights(tmp_path / "whole"),
    )
    assert sorted(stopped) == sorted(never_stopped) == ["dkd", "kd", "teacher"]
    for run, weights in stopped.items():
        assert weights.keys() == never_stopped[run].keys()
        for key, tensor in weights.items():
            assert torch.equal(tensor, never_stopped[run][key]), f"{run}: {key} differs"


def test_a_zoo_run_that_fails_stops_the_stage_with_its_error_line(tmp_path: Path):
    """A run that exits with any status but 0 or 3 stops the stage with that status and its
    ``error:`` line; a budget that is not one is refused in one line before any launch."""
    failed = zoo_stage(tmp_path / "zoo", "600", ZOO_TEACHER="resnet9")
    assert failed.returncode == 2, failed.stdout[-2000:] + failed.stderr[-2000:]
    progress = (tmp_path / "zoo" / "out" / "zoo_progress.txt").read_text().splitlines()
    assert len(progress) == 1  # nothing launched after the teacher
    assert re.search(
        r"teacher: failed with exit status 2: error: model=resnet9 is not allowed", progress[0]
    )
    assert "zoo: teacher: failed" in failed.stdout

    refused = zoo_stage(tmp_path / "refused", "9:00")  # neither seconds nor DD:HH:MM:SS
    assert refused.returncode == 2
    assert refused.stdout.splitlines()[-1] == (
        "error: CHUNK=9:00 and ZOO_MARGIN=0 are not allowed: whole seconds (CHUNK also DD:HH:MM:SS)"
    )
    assert not (tmp_path / "refused" / "work" / "zoo").exists()  # refused before any work


def test_the_published_table_covers_the_shipped_pairs_and_agrees_with_the_zoo_stage():
    """docs/results.md's published accuracies: a row per shipped pair, a number or "not
    published" in every column, and the numbers the zoo stage compares with are the
    table's (resnet32x4 -> resnet8x4: teacher, KD, DKD)."""
    text = (REPO / "docs" / "results.md").read_text()
    text = text.split("## The shipped pairs' published accuracies")[1].split("\n## ")[0]
    rows = dict(re.findall(r"^\| `(\w+)` \|(.*)\|$", text, re.M))
    shipped = sorted(p.stem for p in (REPO / "conf" / "pair").glob("*.yaml"))
    assert sorted(rows) == shipped
    columns = ["teacher", "student", "KD", "FitNet", "AT", "SP", "VID", "RKD", "PKT", "CRD"]
    columns.append("DKD")
    table = {}
    for pair, cells in rows.items():
        values = [cell.strip() for cell in cells.split("|")]
        assert len(values) == len(columns), pair
        assert all(re.fullmatch(r"\d\d\.\d\d|not published", v) for v in values), values
        table[pair] = dict(zip(columns, values, strict=True))
    spec = importlib.util.spec_from_file_location("zoo_table", REPO / "scripts" / "zoo_table.py")
    zoo_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo_table)
    for run, (published, _) in zoo_table.PUBLISHED.items():
        assert table["resnet32x4_resnet8x4"][run] == f"{published:.2f}", run
