"""Reading checkpoint files: the only module of the library that does.

Every layout users already have is accepted, and recognised from its keys and tensor shapes, never from its name:

- DiT: ComfyUI repackaged safetensors (bare keys or `model.diffusion_model.`, bf16/fp16, also ComfyUI
  `fp8_scaled`), the original Wan2.1 folder (`config.json` + one or sharded safetensors), diffusers
  `WanTransformer3DModel` weights, Self-Forcing / LongLive / MemFlow training checkpoints (`.pt` holding
  `generator_ema` / `generator`, keys prefixed `model.`, FSDP wrappers anywhere) and IAMFlow's
  `iamflow_fp8.safetensors` (attention projections in float8_e4m3fn with per-output-channel `weight_scale`).
  PEFT LoRA files are merged at load.
- umT5 encoder: Wan's `models_t5_umt5-xxl-enc-bf16.pth` and the Hugging Face-named files of ComfyUI
  (`umt5_xxl_fp16.safetensors`, `umt5_xxl_fp8_e4m3fn_scaled.safetensors`, dequantized at load).
- VAE: Wan's `Wan2.1_VAE.pth`, ComfyUI's `wan_2.1_vae.safetensors`, diffusers `AutoencoderKLWan` weights.

Model dimensions come from the shapes (configs in `config.py`), so tiny test checkpoints take the same path as
full-size ones. Files are read lazily: shapes are checked before any tensor data is read, each tensor is converted
and cast on its own, and models are built without memory (parameters on the meta device) and then take the loaded
tensors as they are (`assign=True`). `.pt`/`.pth` files are only read with `torch.load(weights_only=True)`.
Every problem with a file raises `CheckpointError`, naming the file, what was found and what was expected.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from .config import DiTConfig, T5Config, VAEConfig
from .models.dit import CausalWanDiT
from .models.fp8 import FP8Linear, quantize_rows_fp8, scaled_mm_supported
from .models.t5 import UMT5Encoder
from .models.vae import WanVAE

logger = logging.getLogger(__name__)

PathLike = str | Path
Quantization = Literal["auto", "off", "fp8"]

WAN_HEAD_DIM = 128  # every released Wan2.1/2.2 DiT uses 128-dim heads
WAN_1_3B = DiTConfig()
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip

# Linears stored as FP8Linear when quantizing: attention projections (as IAMFlow's release) and the FFN (which the
# release's name filter misses; quantizing it too is where most of the linear FLOPs are).
_FP8_TARGET = re.compile(r"blocks\.\d+\.(?:(?:self_attn|cross_attn)\.[qkvo]|ffn\.[02])")
# Wrappers that training code puts anywhere in key names (FSDP, activation checkpointing, torch.compile).
_WRAPPER_PARTS = re.compile(r"(?:^|(?<=\.))(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")
# Keys that carry quantization bookkeeping rather than weights: "<module>.<suffix>".
_SCALE_SUFFIXES = (".weight_scale", ".scale_weight")
_DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
_DROPPED_KEYS = ("scaled_fp8", "spiece_model")

_warned: set[str] = set()


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unknown, truncated, unsafe, the wrong model, or mismatched."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What was read and how it was recognised.

    layout: "wan" (original Wan key names: ComfyUI repackaged files, Wan folders and `.pth` files, training
    checkpoints), "diffusers", "hf-umt5" (Hugging Face T5 names, as ComfyUI's text-encoder files), each with
    "-fp8" appended when float8 weights were found.
    """

    path: str
    component: str  # "dit" | "t5" | "vae"
    layout: str
    files: tuple[str, ...]
    key_prefix: str = ""  # stripped from every key, e.g. "model." or "model.diffusion_model."
    state_key: str | None = None  # the sub-dictionary of a training checkpoint, e.g. "generator_ema"
    fp8: bool = False  # float8 weights in the file
    fp8_modules: int = 0  # linears kept in FP8 (FP8Linear) after loading
    lora: str | None = None
    lora_modules: int = 0


# --- reading files, lazily -------------------------------------------------------------------------------------


@dataclass
class _Source:
    """The tensors of a checkpoint (one file or the shards of a folder); shapes are known before data is read."""

    path: Path
    files: list[Path]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    read: Callable[[str], torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    state_key: str | None = None


def _size(path: Path) -> str:
    return f"{path.stat().st_size} bytes" if path.is_file() else "a folder"


def _open_safetensors(files: list[Path], path: Path) -> _Source:
    handles, owner, shapes, dtypes, metadata = [], {}, {}, {}, {}
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
            metadata.update(handle.metadata() or {})
            names = handle.keys()  # safe_open handles are not iterable
            for key in names:
                tensor_slice = handle.get_slice(key)
                shapes[key] = tuple(tensor_slice.get_shape())
                dtypes[key] = _safetensors_dtype(tensor_slice.get_dtype(), key, file)
                owner[key] = handle
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"the file looks truncated or is not a safetensors file: {file} ({_size(file)}): {exc}"
            ) from exc
        handles.append(handle)

    def read(key: str) -> torch.Tensor:
        try:
            return owner[key].get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read tensor {key} from {path}; the file may be damaged: {exc}") from exc

    return _Source(path, files, shapes, dtypes, read, metadata)


