"""Run records for ``kdlight-report``: the run directories below a folder (:func:`run_dirs`),
each run's ``metrics.json`` and config read into one checked record (:func:`load_run`; a run
that cannot be read is a failed run with the reason), the identity (group and sweep) that
tells which runs may be averaged or compared, and the text forms of a record's values that
the report and the plots share (:func:`fmt`, :func:`cell_name`, :func:`mean_std`)."""

import hashlib
import io
import json
import math
import os
import stat
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from kdlight.analysis.stats import BASELINE_ROLES, Comparison, Estimate, compare_runs, is_cell_key
from kdlight.runs.identity import group_key, is_debug, settings

RUN_MARKERS = ("config.yaml", "metrics.json", "error.txt", ".hydra/config.yaml")
DISTILLATION = ("DistillationModule", "DistillationGridModule")  # one row per (T, alpha) cell
FIELDS = ("error", "name", "system", "model", "temperature", "alpha", "accuracy", "val_acc_best")
FIELDS += ("validation", "teacher_accuracy", "teacher_checkpoint", "root", "delta_vs_baseline")
FIELDS += ("seed", "settings", "epochs", "test_images", "test_set", "role", "group", "sweep")
FIELDS += ("method", "method_settings", "teacher_cache", "teacher_cache_hit_rate")
#: metrics.json's fields and the kind of value each must hold (null is allowed but for the
#: first two); see :data:`KINDS`. Accuracies are percentages, as kdlight-train writes them.
METRICS = {"accuracy": "percent", "per_class_accuracy": "table", "system": "text"}
METRICS |= {"model": "text", "epochs": "count", "test_images": "count", "test_set": "text"}
METRICS |= {"val_acc_best": "percent", "validation": "text", "temperature": "positive"}
METRICS |= {"alpha": "weight", "teacher_model": "text", "teacher_checkpoint": "text"}
METRICS |= {"teacher_accuracy": "percent", "run": "table", "distiller": "text"}
METRICS |= {"distiller_settings": "table", "teacher_cache": "table"}
RUN_BLOCK = {"settings": "table", "id": "text", "seed": "integer", "debug": "flag"}
#: The ``teacher_cache`` block: whether the run used the cache of teacher logits, the
#: fraction of its teacher lookups found there and the cache's folder.
TEACHER_CACHE = {"used": "flag", "hit_rate": "fraction", "path": "text"}
KINDS = {
    "percent": ("a percentage in [0, 100]", lambda v: _is_finite(v) and 0 <= v <= 100),
    "positive": ("a finite number > 0", lambda v: _is_finite(v) and v > 0),
    "weight": ("a finite number >= 0", lambda v: _is_finite(v) and v >= 0),
    "fraction": ("a number in [0, 1]", lambda v: _is_finite(v) and 0 <= v <= 1),
    "count": ("a whole number >= 0", lambda v: _is_int(v) and v >= 0),
    "integer": ("a whole number", lambda v: _is_int(v)),
    "text": ("a string", lambda v: isinstance(v, str)),
    "flag": ("true or false", lambda v: isinstance(v, bool)),
    "table": ("an object", lambda v: isinstance(v, dict)),
}
VALIDATION = ("held_out", "test_set")  # held out of the training images, or the test set
#: The most bytes the report reads of one run file: kdlight's are a few kB (a per-class
#: table of 1000 classes about 40 kB); anything larger is not one of its records.
MAX_FILE_BYTES = 4 * 2**20
#: How deeply a ``config.yaml`` may nest: kdlight's nest 4 or 5 levels.
MAX_DEPTH = 64
FILE_KINDS = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket"}
FILE_KINDS |= {stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    """A JSON number that is neither NaN nor infinite (true and false are not numbers)."""
    return _is_int(value) or isinstance(value, float) and math.isfinite(value)


def _not_regular(mode: int) -> str | None:
    """Why a file of ``mode`` is not read (``it is a FIFO, not a regular file``), or None."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for is_kind, name in FILE_KINDS.items() if is_kind(mode)), "not a file")
    return f"it is {kind}, not a regular file"


def read_run_file(file: Path, limit: int = MAX_FILE_BYTES) -> str:
    """The text of ``file`` when it is a regular file of at most ``limit`` bytes; else
    ValueError saying what it is. A FIFO, a device or a socket is never read: opening one
    blocks (a FIFO waits for a writer) or acts on a device. It is looked at before it is
    opened, opened without blocking, and looked at again once open, so a file swapped in
    between is refused as well. Undecodable bytes read as U+FFFD."""
    why = _not_regular(os.stat(file).st_mode)
    if why:
        raise ValueError(why)
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    with os.fdopen(fd, "rb") as opened:
        why = _not_regular(os.fstat(fd).st_mode)
        if why:
            raise ValueError(why)
        data = opened.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"it holds more than {limit // 2**20} MiB, more than a run's record")
    return data.decode("utf-8", errors="replace")


def parse_config(text: str) -> DictConfig:
    """A run's ``config.yaml`` (as OmegaConf reads it) from its ``text``, refused with
    ValueError when it holds YAML anchors or aliases (which kdlight never writes, and which
    let a few lines expand to billions of values: "billion laughs") or nests deeper than
    :data:`MAX_DEPTH`. Its events are checked before anything is built from them."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise ValueError(
                "it holds YAML anchors or aliases (& and *), which kdlight never writes"
            )
        depth += isinstance(event, yaml.CollectionStartEvent)
        depth -= isinstance(event, yaml.CollectionEndEvent)
        if depth > MAX_DEPTH:
            raise ValueError(f"it nests deeper than {MAX_DEPTH} levels")
    cfg = OmegaConf.load(io.StringIO(text))
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create()


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # missing, or not a number: shown as empty
        return None


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _outputs_root(run_dir: Path, root: str | None) -> Path | None:
    """``paths.root``; a relative one (to the launch directory) is looked for above the run."""
    if not root or Path(root).is_absolute():
        return Path(root) if root else None
    parts = Path(root).parts
    return next((a for a in run_dir.parents if a.parts[-len(parts) :] == parts), Path.cwd() / root)


