"""Tiny checkpoint files in every layout IAMFlow reads (DESIGN.md §4), for the loader tests.

Each writer takes a state dict in the original Wan key names (what our modules use) and writes it the way the
real file is laid out; where a library defines the layout (diffusers, transformers, peft) the file is written by
that library, so the key names are the real ones and not our guess of them.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from iamflow_core.config import T5Config, VAEConfig
from iamflow_core.models.fp8 import quantize_rows_fp8
from iamflow_core.models.vae import WanVAE

from ._tiny_dit import TINY_DIT, diffusers_twin, tiny_dit
from ._tiny_t5 import hf_model, tiny_encoder

TINY_T5 = T5Config(vocab_size=300, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2)
TINY_VAE = VAEConfig(base_dim=8)
ATTENTION_LINEAR = re.compile(r"blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]\.weight")
BLOCK_LINEAR_NAMES = (*(f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"), "ffn.0", "ffn.2")
BLOCK_LINEAR = re.compile(r"blocks\.\d+\.((self_attn|cross_attn)\.[qkvo]|ffn\.[02])\.weight")


def dit_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tiny DiT weights (TINY_DIT: dim 256 = 2 heads of 128, 2 layers), float32, Wan key names."""
    return {k: v.clone() for k, v in tiny_dit(TINY_DIT, seed=seed).state_dict().items()}


def t5_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_encoder(TINY_T5, seed=seed).state_dict().items()}


def vae_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = WanVAE(TINY_VAE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype).contiguous() for k, v in state.items()}


# --- DiT -----------------------------------------------------------------------------------------------------------


def write_comfyui_dit(
    path: Path, state: dict, *, prefix: str = "", dtype: torch.dtype = torch.bfloat16, metadata: dict | None = None
) -> Path:
    """ComfyUI repackaged `wan2.1_t2v_1.3B_bf16.safetensors` (bare keys, or `model.diffusion_model.`)."""
    save_file({prefix + k: v for k, v in _cast(state, dtype).items()}, str(path), metadata=metadata)
    return path


def write_wan_folder(folder: Path, state: dict, *, shards: int = 1) -> Path:
    """Original Wan2.1-T2V-1.3B folder: config.json + diffusion_pytorch_model.safetensors (or shards + index)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = TINY_DIT
    config = {
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v", "dim": cfg.dim,
        "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "in_dim": cfg.in_channels, "out_dim": cfg.out_channels,
        "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "text_len": 512, "eps": 1e-6,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    state = _cast(state, torch.float32)
    if shards == 1:
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
        return folder
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map |= dict.fromkeys(part, name)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def write_training_checkpoint(path: Path, generator: dict, ema: dict | None = None, *, fsdp: bool = False) -> Path:
    """Self-Forcing / LongLive / MemFlow `.pt`: {"generator": ..., "generator_ema": ..., "critic": ..., "step"}
    with keys of the WanDiffusionWrapper (`model.` prefix), FSDP wrappers optionally inside the names."""

    def wrap(state: dict) -> dict:
        inner = "_fsdp_wrapped_module." if fsdp else ""
        return {f"model.{inner}" + re.sub(r"^(blocks\.\d+\.)", rf"\1{inner}", k): v for k, v in state.items()}

    checkpoint = {"generator": wrap(_cast(generator, torch.bfloat16)), "critic": {"x": torch.zeros(2)}, "step": 7}
    if ema is not None:
        checkpoint["generator_ema"] = wrap(_cast(ema, torch.bfloat16))
    torch.save(checkpoint, path)
    return path


def write_diffusers_dit(folder: Path, state: dict) -> Path:
    """diffusers `WanTransformer3DModel.save_pretrained` (config.json + diffusion_pytorch_model.safetensors)."""
    model = tiny_dit()
    model.load_state_dict(state)
    diffusers_twin(model).save_pretrained(folder)
    return folder


def write_iamflow_fp8(path: Path, state: dict) -> Path:
    """IAMFlow `iamflow_fp8.safetensors`: `model.` prefix, attention projections float8_e4m3fn with per-output-
    channel `weight_scale` float32 [out, 1], everything else bf16 (the FFN too)."""
    out = {}
    for key, value in state.items():
        if ATTENTION_LINEAR.fullmatch(key):
            out["model." + key], out["model." + key + "_scale"] = quantize_rows_fp8(value)
        else:
            out["model." + key] = value.to(torch.bfloat16)
    save_file(out, str(path), metadata={"route": "lightx2v_fp8", "quant_scheme": "fp8-vllm"})
    return path


def write_comfyui_fp8_scaled_dit(path: Path, state: dict) -> Path:
    """ComfyUI `*_fp8_e4m3fn_scaled.safetensors`: block linears in e4m3 with one float32 `scale_weight` each,
    plus the `scaled_fp8` marker tensor."""
    out = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, value in state.items():
        if BLOCK_LINEAR.fullmatch(key):
            scale = value.abs().max().float() / 448.0
            out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[key] = value.to(torch.float16)
    save_file(out, str(path))
    return path


class _WanDiffusionWrapper(nn.Module):
    """Self-Forcing's wrapper: the DiT under `.model`, which puts `model.` into every LoRA key."""

    def __init__(self, dit: nn.Module) -> None:
        super().__init__()
        self.model = dit


