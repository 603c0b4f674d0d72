"""Time one streaming chunk (4 denoising forwards + 1 clean cache-write forward) of the full-size DiT.

    python -m iamflow_core bench dit [--backends sdpa,flash3] [--memory-frames 0 3] [--quantization off fp8]
                                     [--profile]

Random weights (compute does not depend on the values), bf16, steady state (sink and window already full).
`--profile` adds to each row where one more chunk's GPU time goes (`torch.profiler`, CUDA graphs off so that each
kernel shows, the clean pass run eagerly): attention, GEMMs, the fused Triton kernels, copies and the rest, with the
largest kernels.
`--quantization fp8` adds rows with the DiT quantized as the CLI's `--quantization fp8` does (self-attention q/k/v,
cross-attention q and FFN-in as FP8 matmuls). Every FP8 row (FP8 matmuls, the `flash3_fp8` attention backend, both)
also gets a row of its error against bf16 with 16-bit attention: one forward, and the denoised latents of a 10-chunk
stream.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator

import torch

from ..config import CacheConfig, DiTConfig
from ..models import fused
from ..models.attention import available_backends, precise
from ..models.dit import CausalWanDiT
from ..schedule import sigma
from ..weights import quantize_dit
from . import kernel_time

TIMESTEPS = (1000.0, 937.5, 833.3, 625.0)
# Kernel name fragments -> what they are, first match wins (FA3's kernels are CUTLASS ones in namespace flash).
KINDS = (
    ("attention", ("flash", "fmha", "attention")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "matmul")),
    ("fused (triton)", ("triton", "rms_norm_rope")),
    ("copy", ("memcpy", "memset", "copy")),
)


def build_model(device: str, dtype: torch.dtype, cfg: DiTConfig | None = None, seed: int = 0) -> CausalWanDiT:
    torch.manual_seed(seed)
    with torch.device(device):
        model = CausalWanDiT(cfg or DiTConfig())
    return model.to(dtype).eval()


@torch.no_grad()
def time_chunks(
    model: CausalWanDiT, cache_cfg: CacheConfig, height: int, width: int, chunks: int = 5, warmup: int = 5,
    profile: bool = False,
) -> dict:  # fmt: skip
    """Mean seconds per chunk and per forward over `chunks` timed chunks after `warmup` chunks; with `profile`, one
    more chunk's kernel time by kind (CUDA graphs off)."""
    device = model.device
    h, w = height // 8, width // 8
    tokens = (h // 2) * (w // 2)
    cache = model.new_cache(cache_cfg, tokens_per_frame=tokens)
    text = torch.randn(1, model.cfg.text_len, model.cfg.text_dim, device=device, dtype=torch.bfloat16)
    cross = model.encode_text(text)
    if cache_cfg.memory_frames:
        mem_tokens = cache_cfg.memory_frames * tokens
        shape = (model.cfg.num_layers, 1, mem_tokens, model.cfg.num_heads, model.cfg.head_dim)
        mem = torch.randn(shape, device=device, dtype=cache.k.dtype)
        cache.set_memory(mem, mem, list(range(cache_cfg.memory_frames)))
    n = cache_cfg.chunk_frames
    x = torch.randn(1, model.cfg.in_channels, n, h, w, device=device)

    def chunk(index: int) -> None:
        for t in TIMESTEPS:
            model.forward_chunk(x, torch.tensor([t]), cross, cache, index * n)
        model.write_chunk(x, torch.tensor([0.0]), cross, cache, index * n)

    for i in range(warmup):
        chunk(i)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(warmup, warmup + chunks):
        chunk(i)
    torch.cuda.synchronize()
    per_chunk = (time.perf_counter() - start) / chunks
    row = {
        "context_tokens": cache.layout.context_tokens if cache.layout else None,
        "chunk_s": per_chunk,
        "forward_ms": per_chunk / 5 * 1000,
        "video_fps_dit_only": (4 * n) / per_chunk,
    }
    if profile:
        graphs, model.cuda_graphs = model.cuda_graphs, False
        try:
            row.update(kernel_time.profile_kinds(lambda: chunk(warmup + chunks), KINDS, top=12))
        finally:
            model.cuda_graphs = graphs
    return row


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def stream_error(
    reference: CausalWanDiT, other: CausalWanDiT, cache_cfg: CacheConfig, height: int, width: int, chunks: int = 10,
    seed: int = 0,
) -> dict:  # fmt: skip
    """How far `other` drifts from `reference` over a stream: each renders `chunks` chunks from the same noise and
    text with its own cache (4 denoising steps, x0 = x - sigma * v, the clean pass writes the cache), so errors of
    earlier chunks reach later ones through the cache as in a real story. Returns the relative error of the first
    forward's velocity and of each chunk's denoised latents."""
    device = reference.device
    h, w = height // 8, width // 8
    tokens = (h // 2) * (w // 2)
    gen = torch.Generator(device).manual_seed(seed)
    text = torch.randn(1, reference.cfg.text_len, reference.cfg.text_dim, device=device, generator=gen)
    n = cache_cfg.chunk_frames
    shape = (1, reference.cfg.in_channels, n, h, w)
    runs = [(model, model.new_cache(cache_cfg, tokens), model.encode_text(text)) for model in (reference, other)]
    first_forward, per_chunk = [], []
    for chunk in range(chunks):
        noise = [torch.randn(shape, device=device, generator=gen) for _ in TIMESTEPS]
        x0s = []
        for model, cache, cross in runs:
            x = noise[0]
            for j, t in enumerate(TIMESTEPS):
                v = model.forward_chunk(x, torch.tensor([t], device=device), cross, cache, chunk * n)
                if chunk == 0 and j == 0:
                    first_forward.append(v.float())
                x0 = x - sigma(t) * v.float()
                if j + 1 < len(TIMESTEPS):
                    s = sigma(TIMESTEPS[j + 1])
                    x = (1 - s) * x0 + s * noise[j + 1]
            model.write_chunk(x0, torch.tensor([0.0], device=device), cross, cache, chunk * n)
            x0s.append(x0)
        per_chunk.append(_rel(x0s[1], x0s[0]))
    return {"forward_rel_err": _rel(first_forward[1], first_forward[0]),
            "stream_rel_err": [round(e, 4) for e in per_chunk]}  # fmt: skip


def main(argv: list[str] | None = None) -> Iterator[str]:
    """Yield the result lines (a header, then one JSON row per backend and memory size)."""
    parser = argparse.ArgumentParser(
        prog="python -m iamflow_core bench dit", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--backends", default="all", help="comma-separated, or 'all' available")
    parser.add_argument("--memory-frames", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--no-compile", action="store_true", help="eager elementwise kernels (no torch.compile)")
    parser.add_argument(
        "--quantization", nargs="+", choices=["off", "fp8"], default=["off"],
        help="fp8: also time the DiT as the CLI's --quantization fp8 makes it, and measure its error against bf16",
    )  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="also where one chunk's GPU time goes, by kernel")
    args = parser.parse_args(argv)
    fused.enable(not args.no_compile)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    backends = [b for b in available_backends() if b != "auto"] if args.backends == "all" else args.backends.split(",")
    name = torch.cuda.get_device_name()
    yield f"# {name} torch {torch.__version__}; compiled={fused.enabled()}"
    models = {}
    for quantization in args.quantization:
        model = build_model("cuda", torch.bfloat16)
        models[quantization] = quantize_dit(model) if quantization == "fp8" else model
    for quantization, model in models.items():
        for memory in args.memory_frames:
            cache_cfg = CacheConfig(memory_frames=memory)
            for backend in backends:
                model.attention_backend = backend
                row = {
                    "quantization": quantization,
                    "backend": backend,
                    "memory_frames": memory,
                    **time_chunks(model, cache_cfg, args.height, args.width, profile=args.profile),
                }
                yield json.dumps(row)
    # Error rows: each other quantization and backend against bf16 with the first 16-bit backend, on models of the
    # same seed (the same weights), so FP8 matmuls and FP8 attention are measured alone and together.
    reference_backend = precise(backends[0])
    others = [(q, b) for q in models for b in backends if q == "fp8" or b == "flash3_fp8"]
    if others:
        del models, model  # the timed models' graphs and caches go before the error runs
        reference = build_model("cuda", torch.bfloat16)
        reference.attention_backend = reference_backend
        for quantization, backend in others:
            other = build_model("cuda", torch.bfloat16)
            other = quantize_dit(other) if quantization == "fp8" else other
            other.attention_backend = backend
            error = stream_error(reference, other, CacheConfig(), args.height, args.width)
            yield json.dumps({"error_of": f"{quantization} {backend}", "against": f"off {reference_backend}", **error})
            del other
