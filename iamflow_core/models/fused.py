"""Elementwise glue of the DiT and VAE as small pure functions, fused by `torch.compile` on CUDA.

In eager PyTorch each of these is several kernels over large activations (float32 norms, modulation, casts, RoPE),
which cost more than the attention itself at Wan's streaming shapes. Compiled, each becomes one kernel. On CPU, or
with `enable(False)` / `IAMFLOW_COMPILE=0`, the same functions run eagerly: identical math.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import wraps
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)
_enabled = False
# torch.compile traces by patching nn.Module.__call__ for the whole process, so no other thread may run modules
# while it compiles. Threads that run models (the DiT loop, the VAE decode worker) launch their kernels under this
# lock when compiled kernels are on; the GPU work itself still overlaps, only the host-side launching is serialised.
_launch_lock = threading.RLock()
# Per thread: run the fusable functions as plain PyTorch for now (`eager`).
_local = threading.local()


def cache_dir() -> Path:
    """Where compiled kernels are kept between runs: `IAMFLOW_CACHE_DIR`, else the user's cache folder
    (`$XDG_CACHE_HOME/iamflow`, `~/.cache/iamflow`)."""
    given = os.environ.get("IAMFLOW_CACHE_DIR")
    if given:
        return Path(given).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "iamflow"


def use_cache_dir() -> Path | None:
    """Point TorchInductor's and Triton's on-disk caches into `cache_dir()` (unless the user set their own), so a
    second process, or the same machine after a reboot or a new container with that folder kept, loads the
    kernels instead of compiling them. Returns the folder, or None when it cannot be written (the defaults stay)."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        logger.warning("kernel cache folder %s cannot be written (%s); set IAMFLOW_CACHE_DIR to one that can", folder,
                       e)  # fmt: skip
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # TorchInductor writes its temp-folder default into the environment once it has compiled: that one is not the
    # user's choice and is replaced.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    return folder


def enable(flag: bool = True) -> None:
    """Turn compiled kernels on (for CUDA tensors). The first calls of each shape compile (seconds), or load them
    from the kernel cache folder (`use_cache_dir`)."""
    global _enabled
    _enabled = flag and os.environ.get("IAMFLOW_COMPILE", "1") != "0"
    if _enabled:
        import torch._dynamo

        use_cache_dir()

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


def enabled() -> bool:
    return _enabled


@contextmanager
def eager() -> Iterator[None]:
    """In this thread, run the fusable functions as plain PyTorch (the same math, other rounding) and let no CUDA
    graph be captured. For work done once or with shapes of its own (a story's first chunk, its text encoding,
    reference pictures, the recache at a prompt switch), whose kernels would cost a compile or a cache load before
    they run once: the pipeline makes its first chunk so, and a user sees frames before any kernel is compiled."""
    before = getattr(_local, "eager", False)
    _local.eager = True
    try:
        yield
    finally:
        _local.eager = before


def eager_now() -> bool:
    """Whether this thread is inside `eager()`."""
    return getattr(_local, "eager", False)


def compiles(x: torch.Tensor) -> bool:
    """Whether a fusable function called on `x` here runs a compiled kernel (else it runs as plain PyTorch)."""
    return _enabled and x.is_cuda and not eager_now()


def launch_guard() -> AbstractContextManager:
    """Hold while launching model work from a thread when compiled kernels are on (see `_launch_lock`)."""
    return _launch_lock if _enabled else nullcontext()


def _fusable(fn: Callable) -> Callable:
    compiled: list[Callable] = []

    @wraps(fn)
    def run(x: torch.Tensor, *args, **kwargs):
        if not compiles(x):
            return fn(x, *args, **kwargs)
        if not compiled:
            compiled.append(torch.compile(fn, fullgraph=True))
        return compiled[0](x, *args, **kwargs)

    return run


# --- DiT -------------------------------------------------------------------------------------------------------
@_fusable
def modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frames: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """LayerNorm (no affine) of x: [B, L, dim] in float32, then per-frame (1 + scale) * h + shift, cast to dtype.
    shift, scale: [B, F, 1, dim] float32."""
    h = F.layer_norm(x.float(), x.shape[-1:], eps=eps).unflatten(1, (frames, -1))
    return (h * (1 + scale) + shift).flatten(1, 2).to(dtype)


@_fusable
def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, frames: int) -> torch.Tensor:
    """x + gate * y per frame, in float32. x: [B, L, dim] float32, y: [B, L, dim], gate: [B, F, 1, dim]."""
    return x + (y.float().unflatten(1, (frames, -1)) * gate).flatten(1, 2)


@_fusable
def residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + y.float()


@_fusable
def affine_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """Affine LayerNorm in float32, cast to dtype."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(dtype)


@_fusable
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in float32 (Wan's WanRMSNorm), result in x.dtype times weight."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a weight, statistics in float32 (Wan's WanRMSNorm, T5's layer norm): the
    input is taken in the weight's dtype, the result comes out in it."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x.to(self.weight.dtype), self.weight, self.eps)


@_fusable
def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """RMSNorm over the full dim, split into heads, rotate. x: [B, L, dim] -> [B, L, H, D]; cos, sin: [L, D/2]."""
    h = rms_norm.__wrapped__(x, weight, eps)
    return apply_rope.__wrapped__(h.unflatten(-1, (heads, -1)), cos, sin)


@_fusable
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [..., L, H, D] by cos/sin: [L, D/2] (float32), pairs (2i, 2i+1). Float32 math, x.dtype result."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).to(x.dtype)


# --- VAE -------------------------------------------------------------------------------------------------------
@_fusable
def channel_rms(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """F.normalize over channels (dim 1) in float32, times sqrt(C) * gamma, in x.dtype."""
    return F.normalize(x.float(), dim=1).type_as(x) * scale * gamma


@_fusable
def tap_sum(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """a + b + c + bias per channel (dim 1), summed in float32: the three time taps of a conv computed as 2D convs.
    One pass over the outputs, which at the decoder's full resolution are about a GB each."""
    return (a.float() + b.float() + c.float() + bias.float().view(1, -1, 1, 1)).to(a.dtype)


@_fusable
def channel_rms_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    return F.silu(channel_rms.__wrapped__(x, gamma, scale))
