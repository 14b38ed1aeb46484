"""A dry run of ``hydra/launcher=slurm`` (its command line: :data:`USAGE`). The script is
rendered by submitit's own template from the composed launcher settings, so it is what
``sbatch`` would receive. Needs hydra-submitit-launcher (``pip install 'kdlight[slurm]'``).
"""

import shlex
import sys

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import filter_overrides
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdlight import config_dir
from kdlight.config.preflight import check_command_line
from kdlight.errors import KDLightError, first_line
from kdlight.runs.identity import is_distillation
from kdlight.teacher.find import resolve_teacher

USAGE = """usage: python -m kdlight.cli.slurm [-h] [OVERRIDE ...]

Print what `kdlight-train -m hydra/launcher=slurm OVERRIDE ...` would submit: the sbatch
script (submitit's own template) and one line per run. Submits nothing, writes nothing.
The overrides are kdlight-train's; trainer.devices and trainer.num_nodes must be numbers.

  python -m kdlight.cli.slurm experiment=teacher trainer=ddp trainer.devices=4 \\
    trainer.num_nodes=2 hydra.launcher.partition=gpu
  python -m kdlight.cli.slurm experiment=distill sweep=reference_grid hydra.launcher.partition=gpu
"""

#: Launcher settings for submitit itself or for Hydra, not for the sbatch script.
_NOT_SBATCH = {"_target_", "submitit_folder", "max_num_timeout"}


def submitit_script(launcher: dict, num_runs: int) -> str:
    """The sbatch script submitit writes for ``num_runs`` runs (a job array when several)."""
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string  # the slurm extra

    names = SlurmExecutor._equivalence_dict()  # the launcher's shared names -> sbatch's
    sbatch = {
        names.get(key, key): value
        for key, value in launcher.items()
        if value is not None and key not in _NOT_SBATCH
    }
    if "mem" in sbatch:
        sbatch["mem"] = f"{sbatch['mem']}GB"
    folder = launcher["submitit_folder"]
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(folder)}"
    return _make_sbatch_string(
        command=command, folder=folder, map_count=num_runs if num_runs > 1 else None, **sbatch
    )


def dry_run(args: list[str]) -> str:
    """What ``kdlight-train -m hydra/launcher=slurm ARGS`` would submit, as text. Raises a
    one-line :class:`KDLightError` for what would stop that command (an unknown setting,
    the slurm extra missing, ``trainer.devices=auto``)."""
    args = [
        a for a in args if a not in ("-m", "--multirun") and not a.startswith("hydra/launcher=")
    ]
    if flags := [a for a in args if a.startswith("-")]:
        raise KDLightError(f"unknown option {flags[0]} (python -m kdlight.cli.slurm --help)")
    check_command_line(["-m", *args, "hydra/launcher=slurm"])
    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(args) if not o.is_sweep_override()]
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose(
            "train",
            overrides=[*fixed, "hydra/launcher=slurm", "hydra.job.name=train"],
            return_hydra_config=True,
        )
    # The runs, as Hydra's basic sweeper makes them: conf/sweep/ params, then the command line.
    sweep = [f"{key}={value}" for key, value in (cfg.hydra.sweeper.params or {}).items()]
    runs = [run for batch in BasicSweeper.split_arguments(parser.parse_overrides([*sweep, *args]), None) for run in batch]  # fmt: skip
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    lines = [submitit_script(launcher, len(runs)), ""]
    lines += [f"# run {n}: {' '.join(filter_overrides(run))}" for n, run in enumerate(runs)]
    if warning := missing_teacher(cfg):
        lines.append(warning)
    lines.append(f"# dry run: {len(runs)} run(s), nothing submitted")
    return "\n".join(lines)


def missing_teacher(cfg: DictConfig) -> str | None:
    """One line when ``cfg`` distils from a teacher that does not exist yet: each of these
    jobs would stop at its start. kdlight-study submits the teacher first, then the students
    as an array that waits for it."""
    if not is_distillation(cfg):
        return None
    try:
        resolve_teacher(cfg)
    except KDLightError:
        model = OmegaConf.select(cfg, "distill.teacher_model")
        folder = f"{cfg.paths.root}/teacher/{model}"
        pair = OmegaConf.select(cfg, "hydra.runtime.choices.pair", default=None)
        study = f"kdlight-study pair={pair}" if pair else "kdlight-study pair=PAIR (a zoo pair)"
        return (
            f"# no finished {model} teacher under {folder} yet: each run would stop at its "
            f"start; {study} distiller=... seed=... --slurm submits the teacher first and "
            "these runs after it"
        )
    return None


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if "-h" in args or "--help" in args:
        print(USAGE, end="")
        return
    try:
        print(dry_run(args))
    except (KDLightError, HydraException, OmegaConfBaseException) as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
