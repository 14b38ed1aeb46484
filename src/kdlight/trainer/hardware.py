"""What the machine can do fast, for the speed presets and the benchmark."""

import torch


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX, as on recent Xeon and
    EPYC), so that bf16 autocast speeds training up rather than emulating it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fast_cpu_precision() -> str:
    """The Trainer precision of ``speed=fast_cpu``: ``bf16-mixed`` where the CPU has native
    bf16 (about 2x the float32 throughput of kdlight's convnets there), else ``32-true``."""
    return "bf16-mixed" if native_bf16_cpu() else "32-true"
