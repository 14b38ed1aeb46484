"""The teacher-output cache (kdlight.teacher.cache): a hit is the live teacher's answer
for the same augmented image, a cached KD run equals the same run without the cache, the
key follows the teacher, the data and the precision, and a killed or concurrent fill
leaves a correct cache (real processes)."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate

from kdlight.cli.cache_teacher import main as cache_teacher_main
from kdlight.data.augment import crop_flip, random_crop_flip
from kdlight.distillers import DKD, FitNet
from kdlight.lit import DistillationGridModule, DistillationModule
from kdlight.models import create_model
from kdlight.teacher.cache import VARIANTS, TeacherCache, params_of, variant_of
from kdlight.train import train
from tests.conftest import REPO, compose_config, cpu_trainer, synthetic_datamodule


def test_a_hit_is_the_live_teachers_answer_for_that_augmented_image(tmp_path: Path):
    teacher = create_model("resnet8").eval()
    data = synthetic_datamodule(train=64, test=16, val=0, batch=16, data_dir=tmp_path)
    data.setup("fit")
    raw = data.train_set.images[:16]
    index = torch.arange(16)
    _, params = random_crop_flip(
        raw, generator=torch.Generator().manual_seed(0), return_params=True
    )
    with torch.no_grad():
        live = teacher(data.normalize(crop_flip(raw, params)))
    cache = TeacherCache(tmp_path / "c", "key", 64, 10)
    assert not cache.lookup(index, params)[1].any()
    cache.store(index, params, live)
    again = TeacherCache(tmp_path / "c", "key", 64, 10)  # another process, say
    logits, hit = again.lookup(index, params)
    assert hit.all() and torch.equal(logits, live)
    assert sorted(set(variant_of(params).tolist())) and variant_of(params).max() < VARIANTS


def fit(module: DistillationModule, root: Path, data_dir: Path) -> DistillationModule:
    L.seed_everything(0)
    trainer = cpu_trainer(root, epochs=2, limit_val_batches=0)
    data = synthetic_datamodule(train=200, test=50, val=0, batch=50, data_dir=data_dir)
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data, verbose=False)
    return module


def test_a_cached_kd_run_equals_the_run_without_it(tmp_path: Path):
    """Without the cache; with it, filling it; with it again, every lookup a hit: the
    students end the same, and metrics.json says how the cache was used."""
    teacher = create_model("resnet8").eval()

    def run(name: str, cache: bool) -> DistillationModule:
        L.seed_everything(0)
        student = create_model("small_cnn", width=0.25)
        module = DistillationModule(student, teacher=teacher, teacher_cache=cache)
        return fit(module, tmp_path / name, tmp_path / "data")

    live, filling, warm = run("live", False), run("filling", True), run("warm", True)
    for key, value in live.model.state_dict().items():
        torch.testing.assert_close(filling.model.state_dict()[key], value, msg=key)
        torch.testing.assert_close(warm.model.state_dict()[key], value, msg=key)
    assert filling.frozen.cache.hit_rate < 0.05 and warm.frozen.cache.hit_rate == 1.0
    record = json.loads((tmp_path / "warm" / "metrics.json").read_text())["teacher_cache"]
    assert record["used"] and record["hit_rate"] == 1.0
    assert Path(record["path"]).parent == tmp_path / "data" / "teacher_cache"
    assert "teacher_cache" not in json.loads((tmp_path / "live" / "metrics.json").read_text())
    tested = DistillationModule(warm.model, teacher=teacher, teacher_cache=True)
    data = synthetic_datamodule(train=200, test=50, val=0, batch=50, data_dir=tmp_path / "data")
    cpu_trainer(tmp_path / "tested", epochs=1).test(tested, datamodule=data, verbose=False)
    record = json.loads((tmp_path / "tested" / "metrics.json").read_text())
    assert "teacher_cache" not in record  # evaluated only: no cache was asked for in a fit


def test_another_teacher_data_or_precision_is_another_cache(tmp_path: Path):
    def path_of(teacher, train: int, precision: str) -> Path:
        L.seed_everything(0)
        module = DistillationModule(
            create_model("small_cnn", width=0.25), teacher=teacher, teacher_cache=True
        )
        trainer = cpu_trainer(tmp_path, epochs=1, limit_train_batches=1, limit_val_batches=0,
                              precision=precision)  # fmt: skip
        data = synthetic_datamodule(train=train, test=50, val=0, batch=50, data_dir=tmp_path)
        trainer.fit(module, datamodule=data)
        return module.frozen.cache.path

    torch.manual_seed(0)
    one = create_model("resnet8").eval()
    torch.manual_seed(1)
    other = create_model("resnet8").eval()
    base = path_of(one, 100, "32-true")
    assert path_of(one, 100, "32-true") == base
    assert len({base, path_of(other, 100, "32-true"), path_of(one, 150, "32-true"),
                path_of(one, 100, "bf16-mixed")}) == 4  # fmt: skip


def test_every_seed_shares_one_cache(tmp_path: Path):
    """Seeds split training and validation images differently; a row is an image's place
    in the whole training split, so they share one cache, and its entries stay right."""
    teacher = create_model("resnet8").eval()
    paths = []
    for seed in (0, 1):
        L.seed_everything(seed)
        module = DistillationModule(
            create_model("small_cnn", width=0.25), teacher=teacher, teacher_cache=True
        )
        trainer = cpu_trainer(tmp_path, epochs=1, limit_val_batches=0)
        data = synthetic_datamodule(
            train=200, test=50, val=50, batch=50, data_dir=tmp_path, seed=seed
        )
        trainer.fit(module, datamodule=data)
        paths.append(module.frozen.cache.path)
    assert paths[0] == paths[1]
    assert_entries_are_the_teachers(module.frozen.cache, teacher, tmp_path)


def assert_entries_are_the_teachers(cache: TeacherCache, teacher, data_dir: Path) -> None:
    """Every filled entry of ``cache`` (of a 200-image synthetic training split, float32)
    holds ``teacher``'s logits of that image's variant."""
    data = synthetic_datamodule(200, 50, 0, 50, data_dir=data_dir)
    data.setup("fit")  # no validation split: every position of the whole training split
    at = torch.empty_like(data.train_positions)
    at[data.train_positions] = torch.arange(len(at))  # position -> its place in train_set
    rows, variants = torch.nonzero(torch.from_numpy(cache.filled.copy()), as_tuple=True)
    with torch.no_grad():
        images = crop_flip(data.train_set.images[at[rows]], params_of(variants))
        live = teacher(data.normalize(images))
    stored = torch.from_numpy(cache.logits[rows.numpy(), variants.numpy()])
    torch.testing.assert_close(stored, live)


def test_a_logit_method_reads_the_cache_a_feature_method_keeps_its_teacher_live(
    tmp_path: Path, caplog
):
    teacher = create_model("resnet8").eval()
    dkd = DistillationModule(
        create_model("small_cnn", width=0.25), teacher=teacher, distiller=DKD(),
        teacher_cache=True,
    )  # fmt: skip
    fit(dkd, tmp_path / "dkd", tmp_path / "data")
    record = json.loads((tmp_path / "dkd" / "metrics.json").read_text())["teacher_cache"]
    assert record["used"] and record["path"] == str(dkd.frozen.cache.path)

    module = DistillationModule(
        create_model("small_cnn", width=0.25), teacher=teacher, distiller=FitNet(),
        teacher_cache=True,
    )  # fmt: skip
    with caplog.at_level("INFO", logger="kdlight"):
        fit(module, tmp_path / "fitnet", tmp_path / "data")
    assert module.frozen.cache is None
    assert (
        "distill.teacher_cache: not used: distiller=fitnet reads the teacher's features"
        in caplog.text
    )
    record = json.loads((tmp_path / "fitnet" / "metrics.json").read_text())["teacher_cache"]
    assert record == {"used": False, "hit_rate": None, "path": None}


# ------------------------------------------------------------------------- processes
IMAGES, CLASSES = 400, 10


def pattern(index: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """What a correct cache holds for each (image, variant): a function of both."""
    variant = variant_of(params).float()
    base = index.float() * 1000 + variant
    return base.unsqueeze(1) + torch.arange(CLASSES).float() / 100


def all_params(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    dy = torch.randint(0, 9, (n, 1), generator=generator)
    dx = torch.randint(0, 9, (n, 1), generator=generator)
    return torch.cat([dy, dx, torch.randint(0, 2, (n, 1), generator=generator)], 1)


def fill(folder: str, seed: int, forever: bool) -> None:
    cache = TeacherCache(folder, "key", IMAGES, CLASSES)
    while True:
        index = torch.randint(0, IMAGES, (32,), generator=torch.Generator().manual_seed(seed))
        params = all_params(32, seed)
        cache.store(index, params, pattern(index, params))
        seed += 2
        if not forever and seed > 400:
            return


def check(folder: Path) -> int:
    """Every filled variant holds its pattern; returns how many are filled."""
    cache = TeacherCache(folder, "key", IMAGES, CLASSES)
    rows, variants = torch.nonzero(torch.from_numpy(cache.filled.copy()), as_tuple=True)
    params = params_of(variants)
    logits, hit = cache.lookup(rows, params)
    assert hit.all()
    torch.testing.assert_close(logits, pattern(rows, params), rtol=0, atol=0)
    return len(rows)


def test_a_killed_fill_leaves_a_correct_cache(tmp_path: Path):
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=fill, args=(str(tmp_path), 0, True))
    child.start()
    cache = TeacherCache(tmp_path, "key", IMAGES, CLASSES)
    deadline = time.monotonic() + 120
    while cache.filled.sum() < 2000 and time.monotonic() < deadline:  # killed while filling
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert check(tmp_path) >= 2000


def test_two_processes_filling_one_cache_leave_it_correct(tmp_path: Path):
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=fill, args=(str(tmp_path), s, False)) for s in (0, 1)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
        assert child.exitcode == 0
    filled = check(tmp_path)
    expected = set()
    for seed in range(0, 401):  # the first child stores 0, 2 ... 400; the second 1 ... 399
        index = torch.randint(0, IMAGES, (32,), generator=torch.Generator().manual_seed(seed))
        expected |= set(zip(index.tolist(), variant_of(all_params(32, seed)).tolist(), strict=True))
    assert filled == len(expected)


# ------------------------------------------------------------------ kdlight-cache-teacher
def test_cache_teacher_fills_every_variant_that_a_run_then_reads(tmp_path: Path, capsys):
    """``kdlight-cache-teacher`` with a distillation run's command line fills all 162
    variants of every training image with the teacher's answers (in bf16, the run's
    precision: its logits' own dtype); a second call computes nothing; the run, on the
    same command line with ``distill.teacher_cache=true``, finds every lookup there."""
    torch.manual_seed(0)
    teacher = create_model("resnet8").eval()
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    command = [
        "experiment=distill", "trainer=cpu", "trainer.precision=bf16-mixed",
        "data=synthetic", "data.synthetic_train_size=24", "data.synthetic_test_size=20",
        "data.val_size=4", "data.batch_size=10", "data.eval_batch_size=500",
        "model=small_cnn", "model.width=0.25", "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
        f"distill.teacher_checkpoint={tmp_path / 'teacher.pt'}", "distill.teacher_model=resnet8",
        f"paths.data_dir={tmp_path / 'data'}", f"paths.root={tmp_path / 'outputs'}",
    ]  # fmt: skip
    assert cache_teacher_main(command) == 0
    said = capsys.readouterr().out
    assert f"{24 * VARIANTS:,} entries, {24 * VARIANTS:,} computed now" in said
    assert "torch.bfloat16 logits" in said
    assert cache_teacher_main(command) == 0
    assert f"{24 * VARIANTS:,} entries, 0 computed now" in capsys.readouterr().out

    (logits_file,) = (tmp_path / "data" / "teacher_cache").glob("*.logits")
    cache = TeacherCache(logits_file.parent, logits_file.stem, 24, 10, dtype=torch.bfloat16)
    assert cache.filled.all()
    data = instantiate(compose_config(command, tmp_path).data, val_size=0)
    data.setup("fit")
    rows = torch.tensor([0, 5, 23, 23])
    params = torch.tensor([[0, 0, 0], [8, 8, 1], [4, 4, 0], [3, 7, 1]])
    at = torch.empty_like(data.train_positions)
    at[data.train_positions] = torch.arange(24)  # position -> its place in train_set
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        live = teacher(data.normalize(crop_flip(data.train_set.images[at[rows]], params)))
    assert torch.equal(cache.lookup(rows, params)[0], live.float())

    run = tmp_path / "run"
    train(compose_config([*command, "distill.teacher_cache=true"], run))
    assert json.loads((run / "metrics.json").read_text())["teacher_cache"] == {
        "used": True,
        "hit_rate": 1.0,
        "path": str(cache.path),
    }


def test_cache_teacher_says_what_is_wrong_in_one_line(tmp_path: Path, capsys):
    assert cache_teacher_main(["experiment=teacher", "trainer=cpu"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: kdlight-cache-teacher fills a distillation run's cache"
    )
    assert cache_teacher_main(["experiment=distill", "seed=0,1"]) == 2
    assert capsys.readouterr().err == (
        "error: seed=0,1: kdlight-cache-teacher fills one teacher's cache, give one value "
        "(seeds, T, alpha and the method do not change the cache: leave them out)\n"
    )


# --------------------------------------------------------------------------- DDP, grid
DDP_FILL = """
import json, sys
from pathlib import Path
import lightning as L, torch
from kdlight.lit import DistillationGridModule, DistillationModule
from kdlight.models import create_model
from tests.conftest import cpu_trainer, synthetic_datamodule

