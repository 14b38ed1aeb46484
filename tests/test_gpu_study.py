"""``scripts/gpu_study.sh`` (``make gpu-study``) runs end to end: checked here on CPU at toy
size, because a session lent a GPU has minutes, not hours, to find a broken script."""

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

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
