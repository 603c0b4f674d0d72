"""Greedy decoding of a Qwen3 text decoder with one CUDA graph per new token, after transformers' own prefill.

transformers' `generate` runs each new token as a Python loop over the decoder's layers: hundreds of kernel
launches per token, so the host, not the GPU, sets the pace. Inside a render the verifier shares the process with
the sampler, the VAE decoder and the video writer, and a verdict took 10+ s (2× H200, py-spy: the verifier thread
sat in transformers' Python, its GPU idle), so nearly every chunk went unscored. The entity extractor (the LLM, run
before the first frame) paid the same per token.

`GreedyDecoder` keeps transformers for what it does once per answer (the vision encoder and the prompt's prefill)
and decodes the answers itself, for a batch of left-padded prompts:

- the prefill's keys and values are copied into a static cache (one buffer per layer, lengths in steps of 256);
- one decoding step (embedding, the layers, the head, argmax) is captured as a CUDA graph per batch size and buffer
  length, on a stream of high priority (its short kernels get SMs before the queued blocks of the VAE's or the
  DiT's long ones). A layer is nine kernels on a GPU: q/k/v as one matmul over their joined weights, one Triton
  kernel for the q/k norms, RoPE at each row's text position and the cache write, grouped-query attention over the
  kept part of the cache, the output projection, the residual add with the next norm, gate/up as one matmul, SiLU
  times up, the down projection, the residual add with the next norm (`greedy_ops`);
- the step's inputs (tokens, positions, cache slot) live on the GPU and each replay advances them, so the host
  launches one graph per `STEPS` tokens (fewer trips through the GIL, which the sampler's and the VAE's threads
  want too) and reads the tokens back after each to stop at the end of the answers.

The math is transformers' (float32 RMSNorm statistics, rotate-half RoPE at the text position, the same scaling,
masking and roundings), so greedy answers match `generate`'s exactly in float32 (the CPU tests run the same step
eagerly as plain PyTorch, the GPU tests replay it with the kernels); in bf16 the matmuls differ (one over joined
weights) and so can the rounding. Models or settings this path does not cover raise `Unsupported`, and the
caller falls back to `generate`. `IAMFLOW_CUDA_GRAPHS=0` turns it off.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import own_stream
from ..models.graphs import capturing, graphs_allowed
from . import greedy_ops as ops
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


def _norm_of(norm: Any) -> tuple[torch.Tensor, float]:
    """An RMSNorm module's weight and epsilon (Qwen3's `Qwen3RMSNorm`)."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or eps is None:
        raise Unsupported(f"{type(norm).__name__} does not show its weight and epsilon")
    return weight, float(eps)


