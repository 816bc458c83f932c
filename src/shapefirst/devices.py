"""The device a user asks for (--device), checked against what this machine has."""
from __future__ import annotations

import re

import torch

from .errors import ShapefirstError


def device(value: str | None) -> str | None:
    """cpu, cuda, cuda:N or mps, and only what this machine has (None: the best available)."""
    if value in (None, "", "auto"):
        return None
    if value == "cpu":
        return value
    if re.fullmatch(r"cuda(:\d+)?", value):
        if not torch.cuda.is_available():
            raise ShapefirstError(f"device {value!r} was asked for but CUDA is not available", "pass --device cpu")
        idx = int(value.split(":")[1]) if ":" in value else 0
        if idx >= torch.cuda.device_count():
            raise ShapefirstError(f"device {value!r} does not exist ({torch.cuda.device_count()} CUDA devices)",
                                  "pass --device cuda:0")
        return value
    if value == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ShapefirstError("device 'mps' was asked for but Apple's MPS is not available", "pass --device cpu")
        return value
    raise ShapefirstError(f"unknown device {value!r}", "pass cpu, cuda, cuda:N or mps")
