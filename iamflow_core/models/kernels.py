"""Kernels written by hand in Triton, where TorchInductor's fall short.

`rms_norm_rope`: the RMS norm of the self-attention's q or k over the full width, its weight and the rotary
embedding, one row per program. TorchInductor compiled the same function (`fused.rms_norm_rope`'s plain PyTorch) into
a looped reduction with the rotary pairs gathered by index: 21.9 us a call at 4680 x 1536 in bf16 on an H200 (300
calls a chunk, 6.6 ms), 1.3 TB/s for the 28.8 MB it reads and writes. Here the row stays in registers, the rotary
pairs are split from it and joined back in place: 8.6 us a call in the same profile (3.3 TB/s). The result is
stored wherever the caller wants it: the KV cache's query slot for the keys, so no copy follows.

The math is the plain function's, roundings included: the norm rounded to the input's dtype, times the weight,
rounded again, then rotated in float32 and rounded once more.

Every hand-written kernel (this one, the answer decoder's in `story/greedy_ops.py`) launches through `launched`: one
that cannot be built or launched (a Triton without an op the kernel uses, a GPU older than Triton supports, no C
compiler for Triton's launcher) turns them all off for the process with one warning, and their callers compute the
same values as plain PyTorch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU build of PyTorch: the callers run plain PyTorch
    triton = None

logger = logging.getLogger(__name__)
# What TorchInductor's and these kernels need, for the warnings that turn them off.
NEEDS = ("Triton (`pip install triton`; on Windows `pip install triton-windows`), a GPU of compute capability 7.0 or "
         "newer and a C compiler for Triton's launcher (set CC)")  # fmt: skip
_off: str | None = None  # why the hand-written kernels are off in this process, after one failed


def available(x: torch.Tensor) -> bool:
    """Whether the hand-written kernels can run on x: on a GPU, with Triton, none having failed in this process."""
    return triton is not None and _off is None and x.is_cuda


def error_stands(error: Exception) -> bool:
    """Whether a kernel's (or a compiled function's) error is raised as it is instead of turning the kernels off:
    out of memory, or inside a CUDA-graph capture, whose caller handles it (a capture is preceded by an eager run,
    where a kernel that cannot build fails first)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    )


def first_line(error: Exception, limit: int = 300) -> str:
    """`Type: message` of an error for a one-line warning: the compiler's own where Dynamo wrapped it
    (`inner_exception`), its first line only (TorchInductor's and Triton's go on with advice and source), at most
    `limit` characters."""
    error = getattr(error, "inner_exception", None) or error
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def launched(launch: Callable[[], None], what: str) -> bool:
    """Run `launch`, the launch of `what` (for the warning). If the kernel cannot be built or launched, turn the
    hand-written kernels off for the process with one warning and return False: the caller computes the same values
    as plain PyTorch. Out of memory, or inside a CUDA-graph capture, the error is raised (`error_stands`)."""
    global _off
    try:
        launch()
        return True
    except Exception as error:  # noqa: BLE001 - Triton reports a missing compiler or an old GPU in several types
        if error_stands(error):
            raise
        _off = first_line(error)
        logger.warning("%s failed (%s); the hand-written Triton kernels run as plain PyTorch from now on (the same "
                       "values, slower). They need %s", what, _off, NEEDS)  # fmt: skip
        return False


def on_its_gpu(x: torch.Tensor) -> AbstractContextManager:
    """x's GPU as the current one while a kernel is launched on x: it need not be the current one (a batch rank's, a
    loader's device widget, a VLM on another GPU than the DiT's)."""
    return nullcontext() if x.device.index == torch.cuda.current_device() else torch.cuda.device(x.device)


