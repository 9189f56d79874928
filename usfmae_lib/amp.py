"""Mixed precision: what a training step computes in, one rule for pretraining and fine-tuning.

`precision` (a parameter of both) is a request:

| request | CUDA GPU with bf16 (Ampere and later) | CUDA GPU without bf16 (V100, T4, ...) | CPU |
|---|---|---|---|
| auto, bf16 | bf16 autocast | fp16 autocast + GradScaler | fp32 |
| fp16 | fp16 autocast + GradScaler | fp16 autocast + GradScaler | fp32 |
| fp32 | fp32 | fp32 | fp32 |

A CPU computes in fp32 whatever is asked, as the official code's torch.cuda.amp.autocast does
there: the official profile asks for bf16, and CPU bf16 autocast ran its ViT-B steps 16x slower
than fp32 on an AVX2-only machine (docs/dry_run.md; AVX-512 BF16 or AMX CPUs differ: measure with
`usfmae bench pretrain --dtype bf16`). fp16 overflows where bf16 does not, hence the GradScaler:
it scales the loss up before backward, unscales the gradients before clipping, and skips a step
whose gradients overflowed.

Inside `cpu_as_gpu()` a CPU follows the GPU columns (bf16_supported says which), so that the GPU's
code paths (autocast, the GradScaler's unscale and skipped steps) run on a CPU: the dry form of
`usfmae check gpu` and the tests use it.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from . import UsfmaeError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# the GradScaler skips the optimiser step of an overflowed fp16 batch by design; the schedule still
# advances (a step of the schedule is a batch), which torch would otherwise warn about at the first skip
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UsfmaeError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def bf16_supported(device: torch.device) -> bool:
    """Whether autocast can compute in bf16 on this device (a CPU can, if slowly without AVX-512 BF16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


_cpu_as_gpu = False


@contextlib.contextmanager
def cpu_as_gpu():
    """Within: a CPU follows the GPU's rule (autocast_dtype), for dry runs and tests of the GPU paths."""
    global _cpu_as_gpu
    before, _cpu_as_gpu = _cpu_as_gpu, True
    try:
        yield
    finally:
        _cpu_as_gpu = before


def autocast_dtype(precision: str, device) -> torch.dtype | None:
    """The autocast dtype of a precision request on `device` (the table above); None = fp32."""
    check_precision(precision)
    device = torch.device(device)
    if precision == "fp32" or (device.type != "cuda" and not _cpu_as_gpu):
        return None
    if precision == "fp16" or not bf16_supported(device):
        return torch.float16
    return torch.bfloat16


def precision_name(dtype: torch.dtype | None) -> str:
    """What a step computes in, in words: 'bf16 autocast', 'fp16 autocast + GradScaler' or 'fp32'."""
    return {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}.get(dtype, "fp32")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for `dtype` on the device's type; a no-op context for fp32 (None)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (elsewhere its scale/unscale/step are plain pass-throughs)."""
    return torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
