"""A tiny umT5 encoder config and a tiny SentencePiece unigram tokenizer, built in tens of milliseconds."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import sentencepiece
import torch

from iamflow_core.config import T5Config
from iamflow_core.models.t5 import UMT5Encoder

# text_len stays at Wan's 512 so the TextEncoder tests check the real padded length.
TINY_T5 = T5Config(
    vocab_size=256, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=3, num_buckets=32, max_distance=128
)

# Words and punctuation for the training corpus; enough distinct characters for a 100-piece vocabulary.
_WORDS = (
    "a the cat dog walks runs on in at beach city night sunset rain window cafe two people talk slowly quickly red "
    "blue green camera pans over mountain river forest woman man child smiles looks toward light shadow old young "
    "street car bird flies sky water wave ocean snow winter summer house door opens closes & ; , . ! ? 0 1 2 3 4 5"
)


def tiny_encoder(cfg: T5Config = TINY_T5, seed: int = 0) -> UMT5Encoder:
    """An encoder with every parameter random (norm weights too), so a wrong key or a missing norm shows up."""
    torch.manual_seed(seed)
    model = UMT5Encoder(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("token_embedding.weight") or name.endswith("pos_embedding.embedding.weight"):
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.eval()


def write_spiece_folder(folder: Path, vocab_size: int = 100) -> Path:
    """Train a unigram SentencePiece model with umT5's special ids (pad 0, </s> 1, <unk> 2, no <s>) into
    `folder/spiece.model`, the layout of a bare google/umt5-xxl tokenizer folder. Returns `folder`."""
    rng = random.Random(0)
    words = _WORDS.split()
    sentences = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    folder.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(folder / "spiece"),
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    (folder / "spiece.vocab").unlink()
    return folder


# Wan checkpoint key -> transformers UMT5EncoderModel key (parity.md §2.1); first matching pattern wins.
WAN_TO_HF = [
    (r"^token_embedding\.weight$", "shared.weight"),
    (r"^blocks\.(\d+)\.norm1\.weight$", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"^blocks\.(\d+)\.attn\.([qkvo])\.weight$", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (
        r"^blocks\.(\d+)\.pos_embedding\.embedding\.weight$",
        r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    (r"^blocks\.(\d+)\.norm2\.weight$", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"^blocks\.(\d+)\.ffn\.gate\.0\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (r"^blocks\.(\d+)\.ffn\.fc1\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (r"^blocks\.(\d+)\.ffn\.fc2\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
    (r"^norm\.weight$", "encoder.final_layer_norm.weight"),
]


def wan_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in WAN_TO_HF:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            raise KeyError(f"no HF name for Wan key {key}")
    out["encoder.embed_tokens.weight"] = out["shared.weight"]  # tied in HF
    return out


def hf_twin(model: UMT5Encoder):
    """transformers UMT5EncoderModel with the weights of `model` (eager attention, loaded strict)."""
    return hf_model(model.cfg, model.state_dict())


def hf_model(cfg: T5Config, state: dict[str, torch.Tensor]):
    """transformers UMT5EncoderModel holding the Wan-named `state` (loaded strict, so the key map is proven)."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.UMT5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.dim,
        d_kv=cfg.dim_attn // cfg.num_heads,
        d_ff=cfg.dim_ffn,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=cfg.eps,
        dropout_rate=0.0,
        attn_implementation="eager",
    )
    twin = transformers.UMT5EncoderModel(hf_cfg)
    twin.load_state_dict(wan_to_hf(state), strict=True)
    return twin.eval()
