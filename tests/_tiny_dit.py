"""Tiny random Wan DiTs for CPU tests, and the original-Wan -> diffusers key map used by the parity test."""

from __future__ import annotations

import torch

from iamflow_core.config import DiTConfig
from iamflow_core.models.dit import CausalWanDiT

# dim 256 = 2 heads of 128, so the real 44/42/42 RoPE split and `heads = dim // 128` detection are exercised.
TINY_DIT = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_channels=16, out_channels=16, text_dim=64)


def tiny_dit(cfg: DiTConfig = TINY_DIT, seed: int = 0, dtype: torch.dtype = torch.float32) -> CausalWanDiT:
    """A DiT with every parameter random (norm weights and modulation included), so parity tests see them all."""
    torch.manual_seed(seed)
    model = CausalWanDiT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm3.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 / max(p.shape[-1], 1) ** 0.5 if p.dim() > 1 else 0.1))
    return model.to(dtype).eval()


# Sequential str.replace over each key, in this order (order matters: head.modulation before modulation, and the
# norm2/norm3 swap through a placeholder).
WAN_TO_DIFFUSERS = [
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("norm2", "__norm_placeholder__"),
    ("norm3", "norm2"),
    ("__norm_placeholder__", "norm3"),
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
]


def to_diffusers_key(key: str) -> str:
    for old, new in WAN_TO_DIFFUSERS:
        key = key.replace(old, new)
    return key


def diffusers_twin(model: CausalWanDiT):
    """diffusers WanTransformer3DModel with the same weights (fp32)."""
    from diffusers import WanTransformer3DModel

    cfg = model.cfg
    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
        rope_max_seq_len=cfg.rope_max_positions,
    )
    state = {to_diffusers_key(k): v.float() for k, v in model.state_dict().items()}
    ref.load_state_dict(state, strict=True)
    return ref.eval()
