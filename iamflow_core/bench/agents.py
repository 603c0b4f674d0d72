"""Latency of entity extraction (LLM) and frame verification (VLM) at full size with random weights.

    python -m iamflow_core bench agents [--device cuda:0] [--vlm-device cuda:0] [--workdir DIR]

Builds random Qwen3-4B-Instruct-2507- and Qwen3-VL-2B-Instruct-shaped folders (once, in --workdir) with the real
Qwen tokenizer, then times `EntityExtractor.extract` on a 6-prompt story and `FrameVerifier.score` on 3 frames of
480x832. Random weights answer until the token limit, so extraction times are an upper bound.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..story.entities import Entity
from .qwen_random import model_folders
from .stories import DEFAULT_PROMPTS


def _peak(device: str) -> float:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.startswith("cuda") else 0.0


def _reset_peak(device: str) -> None:
    """Start a part's peak afresh: writing the random model folders (on the GPU) and the part before would count."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def main(argv: list[str] | None = None) -> Iterator[str]:
    """Yield the result lines (comments start with #, results are JSON rows)."""
    parser = argparse.ArgumentParser(
        prog="python -m iamflow_core bench agents", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--device", default="cuda:0", help="device of the LLM")
    parser.add_argument("--vlm-device", default=None, help="device of the VLM (default: --device)")
    parser.add_argument("--workdir", default="/tmp/iamflow-agents-bench")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--parts", nargs="+", choices=["llm", "vlm"], default=["llm", "vlm"], help="what to time")
    args = parser.parse_args(argv)
    vlm_device = args.vlm_device or args.device
    t0 = time.perf_counter()
    llm_dir, vlm_dir = model_folders(Path(args.workdir), args.device)
    yield f"# model folders ready in {time.perf_counter() - t0:.1f} s ({llm_dir.parent})"

    if "llm" in args.parts:
        yield from _time_llm(llm_dir, args.device)
    if "vlm" in args.parts:
        yield from _time_vlm(vlm_dir, vlm_device, args.repeats)


def _time_llm(llm_dir: Path, device: str) -> Iterator[str]:
    from ..story.llm import EntityExtractor

    _reset_peak(device)
    extractor = EntityExtractor(llm_dir, device=device)
    for run in ("first", "second"):
        t0 = time.perf_counter()
        registry = extractor.extract(list(DEFAULT_PROMPTS))
        seconds = time.perf_counter() - t0
        yield json.dumps({"llm": "Qwen3-4B shape", "run": run, "prompts": len(DEFAULT_PROMPTS),
                          "seconds": round(seconds, 2), "per_prompt_s": round(seconds / len(DEFAULT_PROMPTS), 2),
                          "entities": len(registry.entities), "peak_gib": _peak(device)})  # fmt: skip
    extractor.unload()


def _time_vlm(vlm_dir: Path, vlm_device: str, repeats: int) -> Iterator[str]:
    from ..story.vlm import FrameVerifier

    _reset_peak(vlm_device)
    verifier = FrameVerifier(vlm_dir, device=vlm_device)
    frames = np.random.default_rng(0).integers(0, 256, (3, 480, 832, 3), dtype=np.uint8)
    entities = [Entity(1, "woman", attributes=("beige sweater",)), Entity(2, "red notebook", kind="object")]
    for check in (False, True):
        verifier.score(frames, DEFAULT_PROMPTS[0], entities, check_attributes=check)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            verifier.score(frames, DEFAULT_PROMPTS[0], entities, check_attributes=check)
        ms = (time.perf_counter() - t0) / repeats * 1000
        yield json.dumps({"vlm": "Qwen3-VL-2B shape", "frames": 3, "check_attributes": check,
                          "ms_per_chunk": round(ms, 1), "peak_gib": _peak(vlm_device)})  # fmt: skip
    verifier.unload()
