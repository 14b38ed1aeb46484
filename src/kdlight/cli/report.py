"""``kdlight-report``: tables, statistics over seeds and plots of a study's runs.

    kdlight-report outputs/distill outputs/distill_grid [--out report/] [--reference dkd]

:func:`collect_runs` (:mod:`kdlight.analysis.records`) reads one record per run directory below
the given ones; a run that cannot be read is a failed run with the reason. Finished runs
that differ only in the seed form a group; :func:`compare_runs` puts the distillation groups
of one student model whose settings differ only in T and alpha into one comparison, with its
teacher, the comparable baseline (same model, test images, epochs and data) and a reference
row (:func:`~kdlight.analysis.stats.set_reference`; ``INTRO`` says it to the reader). Nothing
else is averaged or put in one table. Debug runs (``run.debug``) are in ``report.csv`` only.

:func:`build_report` writes, each file whole or not at all: ``report.csv`` (every run),
``groups.csv`` (every group: n, mean, std, 95% CI, difference from the baseline and from
the reference row; both CSVs name each row's method and its settings),
``report.md`` (one table per comparison, and whether its runs used the teacher cache),
``heatmap.png`` (group means over T x alpha of the main comparison; the others in
``heatmap_<model>[_<id>].png``) and ``per_class.png`` (teacher, baseline and best cell of
the main comparison; both plots in :mod:`kdlight.analysis.plots`).
This module holds the command and the CSV and Markdown writers.
"""

import argparse
import csv
import dataclasses
import io
import json
import sys
from collections import Counter
from pathlib import Path

from kdlight.analysis.plots import plot_heatmap, plot_per_class
from kdlight.analysis.records import (
    cell_name,
    collect_comparisons,
    collect_runs,
    fmt,
    mean_std,
    run_dirs,
)
from kdlight.analysis.stats import (
    BASELINE,
    Comparison,
    Estimate,
    Group,
    choose_best,
    differences,
    groups_of,
    method_of,
    noise_verdict,
    references,
    set_reference,
)
from kdlight.errors import KDLightError
from kdlight.runs.files import atomic_write

# collect_runs (kdlight.analysis.records) can be imported from here too
__all__ = ["build_report", "collect_runs", "main", "write_csv", "write_groups_csv"]
__all__ += ["write_markdown"]

CSV_NUMBERS = {"test_acc": "accuracy", "val_acc_best": "val_acc_best"}
CSV_NUMBERS |= {"delta_vs_baseline": "delta_vs_baseline", "teacher_acc": "teacher_accuracy"}
CSV_FACTS = ("seed", "validation", "epochs", "test_images", "test_set", "debug", "group")
CSV_FACTS += ("teacher_cache",)  # true/false when the run asked for the cache, else empty
INTRO = (
    "Each row is one setting; its runs differ only in the seed. Test accuracy is the mean "
    "± standard deviation over seeds (n), with the 95% confidence interval of the mean "
    "(Student's t). Δ is the difference from the comparable student baseline (same model, "
    "test images, epochs and data) in percentage points, with its 95% interval: paired by "
    "seed when the baseline has the same seeds, else Welch's. Each table's reference row "
    "(KD at the settings the other methods ran with, else the baseline, or `--reference`) "
    "gives every other row a second Δ, against it, computed the same way. A seed run more "
    "than once counts once, as the mean of its runs."
)


def _csv(header: list[str], rows: list[list]) -> str:
    text = io.StringIO()
    csv.writer(text).writerows([header, *rows])
    return text.getvalue()


