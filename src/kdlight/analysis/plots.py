"""The plots of ``kdlight-report``: the heatmap of a comparison's group means over
temperature x alpha (:func:`plot_heatmap`) and the per-class accuracy of its teacher, baseline
and best cell (:func:`plot_per_class`). Each PNG is written whole or not at all; matplotlib
is imported only when a plot is drawn, and renders with Agg without touching pyplot's backend.
"""

import math
import textwrap
from pathlib import Path

from kdlight.analysis.records import cell_name, mean_std
from kdlight.analysis.stats import Comparison, Group
from kdlight.runs.files import atomic_write

#: The pixels per inch of every PNG: figure sizes below are in inches.
DPI = 120
#: The widest a per-class plot gets: a screen's width (1600 pixels at :data:`DPI`).
MAX_WIDTH_IN = 1600 / DPI
#: Class rows per panel below which the per-class plot is one panel; beyond, up to
#: :data:`MAX_PANELS` panels side by side, each as tall as its share of the classes.
ROWS_PER_PANEL = 25
MAX_PANELS = 4
#: A class name longer than this is shortened (with "…") on the per-class plot's axis.
MAX_LABEL_CHARS = 18
TITLE_POINTS = 11


def _save(fig, path: Path) -> Path:
    return atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=DPI))


def _wrap_to(fig, lines: list[str], points: float = TITLE_POINTS) -> str:
    """``lines`` wrapped to the figure's width: a character of a ``points`` font is at most
    about 0.6 of its height wide, so this many fit between the figure's edges."""
    width = max(20, int(fig.get_figwidth() * 72 / (0.6 * points)) - 4)
    return "\n".join(part for line in lines for part in textwrap.wrap(line, width) or [""])


