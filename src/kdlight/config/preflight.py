"""``kdlight-train``'s command line checked before Hydra runs it (:func:`check_command_line`),
each problem in one line and exit status 2::

    error: unknown setting 'distil.temperature' (did you mean 'distill.temperature'?)

The settings' own types and ranges are checked by :func:`kdlight.config.settings.validate_settings`.
"""

import contextlib
import difflib
import importlib.util
import inspect
import io
import math
import os
import re
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser  # the parser of Hydra's own main
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from kdlight import config_dir
from kdlight.config.settings import (
    RUN_FILES,
    check_extras,
    check_path_length,
    check_writable,
    integer,
    located,
    missing_extra,
    show,
    value_of,
)
from kdlight.errors import KDLightError, first_line


def preflight(argv: list[str]) -> None:
    """Check ``kdlight-train ARGV`` before Hydra runs it (see :func:`check_command_line`).
    On a problem print one ``error: ...`` line and exit with status 2 (with
    ``HYDRA_FULL_ERROR=1``: raise, with the traceback)."""
    try:
        check_command_line(argv)
    except KDLightError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def own_method_overrides(argv: list[str]) -> list[str]:
    """``argv`` with a user's own method given whole: ``distiller={_target_: my.METHOD,
    beta: 2}`` becomes ``~distiller +distiller={...}``, so that the method is built from
    exactly what was written, not merged into ``conf/distiller/kd.yaml`` (KD's ``alpha``
    would be passed to the user's class). The method's other arguments with a default are
    written in too (:func:`_written_defaults`). A dict without ``_target_``
    (``distiller={beta: 2}``) changes the chosen method's settings, as Hydra does. The
    ``_target_`` is the user's own, from the command line, so it may run; one read from a
    file never is (:mod:`kdlight.models.registry`)."""
    parser = OverridesParser.create()
    rewritten: list[str] = []
    for line in argv:
        try:
            override = parser.parse_overrides([line])[0]
        except HydraException:  # a flag (-m), or a line preflight will explain
            rewritten.append(line)
            continue
        value = None if override.is_sweep_override() else override.value()
        whole = override.key_or_group == "distiller" and override.package is None
        given = isinstance(value, dict) and "_target_" in value
        if whole and given and override.type == OverrideType.CHANGE:
            defaults = _written_defaults(str(value["_target_"]))
            rewritten += ["~distiller", f"+{line}"]
            rewritten += [f"+distiller.{k}={v}" for k, v in defaults.items() if k not in value]
        else:
            rewritten.append(line)
    return rewritten


def _written_defaults(target: str) -> dict[str, str]:
    """The arguments of ``target`` with a default that the command line can write (a
    number, a bool, null or a plain word), as override values, so that ``distiller.gamma=3``
    sets any of them as for a shipped method, and the run records them. Nothing where
    ``target`` cannot be imported (the settings' check says so in one line)."""
    try:
        parameters = inspect.signature(located(target)).parameters.values()
    except (TypeError, ValueError):  # None: not importable
        return {}
    written = {}
    for parameter in parameters:
        value = parameter.default
        if parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            continue
        if value is None or (isinstance(value, int | float) and math.isfinite(value)):
            written[parameter.name] = show(value)  # bools too: true, false
        elif isinstance(value, str) and re.fullmatch(r"[A-Za-z_][\w.-]*", value):
            written[parameter.name] = f"'{value}'"
    return written