def _setting(value) -> str:
    """A setting's value as ``method_settings`` writes it: ``4`` for 4.0, ``false``, ``[1,2]``."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return format(value, "g") if float(format(value, "g")) == value else repr(value)
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def method_settings(run: dict) -> str:
    """``temperature=4;alpha=1;beta=8;...``: the settings ``metrics.json`` records for the
    run's method (``distiller_settings``); for a KD run from before they were recorded, its
    T and alpha; empty for a run trained without a teacher."""
    found = run.get("method_settings") or {}
    if not found and method_of(run):
        found = {"temperature": run["temperature"], "alpha": run["alpha"]}
    return ";".join(f"{k}={_setting(v)}" for k, v in found.items() if v is not None)


def write_csv(runs: list[dict], path: Path) -> Path:
    """``report.csv``: one row per run, debug runs and failures included. Newer columns
    follow the older ones of their kind (the teacher cache's last of the facts); the method
    and its settings come last, after ``path``, so that no older column moves."""
    classes = list(dict.fromkeys(c for run in runs for c in run["per_class"]))
    head = ["status", "model", "temperature", "alpha", *CSV_NUMBERS, *CSV_FACTS]
    head += ["teacher_cache_hit_rate"]
    rows = [
        [r["status"], r["model"] or "", fmt(r["temperature"], "g"), fmt(r["alpha"], "g")]
        + [fmt(r[key], ".4f") for key in CSV_NUMBERS.values()]
        + ["" if r[key] is None else str(r[key]).lower() for key in CSV_FACTS]
        + [fmt(r["teacher_cache_hit_rate"], ".4f")]
        + [fmt(r["per_class"].get(c), ".4f") for c in classes]
        + [r["error"] or "", str(r["path"]), method_of(r) or "", method_settings(r)]
        for r in runs
    ]
    head += [*(f"acc_{c}" for c in classes), "error", "path", "method", "method_settings"]
    return atomic_write(path, _csv(head, rows))


def _alone(runs: list[dict], comparisons: list[Comparison]) -> list[Group]:
    """The groups trained without a teacher: those collected, and each comparison's baseline."""
    groups = {k: g for k, g in groups_of(runs).items() if g.first["role"] != "distill"}
    groups |= {c.baseline.key: c.baseline for c in comparisons if c.baseline}
    return sorted(groups.values(), key=lambda g: (g.first["role"], g.first["model"] or ""))


def write_groups_csv(runs: list[dict], comparisons: list[Comparison], path: Path) -> Path:
    """``groups.csv``: one row per group with the statistics ``report.md`` shows. The
    method, its settings and the Δ against the reference row follow the older columns
    (``reference``: the reference's method or ``baseline``; the reference row itself has
    no Δ and its own group as ``reference_group``)."""
    head = ["role", "model", "temperature", "alpha", "n", "seeds", "test_acc_mean", "test_acc_std"]
    head += ["test_acc_ci_low", "test_acc_ci_high", "val_acc_best_mean", "validation"]
    head += ["delta_mean", "delta_ci_low", "delta_ci_high", "delta_method", "baseline_group"]
    head += ["epochs", "test_images", "test_set", "group", "method", "method_settings"]
    head += ["reference", "reference_delta_mean", "reference_delta_ci_low"]
    head += ["reference_delta_ci_high", "reference_delta_method", "reference_group"]
    rows = []
    pairs = [(g, c) for c in comparisons for g in c.groups]
    for group, c in pairs + [(g, None) for g in _alone(runs, comparisons)]:
        run, acc, val = group.first, group.summary(), group.summary("val_acc_best")
        delta = c.deltas[group.key] if c else None
        versus = c.reference_deltas.get(group.key) if c else None
        reference = c.reference if c else None
        rows.append(
            [run["role"], run["model"], fmt(run["temperature"], "g"), fmt(run["alpha"], "g")]
            + [acc.n, " ".join("?" if s is None else str(s) for s in group.seeds)]
            + [fmt(x, ".4f") for x in (acc.mean, acc.std, acc.low, acc.high, val and val.mean)]
            + [_validation(group) or ""]
            + [fmt(getattr(delta, k, None), ".4f") for k in ("mean", "low", "high")]
            + [delta.method if delta else "", c.baseline.key if c and c.baseline else ""]
            + [run["epochs"], run["test_images"], run["test_set"], group.key]
            + [method_of(run) or "", method_settings(run), c.reference_method if c else ""]
            + [fmt(getattr(versus, k, None), ".4f") for k in ("mean", "low", "high")]
            + [versus.method if versus else "", reference.key if reference else ""]
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


def _table(
    head: list[str], groups: list[Group], first_cells, delta_cells=None, delta_heads=()
) -> list[str]:
    """A Markdown table of ``groups``: ``first_cells(group)``, test accuracy and its interval,
    ``delta_cells(group)`` (under ``delta_heads``), the best validation accuracy (labelled by
    its split), seeds, epochs, test images and group id; then the footnotes it needs."""
    kinds = {_validation(g) for g in groups}
    uniform = next(iter(kinds)) if len(kinds) == 1 else "held_out"
    head = [*head, "test acc (%): mean ± std (n)", "95% CI", *delta_heads]
    head += [VAL_HEADS[uniform], "seeds", "epochs", "test images", "group"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for g in groups:
        acc, val = g.summary(), g.summary("val_acc_best")
        mark = "" if len(kinds) == 1 else VAL_MARKS.get(_validation(g), "")
        cells = [
            *first_cells(g),
            mean_std(acc),
            _interval(acc),
            *(delta_cells(g) if delta_cells else []),
        ]
        cells += [(fmt(val and val.mean) + mark) or "—", _seeds(g)]
        cells += [fmt(g.first["epochs"], "d"), fmt(g.first["test_images"], "d"), f"`{g.key}`"]
        lines.append("| " + " | ".join(cells) + " |")
    if len(kinds) > 1:
        notes = [f"{VAL_MARKS[k]} {VAL_NOTES[k]}" for k in kinds if k in VAL_MARKS]
    else:
        notes = [f"{VAL_HEADS[uniform]}: {VAL_NOTES[uniform]}"] if uniform == "test_set" else []
    return lines + (["", *notes] if notes else [])


def _method(run: dict) -> str:
    """A row of a table of methods: ``kd: T=4, alpha=0.9`` or ``dkd: temperature=4, ...``."""
    cell = cell_name(run)
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
    if c.kd_cells:
        lines += [f"Heatmap (the KD cells): `{c.name}.png`.", ""]
    measured = c.groups[0].first["teacher_accuracy"]
    if c.teacher:
        lines += [f"- Teacher ({c.teacher['model']}): {c.teacher['accuracy']:.2f}% test accuracy"]
    elif measured is not None:
        lines += [
            f"- Teacher: {measured:.2f}% test accuracy (as the distillation runs measured it)"
        ]
    lines += filter(None, [_teacher_cache_line(c)])
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
        best = f"{cell_name(c.best.first)}, {_describe(c.best)}{gain}"
        lines.append(f"- Best distilled {c.model}: {best}; chosen on {basis}.")
        lines.append(f"- {noise_verdict(delta)}")
    lines += _reference_lines(c)

    reference = c.reference if c.reference_method != BASELINE else None
    heads = ["Δ baseline (pp)", "Δ baseline 95% CI"]
    heads += [f"Δ {c.reference_method} (pp)", f"Δ {c.reference_method} 95% CI"] if reference else []

    def delta_cells(group: Group) -> list[str]:
        cells = _delta_cells(c.deltas[group.key])
        if reference is None:
            return cells
        return cells + (
            ["reference", "—"]
            if group is reference
            else _delta_cells(c.reference_deltas[group.key])
        )

    def first_cells(group: Group) -> list[str]:
        if not grid:  # methods compared: each row's method and settings name it
            return [_method(group.first)]
        return [fmt(group.first["temperature"], "g"), fmt(group.first["alpha"], "g")]

    grid = len(c.kd_cells) == len(c.groups)
    head = ["T", "alpha"] if grid else ["method"]
    return [*lines, "", *_table(head, c.groups, first_cells, delta_cells, heads)]


def _delta_cells(delta: Estimate | None) -> list[str]:
    """A difference's two cells: ``+0.63`` and ``[+0.01, +1.26] paired`` (or Welch)."""
    named = {"paired": " paired", "welch": " Welch"}
    how = named[delta.method] if delta and delta.has_interval else ""
    return [fmt(delta and delta.mean, "+.2f") or "—", _interval(delta, "+.2f") + how]


def _reference_lines(c: Comparison) -> list[str]:
    """The reference row, how it was chosen, and the noise verdict of the best row against
    it (of the best other row when the best is the reference itself)."""
    if c.reference_method == BASELINE:
        found = "every Δ is against it" if c.baseline else "not found, no Δ computed"
        return [f"- Reference row: the student baseline ({c.reference_why}); {found}."]
    name = _method(c.reference.first)
    lines = [
        f"- Reference row: {name} ({c.reference_why}): {_describe(c.reference)}. Δ baseline is "
        f"each row against the student baseline, Δ {c.reference_method} against this row."
    ]
    others = [g for g in c.groups if g is not c.reference]
    if not others or c.best is None:
        return lines
    if c.best is not c.reference:
        best, subject, first = c.best, "the best row", ""
    else:  # the next best, chosen on the same basis
        best = choose_best(others)[0]
        subject = f"the next best row ({_method(best.first)})"
        first = "the best row is the reference itself; "
    verdict = noise_verdict(c.reference_deltas[best.key], against=name, subject=subject)
    return [*lines, f"- Against the reference: {first}{verdict[:1].lower()}{verdict[1:]}"]


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

    problems = [r for r in runs if r["status"] != "finished"]
    if problems:
        lines += ["", "## Failed or unfinished runs", ""]
        for r in problems:
            shown = r["path"].relative_to(base) if r["path"].is_relative_to(base) else r["path"]
            reason = r["error"] or "no metrics.json or error.txt yet: still running, or crashed"
            lines.append(f"- `{shown}` ({r['status']}): {reason}")
    return atomic_write(path, "\n".join(lines) + "\n")


def build_report(dirs: list[Path], out_dir: Path, reference: str | None = None) -> dict[str, Path]:
    """Write the CSVs, the Markdown report and the plots for the runs below ``dirs``, each
    table's reference row the method ``reference`` names (or ``baseline``; default: KD at
    the runs' settings, else the baseline). A reference that no table has raises
    KDLightError naming those there (``--reference crd: no crd runs in these tables; the
    references there are baseline, dkd, kd``), before anything is written; a report that
    cannot be written raises KDLightError ``cannot write report to <out_dir>``."""
    runs, comparisons = collect_comparisons(dirs)
    if reference is not None:
        wanted, there = reference.strip().lower(), references(comparisons)
        if wanted not in there:
            offered = ", ".join(there) or "none (no distilled students)"
            raise KDLightError(
                f"--reference {reference}: no {wanted} runs in these tables; the references "
                f"there are {offered}"
            )
        for comparison in comparisons:
            set_reference(comparison, wanted)
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
        for comparison in (c for c in comparisons if c.kd_cells):
            kd_cells = dataclasses.replace(comparison, groups=comparison.kd_cells)
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
    parser.add_argument(
        "--reference",
        metavar="METHOD",
        help="the row every other is compared with: a method (kd, dkd, ...) or baseline "
        "(default: KD at the runs' settings, else the baseline)",
    )
    args = parser.parse_args(argv)
    try:
        if missing := [d for d in args.dirs if not d.is_dir()]:
            raise KDLightError(f"{missing[0]} is not a directory")
        if not any(run_dirs(d) for d in args.dirs):
            names = ", ".join(map(str, args.dirs))
            raise KDLightError(f"no run directories (config.yaml or metrics.json) under {names}")
        written = build_report(args.dirs, args.out or args.dirs[0], args.reference)
    except KDLightError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(written["markdown"].read_text())
    for path in written.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
