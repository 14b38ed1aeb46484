"""The reference row of ``kdlight-report``: each student's table compares every row with KD
at the runs' settings (or the baseline, or ``--reference METHOD``), paired by seed, and the
CSVs name each row's method and its settings.

Runs are written as ``kdlight-train`` leaves them for ``experiment=zoo_distill`` with
``distiller=kd,dkd`` (``metrics.json`` with ``distiller``, ``distiller_settings`` and the
``run`` block); every expected number is computed here by hand from its formula.
"""

import csv
import hashlib
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdlight.analysis.stats import Estimate, noise_verdict
from kdlight.cli.report import build_report, main

T_975_DF2 = 4.302653  # Student's t, 0.975 quantile, 2 degrees of freedom (t tables)
STUDENT, TEACHER = "resnet8x4", "resnet32x4"
TARGETS = {"kd": "KD", "dkd": "DKD", "fitnet": "FitNet"}
#: What each method records as ``distiller_settings`` at conf/distiller's defaults.
DEFAULTS = {
    "kd": {"temperature": 4.0, "alpha": 0.9, "standardize": False},
    "dkd": {"temperature": 4.0, "alpha": 1.0, "beta": 8.0, "ce_weight": 1.0}
    | {"warmup_epochs": 20, "standardize": False},
    "fitnet": {"weight": 100.0, "hint_layer": 2},
}
#: The question of issue 20, over three seeds: does DKD beat KD?
BASELINE = {0: 70.0, 1: 71.0, 2: 70.5}
KD = {0: 73.1, 1: 73.8, 2: 72.9}
DKD = {0: 74.0, 1: 74.2, 2: 73.5}
KD_T8 = {0: 75.0, 1: 75.5, 2: 74.0}  # another KD cell, better than KD at T 4: not the reference


def make_run(
    root: Path,
    method: str | None,
    seed: int,
    accuracy: float,
    model: str = STUDENT,
    name: str | None = None,
    **changed,
) -> Path:
    """A finished run of ``method`` (None: the student baseline) in kdlight-train's layout,
    ``<root>/<name>/<model>/<folder>/seed<seed>-<id>`` (``name``: the experiment's, by
    default ``distill`` or ``student_baseline``). ``changed`` overrides the method's settings
    (``temperature=8`` for KD sets ``distill.temperature``, as a KD run records it)."""
    distill = method is not None
    system = "DistillationModule" if distill else "ClassifierModule"
    settings = {"model.name": model, "module._target_": f"kdlight.lit.{system}"}
    settings |= {"optimizer.lr": 0.05, "trainer.max_epochs": 240, "data.source": "synthetic"}
    settings |= {"data.val_size": 100, "data.train_subset": None, "data.eval_subset": None}
    metrics = {"system": system, "model": model, "epochs": 240, "test_images": 10000}
    metrics |= {"accuracy": accuracy, "per_class_accuracy": {"apple": accuracy, "bee": accuracy}}
    metrics |= {"val_acc_best": accuracy + 1.0, "validation": "held_out", "test_set": "cifar100"}
    config = {"name": name or ("distill" if distill else "student_baseline"), "seed": seed}
    config |= {"model": {"name": model}, "paths": {"root": str(root)}}
    config["module"] = {"_target_": settings["module._target_"]}
    if distill:
        target = f"kdlight.distillers.{TARGETS[method]}"
        mine = DEFAULTS[method] | changed
        settings |= {
            "distill.teacher": f"{TEACHER}/seed0-0a1b2c3d",
            "distill.teacher_model": TEACHER,
        }
        settings |= {"distill.temperature": 4.0, "distill.alpha": 0.9}
        settings |= {"distiller._target_": target}
        if method == "kd":  # KD's T and alpha are distill.temperature and distill.alpha
            settings |= {"distill.temperature": mine["temperature"], "distill.alpha": mine["alpha"]}
            settings["distiller.standardize"] = mine["standardize"]
            metrics |= {"temperature": mine["temperature"], "alpha": mine["alpha"]}
        else:
            settings |= {f"distiller.{key}": value for key, value in mine.items()}
        metrics |= {"teacher_model": TEACHER, "teacher_accuracy": 79.4}
        metrics |= {"distiller": method, "distiller_settings": mine}
        config["distiller"] = {"_target_": target}
    run_id = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    folder = root / config["name"] / model
    folder = folder / f"{method}_{run_id}" if distill else folder
    folder /= f"seed{seed}-{run_id}"
    folder.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), folder / "config.yaml")
    metrics["run"] = {"id": run_id, "seed": seed, "debug": False, "settings": settings}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return folder


