"""Built-in presets. `tiny` builds random-weight models small enough for a CPU smoke test of the whole pipeline:
its frames are noise, it checks wiring, not quality."""

from __future__ import annotations

import io
import random

import sentencepiece
import torch

from .config import CacheConfig, DiTConfig, SamplerConfig, T5Config, VAEConfig
from .models.dit import CausalWanDiT
from .models.t5 import UMT5Encoder
from .models.vae import WanVAE
from .story import Segment, Story
from .text_encoder import TextEncoder, umt5_tokenizer_from_spiece

TINY_DIT = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64)
TINY_T5 = T5Config(vocab_size=256, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2)
TINY_VAE = VAEConfig(base_dim=8)
TINY_SAMPLER = SamplerConfig(height=64, width=96, cache=CacheConfig())

# The embedded default story of `generate --preset tiny`: three beats, a character who leaves and comes back.
DEFAULT_STORY = Story(
    segments=(
        Segment("A woman in a red coat reads a worn notebook at a library table, warm afternoon light.", 3.0),
        Segment("A young man in a grey hoodie walks past the shelves and waves at her.", 3.0),
        Segment("The woman in the red coat closes the notebook and smiles, the library quiet again.", 3.0),
    ),
    title="tiny smoke test",
    seed=0,
)

_CORPUS = (
    "a the woman man young old red grey coat hoodie reads walks waves smiles closes opens notebook library table "
    "shelves light warm afternoon quiet again past at in and her his cafe street rain camera slowly . , !"
)


def tiny_spiece_model(vocab_size: int = 64) -> bytes:
    """A umT5-style SentencePiece model (pad 0, </s> 1, unk 2), trained in memory in a few milliseconds: what a
    ComfyUI text-encoder file embeds as `spiece_model`."""
    rng = random.Random(0)
    words = _CORPUS.split()
    sentences = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def tiny_tokenizer(vocab_size: int = 64):
    """The tiny preset's umT5 tokenizer (fast, with offsets)."""
    return umt5_tokenizer_from_spiece(tiny_spiece_model(vocab_size), source="tiny preset tokenizer")


def tiny_models(
    seed: int = 0, device: str | torch.device = "cpu", vae_device: str | torch.device | None = None
) -> tuple[CausalWanDiT, TextEncoder, WanVAE]:
    """Random-weight DiT, umT5 and VAE of the tiny preset (float32)."""
    torch.manual_seed(seed)
    dit = CausalWanDiT(TINY_DIT).to(device).eval()
    text_encoder = TextEncoder(UMT5Encoder(TINY_T5), tiny_tokenizer(), device=device)
    vae = WanVAE(TINY_VAE).to(vae_device or device).eval()
    return dit, text_encoder, vae
