"""``kdlight-report``: tables, statistics over seeds and plots of a study's runs.

    kdlight-report outputs/distill outputs/distill_grid [--out report/]

:func:`collect_runs` (:mod:`kdlight.records`) reads one record per run directory below the
given ones; a run that cannot be read is a failed run with the reason, the rest is reported.

Finished runs whose settings differ only in the seed form a group (:mod:`kdlight.stats`).
:func:`compare_runs` puts the distillation groups of one student model whose settings
differ only in T and alpha into one comparison, with its teacher and the comparable student
baseline: the same model, test images, epochs and data. Runs that differ in any of these are
never averaged together nor put in one table. Debug runs (``run.debug``) are in
``report.csv`` only.

:func:`build_report` writes, each file whole or not at all: ``report.csv`` (every run),
``groups.csv`` (every group: n, mean, std, 95% CI, difference from the baseline),
``report.md`` (one table per comparison, and whether its runs used the teacher cache),
``heatmap.png`` (group means over T x alpha of the main comparison; the others in
``heatmap_<model>[_<id>].png``) and ``per_class.png`` (teacher, baseline and best cell of
the main comparison; both plots in :mod:`kdlight.plots`).
This module holds the command and the CSV and Markdown writers.
"""

import argparse
import csv
import dataclasses
import io
import sys
from collections import Counter
from pathlib import Path

from kdlight.errors import KDLightError
from kdlight.io import atomic_write
from kdlight.plots import plot_heatmap, plot_per_class
from kdlight.records import (
    _cell,
    _collect,
    _fmt,
    _mean_std,
    _run_dirs,
    collect_runs,
    is_t_alpha_grid,
    load_run,
    read_metrics,
)
from kdlight.stats import (
    Comparison,
    Estimate,
    Group,
    differences,
    groups_of,
    noise_verdict,
)

# collect_runs, load_run and read_metrics moved to kdlight.records, the plots to kdlight.plots;
# importing them from here still works.
__all__ = ["build_report", "collect_runs", "load_run", "main", "plot_heatmap", "plot_per_class"]
__all__ += ["read_metrics", "write_csv", "write_groups_csv", "write_markdown"]

CSV_NUMBERS = {"test_acc": "accuracy", "val_acc_best": "val_acc_best"}
CSV_NUMBERS |= {"delta_vs_baseline": "delta_vs_baseline", "teacher_acc": "teacher_accuracy"}
CSV_FACTS = ("seed", "validation", "epochs", "test_images", "test_set", "debug", "group")
CSV_FACTS += ("teacher_cache",)  # true/false when the run asked for the cache, else empty
INTRO = (
    "Each row is one setting; its runs differ only in the seed. Test accuracy is the mean "
    "± standard deviation over seeds (n), with the 95% confidence interval of the mean "
    "(Student's t). Δ is the difference from the comparable student baseline (same model, "
    "test images, epochs and data) in percentage points, with its 95% interval: paired by "
    "seed when the baseline has the same seeds, else Welch's. A seed run more than once counts "
    "once, as the mean of its runs."
)


def _csv(header: list[str], rows: list[list]) -> str:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerows([header, *rows])
    return text.getvalue()


def write_csv(runs: list[dict], path: Path) -> Path:
    """``report.csv``: one row per run, debug runs and failures included. Newer columns
    follow the older ones of their kind (the teacher cache's last of the facts)."""
    classes = list(dict.fromkeys(c for run in runs for c in run["per_class"]))
    head = ["status", "model", "temperature", "alpha", *CSV_NUMBERS, *CSV_FACTS]
    head += ["teacher_cache_hit_rate"]
    rows = [
        [r["status"], r["model"] or "", _fmt(r["temperature"], "g"), _fmt(r["alpha"], "g")]
        + [_fmt(r[key], ".4f") for key in CSV_NUMBERS.values()]
        + ["" if r[key] is None else str(r[key]).lower() for key in CSV_FACTS]
        + [_fmt(r["teacher_cache_hit_rate"], ".4f")]
        + [_fmt(r["per_class"].get(c), ".4f") for c in classes]
        + [r["error"] or "", str(r["path"])]
        for r in runs
    ]
    return atomic_write(path, _csv([*head, *(f"acc_{c}" for c in classes), "error", "path"], rows))


