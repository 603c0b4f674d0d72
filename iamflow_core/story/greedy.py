"""Greedy decoding of a Qwen3 text decoder with one CUDA graph per new token, after transformers' own prefill.

transformers' `generate` runs each new token as a Python loop over the decoder's layers: hundreds of kernel
launches per token, so the host, not the GPU, sets the pace. Inside a render the verifier shares the process with
the sampler, the VAE decoder and the video writer, and a verdict took 10+ s (2× H200, py-spy: the verifier thread
sat in transformers' Python, its GPU idle), so nearly every chunk went unscored. The entity extractor (the LLM, run
before the first frame) paid the same per token.

`GreedyDecoder` keeps transformers for what it does once per answer (the vision encoder and the prompt's prefill)
and decodes the answers itself, for a batch of left-padded prompts:

- the prefill's keys and values are copied into a static cache (one buffer per layer, lengths in steps of 256);
- one decoding step (embedding, the layers through the model's own linears and MLPs, fused RMSNorms, RoPE at each
  row's text position, grouped-query attention over the kept part of the cache, the head, argmax) is captured as a
  CUDA graph per batch size and buffer length, on a stream of high priority (its short kernels get SMs before the
  queued blocks of the VAE's or the DiT's long ones);
- the step's inputs (tokens, positions, cache slot) live on the GPU and each replay advances them, so the host
  launches one graph per `STEPS` tokens (fewer trips through the GIL, which the sampler's and the VAE's threads
  want too) and reads the tokens back after each to stop at the end of the answers.

The math is transformers' (float32 RMSNorm statistics, rotate-half RoPE at the text position, the same scaling and
masking), so greedy answers match `generate`'s exactly in float32 (the CPU tests run the same step eagerly, the GPU
tests replay it); in bf16 the kernels differ and so can the rounding. Models or settings this path does not cover
raise `Unsupported`, and the caller falls back to `generate`. `IAMFLOW_CUDA_GRAPHS=0` turns it off.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from ..models.graphs import capturing, graphs_allowed
from .hf import greedy_config

logger = logging.getLogger(__name__)

CACHE_STEP = 256  # cache lengths are rounded up to this, so a few graphs serve every answer
STEPS = 8  # tokens per graph replay; the answers are read back after each (a few tokens past the end are wasted)


class Unsupported(Exception):
    """This model or generation setting is outside what `GreedyDecoder` reproduces; use transformers' generate."""


def _text_model(model: Any) -> Any:
    """The decoder stack of a Qwen3 causal LM (`model.model`) or of Qwen3-VL (`model.model.language_model`)."""
    inner = getattr(model, "model", None)
    text = getattr(inner, "language_model", inner)
    if text is None or not hasattr(text, "layers") or not hasattr(text, "rotary_emb"):
        raise Unsupported(f"{type(model).__name__} has no Qwen3-style decoder stack")
    return text


