"""The one settling rule every analysis uses: a quantity has settled from call c on when its
condition holds at c and at every later call (the last call included)."""
from __future__ import annotations

import torch


def settled_from(ok: torch.Tensor) -> torch.Tensor:
    """ok: bool [T, ...] (condition per call) -> long [...]: the first call c with ok[c:] all true;
    T when the condition fails at the last call (never settled), 0 when it always holds."""
    if ok.dim() < 1 or ok.shape[0] == 0:
        raise ValueError("ok must be [T, ...] with T >= 1")
    suffix = ok.long().flip(0).cumprod(0).flip(0)  # 1 where this and every later call hold
    return ok.shape[0] - suffix.sum(0)
