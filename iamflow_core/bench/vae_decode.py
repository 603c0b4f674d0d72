"""Time one steady chunk of the streaming VAE decode (the decoder's time caches already full), and where its GPU
time goes.

    python -m iamflow_core bench vae [--latent-frames 3] [--height 480 --width 832] [--no-compile]

Random weights at full size (compute does not depend on the values), bf16, fused kernels on unless --no-compile.
The breakdown comes from one profiled chunk: convolutions, the fused Triton kernels (norms, tap sums), adds,
copies and the rest. `launch_ms` is the host's time to queue a chunk (kernel by kernel).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator

import torch

from ..config import VAEConfig
from ..models import fused
from ..models.vae import CONV_PLANS, WanVAE
from . import kernel_time

# Kernel name fragments -> what they are, first match wins.
KINDS = (
    ("conv", ("conv", "xmma", "implicit_gemm", "cutlass", "nhwckrsc")),
    ("fused (triton)", ("triton",)),
    ("add", ("add",)),
    ("copy / cat", ("copy", "memcpy", "cat", "pad")),
    ("upsample", ("upsample",)),
)


def kind_of(kernel: str) -> str:
    return kernel_time.kind_of(kernel, KINDS)


@torch.no_grad()
def time_decode(vae: WanVAE, latent_frames: int, height: int, width: int, chunks: int = 5, warmup: int = 4) -> dict:
    """Mean GPU and host milliseconds per steady chunk, and one profiled chunk's milliseconds by kind of kernel."""
    state = vae.new_decode_state()
    z = torch.randn(1, vae.cfg.z_dim, latent_frames, height // 8, width // 8, device=vae.device, dtype=vae.dtype)
    for _ in range(warmup):
        vae.decode_stream(z, state)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    launched = time.perf_counter()
    start.record()
    for _ in range(chunks):
        vae.decode_stream(z, state)
    end.record()
    launched = time.perf_counter() - launched
    end.synchronize()
    return {
        "chunk_ms": round(start.elapsed_time(end) / chunks, 1),
        "launch_ms": round(1000 * launched / chunks, 1),
        **kernel_time.profile_kinds(lambda: vae.decode_stream(z, state), KINDS),
        "conv_plans": [plan_line(key, plan) for key, plan in CONV_PLANS.items()],
    }


def plan_line(key: tuple, plan: dict) -> str:
    """'96->96 3x3x3 on 14x480x832: taps (conv3d 9.30, taps 5.47, stacked 7.16 ms)' for one timed conv shape."""
    shape, weight = key[0], key[-1]
    timings = ", ".join(f"{name} {ms:.2f}" for name, ms in plan.items() if name != "choice")
    kernel = "x".join(map(str, weight[2:]))
    return f"{weight[1]}->{weight[0]} {kernel} on {'x'.join(map(str, shape[2:]))}: {plan['choice']} ({timings} ms)"


def main(argv: list[str] | None = None) -> Iterator[str]:
    """Yield the result lines (a header, then one JSON row)."""
    parser = argparse.ArgumentParser(
        prog="python -m iamflow_core bench vae", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--latent-frames", type=int, default=3, help="latent frames per chunk (12 video frames)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--no-compile", action="store_true", help="eager elementwise kernels (no torch.compile)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the VAE benchmark needs a CUDA GPU")
    fused.enable(not args.no_compile)
    vae = WanVAE(VAEConfig()).to("cuda", torch.bfloat16).eval()
    yield f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; compiled={fused.enabled()}"
    row = time_decode(vae, args.latent_frames, args.height, args.width)
    yield json.dumps({"latent_frames": args.latent_frames, "height": args.height, "width": args.width, **row})