def _alone(runs: list[dict], comparisons: list[Comparison]) -> list[Group]:
    """The groups trained without a teacher: those collected, and each comparison's baseline."""
    groups = {k: g for k, g in groups_of(runs).items() if g.first["role"] != "distill"}
    groups |= {c.baseline.key: c.baseline for c in comparisons if c.baseline}
    return sorted(groups.values(), key=lambda g: (g.first["role"], g.first["model"] or ""))


def write_groups_csv(runs: list[dict], comparisons: list[Comparison], path: Path) -> Path:
    """``groups.csv``: one row per group with the statistics ``report.md`` shows."""
    head = ["role", "model", "temperature", "alpha", "n", "seeds", "test_acc_mean", "test_acc_std"]
    head += ["test_acc_ci_low", "test_acc_ci_high", "val_acc_best_mean", "validation"]
    head += ["delta_mean", "delta_ci_low", "delta_ci_high", "delta_method", "baseline_group"]
    head += ["epochs", "test_images", "test_set", "group"]
    rows = []
    pairs = [(g, c) for c in comparisons for g in c.groups]
    for group, c in pairs + [(g, None) for g in _alone(runs, comparisons)]:
        run, acc, val = group.first, group.summary(), group.summary("val_acc_best")
        delta = c.deltas[group.key] if c else None
        rows.append(
            [run["role"], run["model"], _fmt(run["temperature"], "g"), _fmt(run["alpha"], "g")]
            + [acc.n, " ".join("?" if s is None else str(s) for s in group.seeds)]
            + [_fmt(x, ".4f") for x in (acc.mean, acc.std, acc.low, acc.high, val and val.mean)]
            + [_validation(group) or ""]
            + [_fmt(getattr(delta, k, None), ".4f") for k in ("mean", "low", "high")]
            + [delta.method if delta else "", c.baseline.key if c and c.baseline else ""]
            + [run["epochs"], run["test_images"], run["test_set"], group.key]
        )
    return atomic_write(path, _csv(head, rows))


def _validation(group: Group) -> str | None:
    """``held_out`` or ``test_set`` when all of the group's runs say so, else None."""
    kinds = {r["validation"] for r in group.runs}
    return kinds.pop() if len(kinds) == 1 else None


def _interval(estimate: Estimate | None, spec: str = ".2f") -> str:
    if estimate is None or not estimate.has_interval:
        return "—"
    return f"[{estimate.low:{spec}}, {estimate.high:{spec}}]"


def _seeds(group: Group) -> str:
    """``0, 1, 2``; a seed run twice ``0 (×2)``; an unknown seed ``?``."""
    counts = Counter("?" if r["seed"] is None else str(r["seed"]) for r in group.runs)
    return ", ".join(s if n == 1 or s == "?" else f"{s} (×{n})" for s, n in counts.items())


def _describe(group: Group) -> str:
    """``84.12 ± 0.31% test accuracy (n=3; seeds 0, 1, 2; 95% CI [83.35, 84.89])``."""
    acc = group.summary()
    spread = f" ± {acc.std:.2f}" if acc.std is not None else ""
    interval = f"; 95% CI {_interval(acc)}" if acc.has_interval else ""
    return f"{acc.mean:.2f}{spread}% test accuracy (n={acc.n}; seeds {_seeds(group)}{interval})"


VAL_HEADS = {"held_out": "best val acc (%)", "test_set": "best test acc over epochs (%)"}
VAL_HEADS[None] = "best val acc (%), split not recorded"
VAL_MARKS = {"test_set": "†", None: "‡"}
VAL_NOTES = {
    "test_set": "validated on the test set (`val_size=0`): the best test accuracy over epochs, "
    "never used to choose a cell.",
    None: "validation split not recorded (a run from before metrics.json said which).",
}