def make_study(root: Path, methods: dict[str, dict[int, float]], **changed) -> Path:
    for method, accuracies in methods.items():
        for seed, accuracy in accuracies.items():
            make_run(root, None if method == "baseline" else method, seed, accuracy, **changed)
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def paired(values: dict, reference: dict) -> tuple[float, float, float]:
    """The mean of the per-seed differences and its 95% t interval, by hand."""
    d = [values[s] - reference[s] for s in sorted(values)]
    m = sum(d) / len(d)
    s = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1))
    half = T_975_DF2 * s / math.sqrt(len(d))
    return m, m - half, m + half


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """Baseline, KD at T 4 (the runs' settings), KD at T 8 and DKD, three seeds each."""
    root = make_study(tmp_path / "outputs", {"baseline": BASELINE, "kd": KD, "dkd": DKD})
    for seed, accuracy in KD_T8.items():
        make_run(root, "kd", seed, accuracy, temperature=8.0)
    return root


def rows_by_method(written: dict) -> dict[str, dict]:
    rows = [r for r in read_csv(written["groups"]) if r["role"] == "distill"]
    return {r["method"] + (f"@T{r['temperature']}" if r["temperature"] else ""): r for r in rows}


def test_dkd_is_compared_with_kd_at_the_runs_settings_paired_by_seed(study: Path, tmp_path):
    written = build_report([study], tmp_path / "report")
    rows = rows_by_method(written)
    dkd, kd = rows["dkd"], rows["kd@T4"]
    # by hand: DKD - KD per seed is 0.9, 0.4, 0.6: mean 0.6333, std 0.2517, half 0.6252
    m, low, high = paired(DKD, KD)
    assert (m, low, high) == (pytest.approx(0.63333, abs=1e-4), pytest.approx(0.00817, abs=1e-4),
                              pytest.approx(1.25849, abs=1e-4))  # fmt: skip
    assert dkd["reference"] == "kd" and dkd["reference_group"] == kd["group"]
    assert dkd["reference_delta_method"] == "paired"
    got = [float(dkd[f"reference_delta_{k}"]) for k in ("mean", "ci_low", "ci_high")]
    assert got == [pytest.approx(x, abs=1e-4) for x in (m, low, high)]
    # the Δ against the baseline stays, in its own columns
    base_m, base_low, base_high = paired(DKD, BASELINE)
    got = [float(dkd[f"delta_{k}"]) for k in ("mean", "ci_low", "ci_high")]
    assert got == [pytest.approx(x, abs=1e-4) for x in (base_m, base_low, base_high)]
    # the reference row has no difference from itself; KD at T 8 is compared with it too
    assert kd["reference_delta_mean"] == "" and kd["reference_group"] == kd["group"]
    t8 = rows["kd@T8"]
    assert float(t8["reference_delta_mean"]) == pytest.approx(paired(KD_T8, KD)[0], abs=1e-4)

    markdown = written["markdown"].read_text()
    head = next(line for line in markdown.splitlines() if line.startswith("| method |"))
    assert "| Δ baseline (pp) | Δ baseline 95% CI | Δ kd (pp) | Δ kd 95% CI |" in head
    dkd_line = next(line for line in markdown.splitlines() if line.startswith("| dkd: "))
    cells = f"| {base_m:+.2f} | [{base_low:+.2f}, {base_high:+.2f}] paired | +0.63 | "
    assert cells + "[+0.01, +1.26] paired |" in dkd_line
    kd_line = next(line for line in markdown.splitlines() if line.startswith("| kd: T=4,"))
    assert "| reference | — |" in kd_line
    assert "- Reference row: kd: T=4, alpha=0.9 (KD at the settings the other methods ran " in (
        markdown
    )
    # KD at T 8 is the best row (validation accuracy): its verdict against KD at T 4
    m8, low8, high8 = paired(KD_T8, KD)
    assert (
        f"- Against the reference: the best row's gain over kd: T=4, alpha=0.9, {m8:+.2f} pp "
        f"(95% CI [{low8:+.2f}, {high8:+.2f}] pp, paired by seed, n=3), is larger than the "
        "seed-to-seed noise: its interval excludes 0." in markdown
    )


