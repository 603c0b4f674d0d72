"""Checking that loaded components fit each other, before sampling: the umT5 encoder's output width must be the
DiT's text width, and the VAE's latent channels the channels the DiT denoises. Each file loads fine on its own;
mixed up, they fail deep inside sampling with a bare matmul shape error that names neither file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn

from ..models.dit import CausalWanDiT
from ..models.t5 import UMT5Encoder
from ..models.vae import WanVAE
from .plan import CheckpointInfo
from .reading import CheckpointError

if TYPE_CHECKING:
    from ..text_encoder import OffloadedTextEncoder, TextEncoder

# What a Wan2.1 DiT takes, for the advice in messages.
WAN21_TEXT_ENCODER = (
    "umT5-XXL, width 4096: umt5_xxl_fp16.safetensors, umt5_xxl_fp8_e4m3fn_scaled.safetensors or "
    "models_t5_umt5-xxl-enc-bf16.pth"
)
WAN21_VAE = "16 channels: wan_2.1_vae.safetensors or Wan2.1_VAE.pth"


def loaded_from(model: nn.Module) -> CheckpointInfo | None:
    """What `model` was loaded from (the `load_info` the loaders set), or None for a model built in code."""
    info = getattr(model, "load_info", None)  # set by load_dit / load_t5 / load_vae only
    return info if isinstance(info, CheckpointInfo) else None


def describe(model: nn.Module, label: str) -> str:
    """'the <label> <path>' of a loaded model, 'the <label> built in code' of one built in code."""
    info = loaded_from(model)
    return f"the {label} {info.path}" if info is not None else f"the {label} built in code"


def umt5_of(text_encoder: UMT5Encoder | TextEncoder | OffloadedTextEncoder) -> UMT5Encoder:
    """The umT5 module inside a `TextEncoder` or `OffloadedTextEncoder` (or the module itself)."""
    if isinstance(text_encoder, UMT5Encoder):
        return text_encoder
    # imported here: text_encoder imports transformers, which `iamflow_core.weights` does not need
    from ..text_encoder import OffloadedTextEncoder, TextEncoder

    if isinstance(text_encoder, OffloadedTextEncoder):
        text_encoder = text_encoder.encoder
    if isinstance(text_encoder, TextEncoder):
        return text_encoder.encoder
    raise TypeError(
        f"text_encoder must be a UMT5Encoder, TextEncoder or OffloadedTextEncoder, got {type(text_encoder).__name__}"
    )


def _text_mismatch(dit: CausalWanDiT, umt5: UMT5Encoder) -> str | None:
    width, text_dim = umt5.cfg.dim, dit.cfg.text_dim
    if width == text_dim:
        return None
    return (
        f"{describe(umt5, 'umT5 text encoder')} gives {width}-wide text embeddings, but {describe(dit, 'DiT')} "
        f"takes text_dim {text_dim}; use the umT5 encoder of width {text_dim} that belongs to this DiT "
        f"(for a Wan2.1 DiT: {WAN21_TEXT_ENCODER})"
    )


def _latent_mismatch(dit: CausalWanDiT, vae: WanVAE) -> str | None:
    z_dim, cfg = vae.cfg.z_dim, dit.cfg
    if z_dim == cfg.in_channels == cfg.out_channels:
        return None
    channels = (
        f"{cfg.in_channels}"
        if cfg.in_channels == cfg.out_channels
        else f"{cfg.in_channels} in, {cfg.out_channels} out"
    )
    return (
        f"{describe(vae, 'VAE')} has {z_dim} latent channels (z_dim), but {describe(dit, 'DiT')} denoises latents "
        f"of {channels} channels (in_channels/out_channels); use the VAE that belongs to this DiT "
        f"(for a Wan2.1 DiT: the Wan2.1 VAE, {WAN21_VAE})"
    )


def check_compatible(
    dit: CausalWanDiT,
    text_encoder: UMT5Encoder | TextEncoder | OffloadedTextEncoder | None = None,
    vae: WanVAE | None = None,
) -> None:
    """Raise one CheckpointError naming both files and both numbers when the text encoder's width is not the DiT's
    `text_dim`, or the VAE's latent channels (`z_dim`) are not the DiT's `in_channels`/`out_channels`.

    Components built in code (tests, the tiny preset) are named "the <component> built in code". Cheap (reads
    configs only): call it once after loading, before the first prompt is encoded.
    """
    problems = [
        problem
        for problem in (
            None if text_encoder is None else _text_mismatch(dit, umt5_of(text_encoder)),
            None if vae is None else _latent_mismatch(dit, vae),
        )
        if problem is not None
    ]
    if problems:
        raise CheckpointError("; and ".join(problems))
