"""Local Hugging Face model folders for the LLM and the VLM: checking a folder, the dtype, chat prompts, greedy
decoding and freeing a model. Shared by `llm.py` and `vlm.py`; transformers is imported only where it is used."""

from __future__ import annotations

import copy
import gc
from pathlib import Path
from typing import Any

import torch


class ModelFolderError(FileNotFoundError):
    """A model folder is missing or incomplete. The message names the folder, the missing part and where to get it."""


def check_model_folder(model_dir: str | Path, what: str) -> Path:
    """`model_dir` as a Path after checking it holds config.json, a tokenizer and weights."""
    folder = Path(model_dir).expanduser()
    hint = f"put the {what} folder (config.json, tokenizer files, *.safetensors) there"
    if not folder.is_dir():
        raise ModelFolderError(f"{what}: model folder {str(folder)!r} does not exist; {hint}")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        missing.append("a tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        missing.append("weights (*.safetensors)")
    if missing:
        raise ModelFolderError(f"{what}: model folder {str(folder)!r} lacks {', '.join(missing)}; {hint}")
    return folder


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA and fp32 on CPU unless told otherwise; accepts torch dtypes and names ("bf16", "float16")."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}  # fmt: skip
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(names)}")
    return names[dtype]


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The generation prompt for `messages`, by the tokenizer's own chat template (real Qwen folders ship one), else
    plain ChatML, the format of Qwen3-Instruct-2507 (which has no think block)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def greedy_config(model: Any, max_new_tokens: int, pad_token_id: int | None) -> Any:
    """The model's generation config switched to greedy decoding (real folders ship sampling defaults)."""
    config = copy.deepcopy(model.generation_config)
    config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
    config.max_new_tokens = max_new_tokens
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    return config


def end_tokens(config: Any, tokenizer: Any) -> set[int]:
    """The token ids that end a greedy answer: the generation config's `eos_token_id` (one or a list), else the
    tokenizer's end token."""
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    return {int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos]) if t is not None}


def free_model(model: Any, device: torch.device) -> None:
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
