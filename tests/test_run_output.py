"""What a run shows: the report's plots readable at CIFAR-100's class count (the size of
``per_class.png``, labels that do not overlap, the heatmap's title inside its figure), the
test report's lines, the run's log (no Lightning noise, the run directory at its start and
end) and what a tracker is told of a run."""

import json
import re
import subprocess
from itertools import pairwise
from pathlib import Path

import pytest
from matplotlib.text import Text
from PIL import Image

from kdlight.analysis.plots import heatmap_figure, per_class_figure, plot_per_class
from kdlight.analysis.records import collect_runs
from kdlight.analysis.stats import compare_runs
from kdlight.lit.results import format_report
from tests.conftest import run_cli
from tests.test_report import make_run

GRID = {(1.0, 0.5): 41.0, (1.0, 0.9): 42.5, (4.0, 0.5): 43.25, (4.0, 0.9): 43.88}


def class_names(count: int) -> list[str]:
    """CIFAR-100-like names, some as long as ``aquarium_fish``."""
    return [f"{'aquarium_fish' if i % 7 == 0 else 'class'}_{i}" for i in range(count)]


def with_classes(run_dir: Path, classes: list[str]) -> None:
    """Give the run's ``metrics.json`` one accuracy per class of ``classes``."""
    file = run_dir / "metrics.json"
    metrics = json.loads(file.read_text())
    metrics["per_class_accuracy"] = {
        name: (metrics["accuracy"] + 37 * i) % 100 for i, name in enumerate(classes)
    }
    metrics["test_images"] = 100 * len(classes)
    file.write_text(json.dumps(metrics))


def comparison(root: Path, count: int):
    """The first comparison of a 2x2 KD grid with its teacher and baseline, ``count``
    classes each."""
    classes = class_names(count)
    teacher = make_run(root / "teacher" / "resnet18_half", root, "teacher", "resnet18_half", 43.88)
    baseline = root / "student_baseline" / "small_cnn"
    make_run(baseline, root, "student_baseline", "small_cnn", 40.12)
    runs = [teacher, baseline]
    for (t, a), acc in GRID.items():
        runs.append(
            make_run(root / "distill" / f"T{t:g}_alpha{a}", root, "distill", "small_cnn", acc, t, a)
        )
    for run in runs:
        with_classes(run, classes)
    return compare_runs(collect_runs([root]))[0]


