"""The checkpoint layouts IAMFlow reads, one table row each (`LAYOUTS`, at the end of this module).

A row says which component a layout holds, the keys that recognise it, how its keys become the Wan names our
modules use, and which models of its component are refused. Layouts are recognised from their keys, never from
file names, trying the rows in table order. Adding a layout is one `Layout` row (with its rename rules and
refusals, written above the table) and its test in `tests/test_weights.py`.

Also here: the key names any layout may carry (training wrappers, FP8 bookkeeping) and how messages name each
component and describe what it expects.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..config import DiTConfig, VAEConfig
from .reading import CheckpointError

Shapes = Mapping[str, tuple[int, ...]]  # Wan key name -> tensor shape
Refusal = Callable[[Path, Shapes], None]  # raises CheckpointError for a model IAMFlow cannot stream

WAN_1_3B = DiTConfig()

# --- what a row says ---------------------------------------------------------------------------------------------


def _substitute(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


@dataclass(frozen=True)
class Rename:
    """Regex substitutions applied in order to every key (its prefix stripped): the layout's names -> Wan names."""

    rules: tuple[tuple[str, str], ...] = ()

    def for_file(self, keys: Collection[str]) -> Callable[[str], str]:
        """The renaming of one key of a file that holds `keys` (prefix stripped)."""
        return self.key

    def key(self, key: str) -> str:
        return _substitute(key, self.rules)


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout.

    component: "dit", "t5", "vae" or "lora". name: the layout as `CheckpointInfo.layout` reports it.
    detect: keys only this layout has. In a model file a detecting key ends a key name and what stands before it
    is the file's prefix (`model.`, `model.diffusion_model.`, `first_stage_model.`, ...), stripped from every key.
    A LoRA names its matrices `<module>.<detecting key>[.<adapter name>].weight`.
    prefixes: stripped from the start of LoRA module names, repeatedly (a model's prefix is found, see `detect`).
    rename: the layout's key names -> Wan names.
    refusals: run on the Wan-named shapes; each refuses, with its own message, a model of this layout that
    IAMFlow cannot stream.
    """

    component: str
    name: str
    detect: tuple[str, ...]
    prefixes: tuple[str, ...] = ()
    rename: Rename = Rename()
    refusals: tuple[Refusal, ...] = ()

    def prefix(self, name: str, key: str) -> str | None:
        """What stands before the detecting `key` in the key `name` (a model file's prefix, a LoRA matrix's
        module name), or None where `key` does not end `name`."""
        if self.component == "lora":
            found = re.search(rf"\.{re.escape(key)}(?:\.[^.]+)?\.weight$", name)
            return None if found is None else name[: found.start()]
        if name.endswith(key) and (len(name) == len(key) or name[-len(key) - 1] == "."):
            return name[: -len(key)]
        return None

    def detects(self, name: str) -> bool:
        """Whether the key `name` ends with one of this layout's detecting keys."""
        return any(self.prefix(name, key) is not None for key in self.detect)


# --- keys any layout may carry -------------------------------------------------------------------------------------

# Wrappers that training code puts anywhere in key names (FSDP, activation checkpointing, torch.compile).
_WRAPPER_PARTS = re.compile(r"(?:^|(?<=\.))(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")
# Keys that carry quantization bookkeeping rather than weights: "<module>.<suffix>".
SCALE_SUFFIXES = (".weight_scale", ".scale_weight")
DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
DROPPED_KEYS = ("scaled_fp8", "spiece_model")


def normalize(key: str) -> str:
    """The key without training wrappers (`_fsdp_wrapped_module.` and the like) wherever they stand."""
    return _WRAPPER_PARTS.sub("", key)


# --- what messages call each component -----------------------------------------------------------------------------

LABELS = {"dit": "Wan DiT", "t5": "umT5 text-encoder", "vae": "Wan VAE", "lora": "LoRA"}
EXPECTED = {
    "dit": "expected a Wan2.1 DiT with keys like blocks.0.self_attn.q.weight and patch_embedding.weight",
    "t5": (
        "expected a umT5-XXL encoder with keys like blocks.0.attn.q.weight (Wan) or "
        "encoder.block.0.layer.0.SelfAttention.q.weight (Hugging Face / ComfyUI)"
    ),
    "vae": "expected a Wan2.1 VAE with keys like decoder.middle.0.residual.0.gamma and encoder.conv1.weight",
}

# --- rename rules --------------------------------------------------------------------------------------------------

# diffusers WanTransformer3DModel -> Wan2.1 (inverse of diffusers' convert_wan_to_diffusers table).
DIFFUSERS_DIT = Rename((
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
    (r"\.attn2\.add_([kv])_proj\.", r".cross_attn.\1_img."),  # I2V only: kept so the I2V refusal can see it
))  # fmt: skip
# Hugging Face (ComfyUI) UMT5 encoder -> Wan T5 encoder (parity.md §2.1).
HF_T5 = Rename((
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
))  # fmt: skip


@dataclass(frozen=True)
class DiffusersVAERename(Rename):
    """diffusers AutoencoderKLWan -> Wan VAE (parity.md §1.3): `rules`, then the decoder's up_blocks as Wan's flat
    `upsamples` list (which needs the number of resnets per block, counted in the file), then `residual` inside
    every residual block."""

    residual: tuple[tuple[str, str], ...] = ()

    def for_file(self, keys: Collection[str]) -> Callable[[str], str]:
        per_block = sum(1 for k in keys if re.match(r"decoder\.up_blocks\.0\.resnets\.\d+\.conv1\.weight$", k))
        return partial(self.vae_key, resnets_per_block=per_block)

    def vae_key(self, key: str, resnets_per_block: int) -> str:
        """resnets_per_block: residual blocks per decoder level (num_res_blocks + 1)."""
        key = self.key(key)
        up = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.", key)
        if up:
            block, resnet = int(up[1]), up[3]
            index = block * (resnets_per_block + 1) + (int(resnet) if resnet is not None else resnets_per_block)
            key = f"decoder.upsamples.{index}." + key[up.end() :]
        if re.match(r"^(encoder\.downsamples\.\d+|(encoder|decoder)\.middle\.[02]|decoder\.upsamples\.\d+)\.", key):
            head, tail = re.match(r"^((?:[^.]+\.){2}\d+)(\..*)$", key).groups()
            key = head + _substitute(tail, self.residual)
        return key


DIFFUSERS_VAE = DiffusersVAERename(
    rules=(
        (r"^quant_conv\.", "conv1."),
        (r"^post_quant_conv\.", "conv2."),
        (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
        (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
        (r"^encoder\.down_blocks\.", "encoder.downsamples."),
    ),
    residual=(
        (r"\.norm1\.gamma$", ".residual.0.gamma"),
        (r"\.conv1\.", ".residual.2."),
        (r"\.norm2\.gamma$", ".residual.3.gamma"),
        (r"\.conv2\.", ".residual.6."),
        (r"\.conv_shortcut\.", ".shortcut."),
    ),
)

# --- refusals: the Wan models that are not the ones IAMFlow streams ------------------------------------------------


def dit_dims(shapes: Shapes) -> tuple[int, int, int, tuple[int, ...]]:
    """(dim, in_channels, out_channels, patch) of a Wan-named DiT: patch_embedding.weight [dim, in, *patch],
    head.head.weight [out * prod(patch), dim] (without a head, out = in)."""
    dim, in_channels, *patch = shapes["patch_embedding.weight"]
    patch = tuple(patch)
    head = shapes["head.head.weight"] if "head.head.weight" in shapes else (in_channels * math.prod(patch),)
    return dim, in_channels, head[0] // max(math.prod(patch), 1), patch


def refuse_image_to_video(path: Path, shapes: Shapes) -> None:
    if any(".cross_attn.k_img." in k for k in shapes) or any(k.startswith("img_emb.") for k in shapes):
        raise CheckpointError(
            f"{path} is a Wan image-to-video DiT (it has cross_attn.k_img / img_emb weights); "
            f"IAMFlow streams the text-to-video 1.3B model"
        )


def refuse_vace(path: Path, shapes: Shapes) -> None:
    if any(k.startswith("vace_") for k in shapes):
        raise CheckpointError(f"{path} is a Wan VACE DiT (vace_blocks); IAMFlow streams the text-to-video 1.3B model")


def refuse_14b(path: Path, shapes: Shapes) -> None:
    if dit_dims(shapes)[0] == 5120:
        layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
        raise CheckpointError(
            f"{path}: this is a Wan2.1 14B DiT (dim 5120, {layers} layers); IAMFlow streams the 1.3B model "
            f"(dim {WAN_1_3B.dim}, {WAN_1_3B.num_layers} layers)"
        )


def refuse_wan22_5b(path: Path, shapes: Shapes) -> None:
    dim, _, out_channels, _ = dit_dims(shapes)
    if out_channels == 48 or dim == 3072:
        raise CheckpointError(
            f"{path}: this is a Wan2.2 5B DiT (dim {dim}, {out_channels} latent channels); IAMFlow streams the "
            f"Wan2.1 1.3B model (dim {WAN_1_3B.dim}, 16 latent channels)"
        )


def refuse_conditioned_dit(path: Path, shapes: Shapes) -> None:
    _, in_channels, out_channels, _ = dit_dims(shapes)
    if in_channels != out_channels:
        raise CheckpointError(
            f"{path}: the DiT takes {in_channels} input channels but predicts {out_channels}: an image- or "
            f"control-conditioned Wan model (Fun/InP/Control); IAMFlow needs the text-to-video DiT"
        )


def refuse_t5_without_layer_bias(path: Path, shapes: Shapes) -> None:
    if "blocks.0.pos_embedding.embedding.weight" not in shapes:
        raise CheckpointError(
            f"{path} has no per-layer position bias (blocks.0.pos_embedding / relative_attention_bias): "
            f"not a umT5 encoder; {EXPECTED['t5']}"
        )


def refuse_wan22_vae(path: Path, shapes: Shapes) -> None:
    if shapes["conv2.weight"][0] == 48:
        raise CheckpointError(f"{path} is the Wan2.2 VAE (48 latent channels); IAMFlow needs the Wan2.1 VAE (16)")


def refuse_other_latent_channels(path: Path, shapes: Shapes) -> None:
    z_dim = shapes["conv2.weight"][0]
    if z_dim != VAEConfig.z_dim:
        raise CheckpointError(f"{path}: a VAE with {z_dim} latent channels; the Wan2.1 VAE has {VAEConfig.z_dim}")


DIT_REFUSALS = (refuse_image_to_video, refuse_vace, refuse_14b, refuse_wan22_5b, refuse_conditioned_dit)
T5_REFUSALS = (refuse_t5_without_layer_bias,)
VAE_REFUSALS = (refuse_wan22_vae, refuse_other_latent_channels)

# --- the table -----------------------------------------------------------------------------------------------------

LORA = Layout(
    "lora", "lora", detect=("lora_A", "lora_B", "lora_down", "lora_up"),  # PEFT, kohya-style
    prefixes=("base_model.model.", "model.", "diffusion_model.", "transformer.", "module."),
    rename=DIFFUSERS_DIT,  # diffusers-named LoRAs (attn1.to_q, ...) to Wan names
)  # fmt: skip
# In detection order. ComfyUI repackaged files, Wan folders and `.pth` files and training checkpoints all use Wan
# names ("wan"); FP8 files are recognised by their dtypes, not here.
LAYOUTS = (
    Layout("dit", "diffusers", detect=("condition_embedder.time_proj.weight",), rename=DIFFUSERS_DIT,
           refusals=DIT_REFUSALS),
    Layout("dit", "wan", detect=("patch_embedding.weight", "head.modulation"), refusals=DIT_REFUSALS),
    Layout("t5", "wan", detect=("token_embedding.weight",), refusals=T5_REFUSALS),
    Layout("t5", "hf-umt5", detect=("encoder.block.0.layer.0.SelfAttention.q.weight",), rename=HF_T5,
           refusals=T5_REFUSALS),
    Layout("vae", "diffusers", detect=("decoder.mid_block.resnets.0.norm1.gamma",), rename=DIFFUSERS_VAE,
           refusals=VAE_REFUSALS),
    Layout("vae", "wan", detect=("decoder.middle.0.residual.0.gamma",), refusals=VAE_REFUSALS),
    LORA,  # looked for only where a file holds no model of the component asked for
)  # fmt: skip