if triton is not None:

    @triton.jit
    def _rms_norm_rope_kernel(
        x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
        tokens, x_stride_b, x_stride_l, cs_stride, out_stride_b, out_stride_l, eps,
        DIM: tl.constexpr, HALF_HEAD: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        b, t = row // tokens, row % tokens
        offs = tl.arange(0, BLOCK)
        mask = offs < DIM
        x = tl.load(x_ptr + b * x_stride_b + t * x_stride_l + offs, mask=mask, other=0.0)
        x32 = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(x32 * x32, axis=0) / DIM + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = ((x32 * inv).to(x.dtype).to(tl.float32) * w).to(x.dtype).to(tl.float32)
        even, odd = tl.split(tl.reshape(h, (BLOCK // 2, 2)))
        pair = tl.arange(0, BLOCK // 2)
        angle = t * cs_stride + pair % HALF_HEAD
        cos = tl.load(cos_ptr + angle, mask=pair < DIM // 2, other=0.0)
        sin = tl.load(sin_ptr + angle, mask=pair < DIM // 2, other=0.0)
        y = tl.reshape(tl.join(even * cos - odd * sin, odd * cos + even * sin), (BLOCK,))
        tl.store(out_ptr + b * out_stride_b + t * out_stride_l + offs, y.to(x.dtype), mask=mask)


def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int, cos: torch.Tensor, sin: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:  # fmt: skip
    """x: [B, L, dim] -> [B, L, H, D] normed, times weight, rotated by cos/sin [L, D/2] (float32) at pairs
    (2i, 2i + 1) of each head; written into `out` when given (its rows contiguous, as the KV cache's are). None when
    the kernel could not be built or launched (`launched`): nothing was written."""
    b, tokens, dim = x.shape
    head = dim // heads
    if out is None:
        out = torch.empty(b, tokens, heads, head, dtype=x.dtype, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    if out.shape != (b, tokens, heads, head) or out.stride(-1) != 1 or out.stride(-2) != head:
        raise ValueError(f"out must be [B, L, H, D] = {[b, tokens, heads, head]} with rows contiguous")
    if cos.shape != (tokens, head // 2) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [L, D/2] = {[tokens, head // 2]}, got {list(cos.shape)}")
    block = triton.next_power_of_2(dim)

    def launch() -> None:
        with on_its_gpu(x):
            _rms_norm_rope_kernel[(b * tokens,)](
                x, weight, cos, sin, out, tokens, x.stride(0), x.stride(1), cos.stride(0), out.stride(0),
                out.stride(1), eps, DIM=dim, HALF_HEAD=head // 2, BLOCK=block, num_warps=4 if block <= 2048 else 8,
            )  # fmt: skip

    return out if launched(launch, "the DiT's q/k norm-and-rotate kernel") else None


# --- signals between two GPUs (the clean pass on the second GPU, `relay.py`) -----------------------------------------
# One program copies BLOCK elements of a frame's K or V into the other GPU's cache and then adds 1 to that layer's
# counter there, after a barrier of its threads and with release ordering at system scope, so a reader that sees the
# count also sees the rows. The reader's GPU runs `wait_count` before the layer's attention: one program that
# spins (acquire loads of the counter) until the count reaches the target. Both run inside CUDA graphs.
PUSH_BLOCK = 4096
# Spins before a wait gives up (about 0.2 us each on an H200: some 13 s). It then sets the error flag, which
# `relay.Relay._check` turns into an exception: a GPU never hangs on a signal that cannot come.
WAIT_LIMIT = 1 << 26

if triton is not None:

    @triton.jit
    def _push_kernel(src_ptr, dst_ptr, src_offsets, dst_offsets, counter_ptr, part_size, BLOCK: tl.constexpr):
        pid, part = tl.program_id(0), tl.program_id(1)
        dst_start = tl.load(dst_offsets + part)
        if dst_start >= 0:  # a frame the cache keeps; -1: one it drops (the head of a recache)
            src_start = tl.load(src_offsets + part)
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            mask = offs < part_size
            rows = tl.load(src_ptr + src_start + offs, mask=mask)
            tl.store(dst_ptr + dst_start + offs, rows, mask=mask)
        tl.debug_barrier()
        tl.atomic_add(counter_ptr, 1, sem="release", scope="sys")

    @triton.jit
    def _wait_kernel(counter_ptr, target_ptr, error_ptr, limit):
        target = tl.load(target_ptr)
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="sys")
        spins = 0
        while (seen < target) & (spins < limit):
            seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="sys")
            spins += 1
        if seen < target:
            tl.store(error_ptr, 1)


def push_programs(part_size: int) -> int:
    """Programs (and so counter increments) of one part of a `push`."""
    return triton.cdiv(part_size, PUSH_BLOCK)


def push(src: torch.Tensor, dst: torch.Tensor, src_offsets: torch.Tensor, dst_offsets: torch.Tensor,
         counter: torch.Tensor, part_size: int) -> None:  # fmt: skip
    """Copy parts of `part_size` elements from src (on the current GPU) to dst (on this or another GPU, peer access
    on), part p from element src_offsets[p] to dst_offsets[p] (int64 tensors on src's GPU; a negative destination
    skips the part), then add `push_programs(part_size)` per part to `counter` (int32, one element, on dst's GPU)."""
    grid = (push_programs(part_size), src_offsets.numel())
    with on_its_gpu(src):
        _push_kernel[grid](src, dst, src_offsets, dst_offsets, counter, part_size, BLOCK=PUSH_BLOCK, num_warps=4)


def wait_count(counter: torch.Tensor, target: torch.Tensor, error: torch.Tensor) -> None:
    """On counter's GPU, hold the current stream until `counter` (int32, one element) reaches `target` (int32 on the
    same GPU, read when the wait runs); after `WAIT_LIMIT` spins give up and set `error` to 1."""
    with on_its_gpu(counter):
        _wait_kernel[(1,)](counter, target, error, WAIT_LIMIT, num_warps=1)