def heatmap_figure(c: Comparison):
    """The figure of :func:`plot_heatmap`, not yet saved (its title fits the figure)."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, leaves the backend alone
    from matplotlib.patches import Rectangle

    cells: dict[tuple, Group | dict] = {
        (g.first["temperature"], g.first["alpha"]): g for g in c.groups
    }
    for run in c.pending:
        if run["temperature"] is not None and run["alpha"] is not None:
            cells.setdefault((run["temperature"], run["alpha"]), run)
    temps, alphas = sorted({t for t, _ in cells}), sorted({a for _, a in cells})
    grid = [[cells.get((t, a)) for t in temps] for a in alphas]
    means = [g.summary().mean for g in c.groups]
    low, high = min(means), max(means)
    low, high = (low - 1, high + 1) if high - low < 1e-9 else (low, high)

    # constrained layout keeps room for the (wrapped) title and the colorbar's label
    fig = Figure(
        figsize=(max(6.5, 1.6 * len(temps) + 3), max(4.5, 1.1 * len(alphas) + 2.5)),
        layout="constrained",
    )
    ax = fig.add_subplot()
    values = [[g.summary().mean if isinstance(g, Group) else math.nan for g in row] for row in grid]
    image = ax.imshow(values, cmap="viridis", vmin=low, vmax=high, origin="lower", aspect="auto")
    for i, row in enumerate(grid):
        for j, cell in enumerate(row):
            if not isinstance(cell, Group):
                shade = "0.85" if cell else "white"  # grey: a run that has no result yet
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fc=shade, ec="0.5", hatch="//"))
                box = {"facecolor": "white", "edgecolor": "none", "alpha": 0.8}
                label = cell["status"] if cell else "no run"
                ax.text(j, i, label, ha="center", va="center", color="0.2", bbox=box)
                continue
            acc, delta = cell.summary(), c.deltas[cell.key]
            text = f"{acc.mean:.2f}%\n" + (f"±{acc.std:.2f}, " if acc.std is not None else "")
            text += f"n={acc.n}" + (f"\n{delta.mean:+.2f} pp" if delta else "")
            color = "white" if (acc.mean - low) / (high - low) < 0.6 else "black"
            weight = "bold" if cell is c.best else "normal"
            ax.text(j, i, text, ha="center", va="center", color=color, fontweight=weight)
    ax.set_xticks(range(len(temps)), [f"{t:g}" for t in temps])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set(xlabel="temperature T", ylabel="alpha (weight of the teacher's soft targets)")
    notes = [f"teacher {c.teacher['accuracy']:.2f}%"] if c.teacher else []
    baseline = c.baseline and f"baseline {mean_std(c.baseline.summary(), '%')} (Δ in pp)"
    notes.append(baseline or "no comparable baseline")
    notes.append(f"bold: best on {'val' if c.chosen_on == 'validation' else 'test'} acc")
    # the title centred on the figure, not on the axes beside the colorbar, and wrapped
    title = [f"Distilled {c.model}: mean test accuracy over seeds", c.differs, ", ".join(notes)]
    fig.suptitle(_wrap_to(fig, [line for line in title if line]), fontsize=TITLE_POINTS)
    fig.colorbar(image, ax=ax, label="mean test accuracy (%)")
    return fig


def plot_heatmap(c: Comparison, path: Path) -> Path:
    """Mean test accuracy of ``c``'s groups over temperature (x) and alpha (y), with n and
    the difference from the baseline; cells without a result show why."""
    return _save(heatmap_figure(c), path)


def _short(name: str) -> str:
    return name if len(name) <= MAX_LABEL_CHARS else name[: MAX_LABEL_CHARS - 1] + "…"


def per_class_figure(c: Comparison):
    """The figure of :func:`plot_per_class`, not yet saved.

    One row per class, a marker per model (a dot plot: three bars a class made 100 classes
    11,040 pixels wide), the classes sorted by the best cell's accuracy, worst first, so
    that the classes distillation helps least are together. Beyond
    :data:`ROWS_PER_PANEL` classes the rows go into up to :data:`MAX_PANELS` panels side
    by side; the figure is never wider than :data:`MAX_WIDTH_IN` and grows only in height,
    a row a class name's height apart."""
    from matplotlib.figure import Figure

    series = []
    if c.teacher:
        label = f"teacher {c.teacher['model']} ({c.teacher['accuracy']:.2f}%)"
        series.append((label, c.teacher["per_class"]))
    if c.baseline:
        label = f"student baseline {c.model} ({mean_std(c.baseline.summary(), '%')})"
        series.append((label, c.baseline.per_class()))
    best = c.best.per_class()
    label = f"best distilled {c.model}, {cell_name(c.best.first)}"
    series.append((f"{label} ({mean_std(c.best.summary(), '%')})", best))
    classes = list(dict.fromkeys(name for _, accs in series for name in accs))
    # worst first; a class without a result of the best cell last
    classes.sort(key=lambda name: (best.get(name) is None, best.get(name) or 0.0))

    panels = min(MAX_PANELS, math.ceil(len(classes) / ROWS_PER_PANEL))
    rows = math.ceil(len(classes) / panels)
    width = min(MAX_WIDTH_IN, max(8.0, 1.2 + 3.1 * panels))
    header = 0.8 + 0.22 * len(series)  # the title and the legend, one line per model
    fig = Figure(figsize=(width, header + 0.6 + 0.26 * max(rows, 4)), layout="constrained")
    axes = fig.subplots(1, panels, sharex=True, squeeze=False)[0]
    markers = ["s", "o", "D"][-len(series) :]
    for p, ax in enumerate(axes):
        names = classes[p * rows : (p + 1) * rows]
        ys = range(len(names))
        for (label, accs), marker in zip(series, markers, strict=True):
            xs = [math.nan if accs.get(name) is None else accs[name] for name in names]
            ax.scatter(xs, ys, s=18, marker=marker, label=label if p == 0 else None, zorder=3)
        ax.set_yticks(ys, [_short(name) for name in names], fontsize=8)
        ax.set_ylim(rows - 0.5, -0.5)  # worst at the top; every panel on one row scale
        ax.set_xlim(0, 102)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel("test accuracy (%)", fontsize=8)
        ax.grid(axis="both", alpha=0.3)
    title = "Per-class test accuracy (means over seeds), worst class of the best first"
    fig.suptitle(_wrap_to(fig, [title]), fontsize=TITLE_POINTS)
    fig.legend(loc="outside lower center", ncol=1, fontsize=8, frameon=False)
    return fig


def plot_per_class(c: Comparison, path: Path) -> Path:
    """Per-class accuracy of the teacher, the baseline and the best cell (means over seeds),
    readable at any class count (:func:`per_class_figure`)."""
    return _save(per_class_figure(c), path)
