"""Statistics over seeds for ``kdlight-report``: groups of runs (:class:`Group`), means with
confidence intervals (:func:`summarize`), differences from a baseline or a reference row
(:func:`difference`), comparisons (:func:`compare_runs`) and which cell of a sweep is best.
One run per setting gives a number but no interval: the seed-to-seed noise can only be
measured from two seeds or more."""

import json
import math
import statistics
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from scipy.stats import ttest_1samp, ttest_ind

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` values with its sample standard deviation and ``CONFIDENCE``
    interval (``std``, ``low`` and ``high`` are None for one value). ``method`` says how it
    was computed: ``mean``, or for a difference ``paired`` or ``welch``."""

    n: int
    mean: float
    std: float | None = None
    low: float | None = None
    high: float | None = None
    method: str = "mean"

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None


def with_interval(estimate: Estimate, t_test: Callable) -> Estimate:
    """``estimate`` with the ``CONFIDENCE`` interval of ``t_test()``, a scipy.stats t-test
    of the same mean; a point when ``estimate.std`` is 0 (every value equal: no spread to
    divide by)."""
    if estimate.std == 0:
        return replace(estimate, low=estimate.mean, high=estimate.mean)
    with warnings.catch_warnings():  # scipy's "precision loss" for values equal to a few ulp
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = t_test().confidence_interval(CONFIDENCE)
    return replace(estimate, low=float(low), high=float(high))


def summarize(values: list[float]) -> Estimate | None:
    """Mean ``m = sum(x) / n``, sample standard deviation
    ``s = sqrt(sum((x - m)^2) / (n - 1))`` and the interval ``m -+ t(0.975, n - 1) * s / sqrt(n)``
    of ``values`` (``scipy.stats.ttest_1samp``); None for no values."""
    if not values:
        return None
    if len(values) == 1:
        return Estimate(1, float(values[0]))
    estimate = Estimate(len(values), statistics.fmean(values), statistics.stdev(values))
    return with_interval(estimate, lambda: ttest_1samp(values, 0.0))


def paired_difference(values: dict, baseline: dict) -> Estimate:
    """The mean of the per-seed differences ``d_s = values[s] - baseline[s]`` over the seeds
    both hold, with the interval ``mean(d) -+ t(0.975, n - 1) * std(d) / sqrt(n)``
    (:func:`summarize` of ``d``: ``scipy.stats.ttest_rel`` is ``ttest_1samp`` of ``d``).
    Pairing removes what one seed does to both runs (initialisation, data order), so it is
    tighter than comparing two means when the seeds match."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        raise ValueError("paired_difference needs at least one seed in common")
    return replace(summarize([values[s] - baseline[s] for s in seeds]), method="paired")


def welch_difference(values: list[float], baseline: list[float]) -> Estimate:
    """``d = mean(a) - mean(b)`` with Welch's interval ``d -+ t(0.975, nu) * se``, where
    ``se = sqrt(s_a^2 / n_a + s_b^2 / n_b)`` and
    ``nu = se^4 / ((s_a^2 / n_a)^2 / (n_a - 1) + (s_b^2 / n_b)^2 / (n_b - 1))``
    (Welch-Satterthwaite; ``scipy.stats.ttest_ind(equal_var=False)``). It assumes neither
    equal variances nor matching seeds; it needs two values on each side for an interval.
    ``std`` is ``se``, the difference's standard error, and ``n`` the smaller of the two
    counts."""
    a, b = summarize(values), summarize(baseline)
    if a is None or b is None:
        raise ValueError("welch_difference needs values on both sides")
    estimate = Estimate(min(a.n, b.n), a.mean - b.mean, method="welch")
    if a.std is None or b.std is None:
        return estimate
    estimate = replace(estimate, std=math.sqrt(a.std**2 / a.n + b.std**2 / b.n))
    return with_interval(estimate, lambda: ttest_ind(values, baseline, equal_var=False))


#: What :class:`Group` reads of each run: a record's key, or a function of the record.
Field = str | Callable[[dict], float | None]


@dataclass
class Group:
    """Finished runs (records of :func:`kdlight.analysis.records.load_run`) whose settings
    differ only in the seed. Several runs of one seed are repeats of one run: they count
    once, as their mean. Runs whose seed is unknown count once each."""

    key: str
    runs: list[dict]

    @property
    def first(self) -> dict:
        return self.runs[0]

    def per_seed(self, field: Field = "accuracy") -> tuple[dict, list[float]]:
        """``({seed: mean of field over that seed's runs}, [field of each unknown-seed run])``,
        leaving out runs where ``field`` (a record key, or a function of the record) is None."""
        read = field if callable(field) else lambda run: run.get(field)
        known: dict = {}
        for run in self.runs:
            if (value := read(run)) is not None:
                known.setdefault(run.get("seed"), []).append(value)
        unknown = known.pop(None, [])
        return {seed: statistics.fmean(v) for seed, v in sorted(known.items())}, unknown

    def values(self, field: Field = "accuracy") -> list[float]:
        known, unknown = self.per_seed(field)
        return [*known.values(), *unknown]

    def summary(self, field: Field = "accuracy") -> Estimate | None:
        return summarize(self.values(field))

    @property
    def seeds(self) -> list:
        """The distinct seeds, sorted, then None once per run of unknown seed."""
        known = sorted({r["seed"] for r in self.runs if r.get("seed") is not None})
        return known + [None] * sum(r.get("seed") is None for r in self.runs)

    def per_class(self) -> dict[str, float | None]:
        """Each class's accuracy averaged like the test accuracy (one value per seed); None
        for a class that no run has an accuracy for (no test image of it)."""
        means = {}
        for name in dict.fromkeys(c for run in self.runs for c in run["per_class"]):
            values = self.values(lambda run, name=name: run["per_class"].get(name))
            means[name] = statistics.fmean(values) if values else None
        return means


def difference(group: Group, baseline: Group) -> Estimate | None:
    """``group`` minus ``baseline`` in test accuracy: paired by seed when both hold exactly the
    same known seeds, else Welch's difference of means. None when either has no value."""
    mine, theirs = group.per_seed()[0], baseline.per_seed()[0]
    values, base = group.values(), baseline.values()
    if not values or not base:
        return None
    if mine and set(mine) == set(theirs) and len(mine) == len(values) == len(base):
        return paired_difference(mine, theirs)
    return welch_difference(values, base)


def choose_best(groups: list[Group]) -> tuple[Group | None, str]:
    """The best group of a sweep and the basis of the choice: ``validation`` (the highest
    mean best-validation accuracy) when every group validated on a held-out split, else
    ``test`` (the highest mean test accuracy). A ``val_acc_best`` measured on the test set
    (``val_size=0``) is never used: choosing on it would pick by the test set twice."""
    held_out = all(r.get("validation") == "held_out" for g in groups for r in g.runs)
    if groups and held_out and all(g.summary("val_acc_best") for g in groups):
        return max(groups, key=lambda g: g.summary("val_acc_best").mean), "validation"
    scored = [g for g in groups if g.summary() is not None]
    return max(scored, key=lambda g: g.summary().mean, default=None), "test"


def _pp(value: float) -> str:
    return f"{value:+.2f}"


def noise_verdict(
    delta: Estimate | None, against: str = "the baseline", subject: str = "the best cell"
) -> str:
    """One sentence: is ``subject``'s difference ``delta`` from ``against`` (the baseline, or
    a reference row such as ``kd: T=4, alpha=0.9``) within the seed-to-seed noise? Judged
    by whether its 95% interval holds 0."""
    if delta is None:
        against = "student baseline" if against == "the baseline" else against
        return f"Without a comparable {against} {subject}'s gain cannot be judged."
    subject = subject[:1].upper() + subject[1:]  # it starts the sentence
    how = "paired by seed" if delta.method == "paired" else "Welch"
    if not delta.has_interval:
        sides = "the cell or of the baseline" if against == "the baseline" else "either row"
        return (
            f"{subject}'s gain over {against}, {_pp(delta.mean)} pp, cannot be told apart "
            f"from seed-to-seed noise: a single seed of {sides} gives no "
            "measure of that noise (run more seeds, e.g. `seed=0,1,2`)."
        )
    interval = f"95% CI [{_pp(delta.low)}, {_pp(delta.high)}] pp, {how}, n={delta.n}"
    noise = delta.low <= 0 <= delta.high
    kind = "gain over" if noise or delta.mean > 0 else "loss against"
    verdict = "within" if noise else "larger than"
    return (
        f"{subject}'s {kind} {against}, {_pp(delta.mean)} pp ({interval}), is {verdict} the "
        f"seed-to-seed noise: its interval {'includes' if noise else 'excludes'} 0."
    )


# --------------------------------------------------------------------------- comparisons
#: Settings that must be equal for two runs' accuracies to be compared at all, besides the
#: test images and the number of epochs.
DATA_KEYS = ("data.source", "data.train_subset", "data.eval_subset", "data.val_size")
DATA_KEYS += ("data.synthetic_train_size", "data.synthetic_test_size")
CELL_KEYS = ("distill.temperature", "distill.alpha")
#: The runs of a student trained alone that are its baseline, by experiment name: with
#: the reference recipe, and with the CIFAR-100 zoo's (``experiment=zoo_student``).
BASELINE_ROLES = ("student_baseline", "zoo_student")
#: The name of the student baseline as a reference (``kdlight-report --reference baseline``).
BASELINE = "baseline"
#: The default reference: KD, the method every other is usually measured against.
DEFAULT_REFERENCE = "kd"


def is_cell_key(key: str) -> bool:
    """Whether a setting names a row of a comparison (the method and its settings, KD's T
    and alpha; a method grid's methods) rather than what the rows share."""
    return key in CELL_KEYS or key.startswith(("distiller.", "methods.", "module.distiller"))


@dataclass
class Comparison:
    """The distillation groups of one student model whose settings differ only in the
    method and its settings (one table, and one heatmap of its KD cells), with what they are
    compared with: the baseline, and the reference row (:func:`set_reference`)."""

    model: str
    groups: list[Group]  # by (T, alpha)
    teacher: dict | None  # the teacher's run record
    baseline: Group | None
    baseline_note: str  # why there is no baseline
    best: Group | None
    chosen_on: str  # "validation" or "test"
    deltas: dict[str, Estimate | None]  # group key -> difference from the baseline
    name: str = "heatmap"  # the heatmap's file name, without .png
    differs: str = ""  # the settings that set it apart from the model's other comparisons
    pending: list[dict] = field(default_factory=list)  # its model's failed or unfinished cells
    #: The row every other is compared with: one of ``groups``, or the baseline (which may
    #: be None) when ``reference_method`` is ``baseline``; see :func:`set_reference`.
    reference: Group | None = None
    reference_method: str = BASELINE
    reference_deltas: dict[str, Estimate | None] = field(default_factory=dict)  # key -> Δ
    reference_why: str = ""  # how the reference was chosen, for the report

    @property
    def kd_cells(self) -> list[Group]:
        """The KD cells of its groups (a temperature and an alpha): its T x alpha heatmap."""
        return [g for g in self.groups if None not in (g.first["temperature"], g.first["alpha"])]


def groups_of(runs: list[dict]) -> dict[str, Group]:
    """The finished, non-debug runs by group, in the order of ``runs``."""
    groups: dict[str, Group] = {}
    for run in runs:
        if run["status"] == "finished" and not run["debug"]:
            groups.setdefault(run["group"], Group(run["group"], [])).runs.append(run)
    return groups


def comparable(run: dict) -> dict:
    """What must be equal for two runs' accuracies to be compared."""
    facts = {key: run[key] for key in ("test_images", "test_set", "epochs")}
    return facts | {key: (run["settings"] or {}).get(key) for key in DATA_KEYS}


def find_baseline(student: dict, candidates: list[dict]) -> tuple[Group | None, str]:
    """The baseline group (a run of :data:`BASELINE_ROLES`) among ``candidates`` comparable
    with the distilled ``student`` run (same model, test images, epochs and data); of
    several, the one that shares most other settings, then has most seeds. Else
    ``(None, why)``."""
    found = [
        r
        for r in candidates
        if (r["system"], r["model"]) == ("ClassifierModule", student["model"])
        and r["role"] in BASELINE_ROLES
        and "eval.checkpoint" not in (r["settings"] or {})  # a test of a named checkpoint
    ]
    groups = list(groups_of(found).values())
    target = comparable(student)
    matching = [g for g in groups if comparable(g.first) == target]
    if not matching:
        if not groups:
            return None, "not found, no Δ computed"
        theirs = comparable(groups[0].first)
        changed = ", ".join(
            f"{k}={theirs[k]} (here {v})" for k, v in target.items() if theirs[k] != v
        )
        return None, f"none comparable (the baseline runs have {changed}), no Δ computed"

    def shared(group: Group) -> int:
        mine, theirs = student["settings"] or {}, group.first["settings"] or {}
        return sum(theirs.get(k) == v for k, v in mine.items() if not k.startswith("distill."))

    return max(matching, key=lambda g: (shared(g), len(g.values()))), ""


def find_teacher_run(student: dict, candidates: list[dict]) -> dict | None:
    """The finished teacher run of ``student``: the run whose ``checkpoints/`` folder holds
    its ``teacher_checkpoint``."""
    if not student["teacher_checkpoint"]:
        return None
    folder = Path(student["teacher_checkpoint"]).resolve().parents[1]
    return next((r for r in candidates if r["path"] == folder and r["status"] == "finished"), None)


def compare_runs(runs: list[dict], referenced: list[dict] = ()) -> list[Comparison]:
    """The comparisons of ``runs``, the main one first (the student model with the most
    distillation runs, then the comparison with the most runs). Baselines and teachers are
    looked for in ``runs`` and ``referenced`` (runs found elsewhere, e.g. under
    ``paths.root``). Sets each distilled run's ``delta_vs_baseline``: its accuracy minus the
    baseline's mean (percentage points)."""
    candidates = [*runs, *referenced]
    sweeps: dict[str, list[Group]] = {}
    for group in groups_of(runs).values():
        if group.first["role"] == "distill" and group.first["model"]:
            sweeps.setdefault(group.first["sweep"], []).append(group)
    comparisons = []
    for groups in sweeps.values():
        groups.sort(key=lambda g: (g.first["temperature"] or 0, g.first["alpha"] or 0))
        student = groups[0].first
        baseline, note = find_baseline(student, candidates)
        best, chosen_on = choose_best(groups)
        deltas = {g.key: baseline and difference(g, baseline) for g in groups}
        teacher = find_teacher_run(student, candidates)
        comparison = Comparison(
            student["model"], groups, teacher, baseline, note, best, chosen_on, deltas
        )
        set_reference(comparison)
        comparisons.append(comparison)
        mean = baseline.summary().mean if baseline else None
        for run in (r for g in groups for r in g.runs):
            run["delta_vs_baseline"] = None if mean is None else run["accuracy"] - mean

    counts = Counter(r["model"] for r in runs if r["role"] == "distill" and not r["debug"])
    comparisons.sort(key=lambda c: (-counts[c.model], c.model, -sum(len(g.runs) for g in c.groups)))
    for k, comparison in enumerate(comparisons):
        same = [c for c in comparisons if c.model == comparison.model]
        first = comparison.groups[0].first
        comparison.differs = differences(first, [c.groups[0].first for c in same])
        if k:  # heatmap.png, heatmap_<model>.png, heatmap_<model>_<sweep>.png
            sweep = "" if comparison is same[0] else f"_{first['sweep']}"
            comparison.name = f"heatmap_{comparison.model}{sweep}"
    for run in runs:
        main = next((c for c in comparisons if c.model == run["model"]), None)
        if run["status"] != "finished" and run["role"] == "distill" and main:
            main.pending.append(run)
    return comparisons


def method_of(run: dict) -> str | None:
    """A distilled run's method (``kd``, ``dkd``, ...) as its ``metrics.json`` names it; a
    run from before it was named, with a temperature and an alpha, is KD; None for a run
    trained without a teacher."""
    if run.get("method"):
        return run["method"]
    return DEFAULT_REFERENCE if run.get("temperature") is not None else None


def references(comparisons: list[Comparison]) -> list[str]:
    """The references ``comparisons`` offer: their methods, and ``baseline`` where one has
    a baseline; sorted."""
    found = {method_of(g.first) for c in comparisons for g in c.groups} - {None}
    return sorted(found | ({BASELINE} if any(c.baseline for c in comparisons) else set()))


def _nearest(candidates: list[Group], others: list[Group]) -> Group:
    """Of ``candidates`` (groups of one method), the one run at the settings the ``others``
    ran with: the most of their row settings (``distill.temperature``, ``distill.alpha``,
    ``distiller.standardize``...) equal, then the most seeds, then the first."""
    missing = object()

    def shared(group: Group) -> int:
        mine = group.first["settings"] or {}
        return sum(
            mine.get(key, missing) == value
            for other in others
            for key, value in (other.first["settings"] or {}).items()
            if is_cell_key(key)
        )

    return max(candidates, key=lambda g: (shared(g), len(g.values()), -candidates.index(g)))


def set_reference(c: Comparison, wanted: str | None = None) -> None:
    """Set ``c``'s reference row and every group's difference from it (paired by seed where
    the seeds match, else Welch's, as from the baseline). ``wanted`` is a method name or
    ``baseline``; None asks for the default: KD at the settings the table's other methods
    ran with (a table of KD cells alone has no such settings: its reference is the baseline),
    else the baseline. Of several groups of the method, the one nearest the others'
    settings (:func:`_nearest`). A table without the wanted method keeps its default and
    says so in ``reference_why``."""
    name = wanted or DEFAULT_REFERENCE
    candidates = [g for g in c.groups if method_of(g.first) == name]
    others = [g for g in c.groups if method_of(g.first) != name]
    # the baseline asked for wins; KD cells alone have no default: none is "the runs' settings"
    if candidates and name != BASELINE and (wanted is not None or others):
        reference = _nearest(candidates, others)
        c.reference, c.reference_method = reference, name
        c.reference_deltas = {
            g.key: None if g is reference else difference(g, reference) for g in c.groups
        }
        default = "KD at the settings the other methods ran with; `--reference` picks another"
        c.reference_why = "chosen with `--reference`" if wanted else default
    elif wanted and wanted != BASELINE:
        set_reference(c)
        c.reference_why = f"no {wanted} row in this table; {c.reference_why}"
    else:
        c.reference, c.reference_method, c.reference_deltas = c.baseline, BASELINE, c.deltas
        if wanted:
            c.reference_why = "chosen with `--reference`"
        elif others:
            c.reference_why = "no KD row in this table"
        else:
            c.reference_why = "every row is KD; `--reference kd` compares them with one of them"


def differences(run: dict, others: list[dict]) -> str:
    """``key=value`` of ``run``'s settings, epochs, test images and test set that vary among
    ``others`` (``run`` among them; T and alpha left out): what tells their groups apart."""

    def facts(r: dict) -> dict:
        cell_free = {k: v for k, v in (r["settings"] or {}).items() if not is_cell_key(k)}
        return cell_free | {k: r[k] for k in ("epochs", "test_images", "test_set")}

    every = [facts(r) for r in others]
    keys = sorted({k for f in every for k in f})
    varying = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in every}) > 1]
    return ", ".join(f"{k}={facts(run).get(k)}" for k in varying)