def drawn(fig):
    """The figure drawn as it will be saved, with its renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(120)
    canvas = FigureCanvasAgg(fig)  # what savefig renders the PNG with
    canvas.draw()
    return canvas.get_renderer()


def inside(box, figure_box) -> bool:
    return (
        box.x0 >= figure_box.x0 - 0.5
        and box.x1 <= figure_box.x1 + 0.5
        and box.y0 >= figure_box.y0 - 0.5
        and box.y1 <= figure_box.y1 + 0.5
    )


@pytest.mark.parametrize("count", [10, 100])
def test_per_class_png_is_at_most_a_screen_wide_at_any_class_count(tmp_path: Path, count: int):
    c = comparison(tmp_path / "outputs", count)
    with Image.open(plot_per_class(c, tmp_path / "per_class.png")) as image:
        width, height = image.size
    # 100 classes were 11,040 x 660 pixels, one bar group of three per class
    assert 700 <= width <= 1600 and 500 <= height <= 1400, (width, height)


@pytest.mark.parametrize("count", [10, 100])
def test_per_class_labels_are_readable_and_do_not_overlap(tmp_path: Path, count: int):
    c = comparison(tmp_path / "outputs", count)
    fig = per_class_figure(c)
    renderer = drawn(fig)
    shown = []
    for ax in fig.axes:
        labels = [label for label in ax.get_yticklabels() if label.get_text()]
        assert all(label.get_fontsize() >= 8 for label in labels)
        boxes = sorted((label.get_window_extent(renderer) for label in labels), key=lambda b: b.y0)
        assert all(low.y1 <= high.y0 + 0.5 for low, high in pairwise(boxes))
        assert all(inside(box, fig.bbox) for box in boxes)
        shown += [label.get_text() for label in labels]
    assert sorted(shown) == sorted(class_names(count))  # every class, once
    worst = min(c.best.per_class().items(), key=lambda item: item[1])[0]
    assert shown[0] == worst  # sorted by the best cell's accuracy, worst first
    legend = fig.legends[0].get_window_extent(renderer)
    title = fig._suptitle.get_window_extent(renderer)
    assert inside(legend, fig.bbox) and inside(title, fig.bbox)
    assert not legend.overlaps(title)


def test_heatmap_title_lies_inside_the_figure(tmp_path: Path):
    c = comparison(tmp_path / "outputs", 10)
    c.differs = "optimizer.lr=0.05, data.batch_size=64, trainer.max_epochs=240, scheduler=multistep"
    fig = heatmap_figure(c)
    renderer = drawn(fig)
    (title,) = [t for t in fig.findobj(Text) if "teacher 43.88%" in t.get_text()]
    assert inside(title.get_window_extent(renderer), fig.bbox)


# ------------------------------------------------------------------------ what a run prints
CIFAR10_REPORT = """\
Accuracy of the network on the 1000 test images: 43.880000 %
Accuracy of airplane : 50 %
Accuracy of automobile : 0 %
Accuracy of  bird : n/a (no test images)"""


def test_a_report_of_up_to_10_classes_keeps_the_reference_format():
    summary = {
        "test_images": 1000,
        "accuracy": 43.88,
        "per_class_accuracy": {"airplane": 50.0, "automobile": 0.0, "bird": None},
    }
    assert format_report(summary, "run/metrics.json") == CIFAR10_REPORT


def test_a_report_of_100_classes_is_a_summary_that_says_where_the_full_list_is():
    per_class = {f"c{i}": float(i) for i in range(98)} | {"empty1": None, "empty2": None}
    summary = {"test_images": 9800, "accuracy": 48.5, "per_class_accuracy": per_class}
    assert format_report(summary, "run/metrics.json").splitlines() == [
        "Accuracy of the network on the 9800 test images: 48.500000 %",
        "Worst 5 of 100 classes: c0 0 %, c1 1 %, c2 2 %, c3 3 %, c4 4 %",
        "Best 5 of 100 classes: c97 97 %, c96 96 %, c95 95 %, c94 94 %, c93 93 %",
        "2 classes without test images",
        "Accuracy of each of the 100 classes: per_class_accuracy in run/metrics.json",
    ]


@pytest.fixture(scope="module")
def cifar100_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess:
    """One tiny CIFAR-100 run of ``kdlight-train`` (synthetic data, 1 epoch of 2 batches),
    as a user launches it: what the process prints is what is tested."""
    cwd = tmp_path_factory.mktemp("cifar100_run")
    args = ["trainer=cpu", "data=cifar100", "data.source=synthetic", "model=small_cnn"]
    args += ["model.width=0.25", "data.synthetic_train_size=64", "data.synthetic_test_size=200"]
    args += ["data.val_size=32", "data.batch_size=16", "data.eval_batch_size=100"]
    args += ["trainer.max_epochs=1", "trainer.enable_progress_bar=false"]
    result = run_cli([*args, "trainer.limit_train_batches=2"], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = (cwd / "outputs").rglob("metrics.json")
    result.run_dir = metrics.parent.resolve()  # the directory the test expects to be named
    return result


def test_a_run_prints_no_lightning_noise_but_its_warnings(cifar100_run):
    printed = cifar100_run.stdout + cifar100_run.stderr
    assert "litlogger" not in printed
    assert "_batches=1.0)` was configured" not in printed  # the defaults, said each run
    assert "LeafSpec" not in printed  # torch to Lightning's code, on every first step
    # Lightning's other lines stay: a warning that matters, what it ran on
    assert "GPU available: False" in printed
    assert "smaller than the logging interval" in printed


def test_a_run_names_its_directory_at_its_start_and_end(cifar100_run):
    run_dir = cifar100_run.run_dir
    lines = [line for line in cifar100_run.stdout.splitlines() if "run directory:" in line]
    assert len(lines) == 2
    assert lines[0].endswith(f"run directory: {run_dir}")
    assert lines[1].endswith(f"run directory: {run_dir} (done)")
    printed = cifar100_run.stdout.splitlines()
    assert printed.index(lines[0]) < 3 and printed[-1] == lines[1]  # first and last


def test_a_100_class_test_prints_a_summary_not_200_lines(cifar100_run):
    printed = cifar100_run.stdout
    run_dir = cifar100_run.run_dir
    assert not re.search(r"^Accuracy of \w+ +: ", printed, re.MULTILINE)  # no class line
    assert "Test metric" not in printed and "test/acc_apple" not in printed  # no table
    assert re.search(r"^Worst 5 of 100 classes: (\w+ \d+ %, ){4}\w+ \d+ %$", printed, re.M)
    assert re.search(r"^Best 5 of 100 classes: ", printed, re.MULTILINE)
    where = f"Accuracy of each of the 100 classes: per_class_accuracy in {run_dir}/metrics.json"
    assert where in printed
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["per_class_accuracy"]) == 100 and "apple" in metrics["per_class_accuracy"]
    assert len(printed.splitlines()) < 45, printed