class _Joined:
    """Linears that read the same input (q/k/v, gate/up) as one matmul: their weights become row blocks of one
    joined weight, so the step launches one GEMM instead of two or three and no weight is held twice. Linears that
    are not plain bias-free `nn.Linear`s of one dtype (a quantized model's) are called one by one and concatenated."""

    def __init__(self, linears: list[Any]) -> None:
        self.linears = linears
        self.weight: torch.Tensor | None = None
        plain = all(type(m) is nn.Linear and m.bias is None for m in linears)
        if plain and len({(m.weight.dtype, m.weight.device, m.weight.shape[1]) for m in linears}) == 1:
            self.join()

    def join(self) -> None:
        # made as the modules' weights were made, in or out of inference mode (ComfyUI loads models in it): a
        # Parameter made in inference mode that is given a normal tensor as its data fails when it is used
        with torch.no_grad(), torch.inference_mode(self.linears[0].weight.is_inference()):
            self.weight = torch.cat([m.weight.detach() for m in self.linears])
            start = 0
            for m in self.linears:
                rows = m.weight.shape[0]
                m.weight.data = self.weight[start : start + rows]  # the module keeps its Parameter, now a view
                start += rows

    def intact(self) -> bool:
        """False when a linear's weight is no longer its block of the joined weight (the model was moved or cast)."""
        if self.weight is None:
            return True
        start = 0
        for m in self.linears:
            w = m.weight
            if w.data_ptr() != self.weight[start].data_ptr() or w.dtype != self.weight.dtype:
                return False
            start += w.shape[0]
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return F.linear(x, self.weight)
        return torch.cat([m(x) for m in self.linears], dim=-1)


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
        self.stream = own_stream(self.device, self, priority=-1) if self.device.type == "cuda" else None
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._room = (0, 0, 0)  # rows, cache length, answer tokens the buffers hold
        self.captures = 0
        layers = self.text.layers
        # each layer's input norm, its q/k norms, its post-attention norm; the final norm closes the last layer
        self._norms = [
            (_norm_of(layer.input_layernorm), _norm_of(layer.self_attn.q_norm), _norm_of(layer.self_attn.k_norm),
             _norm_of(layer.post_attention_layernorm)) for layer in layers
        ] + [(_norm_of(self.text.norm),)]  # fmt: skip
        self._joined = [
            (_Joined([a.q_proj, a.k_proj, a.v_proj]), _Joined([layer.mlp.gate_proj, layer.mlp.up_proj]))
            for layer, a in ((layer, layer.self_attn) for layer in layers)
        ]

    def _keep_joined(self) -> None:
        """Join the weights again where the model was moved or cast since (and drop the graphs that read them)."""
        broken = [j for pair in self._joined for j in pair if not j.intact()]
        for joined in broken:
            joined.join()
        if broken:
            self._graphs.clear()
            self._pool = None

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
        the counters. Nine kernels a layer on a GPU (`greedy_ops`)."""
        text = self.text
        token, position = self._token[:rows], self._position[:rows]
        rope = text.rotary_emb
        freqs = position.float()[:, None] * rope.inv_freq.float()[None, :]  # [B, head_dim / 2]
        scaling = float(getattr(rope, "attention_scaling", 1.0))
        cos, sin = (freqs.cos() * scaling).to(self.dtype), (freqs.sin() * scaling).to(self.dtype)
        reached = torch.arange(length, device=self.device) <= self._slot
        valid = (self._keep[:rows, :length] & reached)[:, None, None, :]
        # as an additive mask, made once a step: given the boolean one, attention converts it in every layer
        bias = torch.zeros(valid.shape, dtype=self.dtype, device=self.device).masked_fill_(~valid, float("-inf"))
        groups = self.heads // self.kv_heads
        h, x = ops.add_rms_norm(text.embed_tokens(token), None, *self._norms[0][0])  # [B, 1, D]
        for i, (layer, k_cache, v_cache) in enumerate(zip(text.layers, self._k, self._v)):
            (_, q_norm, k_norm, post_norm), (next_norm, *_) = self._norms[i], self._norms[i + 1]
            qkv, gate_up = self._joined[i]
            keys, values = k_cache[:rows, :, :length], v_cache[:rows, :, :length]
            q = ops.qk_norm_rope_store(qkv(x).view(rows, -1), self.heads, self.kv_heads, q_norm[0], k_norm[0],
                                       q_norm[1], cos, sin, keys, values, self._slot)  # fmt: skip
            # Grouped-query attention without copying the cache per head: the `groups` query heads that share a
            # key/value head (transformers' repeat_kv order) attend to it as `groups` queries.
            q = q.view(rows, self.kv_heads, groups, self.head_dim)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=self.scale)
            h, x = ops.add_rms_norm(h, layer.self_attn.o_proj(out.reshape(rows, 1, -1)), *post_norm)
            h, x = ops.add_rms_norm(h, layer.mlp.down_proj(ops.silu_mul(gate_up(x))), *next_norm)
        best = self.model.lm_head(x)[:, -1].argmax(-1)  # [B]
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
        self._keep_joined()
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
