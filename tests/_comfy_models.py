"""Tiny model files under the names artists have, in a ComfyUI `models/` folder: random weights of the tiny
preset, written the way the real files are laid out (the umT5 file embeds its SentencePiece tokenizer as a
`spiece_model` uint8 tensor, as ComfyUI's does)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from iamflow_core.presets import tiny_spiece_model

DIT_FILE = "wan2.1_t2v_1.3B_bf16.safetensors"
IAMFLOW_FILE = "iamflow_fp8.safetensors"
TEXT_ENCODER_FILE = "umt5_xxl_fp16.safetensors"
VAE_FILE = "wan_2.1_vae.safetensors"
LLM_FOLDER = "Qwen3-4B-Instruct-2507"
VLM_FOLDER = "Qwen3-VL-2B-Instruct"


def _state(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}


def write_tiny_models(models: Path, *, fp8_dit: bool = False, hf_folders: bool = False) -> Path:
    """diffusion_models/, text_encoders/ and vae/ with tiny random files under the real names. Returns `models`.

    fp8_dit: also write iamflow_fp8.safetensors (keys prefixed `model.`, attention and FFN weights in float8 with
    per-row `weight_scale`). hf_folders: also make empty `LLM/<name>/config.json` folders (listing only).
    """
    from iamflow_core.models.fp8 import quantize_rows_fp8
    from iamflow_core.presets import tiny_models

    dit, text_encoder, vae = tiny_models()
    for sub in ("diffusion_models", "text_encoders", "vae", "loras"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    save_file(_state(dit, torch.bfloat16), str(models / "diffusion_models" / DIT_FILE))
    encoder = _state(text_encoder.encoder, torch.float16)
    encoder["spiece_model"] = torch.frombuffer(bytearray(tiny_spiece_model()), dtype=torch.uint8)
    save_file(encoder, str(models / "text_encoders" / TEXT_ENCODER_FILE))
    save_file(_state(vae, torch.bfloat16), str(models / "vae" / VAE_FILE))
    if fp8_dit:
        state = {}
        for key, value in _state(dit, torch.bfloat16).items():
            if key.endswith(".weight") and value.ndim == 2 and key.startswith("blocks."):
                state["model." + key], state["model." + key + "_scale"] = quantize_rows_fp8(value.float())
            else:
                state["model." + key] = value
        save_file(state, str(models / "diffusion_models" / IAMFLOW_FILE))
    if hf_folders:
        for name in (LLM_FOLDER, VLM_FOLDER):
            (models / "LLM" / name).mkdir(parents=True, exist_ok=True)
            (models / "LLM" / name / "config.json").write_text("{}")
    return models


spiece_bytes = tiny_spiece_model  # the name the node tests use
