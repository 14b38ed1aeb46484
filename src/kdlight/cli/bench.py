"""``python -m kdlight.cli.bench`` (``make bench``): training throughput, kdlight's fast path
against the plain PyTorch loop a user would write, in one process on one device.

The plain loop is written here on purpose, as a fixed point of comparison: torchvision
transforms on PIL images (what ``torchvision.datasets.CIFAR10`` does per sample), a
``DataLoader`` with worker processes, float32, batch 128. The fast path is kdlight's own:
the DataModule (with ``on_device`` on a GPU), the Lightning modules with their speed
options (bf16-mixed, channels_last, torch.compile), driven by a ``lightning.Trainer``.

Four workloads: teacher training, student training, a distillation step (teacher forward +
student step) and the fused T x alpha grid (N students, one teacher forward). For the grid
the figure that matters is the cost per student-epoch against N separate plain
distillation runs: ``grid images/s x N / plain distillation images/s``.

More tables, each on by default: every method's distillation step against KD's
(``--methods``, :func:`method_steps`), the KD step of each CIFAR-100 zoo pair (``--zoo``,
:func:`zoo_steps`), each module's per-step overhead (``--overhead``, :func:`step_overhead`)
and the teacher cache (``--cache``, ``distill.teacher_cache=true``: :func:`cache_steps` and
:func:`lazy_fill_hit_rates`).
"""

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Iterable
from functools import partial
from itertools import chain, islice, repeat
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from kdlight import config_dir, distillers
from kdlight.data import CIFAR10DataModule, CIFAR100DataModule
from kdlight.data.augment import CIFAR10_MEAN, CIFAR10_STD, random_crop_flip
from kdlight.data.sources import make_synthetic
from kdlight.lit import ClassifierModule, DistillationGridModule, DistillationModule, freeze
from kdlight.losses import kd_loss
from kdlight.models import create_model
from kdlight.runs.files import atomic_write
from kdlight.teacher.cache import VARIANTS, variant_of
from kdlight.trainer.hardware import fast_cpu_precision


class PlainCIFAR(Dataset):
    """CIFAR-10 as torchvision serves it: one PIL image and one transform call per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels
        self.transform = T.Compose([
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def plain_loop(
    student: nn.Module,
    teacher: nn.Module | None,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    warmup: int,
    steps: int,
) -> float:
    """Images/s of a textbook training loop (distillation when a teacher is given) over
    ``loader``'s batches, started again when it runs out."""
    student.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    seen, start = 0, None
    batches = islice(chain.from_iterable(repeat(loader)), warmup + steps)
    for step, (images, labels) in enumerate(batches):
        if step == warmup:
            _sync(device)
            start, seen = time.perf_counter(), 0
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if teacher is None:
            loss = F.cross_entropy(student(images), labels)
        else:
            with torch.no_grad():
                teacher_logits = teacher(images)
            loss = kd_loss(student(images), teacher_logits, labels, 4.0, 0.9)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(labels)
    _sync(device)
    return seen / (time.perf_counter() - start)