def _check(model: Any, text: Any, generation_config: Any) -> None:
    config = getattr(text, "config", None)
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "use_sliding_window", False):
        raise Unsupported("only SiLU MLPs and full attention are reproduced")
    attention = text.layers[0].self_attn
    if not all(hasattr(attention, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")):
        raise Unsupported(f"{type(attention).__name__} is not Qwen3 attention (q/k norms)")
    rope = text.rotary_emb
    if getattr(rope, "rope_type", "default") != "default" or not isinstance(
        getattr(rope, "inv_freq", None), torch.Tensor
    ):
        raise Unsupported(f"RoPE type {getattr(rope, 'rope_type', '?')!r} is not reproduced")
    if getattr(model, "lm_head", None) is None:
        raise Unsupported("no output head")
    for name, neutral in (("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0), ("min_new_tokens", 0)):
        if getattr(generation_config, name, None) not in (None, neutral):
            raise Unsupported(f"generation setting {name}={getattr(generation_config, name)!r} is not reproduced")


def fast_decoder(model: Any, device: torch.device, pad_token_id: int | None, what: str) -> GreedyDecoder | None:
    """A `GreedyDecoder` for `model` when it runs on a GPU with CUDA graphs allowed, else None (transformers'
    `generate`; the reason is logged). what: the model's role, for the log ("verifier VLM", "entity LLM")."""
    if device.type != "cuda" or not graphs_allowed():
        return None
    try:
        return GreedyDecoder(model, greedy_config(model, 16, pad_token_id))
    except Unsupported as e:
        logger.info("%s answers through transformers' generate (%s)", what, e)
        return None


def _norm(x: torch.Tensor, norm: Any) -> torch.Tensor:
    """The model's RMSNorm as one fused kernel (`F.rms_norm`) where the module shows its weight and epsilon."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if weight is None or eps is None or not hasattr(F, "rms_norm"):  # F.rms_norm: torch 2.4 on
        return norm(x)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, x·cos + rotate_half(x)·sin, with rotate_half(x)·sin = roll(x, half)·(−sin | sin)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class GreedyDecoder:
    """Greedy answers of one Qwen3 / Qwen3-VL model for a batch of left-padded prompts; buffers and graphs are kept
    between answers (one graph per batch size and cache length).

    graphs: capture the decoding step as CUDA graphs (CUDA models); False runs the same step eagerly.
    """

    def __init__(self, model: Any, generation_config: Any, graphs: bool = True) -> None:
        self.model, self.text = model, _text_model(model)
        _check(model, self.text, generation_config)
        attention = self.text.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.scale = float(getattr(attention, "scaling", self.head_dim**-0.5))
        self.kv_heads = attention.k_proj.out_features // self.head_dim
        self.heads = attention.q_proj.out_features // self.head_dim
        weight = attention.q_proj.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.graphs_on = graphs and self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device, priority=-1) if self.device.type == "cuda" else None
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._room = (0, 0, 0)  # rows, cache length, answer tokens the buffers hold
        self.captures = 0

    def _buffers(self, rows: int, length: int, steps: int) -> None:
        """Room for `rows` prompts, `length` cache positions and `steps` answer tokens (graphs read these buffers,
        so growing them drops the graphs)."""
        if all(need <= have for need, have in zip((rows, length, steps), self._room)):
            return
        rows, length, steps = (max(need, have) for need, have in zip((rows, length, steps), self._room))
        shape = (rows, self.kv_heads, length, self.head_dim)
        n = len(self.text.layers)
        self._k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]
        self._v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]
        self._keep = torch.zeros(rows, length, dtype=torch.bool, device=self.device)  # real prompt tokens, answers
        self._tokens = torch.zeros(rows, steps, dtype=torch.long, device=self.device)
        self._token = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self._position = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._slot = torch.zeros(1, dtype=torch.long, device=self.device)
        self._step = torch.zeros(1, dtype=torch.long, device=self.device)
        self._room = (rows, length, steps)
        self._graphs.clear()
        self._pool = None

    def _step_once(self, rows: int, length: int) -> None:
        """One token per row: reads `_token` at `_position`, writes its K/V at `_slot`, attends to the kept slots
        ≤ `_slot` of the first `length`, stores the argmax at `_tokens[:, _step]` and in `_token`, and advances
        the counters."""
        text = self.text
        token, position = self._token[:rows], self._position[:rows]
        h = text.embed_tokens(token)  # [B, 1, D]
        rope = text.rotary_emb
        freqs = position.float()[:, None] * rope.inv_freq.float()[None, :]  # [B, head_dim / 2]
        scaling = float(getattr(rope, "attention_scaling", 1.0))
        cos, sin = (freqs.cos() * scaling).to(self.dtype), (freqs.sin() * scaling).to(self.dtype)
        cos = torch.cat((cos, cos), dim=-1)[:, None, None]  # [B, 1, 1, head_dim]
        sin = torch.cat((-sin, sin), dim=-1)[:, None, None]  # signed for `_rope`'s roll
        reached = torch.arange(length, device=self.device) <= self._slot
        valid = (self._keep[:rows, :length] & reached)[:, None, None, :]
        groups = self.heads // self.kv_heads
        for layer, k_cache, v_cache in zip(text.layers, self._k, self._v):
            attn = layer.self_attn
            x = _norm(h, layer.input_layernorm)
            q = _norm(attn.q_proj(x).view(rows, 1, self.heads, self.head_dim), attn.q_norm).transpose(1, 2)
            k = _norm(attn.k_proj(x).view(rows, 1, self.kv_heads, self.head_dim), attn.k_norm).transpose(1, 2)
            v = attn.v_proj(x).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            keys, values = k_cache[:rows, :, :length], v_cache[:rows, :, :length]
            keys.index_copy_(2, self._slot, k)
            values.index_copy_(2, self._slot, v)
            # Grouped-query attention without copying the cache per head: the `groups` query heads that share a
            # key/value head (transformers' repeat_kv order) attend to it as `groups` queries.
            q = q.reshape(rows, self.kv_heads, groups, self.head_dim)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=valid, scale=self.scale)
            h = h + attn.o_proj(out.reshape(rows, 1, self.heads * self.head_dim))
            h = h + layer.mlp(_norm(h, layer.post_attention_layernorm))
        best = self.model.lm_head(_norm(h, text.norm))[:, -1].argmax(-1)  # [B]
        self._tokens[:rows].index_copy_(1, self._step, best[:, None])
        token.copy_(best[:, None])
        position.add_(1)
        self._slot.add_(1)
        self._step.add_(1)

    def _block(self, rows: int, length: int) -> None:
        for _ in range(STEPS):
            self._step_once(rows, length)

    def _graph(self, rows: int, length: int) -> torch.cuda.CUDAGraph | None:
        graph = self._graphs.get((rows, length))
        if graph is not None or not self.graphs_on:
            return graph
        # The capture's real run (lazy per-stream library state) writes throwaway entries into the cache's last
        # `STEPS` slots and the first answer tokens; decoding writes each slot and token again before reading it.
        self._slot.fill_(length - STEPS)
        self._step.zero_()
        self._block(rows, length)
        self._slot.fill_(length - STEPS)
        self._step.zero_()
        try:
            graph = torch.cuda.CUDAGraph()
            with capturing(graph, self._pool, self.stream):
                self._block(rows, length)
        except RuntimeError as error:  # the same answers, step by step: slower, never wrong
            logger.warning("CUDA graph capture failed; decoding answers step by step from now on: %s", error)
            self.graphs_on = False
            return None
        self._pool = graph.pool()
        self._graphs[(rows, length)] = graph
        self.captures += 1
        return graph

    def next_positions(self, batch: dict[str, torch.Tensor]) -> list[int]:
        """Each row's text position of its first new token: one per real prompt token, except that an image block
        of t × h × w merged patches spans max(t, h, w) positions (Qwen-VL's M-RoPE; every axis equal for text)."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        real = mask.sum(-1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
        grids = batch.get("image_grid_thw")
        if grids is None:
            return [int(n) for n in real]
        if ids.shape[0] != 1:
            raise Unsupported("images in a batch of more than one prompt")
        config = self.model.config
        merge = config.vision_config.spatial_merge_size
        image_tokens = int((ids == config.image_token_id).sum())
        spans = sum(max(int(t), int(h) // merge, int(w) // merge) for t, h, w in grids.tolist())
        return [int(real[0]) - image_tokens + spans]

    def on_stream(self) -> AbstractContextManager:
        """Run the caller's work (the inputs' upload) on the decoder's stream. On a GPU shared with the sampler the
        default stream holds the sampler's queued chunk, and an upload there would wait for all of it."""
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    @torch.inference_mode()
    def generate(self, batch: dict[str, torch.Tensor], max_new_tokens: int, eos: set[int]) -> list[list[int]]:
        """Each prompt's greedy answer as token ids (the end token and what follows left out). `batch`: the
        tokenizer's (left-padded) or the processor's output, on the model's device."""
        if self.stream is None:
            return self._generate(batch, max_new_tokens, eos)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the inputs' upload
        with torch.cuda.stream(self.stream):
            return self._generate(batch, max_new_tokens, eos)

    def _prefill(self, batch: dict[str, torch.Tensor]) -> Any:
        mask = batch.get("attention_mask")
        extra = {}
        if "image_grid_thw" not in batch and mask is not None:  # text: positions count real tokens (left padding)
            extra["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.model(**batch, **extra, use_cache=True, logits_to_keep=1)

    def _generate(self, batch: dict[str, torch.Tensor], max_new_tokens: int, eos: set[int]) -> list[list[int]]:
        rows, prompt = batch["input_ids"].shape
        positions = self.next_positions(batch)
        out = self._prefill(batch)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)  # transformers 5 renamed it
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != len(self.text.layers):
            raise Unsupported(f"prefill cache {type(cache).__name__} has no per-layer keys and values")
        need = -(-(prompt + max_new_tokens + STEPS) // CACHE_STEP) * CACHE_STEP  # room for a last block's overrun
        self._buffers(rows, need, -(-(max_new_tokens + STEPS) // CACHE_STEP) * CACHE_STEP)
        # Every answer attends over the buffers' whole length (masked past its slot): one graph per batch size until
        # the buffers grow, so a prompt of another length replays it instead of capturing a new graph in the middle
        # of a render, beside the sampler's launches (2 captures in a 1-GPU render before). A step's time is in the
        # weights; a few hundred more masked keys cost next to nothing.
        length = self._room[1]
        graph = self._graph(rows, length)  # captured before the prompt's entries are written
        for layer, k_cache, v_cache in zip(layers, self._k, self._v):
            k_cache[:rows, :, :prompt].copy_(layer.keys)
            v_cache[:rows, :, :prompt].copy_(layer.values)
        keep = self._keep[:rows, :length]
        keep.fill_(True)
        if batch.get("attention_mask") is not None:
            keep[:, :prompt].copy_(batch["attention_mask"].bool())
        first = out.logits[:, -1].argmax(-1)
        del out, cache, layers
        self._tokens[:rows, 0].copy_(first)
        self._token[:rows, 0].copy_(first)
        self._position[:rows].copy_(torch.tensor(positions, device=self.device))
        self._slot.fill_(prompt)
        self._step.fill_(1)
        made = 1
        while True:
            tokens = [row[:max_new_tokens] for row in self._tokens[:rows, :made].tolist()]  # waits for this stream
            ends = [next((i for i, t in enumerate(row) if t in eos), None) for row in tokens]
            if made >= max_new_tokens or all(e is not None for e in ends):
                return [row if e is None else row[:e] for row, e in zip(tokens, ends)]
            if graph is not None:
                graph.replay()
            else:
                self._block(rows, length)
            made += STEPS