def _table(head: list[str], groups: list[Group], first_cells, delta_cells=None) -> list[str]:
    """A Markdown table of ``groups``: ``first_cells(group)``, test accuracy and its interval,
    ``delta_cells(group)``, the best validation accuracy (labelled by its split), seeds,
    epochs, test images and group id; then the footnotes it needs."""
    kinds = {_validation(g) for g in groups}
    uniform = next(iter(kinds)) if len(kinds) == 1 else "held_out"
    head = [*head, "test acc (%): mean ± std (n)", "95% CI"]
    head += ["Δ baseline (pp)", "Δ 95% CI"] if delta_cells else []
    head += [VAL_HEADS[uniform], "seeds", "epochs", "test images", "group"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for g in groups:
        acc, val = g.summary(), g.summary("val_acc_best")
        mark = "" if len(kinds) == 1 else VAL_MARKS.get(_validation(g), "")
        cells = [
            *first_cells(g),
            _mean_std(acc),
            _interval(acc),
            *(delta_cells(g) if delta_cells else []),
        ]
        cells += [(_fmt(val and val.mean) + mark) or "—", _seeds(g)]
        cells += [_fmt(g.first["epochs"], "d"), _fmt(g.first["test_images"], "d"), f"`{g.key}`"]
        lines.append("| " + " | ".join(cells) + " |")
    if len(kinds) > 1:
        notes = [f"{VAL_MARKS[k]} {VAL_NOTES[k]}" for k in kinds if k in VAL_MARKS]
    else:
        notes = (
            [f"{VAL_HEADS['test_set']}: {VAL_NOTES['test_set']}"] if uniform == "test_set" else []
        )
    return lines + (["", *notes] if notes else [])


def kd_groups(c: Comparison) -> list[Group]:
    """The KD cells (a temperature and an alpha) of ``c``: its T x alpha heatmap."""
    return [g for g in c.groups if None not in (g.first["temperature"], g.first["alpha"])]


def _method(run: dict) -> str:
    """A row of a table of methods: ``kd: T=4, alpha=0.9`` or ``dkd: temperature=4, ...``."""
    cell = _cell(run)
    return f"{run.get('method') or 'kd'}: {cell}" if run["temperature"] is not None else cell


def _runs_word(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


def _teacher_cache_line(c: Comparison) -> str | None:
    """``- Teacher cache: used by 4 of 6 runs, hit rate 0.0062 to 0.4612 (...)``, or, when
    the runs that asked for it all read the teacher's features, ``- Teacher cache: asked for
    by 2 runs, not used (...)``; None when none of ``c``'s runs asked for it."""
    runs = [r for g in c.groups for r in g.runs]
    asked = [r for r in runs if r["teacher_cache"] is not None]
    used = [r for r in asked if r["teacher_cache"]]
    if not asked:
        return None
    if not used:
        why = "their method reads the teacher's features"
        return f"- Teacher cache: asked for by {_runs_word(len(asked))}, not used ({why})"
    found = [r["teacher_cache_hit_rate"] for r in used]
    rates = sorted(rate for rate in found if rate is not None)  # none without lookups
    ends = dict.fromkeys(f"{rate:.4f}" for rate in rates[:1] + rates[-1:])  # one if equal
    shown = " to ".join(ends) or "not recorded"
    why = "a hit is the teacher's exact logits, so accuracies are unaffected"
    share = f"{len(used)} of {_runs_word(len(runs))}"
    return f"- Teacher cache: used by {share}, hit rate {shown} ({why})"


def _comparison_lines(c: Comparison) -> list[str]:
    lines = [f"## Distilled {c.model}" + (f": {c.differs}" if c.differs else ""), ""]
    if kd_groups(c):
        lines += [f"Heatmap (the KD cells): `{c.name}.png`.", ""]
    if c.teacher:
        lines.append(
            f"- Teacher ({c.teacher['model']}): {c.teacher['accuracy']:.2f}% test accuracy"
        )
    elif c.groups[0].first["teacher_accuracy"] is not None:
        measured = c.groups[0].first["teacher_accuracy"]
        lines.append(
            f"- Teacher: {measured:.2f}% test accuracy (as the distillation runs measured it)"
        )
    cache = _teacher_cache_line(c)
    lines += [cache] if cache else []
    baseline = _describe(c.baseline) if c.baseline else c.baseline_note
    lines.append(f"- Student baseline ({c.model}): {baseline}")
    if c.best:
        delta = c.deltas[c.best.key]
        if c.chosen_on == "validation":
            basis = "the highest mean validation accuracy (held-out split)"
        else:
            tested = any(r["validation"] == "test_set" for g in c.groups for r in g.runs)
            why = (
                "these runs validate on the test set" if tested else "no held-out split is recorded"
            )
            basis = f"the highest mean test accuracy ({why}, so this pick is optimistic)"
        gain = f", {delta.mean:+.2f} pp vs baseline" if delta else ""
        best = f"{_cell(c.best.first)}, {_describe(c.best)}{gain}"
        lines.append(f"- Best distilled {c.model}: {best}; chosen on {basis}.")
        lines.append(f"- {noise_verdict(delta)}")

    def delta_cells(group: Group) -> list[str]:
        delta = c.deltas[group.key]
        how = (
            {"paired": " paired", "welch": " Welch"}[delta.method]
            if delta and delta.has_interval
            else ""
        )
        return [_fmt(delta and delta.mean, "+.2f") or "—", _interval(delta, "+.2f") + how]

    if not is_t_alpha_grid(c):  # methods compared: each row's method and settings name it
        return [
            *lines,
            "",
            *_table(["method"], c.groups, lambda g: [_method(g.first)], delta_cells),
        ]

    def cell(group: Group) -> list[str]:
        return [_fmt(group.first["temperature"], "g"), _fmt(group.first["alpha"], "g")]

    return [*lines, "", *_table(["T", "alpha"], c.groups, cell, delta_cells)]


def write_markdown(runs: list[dict], comparisons: list[Comparison], path: Path, base: Path) -> Path:
    """``report.md``: one section and table per comparison, the runs trained alone, and the
    runs that failed, did not finish or were left out."""
    lines = ["# Distillation report", "", INTRO]
    debug = sum(r["debug"] for r in runs)
    if debug:
        why = "`run.debug: true`: fast_dev_run or limit_*_batches, a check rather than a result"
        left = f"Left out of the tables and statistics: {debug} debug run(s) ({why})"
        lines += ["", f"{left}; report.csv lists them."]
    for comparison in comparisons:
        lines += ["", *_comparison_lines(comparison)]
    alone = _alone(runs, comparisons)
    if alone:

        def names(group: Group) -> list[str]:  # and what tells a role's groups apart
            key = (group.first["role"], group.first["model"])
            same = [g.first for g in alone if (g.first["role"], g.first["model"]) == key]
            apart = differences(group.first, same)
            return [group.first["role"] + (f" ({apart})" if apart else ""), group.first["model"]]

        lines += ["", "## Trained alone", "", *_table(["run", "model"], alone, names)]

    def shown(p: Path) -> str:
        return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)

    problems = [r for r in runs if r["status"] != "finished"]
    if problems:
        lines += ["", "## Failed or unfinished runs", ""]
        for r in problems:
            reason = r["error"] or "no metrics.json or error.txt yet: still running, or crashed"
            lines.append(f"- `{shown(r['path'])}` ({r['status']}): {reason}")
    return atomic_write(path, "\n".join(lines) + "\n")


def build_report(dirs: list[Path], out_dir: Path) -> dict[str, Path]:
    """Write the CSVs, the Markdown report and the plots for the runs below ``dirs``. A
    report that cannot be written raises KDLightError ``cannot write report to <out_dir>``."""
    runs, comparisons = _collect(dirs)
    out_dir = Path(out_dir)
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise NotADirectoryError(0, "it is a file, not a folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = {
            "csv": write_csv(runs, out_dir / "report.csv"),
            "groups": write_groups_csv(runs, comparisons, out_dir / "groups.csv"),
            "markdown": write_markdown(
                runs, comparisons, out_dir / "report.md", Path(dirs[0]).resolve()
            ),
        }
        for comparison in (c for c in comparisons if kd_groups(c)):
            kd_cells = dataclasses.replace(comparison, groups=kd_groups(comparison))
            written[comparison.name] = plot_heatmap(kd_cells, out_dir / f"{comparison.name}.png")
        if comparisons:
            written["per_class"] = plot_per_class(comparisons[0], out_dir / "per_class.png")
    except OSError as err:
        raise KDLightError(f"cannot write report to {out_dir}: {err.strerror or err}") from err
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdlight-report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="runs or their parents")
    parser.add_argument("--out", type=Path, help="where the report goes (default: the first DIR)")
    args = parser.parse_args(argv)
    for d in args.dirs:
        if not d.is_dir():
            print(f"error: {d} is not a directory", file=sys.stderr)
            return 2
    if not any(_run_dirs(d) for d in args.dirs):
        names = ", ".join(map(str, args.dirs))
        message = f"no run directories (config.yaml or metrics.json) under {names}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    try:
        written = build_report(args.dirs, args.out or args.dirs[0])
    except KDLightError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(written["markdown"].read_text())
    for path in written.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