def _check(record: dict, kinds: dict, where: str = "", required: int = 0) -> None:
    """Raise ValueError naming the first field of ``record`` that is not of its kind in
    ``kinds`` (the first ``required`` fields must be there; the others may be null)."""
    for k, (key, kind) in enumerate(kinds.items()):
        value = record.get(key)
        description, valid = KINDS[kind]
        if (value is None and k < required) or (value is not None and not valid(value)):
            shown = "missing" if value is None else json.dumps(value)[:40]
            raise ValueError(f"{where}{key} is {shown}, expected {description}")


def read_metrics(file: Path) -> dict:
    """``metrics.json``, checked: a field of the wrong type or an impossible value (an
    accuracy outside [0, 100] %, a number that is not finite) raises ValueError naming it,
    as does a file that is not a regular one (:func:`read_run_file`). A class's accuracy of
    ``NaN`` (no test image of it, as older runs wrote it) reads as None."""
    try:
        metrics = json.loads(read_run_file(file))
    except RecursionError:
        raise ValueError("it nests too deeply to parse") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"expected an object, got {type(metrics).__name__}")
    _check(metrics, METRICS, required=2)
    per_class = {
        name: None if isinstance(v, float) and math.isnan(v) else v
        for name, v in metrics["per_class_accuracy"].items()
    }
    _check(per_class, dict.fromkeys(per_class, "percent"), "per_class_accuracy.")
    if metrics.get("validation") not in (None, *VALIDATION):
        raise ValueError(f"validation is {metrics['validation']!r}, expected one of {VALIDATION}")
    for block, kinds in (("run", RUN_BLOCK), ("teacher_cache", TEACHER_CACHE)):
        if metrics.get(block) is not None:
            _check(metrics[block], kinds, f"{block}.", required=1)
    return metrics | {"per_class_accuracy": per_class}


def load_run(path: Path) -> dict:
    """One run directory as a record. Files that cannot be read make it a failed run with
    the reason, whatever that reason is: one odd run never stops the report."""
    path = Path(path).resolve()
    run = {"path": path, "status": "unfinished", **dict.fromkeys(FIELDS), "per_class": {}}
    run["debug"] = False
    try:
        _read_run(path, run)
    except Exception as err:  # whatever it is, the report shows it
        run |= {"status": "failed", "error": f"unreadable run: {err!r}"}
    return run


