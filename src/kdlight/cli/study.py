"""``kdlight-study``: a zoo study as one command, teacher -> students -> report (its
command line and the jobs it runs: :data:`USAGE`).

Each job is the ``kdlight-train`` run its overrides name, so its directory, identity and
finished state are that run's (:mod:`kdlight.runs.identity`). Locally the jobs run one after
another (:func:`run_here`, :func:`run_job`); on SLURM ``sbatch`` receives the scripts of
:func:`slurm_jobs`, with the resources of ``conf/hydra/launcher/slurm.yaml``.
"""

import argparse
import copy
import logging
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdlight import config_dir
from kdlight.config.preflight import check_command_line, check_slurm_resources
from kdlight.config.settings import choices, not_allowed
from kdlight.errors import KDLightError, find_user_error, first_line
from kdlight.runs.files import atomic_write
from kdlight.runs.identity import identify
from kdlight.teacher.find import resolve_teacher

log = logging.getLogger("kdlight")

USAGE = """usage: kdlight-study pair=PAIR distiller=M[,M...] seed=S[,S...] [OVERRIDE ...]
                     [--slurm] [--dry-run] [--report] [--out DIR]

Train the pair's teacher, then its student alone and each method at each seed, then
report them (kdlight-report) into --out (default: <paths.root>/study/<PAIR>). What has
finished is skipped: the same command again continues a study. OVERRIDEs are
kdlight-train's; model=, model.*, distill.* and distiller.* are the students' (the teacher
is distill.teacher_model), the others go to every job.

  --slurm     submit with sbatch: the teacher, then the students as one job array that
              depends on it (afterok), then the report (also: hydra/launcher=slurm);
              hydra.launcher.* settings (partition, timeout_min, ...) size the jobs
  --dry-run   with --slurm: print every job, its commands and its dependency; submit nothing
  --report    only write the report of the study's runs as they are now
  --out DIR   where the report (and the SLURM scripts) go

  kdlight-study pair=resnet32x4_resnet8x4 distiller=kd,dkd seed=0,1,2
  kdlight-study pair=resnet32x4_resnet8x4 distiller=kd,dkd seed=0,1,2 --slurm --dry-run \\
      hydra.launcher.partition=gpu
"""

#: Overrides of the students only: the teacher is the pair's (distill.teacher_model).
STUDENT_KEYS = ("model", "distill", "distiller")
#: The settings a report job needs: it reads files and trains nothing.
REPORT_RESOURCES = {"cpus_per_task": 2, "mem_gb": 8, "timeout_min": 60}


@dataclass(frozen=True)
class Job:
    """One ``kdlight-train`` run of the study."""

    role: str  # "teacher", "student" (alone) or "distill"
    label: str  # what the output calls it: "teacher resnet32x4", "dkd seed 1"
    overrides: tuple[str, ...]


@dataclass
class Study:
    """What ``kdlight-study ARGS`` asked for."""

    pair: str
    distillers: list[str]
    seeds: list[int]
    student_overrides: list[str] = field(default_factory=list)  # model=, distill.*, ...
    shared_overrides: list[str] = field(default_factory=list)  # every job's
    launcher_overrides: list[str] = field(default_factory=list)  # hydra.launcher.*

    def teacher_job(self, teacher_model: str) -> Job:
        """The pair's teacher, ``teacher_model``: named only where the students' overrides
        changed it (``distill.teacher_model=``), else the pair's choice."""
        changed = any(_key(o) == "distill.teacher_model" for o in self.student_overrides)
        model = [f"model={teacher_model}"] if changed else []
        overrides = ["experiment=zoo_teacher", f"pair={self.pair}", *model, *self.shared_overrides]
        return Job("teacher", f"teacher {teacher_model}", tuple(overrides))

    def student_jobs(self) -> list[Job]:
        """The student alone at each seed, then each method at each seed."""
        alone = [o for o in self.student_overrides if _key(o).split(".")[0] == "model"]
        pair, students = f"pair={self.pair}", self.student_overrides
        kinds = [("student", "student alone", ["experiment=zoo_student", pair, *alone])]
        kinds += [
            ("distill", m, ["experiment=zoo_distill", pair, f"distiller={m}", *students])
            for m in self.distillers
        ]
        return [
            Job(role, f"{label} seed {seed}", (*words, f"seed={seed}", *self.shared_overrides))
            for role, label, words in kinds
            for seed in self.seeds
        ]


def _key(override: str) -> str:
    """The key or group an override sets (``~distiller.beta`` and ``+model.x`` too)."""
    return override.lstrip("~+").split("=", 1)[0].split("@", 1)[0]


