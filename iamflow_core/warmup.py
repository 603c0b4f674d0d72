"""Kernels traced while the models load, so a story's second chunk does not wait for them.

The fused kernels (`models.fused`) are compiled by the second chunk of a story, or, with warm caches, loaded from the
kernel cache: Dynamo still traces every function first, which stalled a warm 60-s story's second chunk for about 5 s
on an H200. `warm_kernels` runs a steady chunk's kernels on stand-in inputs instead. The CLI calls
`warm_if_cached` while the text encoder (the longest read) still loads: only when an earlier run of the same shapes
left its kernels in the cache (a marker the pipeline writes once a story's kernels are in place, `remember`), since
compiling from nothing takes ~20 s and a cold run should show its first frames before that.
"""

from __future__ import annotations

import hashlib
import logging
import time

import torch

from .config import SamplerConfig
from .models import fused
from .models.dit import CausalWanDiT
from .models.fp8 import FP8Linear
from .models.vae import WanVAE

logger = logging.getLogger(__name__)


def kernel_key(dit: CausalWanDiT, vae: WanVAE | None, config: SamplerConfig) -> str:
    """What decides which kernels a story compiles: torch, the GPU, the models' shapes, dtypes and FP8 layout, the
    attention backend, the video size and the chunk length."""
    fp8 = sorted(name for name, m in dit.named_modules() if isinstance(m, FP8Linear) and m.use_scaled_mm)
    parts = [
        torch.__version__, _device_name(dit.device), dit.cfg, dit.blocks[0].norm3.weight.dtype,
        dit.attention_backend, fp8, config.height, config.width, config.cache.chunk_frames,
        None if vae is None else (vae.cfg, vae.dtype, vae.device.type),
    ]  # fmt: skip
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _marker(key: str):
    folder = fused.use_cache_dir()
    return None if folder is None else folder / "warmed" / key


def remember(dit: CausalWanDiT, vae: WanVAE | None, config: SamplerConfig) -> None:
    """Note that this process compiled (or loaded) the kernels of these shapes into the kernel cache."""
    if not (fused.enabled() and dit.device.type == "cuda"):
        return
    marker = _marker(kernel_key(dit, vae, config))
    if marker is None or marker.exists():
        return
    try:
        marker.parent.mkdir(exist_ok=True)
        marker.touch()
    except OSError as e:  # the cache folder went read-only: the next run compiles at its second chunk, as this one
        logger.debug("kernel marker %s not written: %s", marker, e)


def warm_if_cached(dit: CausalWanDiT, vae: WanVAE | None, config: SamplerConfig) -> float | None:
    """`warm_kernels` when an earlier run left these kernels in the cache (`remember`); its seconds, else None."""
    if dit.device.type != "cuda":
        return None
    fused.enable()  # what the pipeline turns on for a CUDA DiT; IAMFLOW_COMPILE=0 keeps it off
    marker = _marker(kernel_key(dit, vae, config)) if fused.enabled() else None
    if marker is None or not marker.exists():
        return None
    seconds = warm_kernels(dit, vae, config)
    logger.info("kernels traced from the cache in %.1f s, while the text encoder loaded", seconds)
    return seconds


def warm_kernels(dit: CausalWanDiT, vae: WanVAE | None, config: SamplerConfig) -> float:
    """Trace the fused kernels a steady chunk of `config`'s size runs (loading them from the kernel cache, or compiling
    them), on stand-in inputs: one denoising and one clean forward of the DiT on a scratch cache, and a first and a
    steady VAE decode. Nothing of it stays: no CUDA graph, no cache. Returns its seconds; 0 when kernels are not
    compiled (CPU, `IAMFLOW_COMPILE=0`)."""
    if dit.device.type != "cuda":
        return 0.0
    fused.enable()
    if not fused.enabled():
        return 0.0
    t0 = time.perf_counter()
    h, w = config.height // 8, config.width // 8
    patch = dit.cfg.patch_size
    cache = dit.new_cache(config.cache, tokens_per_frame=(h // patch[1]) * (w // patch[2]))
    text = torch.zeros(1, dit.cfg.text_len, dit.cfg.text_dim, device=dit.device, dtype=torch.bfloat16)
    x = torch.zeros(1, dit.cfg.in_channels, config.cache.chunk_frames, h, w, device=dit.device)
    graphs, dit.cuda_graphs = dit.cuda_graphs, False  # a graph of a scratch cache would only cost memory
    try:
        with torch.no_grad(), fused.launch_guard():
            with fused.eager():
                cross = dit.encode_text(text)
            dit.forward_chunk(x, torch.full((1,), 1000.0, device=dit.device), cross, cache, 0)
            dit.forward_chunk(x, torch.zeros(1, device=dit.device), cross, cache, 0, commit=True)
            if vae is not None:
                state = vae.new_decode_state()
                z = torch.zeros(1, vae.cfg.z_dim, config.cache.chunk_frames, h, w, device=vae.device, dtype=vae.dtype)
                with fused.eager():  # a story's first decode runs eager too
                    vae.decode_stream(z, state)
                vae.decode_stream(z, state)
    finally:
        dit.cuda_graphs = graphs
        dit.release_graphs()
    torch.cuda.synchronize(dit.device)
    return time.perf_counter() - t0
