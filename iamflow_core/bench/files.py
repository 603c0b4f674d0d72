"""Model files under the names artists have, in a ComfyUI `models/` folder, with random weights: what `bench start`
loads at full size and what the tests load at tiny size. The umT5 file embeds its SentencePiece tokenizer as a
`spiece_model` uint8 tensor, as ComfyUI's does; `iamflow_fp8.safetensors` is laid out as IAMFlow's FP8 release
(keys prefixed `model.`, the blocks' linear weights in float8 with per-row `weight_scale`)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

DIT_FILE = "wan2.1_t2v_1.3B_bf16.safetensors"
IAMFLOW_FILE = "iamflow_fp8.safetensors"
TEXT_ENCODER_FILE = "umt5_xxl_fp16.safetensors"
VAE_FILE = "wan_2.1_vae.safetensors"


def _state(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # clone: tied tensors (the umT5 embedding) must not share storage in a safetensors file
    return {k: v.detach().to("cpu", dtype).clone().contiguous() for k, v in module.state_dict().items()}


def write_model_files(models: Path, dit, t5_encoder, vae, *, fp8_dit: bool) -> Path:
    """diffusion_models/, text_encoders/, vae/ (and an empty loras/) holding these modules' weights. Returns
    `models`."""
    from ..models.fp8 import quantize_rows_fp8
    from ..presets import tiny_spiece_model

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
    return models


def write_full_size_files(models: Path, device: str = "cuda:0", fp8_dit: bool = True) -> Path:
    """Wan2.1-T2V-1.3B, umT5-XXL and the Wan2.1 VAE at full size, random weights (about 15 GB), built on `device`."""
    from ..config import DiTConfig, T5Config, VAEConfig
    from ..models.dit import CausalWanDiT
    from ..models.t5 import UMT5Encoder
    from ..models.vae import WanVAE

    torch.manual_seed(0)
    with torch.device(device):
        dit, t5, vae = CausalWanDiT(DiTConfig()), UMT5Encoder(T5Config()).half(), WanVAE(VAEConfig())
    return write_model_files(models, dit, t5, vae, fp8_dit=fp8_dit)
