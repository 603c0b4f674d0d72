"""Write a ComfyUI-style models folder (diffusion_models/, text_encoders/, vae/) of random weights at any size."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from iamflow_core.config import DiTConfig, T5Config, VAEConfig
from iamflow_core.models.dit import CausalWanDiT
from iamflow_core.models.t5 import UMT5Encoder
from iamflow_core.models.vae import WanVAE
from iamflow_core.presets import tiny_spiece_model

from ._tiny_t5 import wan_to_hf


def _save(module: torch.nn.Module, path: Path, rename=None, extra: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    state = rename(state) if rename else state
    # clone: tied tensors (the umT5 embedding) must not share storage in a safetensors file
    save_file({k: v.clone().contiguous() for k, v in state.items()} | (extra or {}), str(path))


def write_models(root: Path, dit: DiTConfig, t5: T5Config, vae: VAEConfig, device: str = "cpu", seed: int = 0) -> Path:
    """`root/diffusion_models/wan2.1_t2v_1.3B_bf16.safetensors`, `root/text_encoders/umt5_xxl_fp16.safetensors`
    (tokenizer embedded) and `root/vae/wan_2.1_vae.safetensors`, with the file names users have."""
    torch.manual_seed(seed)
    spiece = torch.frombuffer(bytearray(tiny_spiece_model()), dtype=torch.uint8)
    with torch.device(device):
        _save(CausalWanDiT(dit).to(torch.bfloat16), root / "diffusion_models/wan2.1_t2v_1.3B_bf16.safetensors")
        t5_model = UMT5Encoder(t5).half()
    _save(t5_model, root / "text_encoders/umt5_xxl_fp16.safetensors", wan_to_hf, {"spiece_model": spiece})
    del t5_model
    with torch.device(device):
        _save(WanVAE(vae).half(), root / "vae/wan_2.1_vae.safetensors")
    return root