def _safetensors_dtype(name: str, key: str, file: Path) -> torch.dtype:
    if name not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{file}: tensor {key} has dtype {name}, which IAMFlow cannot read")
    return _SAFETENSORS_DTYPES[name]


def _torch_load(file: Path) -> object:
    """torch.load that only accepts plain tensors and containers, never code."""
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files written by torch < 1.6 (legacy format) cannot be memory-mapped.
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{file} contains Python objects that are not plain tensors and is refused for safety "
            f"(torch.load(weights_only=True) would have to run code from the file): {exc}"
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"the file looks truncated or is not a PyTorch checkpoint: {file} ({_size(file)}): {exc}"
        ) from exc


def _tensor_dict(obj: object, file: Path, prefer: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict inside a torch.load result: the object itself, or its first `prefer` entry."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file} holds a {type(obj).__name__}; expected a dictionary of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors:
        return tensors, None
    for key in prefer:
        if isinstance(obj.get(key), dict):
            inner, _ = _tensor_dict(obj[key], file, ())
            return inner, key
    raise CheckpointError(
        f"{file} holds no tensors at its top level and none of {', '.join(prefer) or 'the known entries'}; "
        f"its entries are: {', '.join(map(str, list(obj)[:12]))}"
    )


def _open_torch(file: Path, prefer: tuple[str, ...]) -> _Source:
    tensors, state_key = _tensor_dict(_torch_load(file), file, prefer)
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    dtypes = {k: t.dtype for k, t in tensors.items()}
    return _Source(file, [file], shapes, dtypes, tensors.__getitem__, {}, state_key)


def _open(files: list[Path], path: Path, prefer: tuple[str, ...] = ()) -> _Source:
    if all(f.suffix == ".safetensors" for f in files):
        return _open_safetensors(files, path)
    if len(files) == 1:
        return _open_torch(files[0], prefer)
    raise CheckpointError(f"{path}: cannot combine several non-safetensors files: {[f.name for f in files]}")


# Where each component lives inside a folder: file name patterns in the folder itself, then a subfolder
# (diffusers pipelines keep each component in its own subfolder).
_FOLDER_PATTERNS = {
    "dit": (("diffusion_pytorch_model*.safetensors", "*.safetensors"), "transformer"),
    "t5": (("*t5*.pth", "*t5*.safetensors", "*.safetensors"), "text_encoder"),
    "vae": (("*vae*.pth", "*vae*.safetensors", "*.safetensors"), "vae"),
}
_EXPECTED_FILES = {
    "dit": "config.json + diffusion_pytorch_model.safetensors (or sharded *.safetensors with an index json)",
    "t5": "models_t5_umt5-xxl-enc-bf16.pth or a umT5 .safetensors file",
    "vae": "Wan2.1_VAE.pth or wan_2.1_vae.safetensors",
}


def _resolve(path: PathLike, component: str) -> tuple[Path, list[Path], dict]:
    """(path, the weight files, the folder's config.json or {}) of a file or folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"no such file or folder: {path}")
    if path.is_file():
        return path, [path], {}
    patterns, subfolder = _FOLDER_PATTERNS[component]
    for folder in (path, path / subfolder):
        files = _folder_files(folder, patterns)
        if files:
            config_file = folder / "config.json"
            return path, files, _read_json(config_file) if config_file.is_file() else {}
    raise CheckpointError(
        f"no {component.upper()} weights found in the folder {path}: expected {_EXPECTED_FILES[component]}"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def _folder_files(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    if not folder.is_dir():
        return []
    for index in sorted(folder.glob("*.safetensors.index.json")):
        weight_map = _read_json(index).get("weight_map", {})
        return sorted({folder / name for name in weight_map.values()})
    for pattern in patterns:  # case-insensitive: Wan2.1_VAE.pth
        files = sorted(p for p in folder.iterdir() if p.is_file() and fnmatch(p.name.lower(), pattern))
        if files:
            return files
    return []


# --- recognising what a file holds -----------------------------------------------------------------------------

# (component, key format, a key that only this layout has); the key's prefix in the file is the layout's prefix.
_SIGNATURES = (
    ("dit", "diffusers", "condition_embedder.time_proj.weight"),
    ("dit", "wan", "patch_embedding.weight"),
    ("dit", "wan", "head.modulation"),
    ("t5", "wan", "token_embedding.weight"),
    ("t5", "hf", "encoder.block.0.layer.0.SelfAttention.q.weight"),
    ("vae", "diffusers", "decoder.mid_block.resnets.0.norm1.gamma"),
    ("vae", "wan", "decoder.middle.0.residual.0.gamma"),
)
_LABELS = {"dit": "Wan DiT", "t5": "umT5 text-encoder", "vae": "Wan VAE", "lora": "LoRA"}
_EXPECTED = {
    "dit": "expected a Wan2.1 DiT with keys like blocks.0.self_attn.q.weight and patch_embedding.weight",
    "t5": (
        "expected a umT5-XXL encoder with keys like blocks.0.attn.q.weight (Wan) or "
        "encoder.block.0.layer.0.SelfAttention.q.weight (Hugging Face / ComfyUI)"
    ),
    "vae": "expected a Wan2.1 VAE with keys like decoder.middle.0.residual.0.gamma and encoder.conv1.weight",
}
_LORA_KEY = re.compile(r"\.(?:lora_[AB]|lora_down|lora_up)(?:\.[^.]+)?\.weight$")


def _normalize(key: str) -> str:
    return _WRAPPER_PARTS.sub("", key)


def _examples(keys, n: int = 3) -> str:
    return ", ".join(sorted(keys)[:n])


def _survey(names: list[str]) -> list[tuple[str, str, str]]:
    """Every (component, key format, prefix) whose signature key appears among `names`."""
    found = []
    for component, key_format, marker in _SIGNATURES:
        for name in names:
            if name.endswith(marker) and (len(name) == len(marker) or name[-len(marker) - 1] == "."):
                entry = (component, key_format, name[: -len(marker)])
                if entry not in found and not any(f[0] == component and f[2] == entry[2] for f in found):
                    found.append(entry)
    return found


def _locate(source: _Source, names: dict[str, str], component: str) -> tuple[str, str]:
    """(key format, prefix) of `component` in the source, or a CheckpointError saying what the file is."""
    surveyed = _survey(list(names))
    for found_component, key_format, prefix in surveyed:
        if found_component == component:
            return key_format, prefix
    path = source.path
    where = f" (from its '{source.state_key}' entry)" if source.state_key else ""
    lora_keys = [n for n in names if _LORA_KEY.search(n)]
    if lora_keys:
        raise CheckpointError(
            f"{path}{where} is a LoRA, not a full model: found {len(lora_keys)} LoRA keys such as "
            f"{_examples(lora_keys, 2)}; pass it as `lora=` together with the base DiT. {_EXPECTED[component]}"
        )
    if surveyed:
        other, _, prefix = surveyed[0]
        keys = [n for n in names if n.startswith(prefix)]
        raise CheckpointError(
            f"{path}{where} is a {_LABELS[other]} file, not a {_LABELS[component]} file: found {len(keys)} "
            f"{_LABELS[other]} keys such as {_examples(k[len(prefix) :] for k in keys)}; {_EXPECTED[component]}"
        )
    raise CheckpointError(
        f"{path}{where} is not a model IAMFlow knows: found {len(names)} keys such as {_examples(names)}; "
        f"{_EXPECTED[component]}"
    )


# --- key maps to the Wan names our modules use -----------------------------------------------------------------

# diffusers WanTransformer3DModel -> Wan2.1 (inverse of diffusers' convert_wan_to_diffusers table).
_DIFFUSERS_DIT = (
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"\.norm2\.", ".norm3."),  # diffusers' norm2 is the affine cross-attention norm, Wan's norm3
    (r"\.attn1\.to_out\.0\.", ".self_attn.o."),
    (r"\.attn1\.to_([qkv])\.", r".self_attn.\1."),
    (r"\.attn1\.norm_([qk])\.", r".self_attn.norm_\1."),
    (r"\.attn2\.to_out\.0\.", ".cross_attn.o."),
    (r"\.attn2\.to_([qkv])\.", r".cross_attn.\1."),
    (r"\.attn2\.norm_([qk])\.", r".cross_attn.norm_\1."),
    (r"\.attn2\.add_([kv])_proj\.", r".cross_attn.\1_img."),  # I2V only: kept so the I2V check can see it
)
# Hugging Face (ComfyUI) UMT5 encoder -> Wan T5 encoder (parity.md §2.1).
_HF_T5 = (
    (r"^(?:shared|encoder\.embed_tokens)\.weight$", "token_embedding.weight"),
    (r"^encoder\.final_layer_norm\.", "norm."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.",
     r"blocks.\1.pos_embedding.embedding."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
)  # fmt: skip
# diffusers AutoencoderKLWan -> Wan VAE (parity.md §1.3); the decoder's up_blocks need the block count, see below.
_DIFFUSERS_VAE = (
    (r"^quant_conv\.", "conv1."),
    (r"^post_quant_conv\.", "conv2."),
    (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
    (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
    (r"^encoder\.down_blocks\.", "encoder.downsamples."),
)
_DIFFUSERS_RESIDUAL = (
    (r"\.norm1\.gamma$", ".residual.0.gamma"),
    (r"\.conv1\.", ".residual.2."),
    (r"\.norm2\.gamma$", ".residual.3.gamma"),
    (r"\.conv2\.", ".residual.6."),
    (r"\.conv_shortcut\.", ".shortcut."),
)


def _rename(key: str, table) -> str:
    for pattern, replacement in table:
        key = re.sub(pattern, replacement, key)
    return key


def _diffusers_vae_key(key: str, resnets_per_block: int) -> str:
    """resnets_per_block: residual blocks per decoder level (num_res_blocks + 1)."""
    key = _rename(key, _DIFFUSERS_VAE)
    up = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.", key)
    if up:
        block, resnet = int(up[1]), up[3]
        index = block * (resnets_per_block + 1) + (int(resnet) if resnet is not None else resnets_per_block)
        key = f"decoder.upsamples.{index}." + key[up.end() :]
    if re.match(r"^(encoder\.downsamples\.\d+|(encoder|decoder)\.middle\.[02]|decoder\.upsamples\.\d+)\.", key):
        head, tail = re.match(r"^((?:[^.]+\.){2}\d+)(\..*)$", key).groups()
        key = head + _rename(tail, _DIFFUSERS_RESIDUAL)
    return key


# --- a read plan: final key -> source tensor, checked before data is read --------------------------------------


@dataclass
class _Plan:
    source: _Source
    component: str
    key_format: str
    prefix: str
    refs: dict[str, str]  # our key -> source key
    scales: dict[str, str]  # our weight key -> source key of its FP8 scale

    @property
    def path(self) -> Path:
        return self.source.path

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.shapes[self.refs[key]]

    def is_fp8(self, key: str) -> bool:
        return self.source.dtypes[self.refs[key]] in FP8_DTYPES

    def read(self, key: str) -> torch.Tensor:
        """The tensor as stored, FP8 weights dequantized to float32."""
        tensor = self.source.read(self.refs[key])
        if tensor.dtype not in FP8_DTYPES:
            return tensor
        scale = self._scale(key)
        return tensor.float() if scale is None else tensor.float() * _broadcast_scale(scale, tensor.shape)

    def read_fp8(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """An FP8 weight as stored with its per-output-channel scale [out, 1] float32."""
        tensor = self.source.read(self.refs[key])
        scale = self._scale(key)
        out = tensor.shape[0]
        scale = torch.ones(out, 1) if scale is None else _broadcast_scale(scale, (out, 1)).expand(out, 1)
        return tensor, scale.float().contiguous()

    def _scale(self, key: str) -> torch.Tensor | None:
        return self.source.read(self.scales[key]).float() if key in self.scales else None


def _broadcast_scale(scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if scale.numel() == 1:
        return scale.reshape(())
    return scale.reshape(shape[0], *([1] * (len(shape) - 1)))


def _plan(path: PathLike, component: str, prefer: tuple[str, ...] = ()) -> tuple[_Plan, dict]:
    """Open a checkpoint, find `component` in it and map its keys to our names. Returns (plan, folder config)."""
    path, files, config = _resolve(path, component)
    source = _open(files, path, prefer)
    names: dict[str, str] = {}
    for raw in source.shapes:
        name = _normalize(raw)
        if name in names:
            raise CheckpointError(f"{path}: keys {names[name]} and {raw} name the same tensor")
        names[name] = raw
    key_format, prefix = _locate(source, names, component)
    resnets_per_block = sum(
        1 for n in names if re.match(re.escape(prefix) + r"decoder\.up_blocks\.0\.resnets\.\d+\.conv1\.weight$", n)
    )
    plan = _Plan(source, component, key_format, prefix, {}, {})
    for name, raw in names.items():
        if not name.startswith(prefix) or name.endswith(_DROPPED_SUFFIXES) or name[len(prefix) :] in _DROPPED_KEYS:
            continue
        key = name[len(prefix) :]
        if key_format == "diffusers" and component == "dit":
            key = _rename(key, _DIFFUSERS_DIT)
        elif key_format == "diffusers" and component == "vae":
            key = _diffusers_vae_key(key, resnets_per_block)
        elif key_format == "hf":
            key = _rename(key, _HF_T5)
        scale_suffix = next((s for s in _SCALE_SUFFIXES if key.endswith(s)), None)
        if scale_suffix:
            plan.scales[key[: -len(scale_suffix)] + ".weight"] = raw
        elif key in plan.refs:  # HF T5 files may hold the tied embedding twice
            if source.shapes[plan.refs[key]] != source.shapes[raw]:
                raise CheckpointError(f"{path}: {plan.refs[key]} and {raw} both map to {key} with different shapes")
        else:
            plan.refs[key] = raw
    for key in plan.scales:
        if key not in plan.refs or not plan.is_fp8(key):
            raise CheckpointError(f"{path}: {plan.scales[key]} is a scale for {key}, which is not a float8 weight")
    return plan, config


def _check_keys(
    plan: _Plan, expected: dict[str, tuple[int, ...]], extra: dict[str, tuple[int, ...]], what: str
) -> None:
    """Compare the plan (plus derived keys `extra`) with a model's state dict shapes; raise listing differences."""
    present = {key: plan.shape(key) for key in plan.refs} | extra
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    wrong = sorted(k for k in set(expected) & set(present) if tuple(expected[k]) != tuple(present[k]))
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {', '.join(missing[:4])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:4])}")
    if wrong:
        shown = "; ".join(f"{k}: file {list(present[k])}, model {list(expected[k])}" for k in wrong[:3])
        problems.append(f"{len(wrong)} tensors with wrong shapes, e.g. {shown}")
    raise CheckpointError(f"{plan.path} does not match {what}: {'; '.join(problems)}")