def check_command_line(argv: list[str]) -> None:
    """Compose the config of ``kdlight-train ARGV`` with Hydra's own parser, as Hydra will,
    and with ``-m`` the first job and one job per value of each sweep over a config group
    (a sweep over a plain value, ``seed=0,1,2``, composes like its first value), so that an
    override Hydra cannot read or apply (an unknown setting, a typo, an unknown choice)
    stops here; check the extras it needs, SLURM's resources and that the run folder can be
    written. Raise a one-line :class:`KDLightError`. Flags that do not compose kdlight's
    config (``--help``, ``--info``, a ``--config-dir`` of the user's) are left to Hydra.
    About 0.15 s per composition, so a single run's launch takes 0.15 s longer."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            args = get_args_parser().parse_args(argv)
        except SystemExit:  # Hydra's own main says what is wrong with the flags
            return
    left_to_hydra = ("help", "hydra_help", "info", "shell_completion", "experimental_rerun")
    if any(getattr(args, flag) for flag in (*left_to_hydra, "config_path", "config_dir")):
        return
    name = args.config_name or "train"
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir()), job_name="train"):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        overrides = [_parse(parser, line) for line in args.overrides]
        launchers = [str(o.value()) for o in overrides if o.key_or_group == "hydra/launcher"]
        if any("slurm" in launcher for launcher in launchers) and not importlib.util.find_spec(
            "hydra_plugins.hydra_submitit_launcher"
        ):
            raise missing_extra("hydra/launcher=slurm", "hydra-submitit-launcher", "slurm")
        fixed = [o.input_line for o in overrides if not (args.multirun and o.is_sweep_override())]
        cfg = _compose(name, fixed)
        if args.multirun:
            if "Slurm" in str(OmegaConf.select(cfg, "hydra.launcher._target_", default="")):
                check_slurm_resources(cfg)
            _compose_sweeps(name, fixed, cfg, overrides, parser)
        check_extras(cfg)
    if not args.cfg:  # --cfg only prints the config
        _check_run_folder(cfg, args.multirun)


def check_slurm_resources(cfg: DictConfig) -> None:
    """``hydra/launcher=slurm`` asks SLURM for ``trainer.num_nodes`` nodes with
    ``trainer.devices`` GPUs and tasks each: both must be numbers."""
    needs = {"devices": "a number of GPUs per node", "num_nodes": "a number of nodes"}
    for key, what in needs.items():
        value = value_of(cfg, f"trainer.{key}")
        if value is not None and not integer(1).accepts(value):
            raise KDLightError(
                f"trainer.{key}={show(value)} is not allowed for hydra/launcher=slurm: "
                f"set trainer.{key}=N ({what})"
            )


def _parse(parser: OverridesParser, line: str) -> Override:
    """One override of the command line, or a one-line error that links Hydra's grammar."""
    try:
        return parser.parse_overrides([line])[0]
    except HydraException as err:
        raise KDLightError(
            f"cannot read '{line}': {first_line(err)} (the syntax: "
            "https://hydra.cc/docs/advanced/override_grammar/basic)"
        ) from None


