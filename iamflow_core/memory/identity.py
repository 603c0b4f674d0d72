"""IAMFlow's identity-aware memory: frames tagged with the entities they show come back when those entities do.

Per chunk: the chunk's latent frames are candidates; a text score (the frame's keys against the prompt's entity
tokens, found with the tokenizer's offsets) is fused with the verifier's visual score, and the best frame is
archived with the entity IDs of its prompt. The choice is made just before the frames leave the rolling window, so
the verifier (asynchronous, on its own device) has had a chunk's time to answer; the DiT waits only if it is late.
At a prompt switch the memory segment is rebuilt by greedy set cover of the new prompt's entity IDs (at least
`min_frames_multi_entity` frames when two or more entities, at most `max_frames`); in between, a better frame of the
same entities replaces the weakest one. The archive lives in host memory and is bounded in bytes.

Improves on the reference release: objects are tracked too (they come from the registry), entity tokens are the
prompt's real tokens, scores compare keys by content (temporal RoPE phase removed), frames are ranked across
chunks by visual quality, the archive is bounded, and every setting reaches the loop.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..story.entities import EntityRegistry
from ..story.vlm import NOT_READY
from ..text_encoder import clean_prompt
from . import StepContext, frame_descriptor, frame_relevance, require_memory_segment, text_query

logger = logging.getLogger(__name__)
# Without a set `verifier_wait`, the loop waits for a late verdict at most this share of its chunk time, so a
# verifier slower than the sampler costs it at most that much; before the pace is known, FIRST_CHUNKS_WAIT seconds.
VERIFIER_SHARE = 0.05
FIRST_CHUNKS_WAIT = 0.05


@dataclass
class ArchivedFrame:
    frame: int  # absolute latent frame index
    chunk: int
    segment: int
    entities: tuple[int, ...]
    text_score: float
    visual_score: float
    k: torch.Tensor = field(repr=False)  # [layers, B, T, H, D] host memory, rotated at `position`
    v: torch.Tensor = field(repr=False)
    position: int = 0

    @property
    def quality(self) -> float:
        """Cross-chunk rank: the verifier's visual score, text relevance breaking ties."""
        return self.visual_score + 1e-3 * self.text_score

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def summary(self) -> dict[str, Any]:
        return {"frame": self.frame, "chunk": self.chunk, "segment": self.segment, "entities": list(self.entities),
                "text_score": round(self.text_score, 4), "visual_score": round(self.visual_score, 4)}  # fmt: skip


@dataclass
class _Candidate:
    chunk: int
    segment: int
    frames: tuple[int, ...]
    entities: tuple[int, ...]
    text_scores: tuple[float, ...]


def greedy_cover(
    archive: list[ArchivedFrame], wanted: tuple[int, ...], max_frames: int, min_frames_multi_entity: int
) -> list[ArchivedFrame]:
    """Frames covering the wanted entity IDs: repeatedly take the frame showing the most still-uncovered IDs (ties:
    better quality, then newer), up to `max_frames`; with two or more wanted IDs, top up to
    `min_frames_multi_entity` frames with the best remaining frames that show any of them."""
    chosen: list[ArchivedFrame] = []
    uncovered = set(wanted)
    while uncovered and len(chosen) < max_frames:
        options = [f for f in archive if f not in chosen and uncovered & set(f.entities)]
        if not options:
            break
        best = max(options, key=lambda f: (len(uncovered & set(f.entities)), f.quality, f.frame))
        chosen.append(best)
        uncovered -= set(best.entities)
    floor = min(min_frames_multi_entity, max_frames) if len(set(wanted)) >= 2 else 0
    while len(chosen) < floor:
        options = [f for f in archive if f not in chosen and set(wanted) & set(f.entities)]
        if not options:
            break
        chosen.append(max(options, key=lambda f: (f.quality, f.frame)))
    return chosen