def make_peft_lora(state: dict, rank: int = 4, alpha: int = 4, seed: int = 1):
    """A real PEFT LoRA (peft.get_peft_model) on every block linear, with random A and B (LongLive/MemFlow use
    alpha = rank). Returns (peft model, its adapter state dict as PEFT saves it)."""
    peft = __import__("peft")
    base = tiny_dit()
    base.load_state_dict(state)
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0,
        target_modules=r".*blocks\.\d+\.((self_attn|cross_attn)\.[qkvo]|ffn\.[02])",
    )  # fmt: skip
    model = peft.get_peft_model(_WanDiffusionWrapper(base), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return model, {k: v.clone() for k, v in peft.get_peft_model_state_dict(model).items()}


def peft_merged_state(model) -> dict[str, torch.Tensor]:
    """PEFT's own merge (merge_and_unload on a copy), in Wan key names."""
    merged = copy.deepcopy(model).merge_and_unload().model
    return {k: v.clone() for k, v in merged.state_dict().items()}


def write_kohya_lora(path: Path, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float) -> Path:
    """ComfyUI/kohya-style LoRA safetensors: `diffusion_model.<module>.lora_down/lora_up.weight` + `.alpha`."""
    out = {}
    for module, (down, up) in pairs.items():
        out[f"diffusion_model.{module}.lora_down.weight"] = down.clone()
        out[f"diffusion_model.{module}.lora_up.weight"] = up.clone()
        out[f"diffusion_model.{module}.alpha"] = torch.tensor(float(alpha))
    save_file(out, str(path))
    return path


# --- umT5 ----------------------------------------------------------------------------------------------------------


def hf_t5_model(state: dict):
    """transformers UMT5EncoderModel of the tiny config holding `state` (see `_tiny_t5.hf_model`)."""
    return hf_model(TINY_T5, state)


def write_comfyui_t5(path: Path, state: dict, *, fp8_scaled: bool = False, tokenizer: bytes | None = None) -> Path:
    """ComfyUI `umt5_xxl_fp16.safetensors` / `umt5_xxl_fp8_e4m3fn_scaled.safetensors`: Hugging Face names, the
    SentencePiece model embedded as a `spiece_model` uint8 tensor; fp8_scaled: e4m3 linears with a per-tensor
    `scale_weight` and the `scaled_fp8` marker."""
    hf = {k: v.detach().clone() for k, v in hf_t5_model(state).state_dict().items()}
    out = {}
    for key, value in hf.items():
        linear = re.search(r"\.(SelfAttention\.[qkvo]|DenseReluDense\.(wi_0|wi_1|wo))\.weight$", key)
        if fp8_scaled and linear:
            scale = value.abs().max().float() / 448.0
            out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
            continue
        out[key] = value.to(torch.float16)
    if fp8_scaled:
        out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    if tokenizer is not None:
        out["spiece_model"] = torch.frombuffer(bytearray(tokenizer), dtype=torch.uint8)
    save_file(out, str(path))
    return path


# --- VAE -----------------------------------------------------------------------------------------------------------


def wan_to_diffusers_vae_key(key: str, num_res_blocks: int = 2) -> str:
    """Wan VAE name -> diffusers AutoencoderKLWan name (parity.md §1.3)."""
    for pattern, replacement in (
        (r"^conv1\.", "quant_conv."), (r"^conv2\.", "post_quant_conv."),
        (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."), (r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out."),
        (r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out."),
        (r"^(encoder|decoder)\.middle\.0\.", r"\1.mid_block.resnets.0."),
        (r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0."),
        (r"^(encoder|decoder)\.middle\.2\.", r"\1.mid_block.resnets.1."),
        (r"^encoder\.downsamples\.", "encoder.down_blocks."),
    ):  # fmt: skip
        key = re.sub(pattern, replacement, key)
    up = re.match(r"^decoder\.upsamples\.(\d+)\.", key)
    if up:
        block, j = divmod(int(up[1]), num_res_blocks + 2)
        inner = f"resnets.{j}" if j <= num_res_blocks else "upsamplers.0"
        key = f"decoder.up_blocks.{block}.{inner}." + key[up.end() :]
    for old, new in (
        (".residual.0.", ".norm1."), (".residual.2.", ".conv1."), (".residual.3.", ".norm2."),
        (".residual.6.", ".conv2."), (".shortcut.", ".conv_shortcut."),
    ):  # fmt: skip
        key = key.replace(old, new)
    return key


def write_diffusers_vae(folder: Path, state: dict) -> Path:
    """diffusers `AutoencoderKLWan.save_pretrained` of the same weights (loaded strict, proving the key map)."""
    from diffusers import AutoencoderKLWan

    cfg = TINY_VAE
    model = AutoencoderKLWan(
        base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temporal_downsample),
    )  # fmt: skip
    model.load_state_dict({wan_to_diffusers_vae_key(k): v for k, v in state.items()}, strict=True)
    model.save_pretrained(folder)
    return folder
