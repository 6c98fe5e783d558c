"""Mixed precision: the one place that maps ``train.amp`` to a dtype, an autocast context and a scaler."""

from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def default_mode() -> str:
    """What ``--amp`` means on this machine: fp16 with a GradScaler on CUDA, bf16 autocast elsewhere."""
    return "fp16" if torch.cuda.is_available() else "bf16"


def check_mode(mode: str, device: torch.device) -> None:
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs CUDA (GradScaler); on CPU use train.amp=bf16.")


def autocast(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for ``mode``. fp16 is a CUDA mode: elsewhere (inference on CPU) it runs in fp32."""
    if mode == "none" or (mode == "fp16" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[mode])


def grad_scaler(mode: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 training (bf16 and fp32 need none)."""
    check_mode(mode, device)
    return torch.amp.GradScaler("cuda") if mode == "fp16" else None