def test_reference_dkd_compares_every_row_with_dkd(study: Path, tmp_path: Path, capsys):
    out = tmp_path / "report"
    assert main([str(study), "--out", str(out), "--reference", "dkd"]) == 0
    printed = capsys.readouterr().out
    assert "| Δ dkd (pp) | Δ dkd 95% CI |" in printed
    rows = {r["method"] + r["temperature"]: r for r in read_csv(out / "groups.csv") if r["method"]}
    m, low, high = paired(KD, DKD)  # KD - DKD: the mirror of the default's DKD - KD
    got = [float(rows["kd4"][f"reference_delta_{k}"]) for k in ("mean", "ci_low", "ci_high")]
    assert got == [pytest.approx(x, abs=1e-4) for x in (-0.63333, -1.25849, -0.00817)]
    assert got == [pytest.approx(x, abs=1e-4) for x in (m, low, high)]
    assert rows["kd4"]["reference"] == "dkd" and rows["dkd"]["reference_delta_mean"] == ""
    assert (
        "- Reference row: dkd: temperature=4" in printed and "(chosen with `--reference`" in printed
    )

    assert main([str(study), "--out", str(out), "--reference", "baseline"]) == 0
    printed = capsys.readouterr().out
    assert "- Reference row: the student baseline (chosen with `--reference`)" in printed
    assert "Δ kd (pp)" not in printed and "| Δ baseline (pp) | Δ baseline 95% CI |" in printed
    rows = {r["method"] + r["temperature"]: r for r in read_csv(out / "groups.csv") if r["method"]}
    assert rows["dkd"]["reference"] == "baseline"
    assert rows["dkd"]["reference_delta_mean"] == rows["dkd"]["delta_mean"] != ""


def test_without_kd_the_reference_is_the_baseline(tmp_path: Path):
    root = make_study(tmp_path / "outputs", {"baseline": BASELINE, "dkd": DKD, "fitnet": KD})
    written = build_report([root], tmp_path / "report")
    markdown = written["markdown"].read_text()
    assert "- Reference row: the student baseline (no KD row in this table)" in markdown
    head = next(line for line in markdown.splitlines() if line.startswith("| method |"))
    assert "Δ baseline 95% CI" in head and "Δ kd" not in head and "Δ dkd" not in head
    rows = {r["method"]: r for r in read_csv(written["groups"])}
    baseline = rows[""]
    for method in ("dkd", "fitnet"):
        assert rows[method]["reference"] == "baseline"
        assert (
            rows[method]["reference_group"] == baseline["group"] == rows[method]["baseline_group"]
        )
        assert rows[method]["reference_delta_mean"] == rows[method]["delta_mean"]
    assert rows["fitnet"]["method_settings"] == "weight=100;hint_layer=2"