# --- building models without memory ----------------------------------------------------------------------------


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no init); buffers stay real, because non-persistent
    buffers (latent statistics, position tables) are not in checkpoints and must be computed at construction."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _meta_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _assign(model: nn.Module, state: dict[str, torch.Tensor], path: Path, device: torch.device) -> None:
    """load_state_dict(strict, assign) with failures as CheckpointError, then real buffers on `device`."""
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # _check_keys ran already, so this is unexpected; still never a raw traceback
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: {exc}") from exc
    model.to(device)  # moves the buffers built at construction; the parameters are there already
    if hasattr(model, "reset_buffers"):
        model.reset_buffers()
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__} kept tensors without data after loading {path}: {left[:5]}")
    model.eval()


def _build(cls: type[nn.Module], cfg, state: dict[str, torch.Tensor], info, device: torch.device | str) -> nn.Module:
    """Build `cls(cfg)` without memory, take the loaded tensors as they are, eval mode without gradients."""
    with _parameters_on_meta():
        model = cls(cfg)
    model.requires_grad_(False)
    _assign(model, state, Path(info.path), torch.device(device))
    model.load_info = info
    return model


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point() and tensor.dtype not in FP8_DTYPES:
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


def _warn_once(message: str) -> None:
    key = message.split(", first seen in ")[0]
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


