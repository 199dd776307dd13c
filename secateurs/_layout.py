"""Which memory layout a stored tensor is in: oneDNN runs channels-last and contiguous convolutions
by different kernels, so the latency search and surgery both need to know it, in the same words."""
from __future__ import annotations

import torch

__all__ = ["channels_last_only"]


def channels_last_only(t: torch.Tensor) -> bool | None:
    """True for a 4-D tensor stored channels-last and not contiguous, False for the reverse, None when
    it does not tell: not 4-D, or both at once (a 1x1 kernel, one input channel)."""
    if t.dim() != 4:
        return None
    cl, plain = t.is_contiguous(memory_format=torch.channels_last), t.is_contiguous()
    return None if cl == plain else cl