def test_a_reference_that_is_not_there_is_one_line_naming_those_that_are(
    study: Path, tmp_path, capsys
):
    out = tmp_path / "report"
    assert main([str(study), "--out", str(out), "--reference", "crd"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "error: --reference crd: no crd runs in these tables; the references there are "
        "baseline, dkd, kd\n"
    )
    assert captured.out == "" and not out.exists()  # nothing written

    alone = make_study(tmp_path / "alone", {"kd": KD, "dkd": DKD})  # no baseline anywhere
    assert main([str(alone), "--out", str(out), "--reference", "baseline"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "error: --reference baseline: no baseline runs in these tables; the references there "
        "are dkd, kd\n"
    )
    assert not out.exists()


def test_the_csvs_name_each_rows_method_and_settings_after_the_old_columns(study: Path, tmp_path):
    written = build_report([study], tmp_path / "report")
    with open(written["csv"], newline="") as f:
        head = next(csv.reader(f))
    old = ["status", "model", "temperature", "alpha", "test_acc", "val_acc_best"]
    old += ["delta_vs_baseline", "teacher_acc", "seed", "validation", "epochs", "test_images"]
    old += ["test_set", "debug", "group", "teacher_cache", "teacher_cache_hit_rate"]
    old += ["acc_apple", "acc_bee", "error", "path"]
    assert head == [*old, "method", "method_settings"]  # appended: old columns keep their place
    runs = read_csv(written["csv"])
    dkd = next(r for r in runs if r["method"] == "dkd")
    assert dkd["method_settings"] == (
        "temperature=4;alpha=1;beta=8;ce_weight=1;warmup_epochs=20;standardize=false"
    )
    assert (dkd["temperature"], dkd["alpha"]) == ("", "")  # KD's T x alpha columns only
    kd8 = next(r for r in runs if r["method"] == "kd" and r["temperature"] == "8")
    assert kd8["method_settings"] == "temperature=8;alpha=0.9;standardize=false"
    assert {r["method"] for r in runs if r["path"].count("student_baseline")} == {""}

    with open(written["groups"], newline="") as f:
        head = next(csv.reader(f))
    old = ["role", "model", "temperature", "alpha", "n", "seeds", "test_acc_mean", "test_acc_std"]
    old += ["test_acc_ci_low", "test_acc_ci_high", "val_acc_best_mean", "validation"]
    old += ["delta_mean", "delta_ci_low", "delta_ci_high", "delta_method", "baseline_group"]
    old += ["epochs", "test_images", "test_set", "group"]
    new = ["method", "method_settings", "reference", "reference_delta_mean"]
    new += ["reference_delta_ci_low", "reference_delta_ci_high", "reference_delta_method"]
    assert head == [*old, *new, "reference_group"]
    groups = rows_by_method(written)
    assert groups["dkd"]["method_settings"] == dkd["method_settings"]


def test_a_run_from_before_the_method_was_recorded_is_kd(tmp_path: Path):
    """A KD run whose metrics.json has no ``distiller`` (older kdlight) is KD at its T and
    alpha, in both CSVs."""
    root = make_study(tmp_path / "outputs", {"kd": KD})
    for file in root.rglob("metrics.json"):
        metrics = json.loads(file.read_text())
        del metrics["distiller"], metrics["distiller_settings"]
        file.write_text(json.dumps(metrics))
    written = build_report([root], tmp_path / "report")
    for row in [*read_csv(written["csv"]), *read_csv(written["groups"])]:
        assert (row["method"], row["method_settings"]) == ("kd", "temperature=4;alpha=0.9")


def test_the_noise_verdict_names_what_it_compares_with():
    delta = Estimate(3, 0.5, 0.2, 0.1, 0.9, "paired")
    assert noise_verdict(delta).startswith("The best cell's gain over the baseline, +0.50 pp")
    against = noise_verdict(delta, against="kd: T=4, alpha=0.9", subject="the best row")
    assert against == (
        "The best row's gain over kd: T=4, alpha=0.9, +0.50 pp (95% CI [+0.10, +0.90] pp, "
        "paired by seed, n=3), is larger than the seed-to-seed noise: its interval excludes 0."
    )


def test_the_best_row_as_reference_and_a_table_without_the_asked_method(tmp_path: Path):
    """KD best of its table: the verdict is the next best row's against it. A second
    student distilled with KD alone keeps its default reference under ``--reference dkd``
    and says why."""
    root = make_study(tmp_path / "outputs", {"baseline": BASELINE, "kd": DKD, "dkd": KD})
    for seed, accuracy in KD.items():  # resnet8: KD cells alone, at T 4 and T 8
        for temperature in (4.0, 8.0):
            make_run(root, "kd", seed, accuracy, model="resnet8", temperature=temperature)

    def tables(reference: str | None) -> dict[str, str]:
        markdown = build_report([root], tmp_path / "report", reference)["markdown"]
        sections = markdown.read_text().split("## Distilled ")[1:]
        return {section.split("\n")[0]: section for section in sections}

    m, low, high = paired(KD, DKD)  # the DKD row (KD's numbers) against KD (DKD's numbers)
    assert (
        "- Against the reference: the best row is the reference itself; the next best row "
        "(dkd: temperature=4.0, alpha=1.0, beta=8.0, ce_weight=1.0, warmup_epochs=20, "
        f"standardize=False)'s loss against kd: T=4, alpha=0.9, {m:+.2f} pp (95% CI "
        f"[{low:+.2f}, {high:+.2f}] pp, paired by seed, n=3), is larger than the "
        "seed-to-seed noise: its interval excludes 0." in tables(None)["resnet8x4"]
    )
    asked = tables("dkd")
    assert "- Reference row: dkd: temperature=4.0" in asked["resnet8x4"]
    assert (
        "- Reference row: the student baseline (no dkd row in this table; every row is KD; "
        "`--reference kd` compares them with one of them); not found, no Δ computed."
        in asked["resnet8"]
    )


def test_the_zoo_students_alone_are_the_baseline_of_the_zoo_study(tmp_path: Path):
    """``experiment=zoo_student`` (the student alone with the zoo recipe, name
    ``zoo_student``) is the baseline of ``experiment=zoo_distill``, found under
    ``paths.root`` when only the distillation runs are reported."""
    root = tmp_path / "outputs"
    for seed in BASELINE:
        make_run(root, None, seed, BASELINE[seed], name="zoo_student")
        for method, accuracies in (("kd", KD), ("dkd", DKD)):
            make_run(root, method, seed, accuracies[seed], name="zoo_distill")
    written = build_report([root / "zoo_distill"], tmp_path / "report")
    rows = rows_by_method(written)
    m, low, high = paired(DKD, BASELINE)
    got = [float(rows["dkd"][f"delta_{k}"]) for k in ("mean", "ci_low", "ci_high")]
    assert got == [pytest.approx(x, abs=1e-4) for x in (m, low, high)]
    assert rows["dkd"]["reference"] == "kd" and rows["dkd"]["reference_delta_mean"] == "0.6333"
    markdown = written["markdown"].read_text()
    assert "- Student baseline (resnet8x4): 70.50 ± 0.50% test accuracy (n=3;" in markdown