class Throughput(Callback):
    """Images/s over the training batches after ``warmup`` (compilation, caches)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.seen, self.start = warmup, 0, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            _sync(module.device)
            self.start, self.seen = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.seen += trainer.datamodule.hparams.batch_size

    def on_train_epoch_end(self, trainer, module) -> None:
        _sync(module.device)
        self.images_per_second = self.seen / (time.perf_counter() - self.start)


def fast_path(module: L.LightningModule, datamodule: CIFAR10DataModule, args, steps: int) -> float:
    """Images/s of ``module`` trained on ``args.device`` at ``args.precision``, timed over
    ``steps`` batches after ``args.warmup``."""
    meter = Throughput(args.warmup)
    trainer = L.Trainer(
        accelerator=args.device, devices=1, precision=args.precision, max_epochs=1,
        limit_train_batches=args.warmup + steps, limit_val_batches=0,
        callbacks=[meter], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return meter.images_per_second


#: A line of progress, shown as soon as it is said.
say = partial(print, flush=True)


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def step_overhead(
    args: argparse.Namespace, cells: int, batch: int = 8, steps: int = 200
) -> list[dict]:
    """Milliseconds per training step with a trivial model (one linear layer, batch 8): the
    CPU time each kdlight module spends per step outside the model (Lightning's loop,
    logging, augmentation, the optimizer's Python), which bounds a GPU step from below
    however fast the GPU is, against a bare PyTorch loop on tensors in memory."""
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    settings = argparse.Namespace(device=args.device, precision="32-true", warmup=20)

    def tiny() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))

    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    in_memory = [(images.to(device), labels.to(device))]  # already there: no copy per step
    bare = plain_loop(tiny(), None, in_memory, device, settings.warmup, steps)  # the one batch
    rows = [{"module": "bare PyTorch loop", "ms_per_step": 1e3 * batch / bare}]
    datamodule = synthetic_data(batch, settings.warmup + steps, device.type == "cuda")
    modules = {
        "ClassifierModule": lambda: ClassifierModule(tiny()),
        "DistillationModule": lambda: DistillationModule(tiny(), teacher=freeze(tiny())),
        f"DistillationGridModule ({cells} cells)": lambda: DistillationGridModule(
            tiny(), teacher=freeze(tiny()), **grid_axes(cells)
        ),
    }
    for name, module in modules.items():
        rate = fast_path(module(), datamodule, settings, steps)
        rows.append({"module": name, "ms_per_step": 1e3 * batch / rate})
    for row in rows:
        say(f"{row['module']:<36} {row['ms_per_step']:6.2f} ms/step (trivial model)")
    return rows


def synthetic_data(
    batch: int, batches: int, on_device: bool, classes: int = 10, data_dir: str | None = None
) -> CIFAR10DataModule:
    """Synthetic CIFAR-10 (or CIFAR-100) of ``batches`` training batches of ``batch``
    images, one epoch, in ``data_dir`` (where a teacher cache is made; None: the per-user
    data folder)."""
    return (CIFAR100DataModule if classes == 100 else CIFAR10DataModule)(
        source="synthetic", synthetic_train_size=batch * batches, synthetic_test_size=batch,
        val_size=0, batch_size=batch, on_device=on_device, data_dir=data_dir,
    )  # fmt: skip


def step_data(args: argparse.Namespace, data_dir: str | None = None) -> CIFAR10DataModule:
    """The synthetic CIFAR-10 the step workloads train on: ``warmup + steps`` batches."""
    return synthetic_data(
        args.batch_size, args.warmup + args.steps, args.device == "gpu", 10, data_dir
    )


#: The runs of :func:`cache_steps` for each system, in order: (what the run does, with the
#: cache). The KD step is timed twice over, the fused grid once.
CACHE_RUNS = (
    ("live teacher", False),
    ("filling the cache", True),
    ("warm cache", True),
    ("live teacher, again", False),
    ("warm cache, again", True),
)


def cache_steps(args, teacher, student, speed) -> list[dict]:
    """The KD step and the fused grid's step (images/s on the fast path, the "distillation
    step" and "fused grid" workloads' teacher, students and settings) with the teacher
    live, filling an empty teacher cache, and with the cache warm, in the order of
    :data:`CACHE_RUNS` (the grid: its first three), each system's cache in a temporary data
    folder removed afterwards. Every run starts from seed 0 on the same data, so a warm run
    draws the filling run's augmentation again and each of its lookups hits (its
    ``hit_rate``, 1.0; None without the cache). ``vs_live``: the run's images/s against the
    live run before it (None for a live run). Timing on a CPU is noisy, hence two pairs."""
    grid = grid_axes(args.grid)
    systems = {
        "KD step": (CACHE_RUNS, DistillationModule, {}),
        f"fused grid ({args.grid} students)": (CACHE_RUNS[:3], DistillationGridModule, grid),
    }
    rows = []
    for system, (runs, system_class, cells) in systems.items():
        live = None
        with tempfile.TemporaryDirectory(prefix="kdlight-bench-") as folder:
            for what, cached in runs:
                L.seed_everything(0, verbose=False)
                module = system_class(
                    student(), teacher=teacher, teacher_cache=cached, **cells, **speed
                )
                rate = fast_path(module, step_data(args, folder), args, args.steps)
                hit_rate = module.frozen.cache.hit_rate if cached else None
                live = live if cached else rate
                vs_live = rate / live if cached else None
                name = f"{system}, {what}"
                row = {"run": name, "images_per_second": rate, "hit_rate": hit_rate}
                rows.append(row | {"vs_live": vs_live})
                against = f"  hit rate {hit_rate:.1%}  x{vs_live:.2f} vs live" if cached else ""
                say(f"{name:<40} {rate:9.0f} img/s{against}")
    return rows


def lazy_fill_hit_rates(
    num_images: int, epochs: Iterable[int], seed: int = 0, chunk: int = 8192
) -> list[dict]:
    """The hit rate of a teacher cache that training fills as it goes (``DistillationModule``
    with ``teacher_cache=True``), simulated from the augmentation's own draws: each epoch
    looks each of ``num_images`` training images up once, at the variant
    :func:`kdlight.data.augment.random_crop_flip` draws for it from a generator seeded with
    ``seed``, and fills the misses. It draws for ``chunk`` images at a time, as training
    draws a batch at a time, on images without pixels, ``(n, 0, 1, 1)``: the draws depend
    on the number of images and the padding alone, and cropping nothing costs nothing.

    Returns one dict per epoch E of ``epochs`` (sorted; the largest is how many epochs are
    simulated): ``epoch``; ``epoch_hit_rate``, the fraction of epoch E's lookups that were
    already filled; ``cumulative_hit_rate``, that of epochs 1 to E together; ``filled``,
    the fraction of all ``num_images x 162`` entries filled after epoch E; and
    ``teacher_forwards``, the teacher forwards of E epochs with the cache as a fraction of
    those without it (``1 - cumulative_hit_rate``).
    """
    report = sorted(set(epochs))
    generator = torch.Generator().manual_seed(seed)
    filled = np.zeros((num_images, VARIANTS), dtype=bool)
    hits = 0
    rows = []
    for epoch in range(1, report[-1] + 1):
        epoch_hits = 0
        for start in range(0, num_images, chunk):
            index = np.arange(start, min(start + chunk, num_images))
            pixels = torch.zeros(len(index), 0, 1, 1, dtype=torch.uint8)
            _, params = random_crop_flip(pixels, generator=generator, return_params=True)
            variants = variant_of(params).numpy()
            epoch_hits += int(filled[index, variants].sum())
            filled[index, variants] = True
        hits += epoch_hits
        if epoch in report:
            cumulative = hits / (epoch * num_images)  # of all lookups so far
            rows.append(
                {
                    "epoch": epoch,
                    "epoch_hit_rate": epoch_hits / num_images,
                    "cumulative_hit_rate": cumulative,
                    "filled": int(filled.sum()) / filled.size,
                    "teacher_forwards": 1 - cumulative,
                }
            )
    return rows


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    size = args.batch_size * (args.warmup + args.steps)
    data = make_synthetic(train_size=size, test_size=args.batch_size, seed=0)["train"]
    loader = DataLoader(
        PlainCIFAR(data.images, data.labels), batch_size=args.batch_size, shuffle=True, drop_last=True,
        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
    )  # fmt: skip
    datamodule = step_data(args)
    speed = {"compile": args.compile, "channels_last": args.channels_last}
    teacher = freeze(create_model(args.teacher))

    def student() -> nn.Module:
        torch.manual_seed(0)
        return create_model(args.student)

    workloads = {  # the model to train (made anew for each loop), its teacher, its system
        "teacher training": (lambda: create_model(args.teacher), None, ClassifierModule),
        "student training": (student, None, ClassifierModule),
        "distillation step": (student, teacher, partial(DistillationModule, teacher=teacher)),
    }
    rows = []
    for name, (model, its_teacher, system) in workloads.items():
        plain = plain_loop(model(), its_teacher, loader, device, args.warmup, args.steps)
        fast = fast_path(system(model(), **speed), datamodule, args, args.steps)
        rows.append({"workload": name, "plain": plain, "fast": fast, "ratio": fast / plain})
        say(f"{name:<22} plain {plain:9.0f}  fast {fast:9.0f} img/s  x{fast / plain:.2f}")
    distill_plain = rows[-1]["plain"]
    grid = DistillationGridModule(student(), teacher=teacher, **grid_axes(args.grid), **speed)
    cells = len(grid.cells)
    grid_rate = fast_path(grid, datamodule, args, args.steps)
    per_student = grid_rate * cells
    grid_row = {"workload": f"fused grid ({cells} students)", "plain": distill_plain}
    rows.append(grid_row | {"fast": per_student, "ratio": per_student / distill_plain})
    say(
        f"{'fused grid':<22} {cells} students at {grid_rate:.0f} img/s = {per_student:.0f} "
        f"student-img/s  x{per_student / distill_plain:.2f} vs separate plain runs"
    )
    methods = method_steps(args, datamodule, teacher, student, speed) if args.methods else []
    zoo = zoo_steps(args, speed) if args.zoo else []
    overhead = step_overhead(args, cells) if args.overhead else []
    cache = {"steps": [], "fill": []}
    if args.cache:
        cache["steps"] = cache_steps(args, teacher, student, speed)
        cache["fill"] = lazy_fill_hit_rates(args.cache_images, args.cache_epochs)
        for row in cache["fill"]:
            say(
                f"lazy fill, epoch {row['epoch']:>4}: hit rate {row['epoch_hit_rate']:7.2%}, "
                f"epochs 1-{row['epoch']} {row['cumulative_hit_rate']:7.2%}, "
                f"filled {row['filled']:7.2%}"
            )
    on = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    result = {"device": on, "torch": torch.__version__, "settings": settings, "rows": rows}
    return result | {"methods": methods, "zoo": zoo, "overhead": overhead, "cache": cache}


#: The methods ``make bench`` times, each with its defaults (the official CIFAR settings).
METHODS = {
    name.lower(): getattr(distillers, name)
    for name in (
        "KD",
        "DKD",
        "FitNet",
        "AT",
        "SP",
        "VID",
        "NST",
        "KDSVD",
        "PKT",
        "RKD",
        "CC",
        "CRD",
        "DIST",
        "CTKD",
        "TTM",
        "WTTM",
        "OFD",
        "MLKD",
    )
}


def zoo_pairs() -> list[tuple[str, str]]:
    """The (teacher, student) pairs of ``conf/pair/``, in file order."""
    pairs = []
    for path in sorted((config_dir() / "pair").glob("*.yaml")):
        config = OmegaConf.load(path)
        (student,) = [e["override /model"] for e in config.defaults if "override /model" in e]
        pairs.append((str(config.distill.teacher_model), str(student)))
    return pairs


def zoo_steps(args, speed) -> list[dict]:
    """The KD distillation step (images/s on the fast path) of each zoo pair, on 100
    classes at batch 64 (the zoo's recipe)."""
    datamodule = synthetic_data(64, args.warmup + args.zoo_steps, args.device == "gpu", 100)
    rows = []
    for teacher_name, student_name in zoo_pairs()[: args.zoo_pairs]:
        torch.manual_seed(0)
        teacher = freeze(create_model(teacher_name, num_classes=100))
        student = create_model(student_name, num_classes=100)
        module = DistillationModule(student, teacher=teacher, num_classes=100, **speed)
        rate = fast_path(module, datamodule, args, args.zoo_steps)
        rows.append({"teacher": teacher_name, "student": student_name, "images_per_second": rate})
        say(f"zoo {teacher_name:>10} -> {student_name:<12} {rate:9.0f} img/s")
    return rows


def method_steps(args, datamodule, teacher, student, speed) -> list[dict]:
    """Each method's distillation step (images/s on the fast path) and its cost against
    KD's: ``KD images/s / method images/s``."""
    rows = []
    for name, method in METHODS.items():
        module = DistillationModule(student(), teacher=teacher, distiller=method(), **speed)
        rate = fast_path(module, datamodule, args, args.steps)
        rows.append({"method": name, "images_per_second": rate})
        say(f"method {name:<8} {rate:9.0f} img/s")
    kd = rows[0]["images_per_second"]
    return [row | {"cost_vs_kd": kd / row["images_per_second"]} for row in rows]


def grid_axes(cells: int) -> dict[str, list[float]]:
    """The ``temperature`` x ``alpha`` axes of a grid of ``cells`` cells: 3 alphas when 3
    divides it, else 2 or 1."""
    alphas = next(a for a in ([0.1, 0.5, 0.9], [0.5, 0.9], [0.9]) if cells % len(a) == 0)
    return {"temperature": [float(2**i) for i in range(cells // len(alphas))], "alpha": alphas}


#: The tables of ``run``'s lists: the list's key, the columns, a row as its format.
TABLES = {
    "rows": (
        ["workload", "plain loop (img/s)", "kdlight fast path (img/s)", "ratio"],
        "| {workload} | {plain:.0f} | {fast:.0f} | {ratio:.2f}x |",
    ),
    "methods": (
        ["distillation method", "step (img/s)", "step cost vs KD"],
        "| {method} | {images_per_second:.0f} | {cost_vs_kd:.2f}x |",
    ),
    "zoo": (
        ["zoo pair (KD step, CIFAR-100, batch 64)", "img/s"],
        "| {teacher} -> {student} | {images_per_second:.0f} |",
    ),
    "overhead": (
        ["per-step overhead, trivial model, batch 8", "ms/step"],
        "| {module} | {ms_per_step:.2f} |",
    ),
}


def _table(head: list[str], rows: list[str]) -> list[str]:
    """A Markdown table after a blank line: ``head``'s columns (the first aligned left, the
    others right), then ``rows``."""
    return ["", f"| {' | '.join(head)} |", "|---" + "|---:" * (len(head) - 1) + "|", *rows]


def markdown(result: dict) -> str:
    settings, cache = result["settings"], result.get("cache") or {}
    lines = [
        f"Device: {result['device']}, torch {result['torch']}, batch {settings['batch_size']}, "
        f"precision {settings['precision']}, compile {settings['compile']}, "
        f"channels_last {settings['channels_last']}, plain loop workers {settings['workers']}",
    ]
    for key, (head, row) in TABLES.items():
        if result.get(key):
            lines += _table(head, [row.format_map(r) for r in result[key]])
    if cache.get("steps"):
        head = [f"teacher cache, {settings['teacher']} -> {settings['student']}", "step (img/s)"]
        rows = []
        for r in cache["steps"]:
            hit_rate = "" if r["hit_rate"] is None else f"{r['hit_rate']:.1%}"
            ratio = "" if r["vs_live"] is None else f"{r['vs_live']:.2f}x"
            rows.append(f"| {r['run']} | {r['images_per_second']:.0f} | {hit_rate} | {ratio} |")
        lines += _table([*head, "hit rate", "ratio to the live step before"], rows)
    if cache.get("fill"):
        head = [f"lazily filled teacher cache, {settings['cache_images']:,} images, after E epochs"]
        head += ["hit rate, epoch E", "hit rate, epochs 1-E", "entries filled"]
        row = "| E = {epoch} | {epoch_hit_rate:.2%} | {cumulative_hit_rate:.2%} | {filled:.2%} "
        row += "| {teacher_forwards:.2%} |"
        rows = [row.format_map(r) for r in cache["fill"]]
        lines += _table([*head, "teacher forwards vs no cache"], rows)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    option = parser.add_argument
    option("--device", choices=["cpu", "gpu"], default="gpu" if gpu else "cpu")
    option("--teacher", default="resnet18_half")
    option("--student", default="small_cnn")
    option("--batch-size", type=int, default=128)
    option("--warmup", type=int, default=20 if gpu else 3, help="batches before timing starts")
    option("--steps", type=int, default=200 if gpu else 16, help="timed batches per workload")
    option("--grid", type=int, default=12 if gpu else 4, help="students in the fused grid")
    option(
        "--workers", type=int, default=12 if gpu else 2, help="the plain loop's DataLoader workers"
    )
    # The fast path's defaults are the speed presets: speed=fast on a GPU, speed=fast_cpu on
    # a CPU (bf16 only where the CPU has it natively; no torch.compile, which gains little there).
    option("--precision", default="bf16-mixed" if gpu else fast_cpu_precision())
    switch = partial(option, action=argparse.BooleanOptionalAction, default=True)
    switch("--compile", default=gpu)
    switch("--channels-last")
    switch("--methods", help="also time the distillation step of every method against KD's")
    switch("--zoo", help="also time the KD step of each CIFAR-100 zoo pair (conf/pair/)")
    option("--zoo-steps", type=int, default=200 if gpu else 4, help="timed batches per zoo pair")
    option("--zoo-pairs", type=int, default=None, help="only the first N pairs")
    switch("--overhead", help="also time each module's per-step overhead with a trivial model")
    switch(
        "--cache",
        help="also time the KD step with the teacher cache (live, filling, warm) and simulate "
        "a lazily filled cache's hit rate",
    )
    option(
        "--cache-images", type=int, default=50_000,
        help="training images of the lazy-fill simulation (CIFAR-10's 50,000)",
    )  # fmt: skip
    option(
        "--cache-epochs", type=int, nargs="+", default=[1, 10, 100, 200],
        help="epochs after which the lazy fill's hit rate is reported (the largest is simulated)",
    )  # fmt: skip
    option("--out", type=Path, default=Path("bench.json"))
    args = parser.parse_args(argv)
    if args.cache_images < 1 or min(args.cache_epochs) < 1:
        parser.error("--cache-images and --cache-epochs must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    table = markdown(result)
    print("\n" + table)
    atomic_write(args.out, json.dumps({**result, "table": table}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
