"""Where tensors live: pick the best device available and the matching autocast settings.

The course runs the same code on a laptop CPU, an Apple GPU (MPS) and an NVIDIA GPU (CUDA).
Everything that depends on the device goes through these few functions, so no other file has to
ask `torch.cuda.is_available()` again.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def pick_device(preference: str = "auto") -> torch.device:
    """Return `cuda` if available, else `mps`, else `cpu` (or exactly `preference` if given)."""
    if preference != "auto":
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device={preference!r} asked for, but CUDA is not available here")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(f"device={preference!r} asked for, but MPS is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_from_flag(preference: str) -> torch.device:
    """`pick_device` for a command's --device: a device this machine lacks, or a name torch does
    not know, is a ValueError saying so in one line, with what to pass instead (train, chat and
    eval all refuse it in these words)."""
    try:
        return pick_device(preference)
    except RuntimeError as error:
        raise ValueError(
            f"--device {preference}: {error}; try --device auto (the best one here)"
        ) from None


def autocast(device: torch.device, dtype: str = "auto"):
    """Mixed-precision context for the forward pass.

    bf16 on CUDA (no loss scaling needed, unlike fp16); plain fp32 elsewhere, because CPU bf16
    matmuls are slower than fp32 on most laptops and MPS autocast is still partial.
    `dtype` may be "auto", "bfloat16", "float16" or "float32".
    """
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run can be repeated exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
