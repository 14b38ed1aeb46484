"""Each fast path computes what the plain path computes: on-device data, channels-last,
torch.compile's fallback, and the fused T x alpha grid against separate runs."""

import copy
import json
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities import move_data_to_device

from kdlight.data import CIFAR10DataModule
from kdlight.data.datamodule import IndexBatch
from kdlight.lit import ClassifierModule, DistillationGridModule, DistillationModule, freeze
from kdlight.models import create_model
from kdlight.models.fast import FastForward
from kdlight.trainer import hardware
from tests.conftest import TINY, compose_config, cpu_trainer, synthetic_datamodule


def synthetic(**overrides) -> CIFAR10DataModule:
    return synthetic_datamodule(train=640, test=200, val=64, batch=64, **overrides)


def test_on_device_batches_equal_host_batches():
    batches = {}
    for on_device in (False, True):
        datamodule = synthetic(on_device=on_device)
        datamodule.setup()
        torch.manual_seed(3)
        loader = iter(datamodule.train_dataloader())
        batches[on_device] = [
            datamodule.on_after_batch_transfer(
                move_data_to_device(next(loader), torch.device("cpu")), 0
            )
            for _ in range(3)
        ]
    for (x_host, y_host), (x_dev, y_dev) in zip(batches[False], batches[True], strict=True):
        assert torch.equal(x_host, x_dev) and torch.equal(y_host, y_dev)


def test_index_batches_go_to_a_gpu_without_blocking(monkeypatch):
    """Lightning passes ``non_blocking`` only to plain tensors; IndexBatch asks for it itself
    on CUDA, so that no step waits for the GPU to finish the one before."""
    copies = []

    def record(tensor, device, non_blocking=False):
        copies.append((torch.device(device).type, non_blocking))
        return tensor  # nothing is copied: this machine may have no GPU

    monkeypatch.setattr(torch.Tensor, "to", record)
    batch = IndexBatch("train", torch.arange(4))
    move_data_to_device(batch, torch.device("cuda"))
    move_data_to_device(batch, torch.device("cpu"))
    assert copies == [("cuda", True), ("cpu", False)]


def test_channels_last_gives_the_same_logits():
    torch.manual_seed(0)
    model = create_model("resnet8").eval()
    images = torch.randn(4, 3, 32, 32)
    expected = model(images)
    fast = FastForward(copy.deepcopy(model), channels_last=True)
    torch.testing.assert_close(fast(images), expected, rtol=1e-4, atol=1e-4)