def _compose(name: str, overrides: list[str]) -> DictConfig:
    """The config Hydra composes, or its error explained in one line."""
    try:
        return compose(name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise KDLightError(_explain(err, name, overrides)) from err


def _compose_sweeps(
    name: str, fixed: list[str], cfg: DictConfig, overrides: list[Override], parser: OverridesParser
) -> None:
    """Compose a multirun's jobs as Hydra's basic sweeper makes them (``conf/sweep/``'s params
    first, the command line wins): the first job, and one per other value of each sweep
    over a config group."""
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    sweeps = [_parse(parser, f"{k}={v}") for k, v in params.items()]
    sweeps += [o for o in overrides if o.is_sweep_override()]
    fixed_keys = {o.key_or_group for o in overrides if not o.is_sweep_override()}
    values: dict[str, list[str]] = {}
    for sweep in sweeps:
        key, group = sweep.get_key_element(), sweep.key_or_group
        if sweep.is_sweep_override() and group.startswith("hydra"):
            raise KDLightError(f"{sweep.input_line}: Hydra's own settings take one value")
        if group in fixed_keys:
            continue  # one value on the command line wins over conf/sweep/'s several
        if not sweep.is_sweep_override():
            values[key] = [sweep.input_line]
        elif sweep.is_discrete_sweep():  # Hydra itself refuses interval() sweeps
            values[key] = [f"{key}={v}" for v in sweep.sweep_string_iterator()] or [""]
    first = {key: lines[0] for key, lines in values.items()}
    if values:
        _compose(name, [*fixed, *filter(None, first.values())])
    loader = GlobalHydra.instance().config_loader()
    for key, lines in values.items():
        if loader.get_group_options(key.lstrip("+~").split("@")[0]):
            for line in lines[1:]:
                _compose(name, [*fixed, *filter(None, {**first, key: line}.values())])


def _check_run_folder(cfg: DictConfig, multirun: bool) -> None:
    """Hydra makes the run's folder before kdlight starts: from a read-only folder, or where
    the folder's path is too long for the filesystem, that would end in Hydra's traceback."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    root = Path(str(cfg.paths.root)).absolute()
    try:
        folder = Path(str(OmegaConf.select(cfg, key))).absolute()
    except OmegaConfBaseException:
        folder = root
    setting, value = (
        ("paths.root", cfg.paths.root) if folder.is_relative_to(root) else (key, folder)
    )
    check_path_length(folder, setting, value, room=RUN_FILES)
    check_writable(value, setting)


def _explain(err: Exception, name: str, overrides: list[str]) -> str:
    """Hydra's multi-line composition error as one line that says what to write instead."""
    text = str(err)
    missing = re.search(r"Could not find '(.+)/([^/']+)'", text)
    if isinstance(err, MissingConfigException) and missing:
        group, choice = missing.groups()
        options = GlobalHydra.instance().config_loader().get_group_options(group)
        close = difflib.get_close_matches(choice, options, n=1)
        hint = f" (did you mean {group}={close[0]}?)" if close else ""
        return f"{group}={choice} is not allowed: one of {', '.join(options)}{hint}"
    if isinstance(err.__cause__, ValidationError):  # a typed setting of Hydra's or a plugin's
        line = next((o for o in overrides if o in text), text.splitlines()[0])
        return f"{line} is not allowed: {first_line(err.__cause__)}"
    if found := re.search(r"Could not override '([^']+)'|'([^']+)' does not exist", text):
        return _unknown_setting(found.group(1) or found.group(2), name, overrides)
    if found := re.search(r"An item is already at '([^']+)'", text):
        return f"{found.group(1)} exists already: set it without the +"
    if found := re.match(r"Ambiguous value for argument '(.*)'", text):
        return (
            f"{found.group(1)} has several values: add -m for one run per value, "
            "or write a list as [a,b]"
        )
    return first_line(err)


def _unknown_setting(key: str, name: str, overrides: list[str]) -> str:
    """Name the setting Hydra does not know, and the one likely meant or the configs that
    bring it (``distill.*`` comes with ``experiment=distill``)."""
    providers = _providers()
    message = f"unknown setting '{key}'"
    if (config_dir() / key).is_dir():  # a config group this config's defaults do not list
        given = next((o for o in overrides if o.lstrip("+~").split("=")[0] == key), key)
        choice = given.split("=", 1)[-1] if "=" in given else "CHOICE"
        listed = ", ".join(providers.get(key, [])[:4])
        with_it = f" (it comes with {listed}: pick one of those)" if listed else ""
        return (
            f"{key} is a config group this config does not pick{with_it}, "
            f"or add it: +{key}={choice}"
        )
    if providers.get(key):
        return f"{message} in this config (it comes with {', '.join(providers[key][:4])})"
    others = [o for o in overrides if o.lstrip("+~").split("=")[0] != key]
    try:
        here = set(_dotted_keys(compose(name, overrides=others, return_hydra_config=True)))
    except (HydraException, OmegaConfBaseException):
        here = set()
    about_hydra = key.startswith("hydra")  # Hydra's own settings are suggested for those only
    known = sorted(p for p in here | set(providers) if about_hydra or not p.startswith("hydra"))
    close = (
        [p for p in known if p.endswith(f".{key}")]  # lr: optimizer.lr
        or [p for p in known if sorted(p) == sorted(key)]  # two letters swapped
        or difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    )
    if not close:
        return f"{message} (kdlight-train --cfg job prints every setting)"
    elsewhere = close[0] not in here and providers.get(close[0])
    where = f", which comes with {providers[close[0]][0]}" if elsewhere else ""
    return f"{message} (did you mean '{close[0]}'{where}?)"


def _dotted_keys(node: DictConfig | dict, prefix: str = "") -> Iterator[str]:
    """Every dotted key below ``node``, without resolving a value."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=False)
    for key, value in node.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _dotted_keys(value, f"{prefix}{key}.")


@cache
def _providers() -> dict[str, list[str]]:
    """Dotted key -> the choices whose config file brings it (``module=distillation``) and
    the experiments that pick those; a config group is a key too (``model``)."""
    root, found, picked_by = config_dir(), {}, {}
    for file in sorted((root / "experiment").glob("*.yaml")):  # "override /module: distillation"
        # unresolved: a choice may be an interpolation (zoo_teacher's ${kdlight.pair_teacher:...})
        defaults = OmegaConf.to_container(OmegaConf.load(file), resolve=False).get("defaults")
        for entry in defaults or []:
            for target, choice in entry.items() if isinstance(entry, dict) else []:
                picked = f"{str(target).split()[-1].strip('/')}={choice}"
                picked_by.setdefault(picked, []).append(f"experiment={file.stem}")
    for file in sorted(root.glob("*/**/*.yaml")):
        group = file.parent.relative_to(root).as_posix()
        choice = f"{group}={file.stem}"
        experiments = picked_by.get(choice, [])
        # a group itself comes with the experiments that pick one of its choices
        found.setdefault(
            group, [e for p, by in picked_by.items() if p.startswith(f"{group}=") for e in by]
        )
        in_global = "@package _global_" in file.read_text().split("\n", 1)[0]
        prefix = "" if in_global else group.replace("/", ".") + "."
        for key in _dotted_keys(OmegaConf.load(file), prefix):
            if not key.startswith("defaults"):
                found[key] = list(dict.fromkeys([*found.get(key, []), *experiments, choice]))
    for key, choices in found.items():  # the key's own group first, then experiments, by name
        own = key.split(".")[0]
        choices.sort(key=lambda c: (not c.startswith(f"{own}="), not c.startswith("experiment"), c))
    return found
