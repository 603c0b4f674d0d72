"""Loading the umT5-XXL text encoder (`UMT5Encoder`): Wan's `models_t5_umt5-xxl-enc-bf16.pth` and the Hugging
Face-named files of ComfyUI (`umt5_xxl_fp16.safetensors`, `umt5_xxl_fp8_e4m3fn_scaled.safetensors`, dequantized at
load), and the SentencePiece tokenizer that ComfyUI embeds in those files.
"""

from __future__ import annotations

import torch

from ..config import T5Config
from ..models.t5 import UMT5Encoder
from .build import build, meta_shapes, parameters_on_meta
from .finite import check_finite
from .folders import resolve
from .layouts import EXPECTED, normalize
from .plan import CheckpointInfo, Plan, block_indices, check_keys, checkpoint_info, make_plan, materialize
from .reading import CheckpointError, PathLike, open_safetensors


def _t5_config(plan: Plan) -> T5Config:
    required = ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight")
    missing = [k for k in required if k not in plan.refs]
    if missing:
        raise CheckpointError(f"{plan.path} lacks {', '.join(missing)}; {EXPECTED['t5']}")
    plan.refuse()
    layers = block_indices(plan)
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
    plan, _ = make_plan(path, "t5", prefer=("model", "state_dict"))
    cfg = _t5_config(plan)
    with parameters_on_meta():
        expected = meta_shapes(UMT5Encoder(cfg))
    check_keys(plan, expected, {}, f"a umT5 encoder with {cfg.num_layers} layers, dim {cfg.dim}")
    state = materialize(plan, set(), {}, dtype, torch.device(device))
    check_finite(plan, state)
    return cfg, state, checkpoint_info(plan)


def load_t5(path: PathLike, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> UMT5Encoder:
    """Load the umT5-XXL encoder (`UMT5Encoder`) from any supported layout, in eval mode without gradients;
    `model.load_info` says what was read (`check_compatible` names the file from it)."""
    return build(UMT5Encoder, *read_t5_state_dict(path, dtype=dtype, device=device), device)


def read_embedded_tokenizer(path: PathLike) -> bytes | None:
    """The SentencePiece model that ComfyUI stores inside text-encoder safetensors (`spiece_model`), or None."""
    path, files, _ = resolve(path, "t5")
    if not all(f.suffix == ".safetensors" for f in files):
        return None
    source = open_safetensors(files, path)
    key = next((k for k in source.shapes if normalize(k).rsplit(".", 1)[-1] == "spiece_model"), None)
    return None if key is None else source.read(key).numpy().tobytes()
