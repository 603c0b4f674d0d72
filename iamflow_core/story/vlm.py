"""Frame verification with a local vision-language model (Qwen3-VL-2B-Instruct), and the worker that runs it off the
DiT's critical path.

`FrameVerifier.score` shows the VLM a few decoded frames of a chunk with the prompt and the entities that should be
in it, and reads back one score per frame in [0, 1] (and, on request, corrected attributes per entity ID) as a
`Verdict`. Any failure (unreadable answer, model error) gives a neutral verdict (0.5 per frame, `ok=False`) and a
logged warning: the verifier can make memory selection better, never stop a run.

`AsyncVerifier` runs `score` in one worker thread (the VLM sits on its own device) behind a bounded queue: `submit`
never blocks, a full queue drops its oldest job, and `result` waits at most `timeout` seconds. `ImmediateVerifier`
has the same interface and scores on the caller's thread (the "no async" ablation).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .entities import Entity
from .llm import chat_prompt, check_model_folder, free_model, greedy_config, parse_json_answer, resolve_dtype

logger = logging.getLogger(__name__)

NEUTRAL = 0.5
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

INSTRUCTION = """\
The {n} images are frames from one shot of a generated video. The shot should show:
"{prompt}"
{entities}
Score each frame from 0 to 1 for how well it shows this: the subjects clearly visible, each listed entity \
recognisable as itself, its appearance as described. 1 means clearly and correctly shown; 0 means missing or wrong.
{check}Reply with JSON only, one score per frame in order: {{"scores": [{example}], "corrections": {{}}}}"""

CHECK = """\
Also compare each entity's expected appearance with the frames:
{lines}
For an entity that looks different, put the attributes as the frames show them under its ID, e.g. \
"corrections": {{"{first_id}": ["grey hoodie", "short brown hair"]}}; leave "corrections" empty when all match.
"""


NOT_READY = "not ready"  # the note of a neutral verdict given because the real one had not arrived yet


@dataclass(frozen=True)
class Verdict:
    scores: tuple[float, ...]  # one per frame, in [0, 1]
    corrections: dict[int, tuple[str, ...]]  # entity id -> corrected attributes (only when asked to check)
    ok: bool  # False: neutral stand-in (bad answer, error, timeout, dropped job)
    note: str = ""

    @classmethod
    def neutral(cls, num_frames: int, note: str) -> Verdict:
        return cls((NEUTRAL,) * num_frames, {}, ok=False, note=note)

    def frame_score(self, index: int) -> float:
        """The score of frame `index`; neutral when the verdict has none for it (e.g. for an unknown key)."""
        return self.scores[index] if 0 <= index < len(self.scores) else NEUTRAL


# ---------------------------------------------------------------------------------------------------------------------
# Prompt and answer
# ---------------------------------------------------------------------------------------------------------------------


def verifier_instruction(num_frames: int, prompt: str, entities: Sequence[Entity], check_attributes: bool) -> str:
    """The text after the images: the prompt, the entities, and the JSON to answer with."""
    if entities:
        listed = "; ".join(f"ID {e.id}: {e.name} ({e.kind})" for e in entities)
        entity_text = f"Entities that should be recognisable: {listed}."
    else:
        entity_text = "No entities are listed; judge the main subject."
    check = ""
    if check_attributes and entities:
        lines = "\n".join(
            f"  ID {e.id} {e.name}: {', '.join(e.attributes) or 'no attributes given'}" for e in entities
        )
        check = CHECK.format(lines=lines, first_id=entities[0].id)
    example = ", ".join(f"<frame {i + 1}>" for i in range(num_frames))
    return INSTRUCTION.format(n=num_frames, prompt=prompt, entities=entity_text, check=check, example=example)


def parse_verdict(text: str, num_frames: int, entity_ids: Sequence[int], check_attributes: bool = False) -> Verdict:
    """A `Verdict` from the VLM's answer: scores clamped to [0, 1] and padded with 0.5 (extra ones dropped),
    corrections kept only for listed entity IDs and only when asked for. An answer without a score list is neutral."""
    data = parse_json_answer(text, list_key="scores") if isinstance(text, str) else None
    raw = data.get("scores") if data is not None else None
    notes = []
    if data is None and isinstance(text, str):  # e.g. cut off inside the corrections: keep the complete score list
        raw, data = _salvage_scores(text), {}
        notes.append("answer cut off or malformed; scores only")
    if not isinstance(raw, list) or not raw:
        return Verdict.neutral(num_frames, f"no score list in the verifier answer {str(text)[:80]!r}")
    scores = [_score(v) for v in raw[:num_frames]]
    if len(raw) != num_frames:
        notes.append(f"{len(raw)} scores for {num_frames} frames")
    if any(s is None for s in scores):
        notes.append("non-numeric scores set to 0.5")
    scores = [NEUTRAL if s is None else s for s in scores] + [NEUTRAL] * (num_frames - len(scores))
    corrections = _corrections(data.get("corrections"), set(entity_ids)) if check_attributes else {}
    return Verdict(tuple(scores), corrections, ok=True, note="; ".join(notes))


_SCORES = re.compile(r"""["']?scores["']?\s*:\s*\[([^\[\]]*)\]""")


def _salvage_scores(text: str) -> list[str] | None:
    found = _SCORES.search(text)
    return [v.strip() for v in found.group(1).split(",") if v.strip()] if found else None


def _score(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip().rstrip("%")) / (100 if value.strip().endswith("%") else 1)
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or value != value:  # NaN
        return None
    return min(1.0, max(0.0, float(value)))


def _corrections(raw: Any, known: set[int]) -> dict[int, tuple[str, ...]]:
    """Accepts {"3": ["a", "b"]}, {"3": {"corrected_attrs": [...]}} / {"attributes": [...]}, or {"3": "a, b"}."""
    if not isinstance(raw, dict):
        return {}
    out: dict[int, tuple[str, ...]] = {}
    for key, value in raw.items():
        entity_id = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        if isinstance(value, dict):
            value = value.get("attributes", value.get("corrected_attrs", value.get("attrs")))
        if isinstance(value, str):
            value = value.split(",")
        if entity_id not in known or not isinstance(value, list):
            continue
        attrs = tuple(" ".join(v.split()) for v in value if isinstance(v, str) and v.strip())
        if attrs:
            out[entity_id] = attrs[:12]
    return out


def resize_frames(frames: np.ndarray, short_side: int) -> list[Any]:
    """PIL images with the short side at `short_side` (aspect kept; the long side capped at 4x)."""
    from PIL import Image

    out = []
    for frame in frames:
        h, w = frame.shape[:2]
        scale = short_side / min(h, w)
        size = (min(round(w * scale), 4 * short_side), min(round(h * scale), 4 * short_side))
        out.append(Image.fromarray(frame).resize(size, Image.Resampling.BICUBIC))
    return out


def check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        got = f"{type(frames).__name__} {getattr(frames, 'shape', '')} {getattr(frames, 'dtype', '')}"
        raise ValueError(f"frames must be a uint8 array [n, H, W, 3] with n >= 1, got {got}")
    if frames.shape[0] < 1:
        raise ValueError("frames must hold at least one frame, got 0")


# ---------------------------------------------------------------------------------------------------------------------
# The verifier
# ---------------------------------------------------------------------------------------------------------------------


class FrameVerifier:
    """Scores frames against a prompt and its entities with a local Qwen3-VL folder (transformers, no remote code)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        max_new_tokens: int = 160,
        short_side: int = 256,
    ) -> None:
        if max_new_tokens < 16 or short_side < 32:
            raise ValueError(f"max_new_tokens {max_new_tokens} (>= 16) or short_side {short_side} (>= 32) too small")
        self.model_dir = check_model_folder(model_dir, "frame-verifier VLM (e.g. Qwen3-VL-2B-Instruct)")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_new_tokens, self.short_side = max_new_tokens, short_side
        self._model = self._load_model()
        self._inputs = _load_inputs(self.model_dir, self._model.config)

    def _load_model(self) -> Any:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(self.model_dir, dtype=self.dtype, local_files_only=True)
        logger.info("verifier VLM loaded from %s on %s (%s)", self.model_dir, self.device, self.dtype)
        return model.to(self.device).eval()

    def unload(self) -> None:
        if self._model is not None:
            model, self._model = self._model, None
            free_model(model, self.device)

    def score(
        self, frames: np.ndarray, prompt: str, entities: Sequence[Entity], check_attributes: bool = False
    ) -> Verdict:
        """Per-frame scores for `frames` [n, H, W, 3] uint8; a neutral verdict (and a warning) on any model failure."""
        check_frames(frames)
        n, ids = frames.shape[0], [e.id for e in entities]
        try:
            answer = self.answer(frames, prompt, entities, check_attributes)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:  # model-side failures: OOM, shapes, processor
            logger.warning("verifier failed (%s: %s); neutral scores", type(e).__name__, e)
            return Verdict.neutral(n, f"verifier error: {type(e).__name__}: {e}")
        verdict = parse_verdict(answer, n, ids, check_attributes)
        if not verdict.ok:
            logger.warning("verifier answer unreadable; neutral scores (%s)", verdict.note)
        return verdict

    def token_budget(self, num_frames: int, entities: Sequence[Entity], check_attributes: bool) -> int:
        """`max_new_tokens`, raised when the answer needs more: about 6 tokens per score and 48 per corrected entity
        (a cut-off answer loses its corrections; greedy decoding stops at the end of the JSON anyway)."""
        need = 16 + 6 * num_frames + (48 * len(entities) if check_attributes else 0)
        return max(self.max_new_tokens, need)

    @torch.inference_mode()
    def answer(self, frames: np.ndarray, prompt: str, entities: Sequence[Entity], check_attributes: bool) -> str:
        """The VLM's raw answer text for these frames (greedy decoding)."""
        if self._model is None:
            raise RuntimeError("the verifier VLM was unloaded; create a new FrameVerifier")
        images = resize_frames(frames, self.short_side)
        instruction = verifier_instruction(len(images), prompt, entities, check_attributes)
        text = chat_prompt(
            self._inputs.tokenizer, [{"role": "user", "content": IMAGE * len(images) + "\n" + instruction}]
        )
        batch = self._inputs.encode(text, images)
        batch = {
            k: v.to(self.device, self.dtype) if k == "pixel_values" else v.to(self.device) for k, v in batch.items()
        }
        config = greedy_config(self._model, self.token_budget(len(images), entities, check_attributes),
                               self._inputs.tokenizer.pad_token_id)  # fmt: skip
        out = self._model.generate(**batch, generation_config=config)
        return self._inputs.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


class _Inputs:
    """Turns a chat text with image placeholders plus PIL images into model inputs.

    With the real `AutoProcessor` when it loads. It needs torchvision (for its video processor), which cannot be
    installed next to a CPU build of torch; then the PIL image processor is used and each `<|image_pad|>` is expanded
    to `grid_t * grid_h * grid_w / merge**2` copies here, as the processor would do (parity.md §2.2)."""

    def __init__(self, processor: Any, tokenizer: Any, image_processor: Any, image_token_id: int) -> None:
        self.processor, self.tokenizer, self.image_processor = processor, tokenizer, image_processor
        self.image_token_id = image_token_id

    def encode(self, text: str, images: list[Any]) -> dict[str, torch.Tensor]:
        if self.processor is not None:
            return dict(self.processor(text=[text], images=images, return_tensors="pt"))
        pixels = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size**2
        pieces = text.split("<|image_pad|>")
        if len(pieces) != len(images) + 1:
            raise ValueError(f"{len(pieces) - 1} image placeholders for {len(images)} images")
        counts = [int(g.prod()) // merge for g in pixels["image_grid_thw"]]
        expanded = pieces[0] + "".join("<|image_pad|>" * c + p for c, p in zip(counts, pieces[1:]))
        tokens = self.tokenizer([expanded], return_tensors="pt")
        mm_types = (tokens["input_ids"] == self.image_token_id).to(torch.int32)  # 1 = image token (M-RoPE layout)
        return {**tokens, "mm_token_type_ids": mm_types, **pixels}


def _load_inputs(folder: Path, config: Any) -> _Inputs:
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    image_token_id = config.image_token_id
    if is_torchvision_available():
        try:
            processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            return _Inputs(processor, processor.tokenizer, processor.image_processor, image_token_id)
        except ImportError as e:  # a torchvision that does not match torch
            logger.warning("AutoProcessor failed to load (%s); using the PIL image processor", str(e).strip()[:200])
    else:
        logger.info("torchvision is not installed; the VLM uses the PIL image processor")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return _Inputs(None, tokenizer, _pil_image_processor(folder, config.vision_config), image_token_id)


def _pil_image_processor(folder: Path, vision: Any) -> Any:
    """Qwen2-VL's PIL image processor with the folder's settings; patch and merge sizes come from the model config."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    sizes = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                 temporal_patch_size=vision.temporal_patch_size)  # fmt: skip
    if (folder / "preprocessor_config.json").is_file():
        return Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True, **sizes)
    return Qwen2VLImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3, **sizes)


# ---------------------------------------------------------------------------------------------------------------------
# Running it beside the DiT
# ---------------------------------------------------------------------------------------------------------------------


class Scorer(Protocol):
    def score(
        self, frames: np.ndarray, prompt: str, entities: Sequence[Entity], check_attributes: bool = False
    ) -> Verdict: ...


@dataclass(frozen=True)
class _Job:
    key: Hashable
    frames: np.ndarray
    prompt: str
    entities: tuple[Entity, ...]
    check_attributes: bool


def _run_job(scorer: Scorer, job: _Job) -> Verdict:
    """`scorer.score` for a job; any exception becomes a neutral verdict with a warning (the worker must live on)."""
    try:
        verdict = scorer.score(job.frames, job.prompt, job.entities, job.check_attributes)
    except Exception as e:  # the verifier is advisory: its failure must never reach the DiT
        logger.warning("verifier job %r failed (%s: %s); neutral scores", job.key, type(e).__name__, e)
        return Verdict.neutral(len(job.frames), f"verifier error: {type(e).__name__}: {e}")
    if not isinstance(verdict, Verdict) or len(verdict.scores) != len(job.frames):
        logger.warning("verifier job %r returned %r; neutral scores", job.key, verdict)
        return Verdict.neutral(len(job.frames), "verifier returned an invalid verdict")
    return verdict


def _make_job(key: Hashable, frames: np.ndarray, prompt: str, entities: Sequence[Entity], check: bool) -> _Job:
    check_frames(frames)
    # A copy: the caller may reuse its frame buffer for the next chunk while the job waits.
    return _Job(key, np.array(frames, copy=True), prompt, tuple(entities), check)


class AsyncVerifier:
    """Scores frames on one worker thread. `submit` never blocks; `result` waits at most `timeout` seconds.

    When `max_queue` jobs are waiting, submitting another drops the oldest waiting one; its key gets a neutral verdict
    with a note. Verdicts are kept (they are small) and can still be read after `close`. `stats()` counts the jobs
    scored and dropped and the time spent scoring."""

    def __init__(self, verifier: Scorer, *, max_queue: int = 4, timeout: float = 30.0) -> None:
        if max_queue < 1 or timeout < 0:
            raise ValueError(f"max_queue must be >= 1 and timeout >= 0, got {max_queue} and {timeout}")
        self.verifier, self.max_queue, self.timeout = verifier, max_queue, timeout
        self._queue: OrderedDict[Hashable, _Job] = OrderedDict()
        self._results: dict[Hashable, Verdict] = {}
        self._running: _Job | None = None
        self._closed = False
        self._scored, self._dropped, self._seconds = 0, 0, 0.0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="iamflow-verifier", daemon=True)
        self._thread.start()

    def submit(
        self,
        key: Hashable,
        frames: np.ndarray,
        prompt: str,
        entities: Sequence[Entity],
        check_attributes: bool = False,
    ) -> None:
        job = _make_job(key, frames, prompt, entities, check_attributes)
        with self._cond:
            if self._closed:
                raise RuntimeError("the verifier was closed; create a new AsyncVerifier to submit more frames")
            self._results.pop(key, None)
            self._queue.pop(key, None)
            if len(self._queue) >= self.max_queue:
                self._drop_oldest()
            self._queue[key] = job
            self._cond.notify_all()

    def _drop_oldest(self) -> None:
        old_key, old = self._queue.popitem(last=False)
        note = f"dropped: the verifier queue was full ({self.max_queue} jobs waiting)"
        # Expected whenever the VLM is slower than the sampler: counted in stats(), not warned about per chunk.
        logger.debug("verifier job %r %s; neutral scores", old_key, note)
        self._dropped += 1
        self._results[old_key] = Verdict.neutral(len(old.frames), note)
        self._cond.notify_all()

    def result(self, key: Hashable, wait: bool = True, timeout: float | None = None) -> Verdict:
        """The verdict for `key`; neutral (with a note) when unknown, not ready and `wait` is False, or late.

        timeout: how long to wait this time (default: the verifier's `timeout`, after which a warning is logged;
        a caller that sets its own short deadline expects to be early now and then, so that is not warned about).
        """
        limit = self.timeout if timeout is None else timeout
        with self._cond:
            job = self._queue.get(key) or (self._running if self._running and self._running.key == key else None)
            if key not in self._results and job is None:
                logger.warning("no verifier job for key %r; neutral scores", key)
                return Verdict.neutral(0, f"unknown key {key!r}")
            if wait:
                self._cond.wait_for(lambda: key in self._results, timeout=limit)
            if key in self._results:
                return self._results[key]
        if not wait:
            return Verdict.neutral(len(job.frames), NOT_READY)
        if timeout is None:
            logger.warning("verifier result for %r not ready after %.1fs; neutral scores", key, limit)
        return Verdict.neutral(len(job.frames), f"{NOT_READY} after {limit:g}s")

    def started(self, key: Hashable) -> bool:
        """Whether the job for `key` is being scored or done (False while it waits in the queue)."""
        with self._cond:
            return key in self._results or (self._running is not None and self._running.key == key)

    def pending(self) -> int:
        """Jobs submitted and not finished (waiting or running)."""
        with self._cond:
            return len(self._queue) + (self._running is not None)

    def stats(self) -> dict[str, float]:
        """Jobs scored and dropped so far, and the mean seconds per scored job."""
        with self._cond:
            mean = self._seconds / self._scored if self._scored else 0.0
            return {"scored": self._scored, "dropped": self._dropped, "mean_job_s": round(mean, 3)}

    def close(self, wait: float = 5.0) -> None:
        """Stop the worker: the running job may finish (up to `wait` seconds); waiting jobs get neutral verdicts."""
        with self._cond:
            self._closed = True
            for key, job in self._queue.items():
                self._results[key] = Verdict.neutral(len(job.frames), "verifier closed before this job ran")
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout=wait)

    def __enter__(self) -> AsyncVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                _, self._running = self._queue.popitem(last=False)
            start = time.perf_counter()
            verdict = _run_job(self.verifier, self._running)
            with self._cond:
                self._scored += 1
                self._seconds += time.perf_counter() - start
                # A job resubmitted under the same key while this one ran is newer; keep its slot.
                if self._running.key not in self._queue:
                    self._results[self._running.key] = verdict
                self._running = None
                self._cond.notify_all()


class ImmediateVerifier:
    """`AsyncVerifier`'s interface, scoring on the caller's thread at `submit` (the "no async" ablation)."""

    def __init__(self, verifier: Scorer) -> None:
        self.verifier = verifier
        self._results: dict[Hashable, Verdict] = {}

    def submit(
        self,
        key: Hashable,
        frames: np.ndarray,
        prompt: str,
        entities: Sequence[Entity],
        check_attributes: bool = False,
    ) -> None:
        self._results[key] = _run_job(self.verifier, _make_job(key, frames, prompt, entities, check_attributes))

    def result(self, key: Hashable, wait: bool = True, timeout: float | None = None) -> Verdict:
        if key not in self._results:
            logger.warning("no verifier job for key %r; neutral scores", key)
            return Verdict.neutral(0, f"unknown key {key!r}")
        return self._results[key]

    def pending(self) -> int:
        return 0

    def close(self) -> None:
        """Nothing runs in the background; kept for the shared interface."""

    def __enter__(self) -> ImmediateVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
