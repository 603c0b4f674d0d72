"""Scores that rank cached frames for memory: the prompt's text keys against each frame's (unrotated) mean key.

Pure functions on tensors, shared by the MemFlow bank and the identity memory.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..models.dit import CrossKV
from ..models.rope import RopeTables, apply_rope
from ..text_encoder import clean_prompt


def text_query(cross: CrossKV, text: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean cross-attention key of the prompt's real tokens per layer and head: [layers, B, H, D].

    Padding rows (zero umT5 states) are left out: they all map to one constant key that would otherwise dominate
    the mean of a short prompt (MemFlow averages all 512 slots). weights: [text_len] per-token weights (e.g. higher
    on the tokens naming an entity); zero-state rows get weight 0 whatever is given.
    """
    real = (text.float().abs().sum(-1) > 0).float()
    real = torch.where(real.any(), real, torch.ones_like(real))  # on the device: no sync on the sampler's path
    w = real * (weights.to(real.device, real.dtype) if weights is not None else 1.0)
    w = w / w.sum().clamp_min(1e-8)
    return torch.einsum("lbthd,t->lbhd", cross.k.float(), w)


def frame_descriptor(k: torch.Tensor, position: int, rope: RopeTables) -> torch.Tensor:
    """Mean key of one cached frame, moved back to time 0: [layers, B, H, D].

    k: [layers, B, T, H, D] rotated at temporal `position`. The temporal rotation is the same for every token of a
    frame, so it commutes with the mean and is undone on the small mean alone; frames from different times then
    compare by content instead of by RoPE phase (which MemFlow's scores mix in).
    """
    mean = k.float().mean(2, keepdim=True)
    cos, sin = rope.grid([-position], 1, 1, k.device, spatial=False)
    return apply_rope(mean, cos, sin)[:, :, 0]


def frame_relevance(query: torch.Tensor, descriptors: torch.Tensor) -> torch.Tensor:
    """Relevance of stored frames to a text query: mean over layers and heads of <q, frame descriptor> / sqrt(D).

    query: [layers, B, H, D]; descriptors: [n, layers, B, H, D] from `frame_descriptor` -> [n].
    """
    return (descriptors * query[None]).sum(-1).mean((1, 2, 3)) / query.shape[-1] ** 0.5


def entity_token_weights(
    tokenizer: Any, prompt: str, phrases: list[str], text_len: int, entity_weight: float = 2.5
) -> torch.Tensor | None:
    """Per-token weights [text_len]: `entity_weight` on the tokens that spell one of `phrases` in the prompt, 1 on
    the other real tokens, 0 on padding. Tokens are located by the tokenizer's character offsets on the cleaned
    prompt (what the text encoder sees). None when the tokenizer gives no offsets."""
    text = clean_prompt(prompt)
    try:
        enc = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=text_len)
    except (TypeError, ValueError, NotImplementedError):
        return None
    offsets = enc.get("offset_mapping")
    if offsets is None:
        return None
    spans = []
    for phrase in phrases:
        phrase = clean_prompt(phrase) if phrase else ""
        if phrase:
            spans += [m.span() for m in re.finditer(re.escape(phrase), text, flags=re.IGNORECASE)]
    weights = torch.zeros(text_len)
    for i, (start, end) in enumerate(offsets[:text_len]):
        weights[i] = 1.0
        if end > start and any(start < e and s < end for s, e in spans):
            weights[i] = entity_weight
    return weights
