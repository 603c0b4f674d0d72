"""Loading the Wan2.1 VAE (`WanVAE`): Wan's `Wan2.1_VAE.pth`, ComfyUI's `wan_2.1_vae.safetensors` and diffusers
`AutoencoderKLWan` weights."""

from __future__ import annotations

import torch

from ..config import VAEConfig
from ..models.vae import WanVAE
from .build import build, meta_shapes, parameters_on_meta
from .finite import check_finite
from .layouts import EXPECTED
from .plan import CheckpointInfo, Plan, check_keys, checkpoint_info, make_plan, materialize
from .reading import CheckpointError, PathLike


def _vae_config(plan: Plan) -> VAEConfig:
    missing = [k for k in ("encoder.conv1.weight", "conv2.weight") if k not in plan.refs]
    if missing:
        raise CheckpointError(f"{plan.path} lacks {', '.join(missing)}; {EXPECTED['vae']}")
    plan.refuse()  # the Wan2.2 VAE and other latent sizes
    return VAEConfig(base_dim=plan.shape("encoder.conv1.weight")[0], z_dim=plan.shape("conv2.weight")[0])


def read_vae_state_dict(
    path: PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> tuple[VAEConfig, dict[str, torch.Tensor], CheckpointInfo]:
    """Read a Wan2.1 VAE (Wan `.pth`, ComfyUI safetensors, diffusers) into Wan key names.
    Returns (config detected from the shapes, state dict, info)."""
    plan, _ = make_plan(path, "vae", prefer=("model", "state_dict"))
    cfg = _vae_config(plan)
    with parameters_on_meta():
        expected = meta_shapes(WanVAE(cfg))
    what = (
        f"the Wan2.1 VAE structure (base_dim {cfg.base_dim}, dim_mult {cfg.dim_mult}, {cfg.num_res_blocks} res blocks)"
    )
    check_keys(plan, expected, {}, what)
    state = materialize(plan, set(), {}, dtype, torch.device(device))
    check_finite(plan, state)
    return cfg, state, checkpoint_info(plan)


def load_vae(path: PathLike, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> WanVAE:
    """Load the Wan2.1 VAE (`WanVAE`) from any supported layout, in eval mode without gradients; `model.load_info`
    says what was read (`check_compatible` names the file from it)."""
    return build(WanVAE, *read_vae_state_dict(path, dtype=dtype, device=device), device)
