"""Attention backends behind one function.

PyTorch SDPA always works (CPU and GPU, self- and cross-attention, with or without a mask). FlashAttention 2
(`flash_attn`) and FlashAttention 3 (`flash_attn_interface`, or the forward-only `fa3_fwd_interface` wheel) are used
when installed, for unmasked bf16/fp16 attention on CUDA; anything they cannot run falls back to SDPA.

`flash3_fp8` runs FA3's FP8 kernel on Hopper: q, k and v go to e4m3 with one scale per head, the output comes back
in bf16. It applies to the DiT's self-attention over the cache; `precise` gives the backend for attention that stays
in 16 bits (cross-attention to the 512 text tokens). `auto` picks it for a DiT with FP8 linears (an FP8 checkpoint,
or `quantization="fp8"`), never for a 16-bit one, whose output it would change by ~0.3-0.6 % (see `_flash3_fp8`).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import fused

logger = logging.getLogger(__name__)

# "sdpa" lets PyTorch pick its kernel; the other sdpa_* names pin one of PyTorch's kernels (for benchmarks).
SDPA_PINNED = {
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}
BACKENDS = ("auto", "sdpa", *SDPA_PINNED, "flash2", "flash3", "flash3_fp8")


@cache
def _flash3() -> Callable | None:
    for module in ("flash_attn_interface", "fa3_fwd_interface"):
        try:
            return importlib.import_module(module).flash_attn_func
        except Exception:  # noqa: BLE001 - a broken optional install must not break import; logged below
            logger.debug("FlashAttention 3 module %s not usable", module, exc_info=True)
    return None


def _run_flash3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **descales: torch.Tensor) -> torch.Tensor:
    """FA3's attention output (older FA3 builds return (out, lse))."""
    out = _flash3()(q, k, v, **descales)
    return out[0] if isinstance(out, tuple) else out


@cache
def _flash2() -> Callable | None:
    try:
        return importlib.import_module("flash_attn").flash_attn_func
    except Exception:  # noqa: BLE001
        logger.debug("flash_attn not usable", exc_info=True)
        return None


@cache
def _flash3_fp8_runs(device: int) -> bool:
    """Whether this FA3 build runs its FP8 kernel on CUDA device `device` (builds may leave FP8 out): one tiny call."""
    try:
        q = torch.ones(1, 128, 1, 128, device=device).to(fused.FP8_DTYPE)
        one = torch.ones(1, 1, device=device)
        out = _run_flash3(q, q, q, q_descale=one, k_descale=one, v_descale=one)
        return bool(torch.isfinite(out).all()) and out.dtype == torch.bfloat16
    except Exception:  # noqa: BLE001 - no FP8 kernel in this build, or an older interface: the backend is not offered
        logger.debug("FA3 FP8 attention not usable", exc_info=True)
        return False


def available_backends() -> list[str]:
    """Backends that can run on this machine (the `auto` choice first)."""
    names = ["auto", "sdpa"]
    if torch.cuda.is_available():
        names += list(SDPA_PINNED)
        if _flash2() is not None:
            names.append("flash2")
        if _flash3() is not None and torch.cuda.get_device_capability()[0] == 9:
            names.append("flash3")
            if _flash3_fp8_runs(torch.cuda.current_device()):
                names.append("flash3_fp8")
    return names


def resolve_backend(name: str, fp8: bool = False) -> str:
    """Turn a user choice into a concrete backend, failing clearly on unknown or unavailable names. `auto` is FA3 on
    Hopper when installed, else SDPA; with fp8 (a DiT with FP8 linears) FA3's FP8 kernel where this FA3 has it."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    available = available_backends()
    if name == "auto":
        if fp8 and "flash3_fp8" in available:
            return "flash3_fp8"
        return "flash3" if "flash3" in available else "sdpa"
    if name not in available:
        raise ValueError(
            f"attention backend {name!r} is not available on this machine (available: {', '.join(available)}); "
            "install the package it needs or pick 'auto'"
        )
    return name


def precise(backend: str) -> str:
    """The 16-bit backend of `backend`: what attention that stays exact runs (flash3_fp8 -> flash3)."""
    return "flash3" if backend == "flash3_fp8" else backend


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa", mask: torch.Tensor | None = None,
    norms: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Softmax attention with the 1/sqrt(head_dim) scale.

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D]; mask: bool [Lq, Lk] (True = attend) or None. norms: the weights of the
    RMSNorms (over all H*D channels) that made q and k before their rotation, which bound them for FP8 attention
    (`fused.rms_norm_bound`). Returns [B, Lq, H, D].
    """
    flash_ok = mask is None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    if backend == "flash3_fp8" and flash_ok and q.dtype == torch.bfloat16:
        return _flash3_fp8(q, k, v, norms)
    if backend in ("flash3", "flash3_fp8") and flash_ok:
        return _run_flash3(q, k, v)
    if backend == "flash2" and flash_ok:
        return _flash2()(q, k, v)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if backend in SDPA_PINNED and q.is_cuda:
        with sdpa_kernel(SDPA_PINNED[backend]):
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(1, 2)


def _flash3_fp8(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, norms: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """FA3's FP8 kernel on per-head e4m3 copies of q, k and v; bf16 out.

    With `norms` q and k are scaled by their bound (`fused.heads_fp8_bounded`: one pass each, nothing measured);
    without, by their measured amax, the keys centred first (`fused.heads_fp8`: a shared offset would otherwise take
    the range). v always by its amax. At a streaming chunk's shapes on an H200 (4680 queries, 12 heads of 128) the
    kernel took 0.65 ms against FA3's 0.81 in bf16 with 18,720 keys, 0.79 against 1.01 with 23,400; `bench dit`
    timed a DiT forward at 47.4 ms against 52.3 (53.0 against 58.8 with 3 memory frames). With every scale measured
    it saved about half as much."""
    if norms is None:
        q8, q_scale = fused.heads_fp8(q, False)
        k8, k_scale = fused.heads_fp8(k, True)  # centred
    else:
        q8, q_scale = fused.heads_fp8_bounded(q, norms[0])
        k8, k_scale = fused.heads_fp8_bounded(k, norms[1])
    v8, v_scale = fused.heads_fp8(v, False)
    return _run_flash3(q8, k8, v8, q_descale=q_scale, k_descale=k_scale, v_descale=v_scale)