# --- LoRA --------------------------------------------------------------------------------------------------------

_LORA_PART = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.[^.]+)?\.weight$")
_LORA_PREFIXES = ("base_model.model.", "model.", "diffusion_model.", "transformer.", "module.")


@dataclass(frozen=True)
class _LoraPair:
    down: torch.Tensor  # A [rank, in]
    up: torch.Tensor  # B [out, rank]
    factor: float  # lora_scale * alpha / rank

    def delta(self) -> torch.Tensor:
        """scale * (alpha / rank) * B @ A [out, in] in float32."""
        return self.factor * (self.up.float() @ self.down.float())


def _lora_module_name(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _LORA_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return _rename(name + ".", _DIFFUSERS_DIT)[:-1]  # diffusers-named LoRAs (attn1.to_q, ...) to Wan names


def _read_lora(path: PathLike, scale: float, base_shapes: dict[str, tuple[int, ...]]) -> dict[str, _LoraPair]:
    """A LoRA file as {our weight key: pair}. Accepts PEFT (`lora_A`/`lora_B`, optionally with an adapter name),
    kohya-style `lora_down`/`lora_up` + `alpha`, the `generator_lora` entry of LongLive/MemFlow `lora.pt`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"no such LoRA file or folder: {path}")
    files = [path]
    if path.is_dir():
        files = sorted(path.glob("adapter_model.safetensors")) or sorted(path.glob("adapter_model.bin"))
        if not files:
            raise CheckpointError(f"no LoRA found in the folder {path}: expected adapter_model.safetensors")
    source = _open(files, path, prefer=("generator_lora", "lora", "state_dict"))
    config = _adapter_config(files[0].parent)
    parts: dict[str, dict[str, str]] = {}
    alphas: dict[str, str] = {}
    unknown = []
    for raw in source.shapes:
        name = _normalize(raw)
        match = _LORA_PART.match(name)
        if match:
            kind = "down" if match["kind"] in ("lora_A", "lora_down") else "up"
            parts.setdefault(_lora_module_name(match["module"]), {})[kind] = raw
        elif name.endswith(".alpha"):
            alphas[_lora_module_name(name[: -len(".alpha")])] = raw
        else:
            unknown.append(raw)
    if unknown or not parts:
        found = f"keys such as {_examples(unknown)}" if unknown else "no lora_A/lora_B (or lora_down/lora_up) keys"
        raise CheckpointError(
            f"{path} is not a LoRA IAMFlow understands: found {found}; expected PEFT keys like "
            f"base_model.model.blocks.0.self_attn.q.lora_A.weight / .lora_B.weight"
        )
    no_base = sorted(m for m in parts if m + ".weight" not in base_shapes)
    if no_base:
        raise CheckpointError(
            f"{path}: {len(no_base)} LoRA modules match no weight of the DiT, e.g. {', '.join(no_base[:4])}; "
            f"expected module names like blocks.0.self_attn.q"
        )
    pairs = {}
    for module, kinds in parts.items():
        if set(kinds) != {"down", "up"}:
            raise CheckpointError(f"{path}: LoRA module {module} has only its {next(iter(kinds))} matrix")
        down, up = source.read(kinds["down"]), source.read(kinds["up"])
        out_in = base_shapes[module + ".weight"]
        if down.dim() != 2 or up.dim() != 2 or (up.shape[0], down.shape[1]) != out_in or up.shape[1] != down.shape[0]:
            raise CheckpointError(
                f"{path}: LoRA for {module} has A {list(down.shape)} and B {list(up.shape)}, which do not fit the "
                f"weight {list(out_in)} (expected A [rank, {out_in[-1]}], B [{out_in[0]}, rank])"
            )
        rank = down.shape[0]
        alpha = config.get("lora_alpha")
        if alpha is None:
            alpha = float(source.read(alphas[module])) if module in alphas else rank
        ratio = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        pairs[module + ".weight"] = _LoraPair(down, up, scale * ratio)
    return pairs


def _adapter_config(folder: Path) -> dict:
    """PEFT's adapter_config.json next to the LoRA file (lora_alpha, use_rslora), or {}."""
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        return {}
    config = _read_json(config_file)
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise CheckpointError(f"{config_file}: per-module alpha_pattern/rank_pattern are not supported")
    return config


# --- DiT ---------------------------------------------------------------------------------------------------------


def _dit_refusals(plan: _Plan, dim: int, out_channels: int, in_channels: int) -> None:
    """Refuse the Wan models that are not the 1.3B text-to-video DiT, each with its own message."""
    path, keys = plan.path, plan.refs
    if any(".cross_attn.k_img." in k for k in keys) or any(k.startswith("img_emb.") for k in keys):
        raise CheckpointError(
            f"{path} is a Wan image-to-video DiT (it has cross_attn.k_img / img_emb weights); "
            f"IAMFlow streams the text-to-video 1.3B model"
        )
    if any(k.startswith("vace_") for k in keys):
        raise CheckpointError(f"{path} is a Wan VACE DiT (vace_blocks); IAMFlow streams the text-to-video 1.3B model")
    if dim == 5120:
        layers = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
        raise CheckpointError(
            f"{path}: this is a Wan2.1 14B DiT (dim 5120, {layers} layers); IAMFlow streams the 1.3B model "
            f"(dim {WAN_1_3B.dim}, {WAN_1_3B.num_layers} layers)"
        )
    if out_channels == 48 or dim == 3072:
        raise CheckpointError(
            f"{path}: this is a Wan2.2 5B DiT (dim {dim}, {out_channels} latent channels); IAMFlow streams the "
            f"Wan2.1 1.3B model (dim {WAN_1_3B.dim}, 16 latent channels)"
        )
    if in_channels != out_channels:
        raise CheckpointError(
            f"{path}: the DiT takes {in_channels} input channels but predicts {out_channels}: an image- or "
            f"control-conditioned Wan model (Fun/InP/Control); IAMFlow needs the text-to-video DiT"
        )


def _dit_config(plan: _Plan, config: dict) -> DiTConfig:
    """DiTConfig from tensor shapes, confirmed by the folder's config.json / the file's metadata if present."""
    if "patch_embedding.weight" not in plan.refs:
        raise CheckpointError(f"{plan.path} lacks patch_embedding.weight; {_EXPECTED['dit']}")
    dim, in_channels, *patch = plan.shape("patch_embedding.weight")
    patch = tuple(patch)
    head = plan.shape("head.head.weight") if "head.head.weight" in plan.refs else (in_channels * math.prod(patch),)
    out_channels = head[0] // max(math.prod(patch), 1)
    _dit_refusals(plan, dim, out_channels, in_channels)  # before anything else: a 14B file needs no more checks
    required = ("text_embedding.0.weight", "time_embedding.0.weight", "head.head.weight", "blocks.0.ffn.0.weight")
    missing = [k for k in required if k not in plan.refs]
    if missing:
        raise CheckpointError(f"{plan.path} lacks {', '.join(missing)}; {_EXPECTED['dit']}")
    layers = sorted({int(k.split(".")[1]) for k in plan.refs if re.match(r"blocks\.\d+\.", k)})
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


def _dit_heads(plan: _Plan, config: dict, dim: int) -> int:
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


def _fp8_modules(plan: _Plan, expected: dict[str, tuple[int, ...]], quantization: str) -> set[str]:
    targets = {k[: -len(".weight")] for k in expected if k.endswith(".weight") and _FP8_TARGET.fullmatch(k[:-7])}
    if quantization == "fp8":
        return targets
    if quantization == "auto":
        return {m for m in targets if m + ".weight" in plan.refs and plan.is_fp8(m + ".weight")}
    return set()


def read_dit_state_dict(
    path: PathLike, *, lora: PathLike | None = None, lora_scale: float = 1.0, dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu", quantization: Quantization = "auto", use_ema: bool = True,
) -> tuple[DiTConfig, dict[str, torch.Tensor], CheckpointInfo]:  # fmt: skip
    """Read a Wan2.1 DiT checkpoint of any supported layout into Wan key names.

    path: a file (.safetensors, .pt, .pth) or a folder (Wan or diffusers). use_ema: prefer `generator_ema` over
    `generator` in training checkpoints. dtype: cast every floating tensor except FP8 weights and their scales
    (None keeps the stored dtypes). quantization: "auto" keeps FP8 weights of the file as FP8 (`<m>.weight` float8
    + `<m>.weight_scale` [out, 1] float32) and dequantizes everything else; "fp8" also quantizes the attention and
    FFN linears that are stored in higher precision; "off" dequantizes all FP8 weights.
    Returns (config detected from the shapes, state dict, info). Raises CheckpointError for unusable files.
    """
    if quantization not in ("auto", "off", "fp8"):
        raise ValueError(f"quantization must be 'auto', 'off' or 'fp8', got {quantization!r}")
    entries = ("generator_ema", "generator") if use_ema else ("generator", "generator_ema")
    plan, config = _plan(path, "dit", prefer=(*entries, "model", "state_dict", "module"))
    cfg = _dit_config(plan, config)
    with _parameters_on_meta():
        expected = _meta_shapes(CausalWanDiT(cfg))
    fp8_modules = _fp8_modules(plan, expected, quantization)
    scale_keys = {m + ".weight_scale": (expected[m + ".weight"][0], 1) for m in fp8_modules}
    expected |= scale_keys
    _check_keys(plan, expected, scale_keys, f"a Wan2.1 DiT with {_describe(cfg)}")
    lora_pairs = _read_lora(lora, lora_scale, expected) if lora is not None else {}
    state = _materialize(plan, fp8_modules, lora_pairs, dtype, torch.device(device))
    fp8_stored = any(plan.is_fp8(k) for k in plan.refs)
    layout = plan.key_format + ("-fp8" if fp8_stored else "")
    info = CheckpointInfo(
        path=str(plan.path), component="dit", layout=layout, files=tuple(map(str, plan.source.files)),
        key_prefix=plan.prefix, state_key=plan.source.state_key, fp8=fp8_stored, fp8_modules=len(fp8_modules),
        lora=None if lora is None else str(lora), lora_modules=len(lora_pairs),
    )  # fmt: skip
    logger.info("read DiT %s: %s, %s", plan.path, layout, _describe(cfg))
    return cfg, state, info


def _describe(cfg: DiTConfig) -> str:
    return f"dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads, ffn {cfg.ffn_dim}"


def _materialize(
    plan: _Plan, fp8_modules: set[str], lora: dict[str, _LoraPair], dtype: torch.dtype | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """Read every tensor once: dequantize or keep FP8, merge the LoRA in float32, cast, move."""
    state = {}
    for key in plan.refs:
        module = key.rsplit(".", 1)[0]
        pair = lora.get(key)
        if module in fp8_modules and key.endswith(".weight"):
            if plan.is_fp8(key) and pair is None:
                weight, scale = plan.read_fp8(key)
            else:  # a high-precision weight to quantize, or an FP8 weight that takes a LoRA first
                weight, scale = quantize_rows_fp8(_merged(plan, key, pair))
            state[key], state[module + ".weight_scale"] = weight.to(device), scale.to(device)
            continue
        tensor = _merged(plan, key, pair) if pair is not None else plan.read(key)
        stored = plan.source.dtypes[plan.refs[key]]
        target = dtype or (torch.bfloat16 if stored in FP8_DTYPES else stored)
        state[key] = _cast(tensor, target, device)
    return state


def _merged(plan: _Plan, key: str, pair: _LoraPair | None) -> torch.Tensor:
    weight = plan.read(key)
    return weight.float() + pair.delta() if pair is not None else weight


def load_dit(
    path: PathLike, *, lora: PathLike | None = None, lora_scale: float = 1.0, dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu", quantization: Quantization = "auto", fp8_matmul: bool | None = None,
    use_ema: bool = True,
) -> CausalWanDiT:  # fmt: skip
    """Load a Wan2.1-T2V DiT of any supported layout, optionally merging a LoRA and quantizing to FP8.

    lora: a PEFT LoRA file or folder, merged as W += lora_scale * alpha / rank * B @ A (alpha from
    `adapter_config.json`, else `.alpha` keys, else alpha = rank). quantization: see `read_dit_state_dict`; FP8
    linears become `FP8Linear`. fp8_matmul: run those as W8A8 FP8 matmuls (`torch._scaled_mm`, CUDA compute
    capability 8.9+); None picks the faster path, today the dequantized one (see below).
    The model is returned in eval mode without gradients; `model.load_info` says what was read.
    """
    cfg, state, info = read_dit_state_dict(
        path, lora=lora, lora_scale=lora_scale, dtype=dtype, device=device, quantization=quantization,
        use_ema=use_ema,
    )  # fmt: skip
    # None = the faster path: measured on an H100 (torch 2.11, eager), the per-token activation quantization costs
    # more than the FP8 GEMM saves (FFN 8960->1536 at 4680 tokens: 0.77 ms vs 0.29 ms dequantized, 0.17 ms bf16).
    use_scaled_mm = bool(fp8_matmul)
    if fp8_matmul and not scaled_mm_supported(device):
        _warn_once(f"fp8_matmul needs a CUDA GPU with compute capability 8.9+; {device} runs FP8 dequantized")
    with _parameters_on_meta():
        model = CausalWanDiT(cfg)
    model.requires_grad_(False)
    for key in state:
        if key.endswith(".weight_scale"):
            _swap_fp8(model, key[: -len(".weight_scale")], use_scaled_mm)
    _assign(model, state, Path(info.path), torch.device(device))
    model.load_info = info
    return model


def _swap_fp8(model: nn.Module, name: str, use_scaled_mm: bool) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    linear = getattr(parent, child)
    fp8 = FP8Linear(
        linear.in_features, linear.out_features, linear.bias is not None, device="meta", use_scaled_mm=use_scaled_mm
    )
    setattr(parent, child, fp8.requires_grad_(False))


# --- umT5 --------------------------------------------------------------------------------------------------------


def _t5_config(plan: _Plan) -> T5Config:
    required = ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight")
    missing = [k for k in required if k not in plan.refs]
    if missing:
        raise CheckpointError(f"{plan.path} lacks {', '.join(missing)}; {_EXPECTED['t5']}")
    if "blocks.0.pos_embedding.embedding.weight" not in plan.refs:
        raise CheckpointError(
            f"{plan.path} has no per-layer position bias (blocks.0.pos_embedding / relative_attention_bias): "
            f"not a umT5 encoder; {_EXPECTED['t5']}"
        )
    layers = {int(k.split(".")[1]) for k in plan.refs if re.match(r"blocks\.\d+\.", k)}
    vocab, dim = plan.shape("token_embedding.weight")
    buckets, heads = plan.shape("blocks.0.pos_embedding.embedding.weight")
    try:
        return T5Config(
            vocab_size=vocab, dim=dim, dim_attn=plan.shape("blocks.0.attn.q.weight")[0],
            dim_ffn=plan.shape("blocks.0.ffn.fc1.weight")[0], num_heads=heads, num_layers=max(layers) + 1,
            num_buckets=buckets,
        )  # fmt: skip
    except ValueError as exc:
        raise CheckpointError(f"{plan.path}: the weights give an impossible umT5 configuration: {exc}") from exc


def read_t5_state_dict(
    path: PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> tuple[T5Config, dict[str, torch.Tensor], CheckpointInfo]:
    """Read a umT5 encoder (Wan `.pth` or Hugging Face / ComfyUI names, FP8-scaled files dequantized) into Wan
    key names. Returns (config detected from the shapes, state dict, info)."""
    plan, _ = _plan(path, "t5", prefer=("model", "state_dict"))
    cfg = _t5_config(plan)
    with _parameters_on_meta():
        expected = _meta_shapes(UMT5Encoder(cfg))
    _check_keys(plan, expected, {}, f"a umT5 encoder with {cfg.num_layers} layers, dim {cfg.dim}")
    state = _materialize(plan, set(), {}, dtype, torch.device(device))
    return cfg, state, _info(plan, "t5")


def load_t5(path: PathLike, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> UMT5Encoder:
    """Load the umT5-XXL encoder (`UMT5Encoder`) from any supported layout, in eval mode without gradients."""
    return _build(UMT5Encoder, *read_t5_state_dict(path, dtype=dtype, device=device), device)


def read_embedded_tokenizer(path: PathLike) -> bytes | None:
    """The SentencePiece model that ComfyUI stores inside text-encoder safetensors (`spiece_model`), or None."""
    path, files, _ = _resolve(path, "t5")
    if not all(f.suffix == ".safetensors" for f in files):
        return None
    source = _open_safetensors(files, path)
    key = next((k for k in source.shapes if _normalize(k).rsplit(".", 1)[-1] == "spiece_model"), None)
    return None if key is None else source.read(key).numpy().tobytes()


# --- VAE ---------------------------------------------------------------------------------------------------------


def _vae_config(plan: _Plan) -> VAEConfig:
    missing = [k for k in ("encoder.conv1.weight", "conv2.weight") if k not in plan.refs]
    if missing:
        raise CheckpointError(f"{plan.path} lacks {', '.join(missing)}; {_EXPECTED['vae']}")
    base_dim, z_dim = plan.shape("encoder.conv1.weight")[0], plan.shape("conv2.weight")[0]
    if z_dim == 48:
        raise CheckpointError(f"{plan.path} is the Wan2.2 VAE (48 latent channels); IAMFlow needs the Wan2.1 VAE (16)")
    if z_dim != VAEConfig.z_dim:
        raise CheckpointError(f"{plan.path}: a VAE with {z_dim} latent channels; the Wan2.1 VAE has {VAEConfig.z_dim}")
    return VAEConfig(base_dim=base_dim, z_dim=z_dim)


def read_vae_state_dict(
    path: PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> tuple[VAEConfig, dict[str, torch.Tensor], CheckpointInfo]:
    """Read a Wan2.1 VAE (Wan `.pth`, ComfyUI safetensors, diffusers) into Wan key names.
    Returns (config detected from the shapes, state dict, info)."""
    plan, _ = _plan(path, "vae", prefer=("model", "state_dict"))
    cfg = _vae_config(plan)
    with _parameters_on_meta():
        expected = _meta_shapes(WanVAE(cfg))
    what = (
        f"the Wan2.1 VAE structure (base_dim {cfg.base_dim}, dim_mult {cfg.dim_mult}, {cfg.num_res_blocks} res blocks)"
    )
    _check_keys(plan, expected, {}, what)
    state = _materialize(plan, set(), {}, dtype, torch.device(device))
    return cfg, state, _info(plan, "vae")


def load_vae(path: PathLike, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> WanVAE:
    """Load the Wan2.1 VAE (`WanVAE`) from any supported layout, in eval mode without gradients."""
    return _build(WanVAE, *read_vae_state_dict(path, dtype=dtype, device=device), device)


def _info(plan: _Plan, component: str) -> CheckpointInfo:
    fp8 = any(plan.is_fp8(k) for k in plan.refs)
    key_format = "hf-umt5" if plan.key_format == "hf" else plan.key_format
    return CheckpointInfo(
        path=str(plan.path), component=component, layout=key_format + ("-fp8" if fp8 else ""),
        files=tuple(map(str, plan.source.files)), key_prefix=plan.prefix, state_key=plan.source.state_key, fp8=fp8,
    )  # fmt: skip
