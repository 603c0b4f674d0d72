"""Time one streaming chunk (4 denoising forwards + 1 clean cache-write forward) of the full-size DiT.

    python -m iamflow_core bench dit [--backends sdpa,flash3] [--memory-frames 0 3] [--height 480 --width 832]

Random weights (compute does not depend on the values), bf16, steady state (sink and window already full).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator

import torch

from ..config import CacheConfig, DiTConfig
from ..models import fused
from ..models.attention import available_backends
from ..models.dit import CausalWanDiT

TIMESTEPS = (1000.0, 937.5, 833.3, 625.0)


def build_model(device: str, dtype: torch.dtype, cfg: DiTConfig | None = None) -> CausalWanDiT:
    with torch.device(device):
        model = CausalWanDiT(cfg or DiTConfig())
    return model.to(dtype).eval()


@torch.no_grad()
def time_chunks(
    model: CausalWanDiT, cache_cfg: CacheConfig, height: int, width: int, chunks: int = 5, warmup: int = 5
) -> dict:
    """Mean seconds per chunk and per forward over `chunks` timed chunks after `warmup` chunks."""
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
        model.forward_chunk(x, torch.tensor([0.0]), cross, cache, index * n, commit=True)

    for i in range(warmup):
        chunk(i)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(warmup, warmup + chunks):
        chunk(i)
    torch.cuda.synchronize()
    per_chunk = (time.perf_counter() - start) / chunks
    return {
        "context_tokens": cache.layout.context_tokens if cache.layout else None,
        "chunk_s": per_chunk,
        "forward_ms": per_chunk / 5 * 1000,
        "video_fps_dit_only": (4 * n) / per_chunk,
    }


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
    args = parser.parse_args(argv)
    fused.enable(not args.no_compile)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    model = build_model("cuda", torch.bfloat16)
    backends = [b for b in available_backends() if b != "auto"] if args.backends == "all" else args.backends.split(",")
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name()
    yield f"# {name} torch {torch.__version__}; DiT {params:,} params; compiled={fused.enabled()}"
    for memory in args.memory_frames:
        cache_cfg = CacheConfig(memory_frames=memory)
        for backend in backends:
            model.attention_backend = backend
            row = {
                "backend": backend,
                "memory_frames": memory,
                **time_chunks(model, cache_cfg, args.height, args.width),
            }
            yield json.dumps(row)