def _values(parser: OverridesParser, line: str) -> list:
    """The values of ``key=a,b,c`` (one for ``key=a``), as Hydra parses them."""
    override = parser.parse_override(line)
    if override.is_sweep_override():
        return list(override.sweep_iterator())
    return [override.value()]


def parse_study(args: list[str]) -> Study:
    """The study ``kdlight-study ARGS`` (no flags) asks for, or a one-line
    :class:`KDLightError`: no pair or an unknown one, an unknown method, a seed that is not
    a whole number, a sweep over anything else."""
    parser = OverridesParser.create()
    found: dict[str, str] = {}
    rest: list[str] = []
    for line in args:
        if "=" not in line and not line.startswith("~"):
            raise KDLightError(f"{line!r} is not KEY=VALUE (kdlight-study --help)")
        key = _key(line)
        if key in ("pair", "distiller", "seed") and not line.startswith(("+", "~")):
            found[key] = line
        elif key == "experiment":
            raise KDLightError(
                "experiment= is the study's own (zoo_teacher, zoo_student, zoo_distill): "
                "leave it out"
            )
        else:
            rest.append(line)
    try:
        pairs_known = choices("pair")
        known = ", ".join(pairs_known)
        if "pair" not in found:
            raise KDLightError(f"a study needs pair=PAIR, one of {known}")
        pairs = _values(parser, found["pair"])
        if len(pairs) != 1 or pairs[0] not in pairs_known:
            raise KDLightError(f"{found['pair']}: a study is one pair, one of {known}")
        methods = _values(parser, found.get("distiller", "distiller=kd"))
        known_methods = choices("distiller")
        if unknown := [m for m in methods if m not in known_methods]:
            raise KDLightError(
                f"distiller={unknown[0]} is not a method of conf/distiller/: "
                f"one or more of {', '.join(known_methods)}, as distiller=kd,dkd"
            )
        seeds = _values(parser, found.get("seed", "seed=0"))
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise KDLightError(f"{found['seed']}: seeds are whole numbers, as seed=0,1,2")
        for line in rest:
            if parser.parse_override(line).is_sweep_override():
                raise KDLightError(
                    f"{line}: a study sweeps distiller= and seed= only; run one study per "
                    "value of anything else"
                )
    except HydraException as err:
        raise KDLightError(f"cannot read the command line: {first_line(err)}") from None
    if len(set(methods)) != len(methods) or len(set(seeds)) != len(seeds):
        raise KDLightError("distiller= and seed= name each value once")
    study = Study(pairs[0], [str(m) for m in methods], [int(s) for s in seeds])
    for line in rest:
        key = _key(line)
        if key.startswith("hydra.launcher.") or key == "hydra/launcher":
            study.launcher_overrides.append(line)
        elif key.split(".")[0].split("/")[0] in STUDENT_KEYS:
            study.student_overrides.append(line)
        else:
            study.shared_overrides.append(line)
    return study


