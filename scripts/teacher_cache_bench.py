# Usage: .venv/bin/python scripts/teacher_cache_bench.py (2-core CPU: about 30 s)
"""KD step (resnet18_half -> small_cnn, batch 128, CPU fast path) with the live teacher and
with a warm teacher cache (the same run again: every lookup a hit)."""

import tempfile

import lightning as L

from kdlight.bench import Throughput
from kdlight.data import CIFAR10DataModule
from kdlight.hardware import fast_cpu_precision
from kdlight.lit import DistillationModule, freeze
from kdlight.models import create_model

warmup, steps, batch = 3, 16, 128
folder = tempfile.mkdtemp()
teacher = freeze(create_model("resnet18_half"))


def run(cache: bool) -> tuple[float, float | None]:
    L.seed_everything(0)
    module = DistillationModule(
        create_model("small_cnn"), teacher=teacher, teacher_cache=cache, channels_last=True
    )
    data = CIFAR10DataModule(
        source="synthetic",
        synthetic_train_size=batch * (warmup + steps),
        synthetic_test_size=batch,
        val_size=0,
        batch_size=batch,
        data_dir=folder,
    )
    meter = Throughput(warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=fast_cpu_precision(),
        max_epochs=1,
        limit_val_batches=0,
        callbacks=[meter],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return meter.images_per_second, module.cache.hit_rate if module.cache else None


for name, cache in (
    ("live", False),
    ("filling", True),
    ("warm", True),
    ("live again", False),
    ("warm again", True),
):
    rate, hits = run(cache)
    print(f"{name:<11} {rate:7.0f} img/s  hit rate {hits}", flush=True)
