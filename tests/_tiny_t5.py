"""A tiny umT5 encoder config and a tiny SentencePiece unigram tokenizer, built in tens of milliseconds."""

from __future__ import annotations

import random
from pathlib import Path

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