# ------------------------------------------------------------------------------ the runs
def compose_job(job: Job) -> DictConfig:
    """The config ``kdlight-train`` composes for ``job`` (Hydra's own settings left out)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return compose("train", overrides=list(job.overrides))


def check_jobs(jobs: list[Job]) -> None:
    """Each kind of job's command line, checked as ``kdlight-train`` checks its own, so that
    a typo is one line before the teacher trains for hours rather than after."""
    seen = set()
    for job in jobs:
        kind = (job.role, *[o for o in job.overrides if o.startswith("distiller=")])
        if kind not in seen:
            seen.add(kind)
            check_command_line(list(job.overrides))


def _trainer_size(cfg: DictConfig) -> dict:
    """``trainer.devices`` and ``trainer.num_nodes`` of ``cfg`` (1 where unset)."""
    keys = ("devices", "num_nodes")
    return {key: OmegaConf.select(cfg, f"trainer.{key}", default=1) for key in keys}


def run_job(job: Job, cfg: DictConfig, folder: Path) -> str | None:
    """Train ``job`` as ``kdlight-train`` would; None when it finished, else why not.

    A one-process job runs here, in this process (no start-up of seconds per run); one whose
    trainer starts several processes (DDP) runs as ``python -m kdlight.train`` so that
    Lightning restarts that command, not the study, in each of them."""
    from kdlight.runs.guard import RunInUse, Terminated, hold_run_lock, stop_on_sigterm
    from kdlight.train import train, write_error

    if any(str(size) != "1" for size in _trainer_size(cfg).values()):  # DDP
        done = subprocess.run([sys.executable, "-m", "kdlight.train", *job.overrides])
        return None if done.returncode == 0 else f"kdlight-train exited with {done.returncode}"
    cfg = copy.deepcopy(cfg)  # train() fills in settings; the plan's config stays as composed
    cfg.paths.output_dir = str(folder)
    folder.mkdir(parents=True, exist_ok=True)  # as Hydra makes it before kdlight-train starts
    try:
        with hold_run_lock(folder), stop_on_sigterm():
            train(cfg)
    except Terminated as stop:  # the machine or the user stops the study, not only this run
        write_error(folder, first_line(stop))
        _say(f"error: {job.label}: {first_line(stop)}")
        raise
    except Exception as error:
        known = find_user_error(error)
        if known is None:
            raise
        if not isinstance(known, RunInUse) and folder.is_dir():
            write_error(folder, first_line(known))  # kdlight-report lists it as failed
        return first_line(known)
    return None


# ------------------------------------------------------------------------------ SLURM
def launcher_settings(study: Study, cfg: DictConfig) -> dict:
    """``conf/hydra/launcher/slurm.yaml`` with the study's ``hydra.launcher.*`` overrides,
    its trainer references resolved against a student's config."""
    launcher = OmegaConf.load(config_dir() / "hydra" / "launcher" / "slurm.yaml")
    launcher.pop("defaults", None)
    parser = OverridesParser.create()
    for line in study.launcher_overrides:
        override = parser.parse_override(line)
        key = override.key_or_group.removeprefix("hydra.launcher.")
        if key == override.key_or_group:
            continue  # hydra/launcher=slurm: the choice of SLURM itself
        if key not in launcher:
            raise KDLightError(
                f"{line}: not a setting of the SLURM jobs (hydra.launcher.<one of "
                f"{', '.join(k for k in launcher if k not in ('_target_', 'submitit_folder'))}>)"
            )
        launcher[key] = override.value()
    check_slurm_resources(cfg)
    root = OmegaConf.create({"trainer": _trainer_size(cfg), "launcher": launcher})
    settings = OmegaConf.to_container(root, resolve=True)["launcher"]
    for key in ("tasks_per_node", "gpus_per_node", "nodes"):  # as hydra.launcher.KEY=... set
        if not isinstance(settings.get(key), int):
            raise not_allowed(f"hydra.launcher.{key}", settings.get(key), "an integer")
    if str(OmegaConf.select(cfg, "trainer.accelerator", default="")) == "cpu":
        settings["gpus_per_node"] = None  # a CPU job asks for no GPU
    return settings


def sbatch_script(
    name: str, settings: dict, commands: list[str], log_dir: Path, waits: bool = False
) -> str:
    """A batch script running ``commands``: the one command, or an array task each.
    ``waits``: the job depends on another one."""
    array = len(commands) > 1
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}"]
    options = {
        "nodes": settings.get("nodes"),
        "ntasks-per-node": settings.get("tasks_per_node"),
        "gpus-per-node": settings.get("gpus_per_node"),
        "cpus-per-task": settings.get("cpus_per_task"),
        "mem": f"{settings['mem_gb']}G" if settings.get("mem_gb") else None,
        "time": settings.get("timeout_min"),
        "partition": settings.get("partition"),
        "account": settings.get("account"),
        "array": f"0-{len(commands) - 1}" if array else None,
        "output": str(log_dir / (f"{name}-%A_%a.out" if array else f"{name}-%j.out")),
        # a job whose dependency can never be met (its teacher failed) ends, not pends forever
        "kill-on-invalid-dep": "yes" if waits else None,
    }
    lines += [f"#SBATCH --{key}={value}" for key, value in options.items() if value is not None]
    lines += ["", f"cd {shlex.quote(str(Path.cwd()))}"]
    if not array:
        return "\n".join([*lines, commands[0], ""])
    lines.append('case "$SLURM_ARRAY_TASK_ID" in')
    lines += [f"  {n}) {command} ;;" for n, command in enumerate(commands)]
    return "\n".join([*lines, "esac", ""])


def _command(overrides: tuple[str, ...], root: Path) -> str:
    """A job's ``kdlight-train`` command line, with the study's ``paths.root`` spelled out
    (a job may start in another environment); srun starts one task per GPU."""
    words = [sys.executable, "-m", "kdlight.train", *overrides, f"paths.root={root}"]
    return "srun " + shlex.join(words)