def test_compile_builds_one_graph_per_run(tmp_path: Path):
    """speed=fast's settings: torch.compile traces the training step once. The last, smaller
    batch is left out and evaluation runs eagerly, so neither a new batch size nor
    ``no_grad``/``inference_mode`` makes it compile again (each would cost a compilation)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    datamodule = synthetic_datamodule(train=330, test=100, val=100, batch=50, drop_last=True)
    module = ClassifierModule(create_model("small_cnn", width=0.25), compile=True)
    trainer = cpu_trainer(tmp_path, epochs=2)
    trainer.fit(module, datamodule=datamodule)  # 230 training images: 4 batches of 50, 30 left
    trainer.test(module, datamodule=datamodule)
    assert counters["stats"]["unique_graphs"] == 1
    assert module.fast_model.run is not module.model  # it did compile, and ran compiled


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken_compile(model):
        def run(images):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = create_model("resnet8").eval()
    images = torch.randn(2, 3, 32, 32)
    fast = FastForward(model, compile=True)
    with pytest.warns(
        UserWarning, match="torch.compile failed .*no compiler here.*running eagerly"
    ):
        out = fast(images)
    torch.testing.assert_close(out, model(images))
    assert fast.run is model


@pytest.mark.parametrize("native", [True, False])
def test_fast_cpu_uses_bf16_only_where_the_cpu_has_it(native: bool, monkeypatch, tmp_path: Path):
    monkeypatch.setattr(hardware, "native_bf16_cpu", lambda: native)
    cfg = compose_config(["speed=fast_cpu", *TINY], tmp_path)
    assert cfg.trainer.precision == ("bf16-mixed" if native else "32-true")
    assert cfg.module.channels_last and not cfg.module.compile


def test_distillation_trains_under_cpu_bf16_autocast(tmp_path: Path):
    """speed=fast_cpu's settings: the weights stay float32, the loss is finite, the teacher
    does not move."""
    L.seed_everything(0)
    teacher = freeze(create_model("resnet8"))
    before = copy.deepcopy(teacher.state_dict())
    module = DistillationModule(
        create_model("small_cnn", width=0.25), teacher=teacher, channels_last=True
    )
    start = copy.deepcopy(module.student.state_dict())
    trainer = cpu_trainer(
        tmp_path, epochs=1, precision="bf16-mixed", limit_train_batches=3, limit_val_batches=0
    )
    trainer.fit(module, datamodule=synthetic())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in module.student.parameters())
    assert not torch.equal(module.student.state_dict()["head.2.weight"], start["head.2.weight"])
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name


def fit(module: L.LightningModule, root: Path, steps: int = 4, **trainer_settings) -> None:
    """A few training steps with a fixed data order and augmentation."""
    L.seed_everything(7)
    trainer = cpu_trainer(
        root, epochs=1, limit_train_batches=steps, limit_val_batches=0, **trainer_settings
    )
    trainer.fit(module, datamodule=synthetic())


@pytest.mark.parametrize("cells", [[(4.0, 0.9)], [(2.0, 0.5), (8.0, 0.9)]])
def test_grid_students_match_separate_runs(cells: list[tuple[float, float]], tmp_path: Path):
    L.seed_everything(0)
    teacher = freeze(create_model("resnet8"))
    student = create_model("small_cnn", width=0.25)

    separate = []
    for t, a in cells:
        module = DistillationModule(
            copy.deepcopy(student), teacher=copy.deepcopy(teacher), temperature=t, alpha=a
        )
        fit(module, tmp_path)
        separate.append(module.student)

    temperatures = sorted({t for t, _ in cells})
    alphas = sorted({a for _, a in cells})
    grid = DistillationGridModule(
        copy.deepcopy(student),
        teacher=copy.deepcopy(teacher),
        temperature=temperatures,
        alpha=alphas,
    )
    fit(grid, tmp_path)
    for (t, a), expected in zip(cells, separate, strict=True):
        trained = grid.students[grid.cells.index((t, a))]
        for (name, value), reference in zip(
            trained.state_dict().items(), expected.state_dict().values(), strict=True
        ):
            torch.testing.assert_close(
                value, reference, msg=f"cell T={t} alpha={a}: {name} differs"
            )
    assert not any(
        torch.equal(p, q)
        for p, q in zip(student.parameters(), grid.students[0].parameters(), strict=True)
    )


def test_grid_clips_each_student_like_its_separate_run(tmp_path: Path):
    """gradient_clip_val clips each student's gradient norm, not one norm over all students
    (which shrinks each cell by the others' gradients: 1e-3 off its separate run at step 1)."""
    L.seed_everything(0)
    teacher = freeze(create_model("resnet8"))
    student = create_model("small_cnn", width=0.25)
    clip = {"gradient_clip_val": 0.05}
    cells = [(2.0, 0.5), (2.0, 0.9)]
    grid = DistillationGridModule(
        copy.deepcopy(student), teacher=copy.deepcopy(teacher), temperature=[2.0], alpha=[0.5, 0.9]
    )
    fit(grid, tmp_path, steps=3, **clip)
    for index, (t, a) in enumerate(cells):
        runs = {}
        for name, settings in (("clipped", clip), ("unclipped", {})):
            module = DistillationModule(
                copy.deepcopy(student), teacher=copy.deepcopy(teacher), temperature=t, alpha=a
            )
            fit(module, tmp_path, steps=3, **settings)
            runs[name] = module.student.state_dict()
        for name, value in grid.students[index].state_dict().items():
            torch.testing.assert_close(
                value, runs["clipped"][name], rtol=0, atol=1e-6, msg=f"T={t} alpha={a}: {name}"
            )
        weight = "head.2.weight"  # the clip took effect: without it the run goes elsewhere
        assert (runs["clipped"][weight] - runs["unclipped"][weight]).abs().max() > 1e-4


def test_grid_writes_one_run_directory_per_cell(tmp_path: Path):
    L.seed_everything(0)
    grid = DistillationGridModule(
        create_model("small_cnn", width=0.25),
        teacher=freeze(create_model("resnet8")),
        temperature=[2, 8],
        alpha=[0.5, 0.9],
    )
    trainer = cpu_trainer(tmp_path, epochs=1, limit_train_batches=2, limit_val_batches=1)
    datamodule = synthetic()
    trainer.fit(grid, datamodule=datamodule)
    trainer.test(grid, datamodule=datamodule)

    found = sorted(p.parent.name for p in tmp_path.glob("*/metrics.json"))
    assert found == ["T2_alpha0.5", "T2_alpha0.9", "T8_alpha0.5", "T8_alpha0.9"]
    metrics = json.loads((tmp_path / "T8_alpha0.5" / "metrics.json").read_text())
    assert (metrics["temperature"], metrics["alpha"], metrics["test_images"]) == (8.0, 0.5, 200)


def test_bench_runs_and_writes_its_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The benchmark's plumbing on CPU at toy sizes (its numbers are not asserted)."""
    from kdlight.cli import bench

    out = tmp_path / "bench.json"
    temporary = tmp_path / "tmp"  # where the teacher cache's data folder is made
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    toy = "--device cpu --teacher resnet8 --student small_cnn --batch-size 16 --warmup 1 --steps 2"
    zoo = ["--zoo-steps", "1", "--zoo-pairs", "1"]
    cache = ["--cache-images", "300", "--cache-epochs", "3", "1"]
    argv = [*toy.split(), "--grid", "4", "--workers", "0", *zoo, *cache, "--out", str(out)]
    assert bench.main(argv) == 0

    result = json.loads(out.read_text())
    workloads = [row["workload"] for row in result["rows"]]
    assert workloads == [
        "teacher training",
        "student training",
        "distillation step",
        "fused grid (4 students)",
    ]
    assert all(row["plain"] > 0 and row["fast"] > 0 for row in result["rows"])
    assert "| fused grid (4 students) |" in result["table"]
    assert [row["method"] for row in result["methods"]] == list(bench.METHODS)
    assert result["methods"][0]["cost_vs_kd"] == 1.0 and "| crd |" in result["table"]
    assert [(r["teacher"], r["student"]) for r in result["zoo"]] == bench.zoo_pairs()[:1]
    modules = [row["module"] for row in result["overhead"]]
    assert modules == [
        "bare PyTorch loop",
        "ClassifierModule",
        "DistillationModule",
        "DistillationGridModule (4 cells)",
    ]
    assert all(row["ms_per_step"] > 0 for row in result["overhead"])
    assert "| DistillationGridModule (4 cells) |" in result["table"]
    steps = result["cache"]["steps"]
    runs = [f"KD step, {what}" for what, _ in bench.CACHE_RUNS]
    runs += [f"fused grid (4 students), {what}" for what, _ in bench.CACHE_RUNS[:3]]
    assert [row["run"] for row in steps] == runs
    # one epoch of distinct images fills the cache; the same run again hits every time
    assert [row["hit_rate"] for row in steps] == [None, 0.0, 1.0, None, 1.0, None, 0.0, 1.0]
    assert all(row["images_per_second"] > 0 for row in steps)
    assert [row["vs_live"] is None for row in steps] == [True, False, False, True, False] + [
        True,
        False,
        False,
    ]
    assert list(temporary.iterdir()) == []  # the cache's folder is gone
    assert [row["epoch"] for row in result["cache"]["fill"]] == [1, 3]
    assert "| KD step, warm cache, again |" in result["table"]
    assert "| fused grid (4 students), warm cache |" in result["table"]
    assert "| E = 3 |" in result["table"]


def test_lazy_fill_hit_rates_count_the_augmentations_draws():
    """The simulated lazy fill of the teacher cache against a count made here of the
    augmentation's draws for full-size images from the same generator: which (image, dy,
    dx, flip) each epoch looks up, which of them an earlier epoch had filled."""
    from kdlight.cli.bench import lazy_fill_hit_rates
    from kdlight.data.augment import random_crop_flip

    images, seed = 300, 3
    rows = lazy_fill_hit_rates(images, [7, 1, 2], seed=seed)
    generator = torch.Generator().manual_seed(seed)
    blank = torch.zeros(images, 3, 32, 32, dtype=torch.uint8)
    filled, hits, expected = set(), 0, []
    for epoch in range(1, 8):
        _, params = random_crop_flip(blank, generator=generator, return_params=True)
        drawn = {(i, *p) for i, p in enumerate(params.tolist())}
        hits += len(drawn & filled)
        epoch_hit_rate = len(drawn & filled) / images
        filled |= drawn
        if epoch in (1, 2, 7):
            lookups = images * epoch
            expected.append({
                "epoch": epoch,
                "epoch_hit_rate": epoch_hit_rate,
                "cumulative_hit_rate": hits / lookups,
                "filled": len(filled) / (images * 162),
                "teacher_forwards": 1 - hits / lookups,
            })  # fmt: skip
    assert [row["epoch"] for row in rows] == [1, 2, 7]
    for row, want in zip(rows, expected, strict=True):
        assert row == pytest.approx(want, rel=0, abs=1e-12)
        # every miss fills one entry: teacher forwards are the entries filled
        assert row["teacher_forwards"] == pytest.approx(row["filled"] * 162 / row["epoch"])
    assert rows[0]["epoch_hit_rate"] == 0 and rows[0]["filled"] == 1 / 162
    assert rows[-1]["epoch_hit_rate"] > 0