def evict(archive: list[ArchivedFrame], limit_bytes: int, keep: int = 1) -> list[ArchivedFrame]:
    """Drop frames until the archive fits `limit_bytes` (keeping at least `keep`): first the worst frame whose
    entities all appear in other frames (redundant), else the worst frame. Returns the evicted frames."""
    gone = []
    while len(archive) > keep and sum(f.nbytes for f in archive) > limit_bytes:

        def redundant(f: ArchivedFrame) -> bool:
            others = set().union(*(set(g.entities) for g in archive if g is not f))
            return set(f.entities) <= others

        pool = [f for f in archive if redundant(f)] or archive
        worst = min(pool, key=lambda f: (f.quality, f.frame))
        archive.remove(worst)
        gone.append(worst)
    return gone


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


def _last_frame_of_each_latent(num_pixel_frames: int, num_latents: int) -> list[int]:
    """Pixel frame index standing for each latent frame of a decoded chunk (the last one it decodes to)."""
    first = num_pixel_frames - 4 * (num_latents - 1)  # 1 for the video's first chunk, else 4
    return [first - 1 + 4 * i for i in range(num_latents)]


class IdentityMemory:
    name = "identity"

    def __init__(
        self,
        registry: EntityRegistry | None,
        *,
        verifier: Any = None,
        max_frames: int = 4,
        min_frames_multi_entity: int = 2,
        visual_weight: float = 0.3,
        archive_limit_bytes: int = 2 * 2**30,
        entity_token_weight: float = 2.5,
        verifier_wait: float | None = None,
    ) -> None:
        self.registry = registry
        self.verifier = verifier
        self.max_frames = max_frames
        self.min_frames_multi_entity = min_frames_multi_entity
        self.visual_weight = visual_weight if verifier is not None else 0.0
        self.archive_limit_bytes = archive_limit_bytes
        self.entity_token_weight = entity_token_weight
        self.archive: list[ArchivedFrame] = []
        self.injected: list[ArchivedFrame] = []
        self.timeline: list[dict[str, Any]] = []
        self.corrections: dict[int, list[str]] = {}
        self._pending: list[_Candidate] = []
        self._chunks: dict[int, tuple[int, str, bool]] = {}  # chunk -> (segment, prompt, first chunk of segment)
        self._weights: dict[int, torch.Tensor | None] = {}
        self._submitted: dict[int, threading.Event] = {}  # set once a chunk's frames went to the verifier
        self.submit_timeout = 120.0  # the longest the loop waits for a chunk's frames to be decoded
        # The longest the loop waits for a verdict the frame choice needs, in seconds; None: VERIFIER_SHARE of the
        # sampler's recent chunk time, so a slow verifier can cost the loop at most that share. A later verdict
        # still corrects attributes when it comes; that chunk's frame is chosen on text alone.
        self.verifier_wait = verifier_wait
        self._chunk_seconds: float | None = None  # moving average of the time between chunks
        self._last_chunk_at: float | None = None
        self.late_verdicts = 0
        self._late: list[int] = []
        self.peak_archive_bytes = 0

    # policy hooks ------------------------------------------------------------------------------------------------
    def start(self, ctx: StepContext) -> None:
        require_memory_segment(ctx, self.max_frames, "max_frames")
        ctx.cache.clear_memory()

    def on_switch(self, ctx: StepContext) -> None:
        self._decide(ctx, until=ctx.chunk)  # archive what the previous prompt still has in the window
        wanted = self._entities(ctx.segment)
        if self.registry is None:  # no entity extraction: keep the frames most relevant to the new prompt
            chosen = self._most_relevant(ctx)
        else:
            chosen = greedy_cover(self.archive, wanted, self.max_frames, self.min_frames_multi_entity)
        self._inject(ctx, chosen)
        ctx.info["retrieved"] = {"wanted": list(wanted), "frames": [f.summary() for f in chosen]}

    def before_chunk(self, ctx: StepContext) -> None:
        ctx.info["memory_frames"] = [f.frame for f in self.injected]

    def after_chunk(self, ctx: StepContext) -> None:
        self._clock()
        if self._late:
            self._collect_late()
        first_of_segment = ctx.chunk == 0 or self._chunks.get(ctx.chunk - 1, (None,))[0] != ctx.segment
        self._chunks[ctx.chunk] = (ctx.segment, ctx.prompt, first_of_segment)
        if self.verifier is not None and ctx.decoding:
            self._submitted[ctx.chunk] = threading.Event()  # before the decode is submitted: no race
        frames = tuple(f for f in range(ctx.start_frame, ctx.start_frame + ctx.num_frames) if f >= self._sink(ctx))
        stored = set(ctx.cache.state.local)
        frames = tuple(f for f in frames if f in stored)  # sink frames are always attended; nothing to archive
        if frames:
            scores = self._text_scores(ctx, frames)
            self._pending.append(_Candidate(ctx.chunk, ctx.segment, frames, self._entities(ctx.segment), scores))
        # Decide before the frames leave the window: the next commit evicts the oldest chunk still in it.
        keep = ctx.cache.cfg.local_frames // ctx.cache.cfg.chunk_frames
        archived = self._decide(ctx, until=ctx.chunk - keep + 2)
        if archived:
            ctx.info["archived"] = [f.summary() for f in archived]
            self._refresh(ctx, archived)
        ctx.info["archive_frames"] = len(self.archive)
        ctx.info["archive_mb"] = round(sum(f.nbytes for f in self.archive) / 2**20, 1)

    def on_frames(self, chunk: int, frames: np.ndarray) -> None:
        """The chunk's frames are on the host: send them to the verifier (one pixel frame per latent frame)."""
        if self.verifier is None or chunk not in self._chunks:
            return
        segment, prompt, first = self._chunks[chunk]
        picks = frames[_last_frame_of_each_latent(frames.shape[0], 3 if frames.shape[0] >= 9 else 1)]
        entities = [self.registry.entity(i) for i in self._entities(segment)] if self.registry else []
        try:
            self.verifier.submit(chunk, picks, prompt, entities, check_attributes=first and bool(entities))
        finally:
            if chunk in self._submitted:
                self._submitted[chunk].set()

    # decisions ---------------------------------------------------------------------------------------------------
    def _sink(self, ctx: StepContext) -> int:
        return ctx.cache.cfg.sink_frames

    def _entities(self, segment: int) -> tuple[int, ...]:
        if self.registry is None or segment >= len(self.registry.prompts):
            return ()
        return self.registry.ids_in(segment)

    def _token_weights(self, ctx: StepContext) -> torch.Tensor | None:
        if ctx.segment not in self._weights:
            weights = None
            if ctx.tokenizer is not None and self.registry is not None:
                phrases = []
                for m in self.registry.prompts[ctx.segment]:
                    entity = self.registry.entity(m.entity)
                    phrases += [m.text, entity.name, *entity.aliases]
                weights = entity_token_weights(
                    ctx.tokenizer, ctx.prompt, phrases, ctx.text.shape[0], self.entity_token_weight
                )
            self._weights[ctx.segment] = weights
        return self._weights[ctx.segment]

    def _text_scores(self, ctx: StepContext, frames: tuple[int, ...]) -> tuple[float, ...]:
        query = text_query(ctx.cross, ctx.text.to(ctx.cross.k.device), self._token_weights(ctx))
        descriptors = []
        for f in frames:
            k, position = ctx.cache.frame_keys(f)
            descriptors.append(frame_descriptor(k, position, ctx.rope))
        return tuple(frame_relevance(query, torch.stack(descriptors)).tolist())

    def _visual(self, ctx: StepContext, candidate: _Candidate) -> tuple[float, ...]:
        submitted = self._submitted.get(candidate.chunk)
        if self.verifier is None or submitted is None:  # no verifier, or no decoded frames to verify
            return (0.5,) * len(candidate.frames)
        # The frames of this chunk may still be decoding: the loop waits only here, when the choice needs them.
        if not submitted.is_set():
            ctx.flush_frames()
        arrived = submitted.wait(self.submit_timeout)
        del self._submitted[candidate.chunk]  # only now: the decode worker looks the event up to set it
        if not arrived:
            logger.warning("chunk %d was not decoded within %.0f s; neutral visual scores", candidate.chunk,
                           self.submit_timeout)  # fmt: skip
            return (0.5,) * len(candidate.frames)
        # A job still waiting behind another cannot finish within the short wait: do not spend it.
        started = getattr(self.verifier, "started", None)
        wait = self._wait_limit() if started is None or started(candidate.chunk) else 0.0
        verdict = self.verifier.result(candidate.chunk, wait=True, timeout=wait)
        if _not_ready(verdict):
            self._late.append(candidate.chunk)
            self.late_verdicts += 1
            return (0.5,) * len(candidate.frames)
        self._apply_corrections(verdict)
        scores = list(verdict.scores)[-len(candidate.frames) :]
        return tuple(scores + [0.5] * (len(candidate.frames) - len(scores)))

    def _clock(self) -> None:
        now = time.perf_counter()
        if self._last_chunk_at is not None:
            period = now - self._last_chunk_at
            self._chunk_seconds = period if self._chunk_seconds is None else 0.7 * self._chunk_seconds + 0.3 * period
        self._last_chunk_at = now

    def _wait_limit(self) -> float:
        if self.verifier_wait is not None:
            return self.verifier_wait
        if self._chunk_seconds is None:  # the first chunks: no pace known yet
            return FIRST_CHUNKS_WAIT
        return VERIFIER_SHARE * self._chunk_seconds

    def _apply_corrections(self, verdict: Any) -> None:
        for entity_id, attrs in getattr(verdict, "corrections", {}).items():
            if self.registry is not None and entity_id in {e.id for e in self.registry.entities}:
                self.registry = self.registry.with_attributes(entity_id, list(attrs))
                self.corrections[entity_id] = list(attrs)

    def _collect_late(self) -> None:
        """Verdicts that came after their chunk's frame was chosen: keep their attribute corrections."""
        for chunk in list(self._late):
            verdict = self.verifier.result(chunk, wait=False)
            if not _not_ready(verdict):
                self._late.remove(chunk)
                self._apply_corrections(verdict)

    def _decide(self, ctx: StepContext, until: int) -> list[ArchivedFrame]:
        """Choose and archive the best frame of every pending chunk with index < until."""
        archived = []
        for candidate in [c for c in self._pending if c.chunk < until]:
            self._pending.remove(candidate)
            visual = self._visual(ctx, candidate)
            text = np.array(candidate.text_scores)
            spread = text.max() - text.min()
            text_norm = (text - text.min()) / spread if spread > 0 else np.full_like(text, 0.5)
            fused = (1 - self.visual_weight) * text_norm + self.visual_weight * np.array(visual)
            best = int(fused.argmax())
            frame = candidate.frames[best]
            if frame not in ctx.cache.state.local:
                continue  # already left the window (a cache smaller than the decision lag)
            k, v, position = ctx.cache.frame_kv(frame)  # a copy on the cache's device
            entry = ArchivedFrame(frame, candidate.chunk, candidate.segment, candidate.entities,
                                  float(text[best]), float(visual[best]), k, v, position)  # fmt: skip
            self.archive.append(entry)
            for gone in evict(self.archive, self.archive_limit_bytes, keep=self.max_frames):
                self.timeline.append({"evicted": gone.summary()})
            if entry in self.archive:  # moved to host memory only once it has a place: the bound holds strictly
                entry.k, entry.v = _to_host(entry.k), _to_host(entry.v)
                archived.append(entry)
            self.peak_archive_bytes = max(self.peak_archive_bytes, sum(f.nbytes for f in self.archive))
        return archived

    def _refresh(self, ctx: StepContext, new: list[ArchivedFrame]) -> None:
        """Within a prompt: add a new frame of the current entities if there is room, or let it replace the weakest
        injected frame whose entities it also shows."""
        wanted = set(self._entities(ctx.segment))
        changed = False
        for frame in new:
            if not wanted & set(frame.entities) or frame.segment != ctx.segment:
                continue
            if len(self.injected) < self.max_frames and len(self.injected) < max(len(wanted), 1):
                self.injected.append(frame)
                changed = True
                continue
            weaker = [f for f in self.injected if set(f.entities) <= set(frame.entities) and f.quality < frame.quality]
            if weaker:
                self.injected[self.injected.index(min(weaker, key=lambda f: f.quality))] = frame
                changed = True
        if changed:
            self._inject(ctx, list(self.injected))
            ctx.info["refreshed"] = [f.frame for f in self.injected]

    def _most_relevant(self, ctx: StepContext) -> list[ArchivedFrame]:
        if not self.archive:
            return []
        query = text_query(ctx.cross, ctx.text.to(ctx.cross.k.device))
        if ctx.cache.k.is_cuda:  # the host copies are read here on the CPU: let their transfers finish
            torch.cuda.current_stream(ctx.cache.k.device).synchronize()
        descriptors = torch.stack([frame_descriptor(f.k, f.position, ctx.rope) for f in self.archive]).to(query.device)
        order = frame_relevance(query, descriptors).argsort(descending=True).tolist()
        return [self.archive[i] for i in order[: self.max_frames]]

    def _inject(self, ctx: StepContext, frames: list[ArchivedFrame]) -> None:
        self.injected = list(frames)
        if not frames:
            ctx.cache.clear_memory()
            return
        frames = sorted(frames, key=lambda f: f.frame)
        k, v = _to_device(frames, "k", ctx.cache.k), _to_device(frames, "v", ctx.cache.k)
        ctx.cache.set_memory(k, v, [f.frame for f in frames], [f.position for f in frames])

    # report ------------------------------------------------------------------------------------------------------
    def story_map(self) -> dict[str, Any]:
        if self._late:
            self._collect_late()  # verdicts that arrived after the last chunk still correct the registry
        return {
            "registry": self.registry.to_dict() if self.registry is not None else None,
            "archive": [f.summary() for f in self.archive],
            "archive_mb": round(sum(f.nbytes for f in self.archive) / 2**20, 1),
            "peak_archive_mb": round(self.peak_archive_bytes / 2**20, 1),
            "corrections": {str(k): v for k, v in self.corrections.items()},
            "late_verdicts": self.late_verdicts,
            "events": self.timeline,
        }


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a frame's K or V. From a GPU it goes to pinned memory without stopping the loop: the copy is
    ordered on the stream, so later GPU reads of it are safe, and host reads synchronise first (`_most_relevant`)."""
    if not t.is_cuda:
        return t.cpu()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def _to_device(frames: list[ArchivedFrame], name: str, like: torch.Tensor) -> torch.Tensor:
    """The frames' K (or V) side by side along the token axis, on `like`'s device and dtype: [L, B, n*T, H, D].
    Each frame is copied straight into place (no host-side concatenation of hundreds of MB)."""
    parts = [getattr(f, name) for f in frames]
    tokens = parts[0].shape[2]
    out = torch.empty((*parts[0].shape[:2], tokens * len(parts), *parts[0].shape[3:]), device=like.device,
                      dtype=like.dtype)  # fmt: skip
    for i, part in enumerate(parts):
        out[:, :, i * tokens : (i + 1) * tokens].copy_(part, non_blocking=part.is_pinned())
    return out


def _not_ready(verdict: Any) -> bool:
    return not getattr(verdict, "ok", True) and getattr(verdict, "note", "").startswith(NOT_READY)