def _read_run(path: Path, run: dict) -> None:
    try:  # config.yaml (resolved), else Hydra's unresolved .hydra/config.yaml, else empty
        configs = [f for f in (path / "config.yaml", path / ".hydra/config.yaml") if f.exists()]
        cfg = parse_config(read_run_file(configs[0])) if configs else OmegaConf.create()
    except Exception as err:  # a config that cannot be parsed, for any reason
        cfg = OmegaConf.create()
        run |= {"status": "failed", "error": f"unreadable config.yaml: {err}"}
    config_read = run["status"] != "failed"

    def get(key: str):  # an interpolation left in .hydra/config.yaml reads as None
        return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)

    run["system"] = (_text(get("module._target_")) or "").rsplit(".", 1)[-1] or None
    run |= {"name": _text(get("name")), "model": _text(get("model.name"))}
    run |= {"teacher_checkpoint": _text(get("distill.teacher_checkpoint"))}
    run["seed"] = get("seed") if _is_int(get("seed")) else None
    kd = str(get("distiller._target_") or "kdlight.distillers.KD").endswith(".KD")
    if run["system"] in DISTILLATION and kd:  # another method's cells are not T x alpha
        run |= {key: _float(get(f"distill.{key}")) for key in ("temperature", "alpha")}
    val_size = get("data.val_size")
    if _is_int(val_size):
        run["validation"] = VALIDATION[val_size == 0]

    metrics_file, error_file = path / "metrics.json", path / "error.txt"
    if metrics_file.exists() and not config_read:
        pass  # the config's reason stands: a result is not reported without its settings
    elif metrics_file.exists():
        try:
            metrics = read_metrics(metrics_file)
        except (OSError, ValueError) as err:
            run |= {"status": "failed", "error": f"unreadable metrics.json: {err}"}
        else:
            _read_result(run, metrics, cfg)
    elif error_file.exists():
        try:
            lines = read_run_file(error_file).strip().splitlines()
        except (OSError, ValueError) as err:
            lines = [f"unreadable error.txt: {err}"]
        run |= {"status": "failed", "error": lines[0] if lines else "error.txt is empty"}

    run["root"] = _outputs_root(path, _text(get("paths.root")))
    checkpoint = Path(run["teacher_checkpoint"] or "")  # <root>/teacher/<model>/<run>/checkpoints/x
    if run["root"] is None and len(checkpoint.parents) > 3:
        run["root"] = checkpoint.parents[3 + (checkpoint.parents[1].name.startswith("seed"))]
    if run["name"] is None and run["root"] and path.is_relative_to(run["root"].resolve()):
        run["name"] = path.relative_to(run["root"].resolve()).parts[0]  # <root>/<name>/...
    run["role"] = "distill" if run["system"] in DISTILLATION else (run["name"] or "classifier")
    if run["status"] == "finished":
        _identify(run)


def _read_result(run: dict, metrics: dict, cfg: DictConfig) -> None:
    """Fill a finished run's record from its checked ``metrics.json``. ``teacher_cache`` is
    None when the run did not ask for the cache (``distill.teacher_cache``), else whether it
    used it; ``teacher_cache_hit_rate`` the fraction of its lookups found there, when used."""
    block, cache = metrics.get("run") or {}, metrics.get("teacher_cache") or {}
    per_class = metrics["per_class_accuracy"]
    run |= {
        "status": "finished",
        "error": None,
        "system": metrics.get("system") or run["system"],
        "model": metrics.get("model") or run["model"],
        "accuracy": float(metrics["accuracy"]),
        "val_acc_best": _float(metrics.get("val_acc_best")),
        "validation": metrics.get("validation") or run["validation"],
        "teacher_accuracy": _float(metrics.get("teacher_accuracy")),
        "per_class": {k: None if v is None else float(v) for k, v in per_class.items()},
        **{key: metrics.get(key) for key in ("epochs", "test_images", "test_set")},
        "method": metrics.get("distiller"),
        "method_settings": metrics.get("distiller_settings") or {},
        "teacher_cache": cache.get("used"),
        "teacher_cache_hit_rate": _float(cache.get("hit_rate")) if cache.get("used") else None,
    }
    for key in ("temperature", "alpha", "teacher_checkpoint"):
        run[key] = run[key] if metrics.get(key) is None else metrics[key]
    run |= {"temperature": _float(run["temperature"]), "alpha": _float(run["alpha"])}
    if block:
        run |= {"settings": block["settings"], "debug": bool(block.get("debug"))}
        run["seed"] = block["seed"] if block.get("seed") is not None else run["seed"]
    elif len(cfg):  # a run from before metrics.json held its settings: those of its config
        run |= {"settings": settings(cfg, run["teacher_checkpoint"]), "debug": is_debug(cfg)}