folder = Path(sys.argv[1])
torch.manual_seed(0)
teacher = create_model("resnet8").eval()
for name in ("filling", "warm"):
    L.seed_everything(0)
    module = DistillationModule(
        create_model("small_cnn", width=0.25), teacher=teacher, teacher_cache=True
    )
    trainer = cpu_trainer(folder / name, epochs=2, limit_val_batches=0, devices=2, strategy="ddp")
    data = synthetic_datamodule(train=200, test=50, val=0, batch=50, data_dir=folder / "data")
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data, verbose=False)
    if trainer.is_global_zero:
        torch.save(module.model.state_dict(), folder / name / "student.pt")
"""


def test_ddp_processes_fill_and_read_one_cache(tmp_path: Path):
    """Two DDP processes (gloo) fill one cache, each its share of the images, and a second
    run reads it all: metrics.json gives the hit rate over both processes' lookups, the
    students of both runs are equal, and every entry is the teacher's answer."""
    script = tmp_path / "ddp_fill.py"  # Lightning starts the second process by path
    script.write_text(DDP_FILL)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    filling, warm = (
        json.loads((tmp_path / name / "metrics.json").read_text())["teacher_cache"]
        for name in ("filling", "warm")
    )
    assert warm == filling | {"hit_rate": 1.0}
    (logits_file,) = (tmp_path / "data" / "teacher_cache").glob("*.logits")
    cache = TeacherCache(logits_file.parent, logits_file.stem, 200, 10)
    filled = int(cache.filled.sum())  # distinct (image, variant) of the 400 lookups
    assert filling["hit_rate"] == (400 - filled) / 400
    students = [torch.load(tmp_path / n / "student.pt") for n in ("filling", "warm")]
    for key, value in students[0].items():
        assert torch.equal(students[1][key], value), key
    torch.manual_seed(0)
    assert_entries_are_the_teachers(cache, create_model("resnet8").eval(), tmp_path / "data")


def test_a_fused_grid_reads_the_cache_and_trains_as_without_it(tmp_path: Path):
    """The fused T x alpha grid shares the cached logits among its cells: filling, then
    warm, its students end as those of the grid without the cache."""
    teacher = create_model("resnet8").eval()

    def grid(name: str, cache: bool) -> DistillationGridModule:
        L.seed_everything(0)
        module = DistillationGridModule(
            create_model("small_cnn", width=0.25), teacher=teacher, temperature=[2, 8],
            alpha=[0.9], teacher_cache=cache,
        )  # fmt: skip
        trainer = cpu_trainer(tmp_path / name, epochs=1, limit_val_batches=0)
        data = synthetic_datamodule(train=100, test=50, val=0, batch=50, data_dir=tmp_path)
        trainer.fit(module, datamodule=data)
        return module

    live, filling, warm = grid("live", False), grid("filling", True), grid("warm", True)
    assert warm.frozen.cache.path == filling.frozen.cache.path and warm.frozen.cache.hit_rate == 1.0
    for key, value in live.students.state_dict().items():
        torch.testing.assert_close(filling.students.state_dict()[key], value, msg=key)
        torch.testing.assert_close(warm.students.state_dict()[key], value, msg=key)
