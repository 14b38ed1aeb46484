"""What a run shows: the report's plots readable at CIFAR-100's class count (the size of
``per_class.png``, labels that do not overlap, the heatmap's title inside its figure), the
test report's lines, the run's log (no Lightning noise, the run directory at its start and
end) and what a tracker is told of a run."""

import json
from itertools import pairwise
from pathlib import Path

import pytest
from matplotlib.text import Text
from PIL import Image

from kdlight.plots import heatmap_figure, per_class_figure, plot_per_class
from kdlight.records import collect_runs
from kdlight.stats import compare_runs
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