def _identify(run: dict) -> None:
    """The run's ``group`` (runs that differ only in seed) and ``sweep`` (groups that differ
    only in T and alpha): short hashes of the settings (seed and, for the sweep, T and alpha
    left out; a fused-grid cell counted as its separate run) and of the test images,
    epochs and role. A run without settings is a group of its own."""
    facts = [run["role"], run["epochs"], run["test_set"], run["test_images"]]
    if run["settings"] is None:
        run["group"] = run["sweep"] = _short([str(run["path"]), *facts])
        return
    sweep = {k: v for k, v in run["settings"].items() if not is_cell_key(k)}
    cell = Path(run["path"]).name if run["system"] == "DistillationGridModule" else None
    key = group_key(run["settings"], run["temperature"], run["alpha"], cell)
    run["group"] = _short([key, *facts])
    run["sweep"] = _short([group_key(sweep), *facts]) if run["role"] == "distill" else run["group"]


def _short(record: list) -> str:
    return hashlib.sha256(json.dumps(record, default=str).encode()).hexdigest()[:8]


def run_dirs(top: Path) -> list[Path]:
    """Run directories at or below ``top``. A directory with neither ``metrics.json`` nor
    ``error.txt`` above other runs groups them (a fused grid) and is not a run itself."""
    found = []
    for here, subdirs, _ in os.walk(top):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        if any((Path(here) / marker).exists() for marker in RUN_MARKERS):
            found.append(Path(here))
    ended = [d for d in found if (d / "metrics.json").exists() or (d / "error.txt").exists()]
    return [d for d in found if d in ended or not any(d in other.parents for other in found)]


def collect_comparisons(dirs: list[Path]) -> tuple[list[dict], list[Comparison]]:
    """Every run below ``dirs`` (:func:`collect_runs`) and their comparisons
    (:func:`~kdlight.analysis.stats.compare_runs`, with the teachers and baselines they
    reference from elsewhere)."""
    paths = {p.resolve() for top in dirs for p in run_dirs(Path(top))}
    runs = [load_run(p) for p in paths]

    def order(run: dict) -> tuple:
        number = [-math.inf if run[k] is None else run[k] for k in ("temperature", "alpha")]
        return (run["model"] or "", *number, str(run["path"]))

    runs.sort(key=order)
    return runs, compare_runs(runs, _referenced(runs))


def _referenced(runs: list[dict]) -> list[dict]:
    """The runs that distillation ``runs`` compare with but ``dirs`` did not hold: their
    teachers (the run of ``teacher_checkpoint``) and the student baselines of their model
    under ``<paths.root>/<role>/<model>`` for each of :data:`BASELINE_ROLES`."""
    folders = set()
    for run in (r for r in runs if r["role"] == "distill" and r["status"] == "finished"):
        if run["teacher_checkpoint"]:
            folders.add(Path(run["teacher_checkpoint"]).resolve().parents[1])
        if run["root"] and run["model"]:
            for role in BASELINE_ROLES:  # run_dirs of a folder that is not there: none
                folders.update(d.resolve() for d in run_dirs(run["root"] / role / run["model"]))
    known = {r["path"] for r in runs}
    return [load_run(f) for f in sorted(folders - known) if (f / "metrics.json").exists()]


def collect_runs(dirs: list[Path]) -> list[dict]:
    """Every run below ``dirs``, sorted by (model, temperature, alpha, path), each finished
    distillation run with ``delta_vs_baseline`` (:func:`~kdlight.analysis.stats.compare_runs`)."""
    return collect_comparisons(dirs)[0]


# ---------------------------------------------------------------------------- text forms
def fmt(value, spec: str = ".2f") -> str:
    """``value`` formatted by ``spec``; empty for None or NaN (a cell without a value)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, spec)


def cell_name(run: dict) -> str:
    """A distillation cell as text: ``T=4, alpha=0.9`` (KD), else the method and its
    settings (``dkd: temperature=4, alpha=1, beta=8, ...``)."""
    if run["temperature"] is not None and run["alpha"] is not None:
        return f"T={fmt(run['temperature'], 'g')}, alpha={fmt(run['alpha'], 'g')}"
    shown = ", ".join(f"{k}={v}" for k, v in (run.get("method_settings") or {}).items())
    return f"{run.get('method') or 'method'}: {shown}" if shown else str(run.get("method"))


def mean_std(estimate: Estimate, unit: str = "") -> str:
    """``84.12 ± 0.31 (n=3)``; one value has no spread: ``84.12 (n=1)``."""
    spread = f" ± {estimate.std:.2f}" if estimate.std is not None else ""
    return f"{estimate.mean:.2f}{spread}{unit} (n={estimate.n})"
