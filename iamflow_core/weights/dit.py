"""Loading the Wan2.1-T2V DiT (`CausalWanDiT`) from any layout of `layouts`, with a LoRA merged and FP8 kept or
made at load.

The configuration comes from the tensor shapes, confirmed by a folder's config.json or the file's metadata where
they say anything. quantization "auto" keeps the FP8 weights of a file as FP8 (`<m>.weight` float8 +
`<m>.weight_scale` [out, 1] float32); "fp8" also quantizes the self-attention q/k/v, cross-attention q and the
FFN's first linear (whose inputs come quantized from the kernel before them) stored in higher precision; "off"
dequantizes every FP8 weight. FP8 linears become `FP8Linear`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from ..config import DiTConfig
from ..models.dit import CausalWanDiT
from ..models.fp8 import FP8Linear, scaled_mm_supported
from .build import assign, meta_shapes, parameters_on_meta
from .finite import check_finite, check_lora_finite
from .layouts import EXPECTED, WAN_1_3B, dit_dims
from .lora import read_lora
from .plan import CheckpointInfo, Plan, block_indices, check_keys, checkpoint_info, make_plan, materialize
from .reading import CheckpointError, PathLike

logger = logging.getLogger(__name__)

Quantization = Literal["auto", "off", "fp8"]

WAN_HEAD_DIM = 128  # every released Wan2.1/2.2 DiT uses 128-dim heads

# Linears a file may store in FP8 (kept as FP8Linear with "auto"): attention projections (as IAMFlow's release) and
# the FFN (as ComfyUI's fp8_scaled files).
_FP8_TARGET = re.compile(r"blocks\.\d+\.(?:(?:self_attn|cross_attn)\.[qkvo]|ffn\.[02])")
# Linears that quantization="fp8" makes FP8: those whose input the kernel before them quantizes in the same pass
# (self-attention q, k, v and the FFN's first linear after the modulation, cross-attention q after its norm). The
# others would need a kernel of their own to quantize their input, which costs what the FP8 GEMM saves: measured
# on an H200, GELU + per-row quantization of the FFN's 8960-wide hidden rows takes 0.13-0.15 ms against 0.05 ms
# for the GELU alone, and the FFN's second GEMM saves ~0.07 ms.
_FP8_QUANTIZE = re.compile(r"blocks\.\d+\.(?:self_attn\.[qkv]|cross_attn\.q|ffn\.0)")

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    key = message.split(", first seen in ")[0]
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


# --- the configuration, from the shapes ----------------------------------------------------------------------------


def _dit_config(plan: Plan, config: dict) -> DiTConfig:
    """DiTConfig from tensor shapes, confirmed by the folder's config.json / the file's metadata if present."""
    if "patch_embedding.weight" not in plan.refs:
        raise CheckpointError(f"{plan.path} lacks patch_embedding.weight; {EXPECTED['dit']}")
    dim, in_channels, out_channels, patch = dit_dims(plan.shapes())
    plan.refuse()  # before anything else: a 14B file needs no more checks
    required = ("text_embedding.0.weight", "time_embedding.0.weight", "head.head.weight", "blocks.0.ffn.0.weight")
    missing = [k for k in required if k not in plan.refs]
    if missing:
        raise CheckpointError(f"{plan.path} lacks {', '.join(missing)}; {EXPECTED['dit']}")
    layers = block_indices(plan)
    if layers != list(range(len(layers))):
        gaps = sorted(set(range(layers[-1] + 1)) - set(layers))
        raise CheckpointError(f"{plan.path}: transformer blocks {gaps[:5]} are missing (found up to {layers[-1]})")
    heads = _dit_heads(plan, config, dim)
    detected = {
        "dim": dim, "ffn_dim": plan.shape("blocks.0.ffn.0.weight")[0], "num_heads": heads, "num_layers": len(layers),
        "in_channels": in_channels, "out_channels": out_channels, "text_dim": plan.shape("text_embedding.0.weight")[1],
        "freq_dim": plan.shape("time_embedding.0.weight")[1], "patch_size": patch,
    }  # fmt: skip
    _confirm(plan.path, detected, _folder_dims(plan.path, config))
    try:
        cfg = DiTConfig(**detected)
    except ValueError as exc:
        raise CheckpointError(f"{plan.path}: the weights give an impossible DiT configuration: {exc}") from exc
    differs = [f"{k} {getattr(cfg, k)}" for k in detected if getattr(cfg, k) != getattr(WAN_1_3B, k)]
    if differs:  # allowed (tests use tiny models), but say so once
        _warn_once(f"DiT dimensions differ from Wan2.1-T2V-1.3B ({', '.join(differs)}), first seen in {plan.path}")
    return cfg


def _dit_heads(plan: Plan, config: dict, dim: int) -> int:
    for value in (
        plan.source.metadata.get("iamflow.num_heads"),
        config.get("num_heads"),
        config.get("num_attention_heads"),
    ):
        if value is not None:
            return int(value)
    if dim % WAN_HEAD_DIM:
        raise CheckpointError(
            f"{plan.path}: cannot tell the number of attention heads: dim {dim} is not a multiple of Wan's head "
            f"size {WAN_HEAD_DIM} and neither config.json nor the file's metadata (iamflow.num_heads) says it"
        )
    return dim // WAN_HEAD_DIM


def _folder_dims(path: Path, config: dict) -> dict:
    """DiTConfig fields stated by a Wan (`dim`, `in_dim`, ...) or diffusers (`num_attention_heads`, ...) config."""
    if config.get("model_type") not in (None, "t2v") or config.get("image_dim") or config.get("added_kv_proj_dim"):
        kind = config.get("model_type", "i2v")
        raise CheckpointError(f"{path}: config.json describes a '{kind}' Wan model; IAMFlow needs the t2v DiT")
    names = {
        "dim": "dim", "ffn_dim": "ffn_dim", "freq_dim": "freq_dim", "in_dim": "in_channels", "out_dim": "out_channels",
        "num_heads": "num_heads", "num_layers": "num_layers", "text_dim": "text_dim", "in_channels": "in_channels",
        "out_channels": "out_channels", "num_attention_heads": "num_heads",
    }  # fmt: skip
    dims = {ours: config[theirs] for theirs, ours in names.items() if theirs in config}
    if "num_attention_heads" in config and "attention_head_dim" in config:
        dims["dim"] = config["num_attention_heads"] * config["attention_head_dim"]
    if "patch_size" in config:
        dims["patch_size"] = tuple(config["patch_size"])
    return dims


def _confirm(path: Path, detected: dict, stated: dict) -> None:
    clashes = [
        f"{k}={stated[k]} (weights: {detected[k]})" for k in stated if k in detected and stated[k] != detected[k]
    ]
    if clashes:
        raise CheckpointError(f"{path}: config.json disagrees with the weights: {', '.join(clashes)}")


def _describe(cfg: DiTConfig) -> str:
    return f"dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads, ffn {cfg.ffn_dim}"


# --- reading and loading -------------------------------------------------------------------------------------------


def _fp8_modules(plan: Plan, expected: dict[str, tuple[int, ...]], quantization: str) -> set[str]:
    linears = {k[: -len(".weight")] for k in expected if k.endswith(".weight")}
    stored = {
        m for m in linears if _FP8_TARGET.fullmatch(m) and m + ".weight" in plan.refs and plan.is_fp8(m + ".weight")
    }
    if quantization == "fp8":
        return stored | {m for m in linears if _FP8_QUANTIZE.fullmatch(m)}
    if quantization == "auto":
        return stored
    return set()


def read_dit_state_dict(
    path: PathLike, *, lora: PathLike | None = None, lora_scale: float = 1.0, dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu", quantization: Quantization = "auto", use_ema: bool = True,
) -> tuple[DiTConfig, dict[str, torch.Tensor], CheckpointInfo]:  # fmt: skip
    """Read a Wan2.1 DiT checkpoint of any supported layout into Wan key names.

    path: a file (.safetensors, .pt, .pth) or a folder (Wan or diffusers). use_ema: prefer `generator_ema` over
    `generator` in training checkpoints. dtype: cast every floating tensor except FP8 weights and their scales
    (None keeps the stored dtypes). quantization: "auto" keeps FP8 weights of the file as FP8 (`<m>.weight` float8
    + `<m>.weight_scale` [out, 1] float32) and dequantizes everything else; "fp8" also quantizes the self-attention
    q/k/v, cross-attention q and FFN-in linears stored in higher precision; "off" dequantizes all FP8 weights.
    Returns (config detected from the shapes, state dict, info). Raises CheckpointError for unusable files,
    weights with NaN or inf included.
    """
    if quantization not in ("auto", "off", "fp8"):
        raise ValueError(f"quantization must be 'auto', 'off' or 'fp8', got {quantization!r}")
    entries = ("generator_ema", "generator") if use_ema else ("generator", "generator_ema")
    plan, config = make_plan(path, "dit", prefer=(*entries, "model", "state_dict", "module"))
    cfg = _dit_config(plan, config)
    with parameters_on_meta():
        expected = meta_shapes(CausalWanDiT(cfg))
    fp8_modules = _fp8_modules(plan, expected, quantization)
    scale_keys = {m + ".weight_scale": (expected[m + ".weight"][0], 1) for m in fp8_modules}
    expected |= scale_keys
    check_keys(plan, expected, scale_keys, f"a Wan2.1 DiT with {_describe(cfg)}")
    lora_pairs = read_lora(lora, lora_scale, expected) if lora is not None else {}
    check_lora_finite(lora, lora_pairs)
    state = materialize(plan, fp8_modules, lora_pairs, dtype, torch.device(device))
    check_finite(plan, state)
    info = checkpoint_info(
        plan, fp8_modules=len(fp8_modules), lora=None if lora is None else str(lora), lora_modules=len(lora_pairs)
    )
    logger.info("read DiT %s: %s, %s", plan.path, info.layout, _describe(cfg))
    return cfg, state, info


def load_dit(
    path: PathLike, *, lora: PathLike | None = None, lora_scale: float = 1.0, dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu", quantization: Quantization = "auto", fp8_matmul: bool | None = None,
    use_ema: bool = True,
) -> CausalWanDiT:  # fmt: skip
    """Load a Wan2.1-T2V DiT of any supported layout, optionally merging a LoRA and quantizing to FP8.

    lora: a PEFT LoRA file or folder, merged as W += lora_scale * alpha / rank * B @ A (alpha from
    `adapter_config.json`, else `.alpha` keys, else alpha = rank). quantization: see `read_dit_state_dict`; FP8
    linears become `FP8Linear`. fp8_matmul: run those as W8A8 FP8 matmuls (`torch._scaled_mm`, CUDA compute
    capability 8.9+, bf16 compute), each input quantized per token by the kernel that makes it; False runs them
    with dequantized weights; None (default) picks FP8 matmuls where the GPU has them.
    The model is returned in eval mode without gradients; `model.load_info` says what was read.
    """
    cfg, state, info = read_dit_state_dict(
        path, lora=lora, lora_scale=lora_scale, dtype=dtype, device=device, quantization=quantization,
        use_ema=use_ema,
    )  # fmt: skip
    use_scaled_mm = _fp8_matmuls(device, fp8_matmul)
    with parameters_on_meta():
        model = CausalWanDiT(cfg)
    model.requires_grad_(False)
    for key in state:
        if key.endswith(".weight_scale"):
            _swap_fp8(model, key[: -len(".weight_scale")], use_scaled_mm)
    assign(model, state, Path(info.path), torch.device(device))
    model.load_info = info
    return model


def _fp8_matmuls(device: torch.device | str, fp8_matmul: bool | None) -> bool:
    """Whether FP8 linears on `device` run FP8 matmuls: where the GPU has them, unless fp8_matmul is False."""
    supported = scaled_mm_supported(device)
    if fp8_matmul and not supported:
        _warn_once(f"fp8_matmul needs a CUDA GPU with compute capability 8.9+; {device} runs FP8 dequantized")
    return supported and fp8_matmul is not False


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module.requires_grad_(False))


def _swap_fp8(model: nn.Module, name: str, use_scaled_mm: bool) -> None:
    linear = model.get_submodule(name)
    fp8 = FP8Linear(
        linear.in_features, linear.out_features, linear.bias is not None, device="meta", use_scaled_mm=use_scaled_mm
    )
    _replace(model, name, fp8)


def quantize_dit(model: CausalWanDiT, *, fp8_matmul: bool | None = None) -> CausalWanDiT:
    """Quantize a loaded DiT in place as `quantization="fp8"` does at load: the linears whose inputs are quantized by
    the kernel before them become `FP8Linear` (per-output-channel scales), FP8 matmuls as `load_dit`'s `fp8_matmul`.
    For models built in memory (benchmarks, tests); files go through `load_dit`. Returns the model."""
    use_scaled_mm = _fp8_matmuls(model.device, fp8_matmul)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and _FP8_QUANTIZE.fullmatch(name):
            _replace(model, name, FP8Linear.from_linear(module, use_scaled_mm=use_scaled_mm))
    model.release_graphs()
    return model
