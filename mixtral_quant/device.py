"""The one device resolver of every command: ``--device auto|cpu|cuda|cuda:N``."""

from __future__ import annotations

import torch

from mixtral_quant.errors import MixtralQuantError


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda if available else cpu; "cpu", "cuda" or "cuda:N" as given (checked)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MixtralQuantError(f"device {device!r} is not one of auto, cpu, cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise MixtralQuantError(f"device {device!r} is not one of auto, cpu, cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MixtralQuantError(f"--device {device} was asked for but torch sees no CUDA GPU: use --device cpu or auto")
    return dev