def submit(script: Path, dependency: str | None) -> str:
    """``sbatch --parsable`` of ``script``; the job id."""
    if shutil.which("sbatch") is None:
        raise KDLightError("sbatch not found: submit on a SLURM login node (--dry-run prints the jobs)")  # fmt: skip
    command = ["sbatch", "--parsable", *([f"--dependency={dependency}"] if dependency else []), str(script)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        reason = first_line(RuntimeError(done.stderr or done.stdout))
        raise KDLightError(f"sbatch refused {script}: {reason}")
    return done.stdout.strip().split(";")[0]  # "id" or "id;cluster"


# ------------------------------------------------------------------------------ the command
def _say(text: str) -> None:
    print(text, file=sys.stderr if text.startswith("error: ") else sys.stdout, flush=True)


@dataclass
class Planned:
    """A job and its composed config."""

    job: Job
    cfg: DictConfig

    def state(self) -> tuple[Path, bool]:
        """The run's directory (as ``kdlight-train`` names it) and whether it has finished,
        read when asked: a student's depends on its teacher, which may finish meanwhile (a
        distillation whose teacher is not there yet has not)."""
        from kdlight.train import finished  # the run's own test, not a second one

        root = Path(str(self.cfg.paths.root)).resolve() / str(self.cfg.name)
        try:
            teacher = resolve_teacher(self.cfg)
        except KDLightError:  # named as kdlight.runs.identity.run_folder names it: "missing"
            return root / identify(self.cfg, "missing").folder, False
        identity = identify(self.cfg, teacher.identity if teacher else None)
        folder = root / identity.folder
        return folder, finished([folder / "metrics.json"], identity)


def plan(study: Study) -> list[Planned]:
    """The teacher job (none when ``distill.teacher_checkpoint`` names a teacher file), then
    the students' jobs, each command line checked and composed once, before any work."""
    jobs = study.student_jobs()
    check_jobs(jobs)
    students = [Planned(job, compose_job(job)) for job in jobs]
    if any(_key(o) == "distill.teacher_checkpoint" for o in study.student_overrides):
        return students
    # the pair's teacher, after the students' overrides (distill.teacher_model=)
    distill = next(p for p in students if p.job.role == "distill")
    job = study.teacher_job(str(distill.cfg.distill.teacher_model))
    check_jobs([job])
    return [Planned(job, compose_job(job)), *students]


def report(runs: list[Planned], out: Path) -> int:
    """``kdlight-report`` of the study's runs (those that exist) into ``out``."""
    from kdlight.cli.report import main as report_main

    dirs = [folder for run in runs if (folder := run.state()[0]).is_dir()]
    if not dirs:
        raise KDLightError(f"no run of this study exists yet under {runs[-1].cfg.paths.root}")
    status = report_main([*map(str, dirs), "--out", str(out)])
    _say(f"report: {out}")
    return status


def unfinished(run: Planned) -> Path | None:
    """``run``'s directory when it has not finished, else None (and it says it skips it)."""
    folder, done = run.state()
    if done:
        _say(f"skipped (finished): {run.job.label}: {folder}")
    return None if done else folder


def run_here(runs: list[Planned], out: Path) -> int:
    """The study's :func:`plan` in this process, then its report. 0 when every run finished."""
    failed = []
    for run in runs:
        folder = unfinished(run)  # a student's after its teacher: the teacher is theirs
        if folder is None:
            continue
        _say(f"running {run.job.label}: {folder}")
        failure = run_job(run.job, run.cfg, folder)
        if failure or not run.state()[1]:  # a run that did not train it all is not finished
            _say(f"error: {run.job.label}: {failure or 'not finished: it stopped before its last epoch'}")  # fmt: skip
            failed.append(run.job.label)
            if run.job.role == "teacher":
                _say("error: no student can start without its teacher; launch the same command again to continue it")  # fmt: skip
                return 1
    status = report(runs, out)
    if failed:
        _say(f"error: {len(failed)} run(s) did not finish ({', '.join(failed)}); launch the same command again to continue them")  # fmt: skip
        return 1
    return status


@dataclass(frozen=True)
class SlurmJob:
    """One ``sbatch`` submission of the study."""

    name: str  # also the script's file name and SLURM's job name
    what: str  # said in the output
    script: str
    after: str | None = None  # the name of the job it waits for
    kind: str = "afterok"  # sbatch's dependency type


def slurm_jobs(study: Study, todo: list[Job], settings: dict, root: Path, out: Path) -> list[SlurmJob]:  # fmt: skip
    """The teacher job (if ``todo`` holds it), the students' array after it (if any student
    is left), and the report job after them; ``root`` is the study's ``paths.root``."""
    log_dir, jobs = out / "slurm", []
    if todo and todo[0].role == "teacher":
        script = sbatch_script("kdlight-teacher", settings, [_command(todo[0].overrides, root)], log_dir)  # fmt: skip
        jobs.append(SlurmJob("kdlight-teacher", "the teacher", script))
        todo = todo[1:]
    after = jobs[-1].name if jobs else None
    if todo:
        commands = [_command(job.overrides, root) for job in todo]
        script = sbatch_script("kdlight-students", settings, commands, log_dir, waits=bool(after))
        what = f"{len(todo)} student run(s), one array task each"
        jobs.append(SlurmJob("kdlight-students", what, script, after))
    # the report rereads the study's runs when it starts: the same arguments with --report
    words = [f"pair={study.pair}", f"distiller={','.join(study.distillers)}"]
    words += [f"seed={','.join(map(str, study.seeds))}", *study.student_overrides]
    words += [*study.shared_overrides, f"paths.root={root}", "--report", "--out", str(out)]
    command = shlex.join([sys.executable, "-m", "kdlight.cli.study", *words])
    light = {**settings, **REPORT_RESOURCES, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": None}  # fmt: skip
    after = jobs[-1].name if jobs else None
    script = sbatch_script("kdlight-report", light, [command], log_dir, waits=bool(after))
    # afterany: a failed run is listed in the report with its error line
    jobs.append(SlurmJob("kdlight-report", f"the report into {out}", script, after, "afterany"))
    return jobs


def run_on_slurm(study: Study, runs: list[Planned], out: Path, dry_run: bool) -> int:
    """Submit (or with ``dry_run`` print) the :func:`slurm_jobs` of the unfinished runs."""
    todo = [run.job for run in runs if unfinished(run)]
    student = next(run for run in runs if run.job.role == "student")
    root = Path(str(student.cfg.paths.root)).resolve()
    jobs = slurm_jobs(study, todo, launcher_settings(study, student.cfg), root, out)
    ids: dict[str, str] = {}
    for job in jobs:
        path = out / "slurm" / f"{job.name}.sbatch"
        dependency = f"{job.kind}:{ids.get(job.after, f'<{job.after} job id>')}" if job.after else None  # fmt: skip
        waits = f"after {job.after} ({dependency})" if job.after else "no dependency"
        if dry_run:
            option = f" --dependency={dependency}" if dependency else ""
            _say(f"# job {job.name}: {job.what}; {waits}\n# sbatch --parsable{option} {path}")
            _say(job.script)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        ids[job.name] = submit(atomic_write(path, job.script), dependency)
        _say(f"submitted {job.name} (job {ids[job.name]}): {job.what}; {waits}")
    if dry_run:
        _say(f"# dry run: {len(jobs)} job(s), nothing submitted")
    else:
        _say(f"report (when the jobs are done): {out}")
    return 0


def _main(options: argparse.Namespace, overrides: list[str]) -> int:
    """The study the flags and overrides ask for, planned (and checked) whole first."""
    if unknown := [a for a in overrides if a.startswith("-")]:
        raise KDLightError(f"unknown option {unknown[0]} (kdlight-study --help)")
    study = parse_study(overrides)
    slurm = options.slurm or any("slurm" in o for o in study.launcher_overrides if o.startswith("hydra/launcher="))  # fmt: skip
    if options.dry_run and not slurm:
        raise KDLightError("--dry-run shows the SLURM jobs: add --slurm")
    runs = plan(study)
    out = (options.out or Path(str(runs[-1].cfg.paths.root)) / "study" / study.pair).resolve()
    if options.report:
        return report(runs, out)
    if slurm:
        return run_on_slurm(study, runs, out, options.dry_run)
    return run_here(runs, out)


def main(argv: list[str] | None = None) -> None:
    """``kdlight-study``: one ``error:`` line and status 2 for bad input, before any work."""
    args = sys.argv[1:] if argv is None else argv
    if "-h" in args or "--help" in args:
        print(USAGE, end="")
        return
    flags = argparse.ArgumentParser(prog="kdlight-study", add_help=False)
    for flag in ("--slurm", "--dry-run", "--report"):
        flags.add_argument(flag, action="store_true")
    flags.add_argument("--out", type=Path)
    options, overrides = flags.parse_known_args(args)
    # kdlight-train's lines, as Hydra's logging shows them there (Lightning shows its own)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        status = _main(options, overrides)
    except (KDLightError, HydraException, OmegaConfBaseException) as err:
        print(f"error: {first_line(err)}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    sys.exit(status)


if __name__ == "__main__":
    main()
