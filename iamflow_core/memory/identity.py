"""IAMFlow's identity-aware memory: frames tagged with the entities they show come back when those entities do.

Per chunk: the chunk's latent frames are candidates; a text score (the frame's keys against the prompt's entity
tokens, found with the tokenizer's offsets) is fused with the verifier's visual score, and the best frame is
archived with the entity IDs of its prompt. The choice is made just before the frames leave the rolling window, so
the verifier (asynchronous, on its own device) has had a chunk's time to answer; the DiT waits only if it is late.
At a prompt switch the memory segment is rebuilt by greedy set cover of the new prompt's entity IDs (at least
`min_frames_multi_entity` frames when two or more entities, at most `max_frames`); in between, a better frame of the
same entities replaces the weakest one. The archive keeps generated frames in host memory and is bounded in bytes.

Reference pictures of entities (`EntityRegistry.references`) are archived at the start as pinned frames, never
evicted, kept on the DiT's device, and compete in the frame choice with the score `reference_weight`: at 0 a picture
comes back only while no generated frame shows its entity (at the start and at a prompt switch), at 1 it wins over
every generated frame.

Improves on the reference release: objects are tracked too (they come from the registry), entity tokens are the
prompt's real tokens, scores compare keys by content (temporal RoPE phase removed), frames are ranked across
chunks by visual quality, the archive is bounded, and every setting reaches the loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..devices import to_device_async
from ..models.dit import CrossKV
from ..story.entities import EntityRegistry
from ..verify import NEUTRAL, Verdict, Verifier
from .archive import Archive, ArchivedFrame, HostValues, greedy_cover, host_buffers, to_device
from .base import StepContext, require_memory_segment
from .pacing import VerdictPacing
from .scoring import entity_token_weights, frame_descriptor, frame_relevance, text_query

logger = logging.getLogger(__name__)

# How much more the tokens naming an entity weigh in a frame's text score than the prompt's other tokens.
ENTITY_TOKEN_WEIGHT = 2.5


@dataclass
class _Candidate:
    chunk: int
    segment: int
    frames: tuple[int, ...]
    entities: tuple[int, ...]
    query: torch.Tensor  # the prompt's text query at this chunk
    text_scores: HostValues | None = None  # one per frame, read when the frame is chosen (by then on the host)


@dataclass(frozen=True)
class _Chunk:
    """What the memory keeps of a chunk until its frames reach the verifier."""

    segment: int
    prompt: str
    first_of_segment: bool
    latent_frames: int
    temporal_factor: int | None


# Frames whose host buffers are made ahead when a story starts, at most (the default 2-GiB bound holds 7 full-size
# frames; a larger bound makes the rest as they come, and small models do not make thousands).
RESERVED_FRAMES = 8


def frames_to_reserve(limit_bytes: int, frame_bytes: int) -> int:
    """Frames (K and V of `frame_bytes` together) whose host buffers a story makes ahead: as many as the archive's
    bound holds, plus one (a frame comes in before the one it evicts goes), at most `RESERVED_FRAMES`."""
    return min(limit_bytes // frame_bytes + 1, RESERVED_FRAMES)


def _last_frame_of_each_latent(num_pixel_frames: int, num_latents: int, temporal_factor: int) -> list[int]:
    """Pixel frame index standing for each latent frame of a decoded chunk (the last one it decodes to)."""
    first = num_pixel_frames - temporal_factor * (num_latents - 1)  # 1 for the video's first chunk, else the factor
    return [first - 1 + temporal_factor * i for i in range(num_latents)]


class IdentityMemory:
    """The identity-aware memory policy. Settings are those of `settings.MemorySettings` (declared and validated
    there): max_frames, min_frames_multi_entity, visual_weight, archive_limit_bytes, verifier_wait,
    reference_weight."""

    name = "identity"

    def __init__(
        self,
        registry: EntityRegistry | None,
        *,
        max_frames: int,
        min_frames_multi_entity: int,
        visual_weight: float,
        archive_limit_bytes: int,
        verifier: Verifier | None = None,
        verifier_wait: float | None = None,
        reference_weight: float = 0.0,
    ) -> None:
        self.registry = registry
        self.reference_weight = reference_weight
        self.max_frames, self.min_frames_multi_entity = max_frames, min_frames_multi_entity
        self.visual_weight = visual_weight if verifier is not None else 0.0
        self.pacing = VerdictPacing(verifier, verifier_wait) if verifier is not None else None
        self.archive = Archive(archive_limit_bytes, keep=max_frames)
        self.injected: list[ArchivedFrame] = []
        self.timeline: list[dict[str, Any]] = []  # evictions, for the story map
        self.corrections: dict[int, list[str]] = {}
        self._pending: list[_Candidate] = []  # chunks whose frame is not chosen yet
        self._chunks: dict[int, _Chunk] = {}
        self._weights: dict[int, torch.Tensor | None] = {}  # per segment: entity-token weights of its prompt
        # K/V of frames already on the GPU, by id(frame): those of the memory segment in use, and those of frames
        # archived this chunk (their host copies may still be on the way). A refresh copies only these.
        self._segment: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._query: tuple[CrossKV, int, torch.Tensor] | None = None  # the text query of the conditioning in force

    @property
    def late_verdicts(self) -> int:
        """Chunks whose frame was chosen on text alone because their verdict came too late."""
        return self.pacing.late_verdicts if self.pacing is not None else 0

    @property
    def jobs_skipped(self) -> int:
        """Chunks not sent to the verifier: their verdict could not have come before their frame was chosen."""
        return self.pacing.jobs_skipped if self.pacing is not None else 0

    @property
    def verdicts_used(self) -> int:
        """Chunks whose frame was chosen with the verifier's scores (its verdict came in time)."""
        return self.pacing.verdicts_used if self.pacing is not None else 0

    # policy hooks ------------------------------------------------------------------------------------------------
    def start(self, ctx: StepContext) -> None:
        require_memory_segment(ctx, self.max_frames, "max_frames")
        ctx.cache.clear_memory()
        if ctx.cache.k.is_cuda:  # host buffers for the frames the archive holds, made while the window fills
            frame = ctx.cache.k[:, :, : ctx.cache.tokens_per_frame]
            host_buffers.reserve(
                frame.shape, frame.dtype, 2 * frames_to_reserve(self.archive.limit_bytes, 2 * frame.nbytes)
            )
        if self.registry is not None and self.registry.references:
            self._pin_references(ctx)
            self._bring_back(ctx)  # the first prompt's entities: only their pictures exist yet

    def on_switch(self, ctx: StepContext) -> None:
        self._decide(ctx, until=ctx.chunk)  # archive what the previous prompt still has in the window
        self._bring_back(ctx)
        self._fresh.clear()

    def before_chunk(self, ctx: StepContext) -> None:
        ctx.info["memory_frames"] = [f.frame for f in self.injected]

    def after_chunk(self, ctx: StepContext) -> None:
        if self.pacing is not None:
            self.pacing.tick()
            self._collect_late()
        previous = self._chunks.get(ctx.chunk - 1)
        first = previous is None or previous.segment != ctx.segment
        self._chunks[ctx.chunk] = _Chunk(ctx.segment, ctx.prompt, first, ctx.num_frames, ctx.temporal_factor)
        if self.pacing is not None and ctx.decoding:
            self.pacing.expect(ctx.chunk)
        stored = set(ctx.cache.state.local)  # sink frames are always attended; nothing to archive
        frames = tuple(f for f in range(ctx.start_frame, ctx.start_frame + ctx.num_frames) if f in stored)
        if frames:
            self._pending.append(_Candidate(ctx.chunk, ctx.segment, frames, self._entities(ctx.segment),
                                            self._text_query(ctx)))  # fmt: skip
        # Scored behind the chunk on the GPU, or a chunk later when its K/V come from another GPU (`relay.py`): by
        # then they are there, and the DiT's GPU does not wait for them.
        # Each step in a profiler range of its own, so that a trace (`bench speed --trace`) says which one held the
        # sampler's thread.
        with torch.profiler.record_function("iamflow.identity.text_scores"):
            for candidate in self._pending:
                if candidate.text_scores is None and not ctx.cache.arriving(candidate.frames):
                    candidate.text_scores = self._text_scores(ctx, candidate.query, candidate.frames)
        # Decide before the frames leave the window: the next commit evicts the oldest chunk still in it.
        keep = ctx.cache.cfg.local_frames // ctx.cache.cfg.chunk_frames
        with torch.profiler.record_function("iamflow.identity.decide"):
            archived = self._decide(ctx, until=ctx.chunk - keep + 2)
        if archived:
            ctx.info["archived"] = [f.summary() for f in archived]
            with torch.profiler.record_function("iamflow.identity.refresh"):
                self._refresh(ctx, archived)
        self._fresh.clear()
        ctx.info["archive_frames"] = len(self.archive)
        ctx.info["archive_mb"] = round(self.archive.nbytes / 2**20, 1)

    def on_frames(self, chunk: int, frames: np.ndarray) -> None:
        """The chunk's frames are on the host: send them to the verifier (one pixel frame per latent frame) if its
        verdict can still count (`VerdictPacing.worth_scoring`)."""
        if self.pacing is None or chunk not in self._chunks:
            return
        info = self._chunks[chunk]
        picks = frames[_last_frame_of_each_latent(frames.shape[0], info.latent_frames, info.temporal_factor)]
        entities = [self.registry.entity(i) for i in self._entities(info.segment)] if self.registry else []
        check = info.first_of_segment and bool(entities)
        if not self.pacing.worth_scoring(check, chunk):
            self.pacing.skip(chunk)
            return
        try:
            self.pacing.verifier.submit(chunk, picks, info.prompt, entities, check_attributes=check)
        finally:
            self.pacing.submitted(chunk)

    # decisions ---------------------------------------------------------------------------------------------------
    def _pin_references(self, ctx: StepContext) -> None:
        """Each reference picture as a pinned frame tagged with its entity, made under the first prompt that
        names the entity (the first prompt if none does)."""
        references = self.registry.references
        if ctx.encode_image is None:
            raise ValueError("reference pictures need the VAE to encode them; connect a VAE to the sampler")
        k = ctx.cache.k
        self.archive.check_room(len(references), 2 * k[:, :, : ctx.cache.tokens_per_frame].nbytes)
        frames = []
        for n, ref in enumerate(references, start=1):
            segment = next((s for s in range(len(self.registry.prompts)) if ref.entity in self._entities(s)), 0)
            k, v, position = ctx.encode_image(ref.pixels, segment)
            frames.append(ArchivedFrame(-n, -1, segment, (ref.entity,), self.reference_weight, self.reference_weight,
                                        k, v, position, reference=ref.name))  # fmt: skip
        self.archive.pin(frames)

    def _bring_back(self, ctx: StepContext) -> None:
        """Fill the memory segment for the prompt of `ctx`: the frames covering its entities (without a registry,
        the frames most relevant to it), and report them."""
        wanted = self._entities(ctx.segment)
        if self.registry is None:  # no entity extraction: keep the frames most relevant to the new prompt
            chosen = self._most_relevant(ctx)
        else:
            chosen = greedy_cover(self.archive.frames, wanted, self.max_frames, self.min_frames_multi_entity)
        self._inject(ctx, chosen)
        ctx.info["retrieved"] = {"wanted": list(wanted), "frames": [f.summary() for f in chosen]}

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
                    ctx.tokenizer, ctx.prompt, phrases, ctx.text.shape[0], ENTITY_TOKEN_WEIGHT
                )
                if weights is not None:  # once per prompt, without waiting for the GPU
                    weights = to_device_async(weights, ctx.cross.k.device)
            self._weights[ctx.segment] = weights
        return self._weights[ctx.segment]

    def _text_query(self, ctx: StepContext) -> torch.Tensor:
        """The prompt's text query for frame scores: one per prompt (per chunk while a soft switch blends)."""
        if self._query is None or self._query[0] is not ctx.cross or self._query[1] != ctx.segment:
            query = text_query(ctx.cross, ctx.text.to(ctx.cross.k.device), self._token_weights(ctx))
            self._query = (ctx.cross, ctx.segment, query)
        return self._query[2]

    def _text_scores(self, ctx: StepContext, query: torch.Tensor, frames: tuple[int, ...]) -> HostValues:
        """The frames' text scores, queued on the GPU behind the chunk: the loop does not wait for them."""
        descriptors = []
        for f in frames:
            k, position = ctx.cache.frame_keys(f)
            descriptors.append(frame_descriptor(k, position, ctx.rope))
        return HostValues(frame_relevance(query, torch.stack(descriptors)))

    def _visual(self, ctx: StepContext, candidate: _Candidate) -> tuple[float, ...]:
        """The verifier's score of each candidate frame; neutral without a verdict in time."""
        n = len(candidate.frames)
        verdict = self.pacing.verdict(candidate.chunk, ctx.flush_frames) if self.pacing is not None else None
        if verdict is None:
            return (NEUTRAL,) * n
        self._apply_corrections(verdict)
        scores = list(verdict.scores)[-n:]
        return tuple(scores + [NEUTRAL] * (n - len(scores)))

    def _apply_corrections(self, verdict: Verdict) -> None:
        for entity_id, attrs in verdict.corrections.items():
            if self.registry is not None and entity_id in {e.id for e in self.registry.entities}:
                self.registry = self.registry.with_attributes(entity_id, list(attrs))
                self.corrections[entity_id] = list(attrs)

    def _collect_late(self) -> None:
        """Verdicts that came after their chunk's frame was chosen: keep their attribute corrections."""
        for verdict in self.pacing.late_verdicts_ready():
            self._apply_corrections(verdict)

    def _decide(self, ctx: StepContext, until: int) -> list[ArchivedFrame]:
        """Choose and archive the best frame of every pending chunk with index < until."""
        archived = []
        for candidate in [c for c in self._pending if c.chunk < until]:
            self._pending.remove(candidate)
            visual = self._visual(ctx, candidate)
            if candidate.text_scores is None:  # its K/V are still on their way: this waits for them
                candidate.text_scores = self._text_scores(ctx, candidate.query, candidate.frames)
            text = np.array(candidate.text_scores.tolist())
            spread = text.max() - text.min()
            text_norm = (text - text.min()) / spread if spread > 0 else np.full_like(text, NEUTRAL)
            fused = (1 - self.visual_weight) * text_norm + self.visual_weight * np.array(visual)
            best = int(fused.argmax())
            frame = candidate.frames[best]
            if frame not in ctx.cache.state.local:
                continue  # already left the window (a cache smaller than the decision lag)
            k, v, position = ctx.cache.frame_kv(frame)  # a copy on the cache's device
            entry = ArchivedFrame(frame, candidate.chunk, candidate.segment, candidate.entities,
                                  float(text[best]), float(visual[best]), k, v, position,
                                  descriptor=frame_descriptor(k, position, ctx.rope))  # fmt: skip
            kept, gone = self.archive.add(entry)  # entry's K/V now go to host memory
            self.timeline += [{"evicted": f.summary()} for f in gone]
            if kept:
                archived.append(entry)
                self._fresh[id(entry)] = (k, v)
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
        descriptors = self.archive.descriptors(ctx.rope, like=ctx.cache.k)
        order = frame_relevance(query, descriptors).argsort(descending=True).tolist()
        return [self.archive.frames[i] for i in order[: self.max_frames]]

    def _inject(self, ctx: StepContext, frames: list[ArchivedFrame]) -> None:
        """Make `frames` the memory segment. Frames already on the GPU (in the segment now, or archived this chunk)
        are copied there; only the others come from host memory."""
        self.injected = list(frames)
        if not frames:
            ctx.cache.clear_memory()
            self._segment = {}
            return
        frames = sorted(frames, key=lambda f: f.frame)
        ready = {**self._segment, **self._fresh}
        k = to_device(frames, "k", ctx.cache.k, {i: kv[0] for i, kv in ready.items()})
        v = to_device(frames, "v", ctx.cache.k, {i: kv[1] for i, kv in ready.items()})
        ctx.cache.set_memory(k, v, [f.frame for f in frames], [f.position for f in frames])
        tokens = k.shape[2] // len(frames)
        self._segment = {
            id(f): (k[:, :, i * tokens : (i + 1) * tokens], v[:, :, i * tokens : (i + 1) * tokens])
            for i, f in enumerate(frames)
        }

    # report ------------------------------------------------------------------------------------------------------
    def story_map(self) -> dict[str, Any]:
        if self.pacing is not None:
            self._collect_late()  # verdicts that arrived after the last chunk still correct the registry
        return {
            "registry": self.registry.to_dict() if self.registry is not None else None,
            "archive": [f.summary() for f in self.archive],
            "archive_mb": round(self.archive.nbytes / 2**20, 1),
            "peak_archive_mb": round(self.archive.peak_bytes / 2**20, 1),
            "corrections": {str(k): v for k, v in self.corrections.items()},
            "late_verdicts": self.late_verdicts,
            "verdicts_used": self.verdicts_used,
            "verifier_skipped": self.jobs_skipped,
            "events": self.timeline,
        }
