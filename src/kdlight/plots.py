"""The plots of ``kdlight-report``: the heatmap of a comparison's group means over
temperature x alpha (:func:`plot_heatmap`) and the per-class accuracy of its teacher, baseline
and best cell (:func:`plot_per_class`). Each PNG is written whole or not at all; matplotlib
is imported only when a plot is drawn, and renders with Agg without touching pyplot's backend.
"""

import math
import textwrap
from pathlib import Path

from kdlight.io import atomic_write
from kdlight.records import _cell, _mean_std
from kdlight.stats import Comparison, Group


def _save(fig, path: Path) -> Path:
    return atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=120))


def plot_heatmap(c: Comparison, path: Path) -> Path:
    """Mean test accuracy of ``c``'s groups over temperature (x) and alpha (y), with n and
    the difference from the baseline; cells without a result show why."""
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

    fig = Figure(figsize=(max(6.5, 1.6 * len(temps) + 3), max(4.5, 1.1 * len(alphas) + 2.5)))
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
    if c.baseline:
        notes.append(f"baseline {_mean_std(c.baseline.summary(), '%')} (Δ in pp)")
    else:
        notes.append("no comparable baseline")
    notes.append(f"bold: best on {'val' if c.chosen_on == 'validation' else 'test'} acc")
    title = [f"Distilled {c.model}: mean test accuracy over seeds", *textwrap.wrap(c.differs, 70)]
    ax.set_title("\n".join([*title, ", ".join(notes)]))
    fig.colorbar(image, ax=ax, label="mean test accuracy (%)")
    fig.tight_layout()
    return _save(fig, path)


def plot_per_class(c: Comparison, path: Path) -> Path:
    """Per-class accuracy of the teacher, the baseline and the best cell (means over seeds)."""
    from matplotlib.figure import Figure

    series = []
    if c.teacher:
        series.append(
            (f"teacher {c.teacher['model']} ({c.teacher['accuracy']:.2f}%)", c.teacher["per_class"])
        )
    if c.baseline:
        label = f"student baseline {c.model} ({_mean_std(c.baseline.summary(), '%')})"
        series.append((label, c.baseline.per_class()))
    label = f"best distilled {c.model}, {_cell(c.best.first)} ({_mean_std(c.best.summary(), '%')})"
    series.append((label, c.best.per_class()))
    classes = list(dict.fromkeys(name for _, accs in series for name in accs))
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(9, 0.9 * len(classes) + 2), 5.5))
    ax = fig.add_subplot()
    for k, (label, accs) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(classes))]
        ys = [math.nan if accs.get(name) is None else accs[name] for name in classes]
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set(
        ylim=(0, 105),
        ylabel="test accuracy (%)",
        title="Per-class test accuracy (means over seeds)",
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=min(3, len(series)), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
