"""Attention backends behind one function.

PyTorch SDPA always works (CPU and GPU, self- and cross-attention, with or without a mask). FlashAttention 2
(`flash_attn`) and FlashAttention 3 (`flash_attn_interface`, or the forward-only `fa3_fwd_interface` wheel) are used
when installed, for unmasked bf16/fp16 attention on CUDA; anything they cannot run falls back to SDPA.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

# "sdpa" lets PyTorch pick its kernel; the other sdpa_* names pin one of PyTorch's kernels (for benchmarks).
SDPA_PINNED = {
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}
BACKENDS = ("auto", "sdpa", *SDPA_PINNED, "flash2", "flash3")


@cache
def _flash3() -> Callable | None:
    for module in ("flash_attn_interface", "fa3_fwd_interface"):
        try:
            return importlib.import_module(module).flash_attn_func
        except Exception:  # noqa: BLE001 - a broken optional install must not break import; logged below
            logger.debug("FlashAttention 3 module %s not usable", module, exc_info=True)
    return None


@cache
def _flash2() -> Callable | None:
    try:
        return importlib.import_module("flash_attn").flash_attn_func
    except Exception:  # noqa: BLE001
        logger.debug("flash_attn not usable", exc_info=True)
        return None


def available_backends() -> list[str]:
    """Backends that can run on this machine (the `auto` choice first)."""
    names = ["auto", "sdpa"]
    if torch.cuda.is_available():
        names += list(SDPA_PINNED)
        if _flash2() is not None:
            names.append("flash2")
        if _flash3() is not None and torch.cuda.get_device_capability()[0] == 9:
            names.append("flash3")
    return names


def resolve_backend(name: str) -> str:
    """Turn a user choice into a concrete backend, failing clearly on unknown or unavailable names."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    available = available_backends()
    if name == "auto":
        return "flash3" if "flash3" in available else "sdpa"
    if name not in available:
        raise ValueError(
            f"attention backend {name!r} is not available on this machine (available: {', '.join(available)}); "
            "install the package it needs or pick 'auto'"
        )
    return name


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention with the 1/sqrt(head_dim) scale.

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D]; mask: bool [Lq, Lk] (True = attend) or None. Returns [B, Lq, H, D].
    """
    flash_ok = mask is None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    if backend == "flash3" and flash_ok:
        out = _flash3()(q, k, v)
        return out[0] if isinstance(out, tuple) else out  # older FA3 builds return (out, lse)
    if backend == "flash2" and flash_ok:
        return _flash2()(q, k, v)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if backend in SDPA_PINNED and q.is_cuda:
        with sdpa_kernel(SDPA_PINNED[backend]):
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(1, 2)
