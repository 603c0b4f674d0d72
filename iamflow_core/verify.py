"""Frame verification as a service beside the sampler: the `Verdict` a scorer gives, and the runners that call it.

A `Scorer` (the VLM in `story/vlm.py`, or anything with its `score` method) looks at a chunk's frames and gives a
`Verdict`: one score per frame in [0, 1] and, on request, corrected attributes per entity ID. A `Verifier` runs a
scorer for the memory: `AsyncVerifier` on one worker thread behind a bounded queue (`submit` never blocks, the
worker takes attribute checks first and then the newest job, a full queue drops its oldest plain job, `result`
waits at most `timeout` seconds), `ImmediateVerifier` on the caller's thread
(the "no async" ablation). Any failure gives a neutral verdict: the verifier can make memory selection better,
never stop a run. Nothing here imports a model library.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .story.entities import Entity

logger = logging.getLogger(__name__)

NEUTRAL = 0.5
NOT_READY = "not ready"  # the note of a verdict whose answer had not come within the wait


class Status(enum.Enum):
    SCORED = "scored"  # the scorer's answer
    NEUTRAL = "neutral"  # a stand-in: unreadable answer, scorer error, dropped or closed job, unknown key
    NOT_READY = "not ready"  # the answer had not come within the wait; it may still come (ask again later)


@dataclass(frozen=True)
class Verdict:
    scores: tuple[float, ...]  # one per frame, in [0, 1]
    corrections: dict[int, tuple[str, ...]]  # entity id -> corrected attributes (only when asked to check)
    status: Status = Status.SCORED
    note: str = ""

    @property
    def ok(self) -> bool:
        """The scorer's own answer (not a neutral stand-in)."""
        return self.status is Status.SCORED

    @property
    def ready(self) -> bool:
        """False only while the answer may still come."""
        return self.status is not Status.NOT_READY

    @classmethod
    def neutral(cls, num_frames: int, note: str, status: Status = Status.NEUTRAL) -> Verdict:
        return cls((NEUTRAL,) * num_frames, {}, status, note)

    def frame_score(self, index: int) -> float:
        """The score of frame `index`; neutral when the verdict has none for it (e.g. for an unknown key)."""
        return self.scores[index] if 0 <= index < len(self.scores) else NEUTRAL


def check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        got = f"{type(frames).__name__} {getattr(frames, 'shape', '')} {getattr(frames, 'dtype', '')}"
        raise ValueError(f"frames must be a uint8 array [n, H, W, 3] with n >= 1, got {got}")
    if frames.shape[0] < 1:
        raise ValueError("frames must hold at least one frame, got 0")


class Scorer(Protocol):
    """Scores a chunk's frames (e.g. `story.vlm.FrameVerifier`); may be slow, runs on the verifier's own device."""

    def score(
        self, frames: np.ndarray, prompt: str, entities: Sequence[Entity], check_attributes: bool = False
    ) -> Verdict: ...


class Verifier(Protocol):
    """What a memory policy uses: hand a chunk's frames in, read its verdict when the frame choice needs it.

    `result` never raises for a missing answer: it gives a neutral verdict, with `Status.NOT_READY` when the answer
    may still come (ask again later). `started` tells whether the job for a key is being scored or done, so a caller
    does not spend a wait on a job still queued behind others."""

    def submit(
        self,
        key: Hashable,
        frames: np.ndarray,
        prompt: str,
        entities: Sequence[Entity],
        check_attributes: bool = False,
    ) -> None: ...
    def result(self, key: Hashable, wait: bool = True, timeout: float | None = None) -> Verdict: ...
    def started(self, key: Hashable) -> bool: ...
    def pending(self) -> int: ...
    def close(self) -> None: ...


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


class _Runner:
    """What both runners share: `submit` checks and copies the frames into a job, `_take` runs or queues it; a
    context manager that closes the runner."""

    def submit(
        self,
        key: Hashable,
        frames: np.ndarray,
        prompt: str,
        entities: Sequence[Entity],
        check_attributes: bool = False,
    ) -> None:
        self._take(_make_job(key, frames, prompt, entities, check_attributes))

    def _take(self, job: _Job) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncVerifier(_Runner):
    """A `Verifier` that scores frames on one worker thread. `submit` never blocks; `result` waits at most `timeout`
    seconds.

    The worker takes the oldest waiting attribute check first (its corrections fix the registry whenever they come),
    else the newest job: the memory chooses a chunk's frame soon after submitting it (by default at the end of the
    next chunk), so with a VLM slower than the sampler the oldest plain job is the one whose verdict would come too
    late, and the newest the one that can still be used. When `max_queue` jobs are waiting, submitting another drops
    the oldest waiting one that is not an attribute check (the oldest check if all are); its key gets a neutral
    verdict with a note. Verdicts are kept (they are small) and can still be read after `close`. `stats()` counts
    the jobs scored and dropped and the time spent scoring."""

    def __init__(self, verifier: Scorer, *, max_queue: int = 4, timeout: float = 30.0) -> None:
        if max_queue < 1 or timeout < 0:
            raise ValueError(f"max_queue must be >= 1 and timeout >= 0, got {max_queue} and {timeout}")
        self.verifier, self.max_queue, self.timeout = verifier, max_queue, timeout
        self._queue: OrderedDict[Hashable, _Job] = OrderedDict()
        self._results: dict[Hashable, Verdict] = {}
        self._running: _Job | None = None
        self._closed = False
        self._scored, self._dropped, self._seconds = 0, 0, 0.0
        self._recent: float | None = None  # recent plain (no attribute check) jobs' seconds: see recent_job_seconds
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="iamflow-verifier", daemon=True)
        self._thread.start()

    def _take(self, job: _Job) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the verifier was closed; create a new AsyncVerifier to submit more frames")
            self._results.pop(job.key, None)
            self._queue.pop(job.key, None)
            if len(self._queue) >= self.max_queue:
                self._drop_oldest()
            self._queue[job.key] = job
            self._cond.notify_all()

    def _drop_oldest(self) -> None:
        old_key = next((k for k, j in self._queue.items() if not j.check_attributes), next(iter(self._queue)))
        old = self._queue.pop(old_key)
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
            return Verdict.neutral(len(job.frames), NOT_READY, Status.NOT_READY)
        if timeout is None:
            logger.warning("verifier result for %r not ready after %.1fs; neutral scores", key, limit)
        return Verdict.neutral(len(job.frames), f"{NOT_READY} after {limit:g}s", Status.NOT_READY)

    def started(self, key: Hashable) -> bool:
        """Whether the job for `key` is being scored or done (False while it waits in the queue)."""
        with self._cond:
            return key in self._results or (self._running is not None and self._running.key == key)

    def pending(self) -> int:
        """Jobs submitted and not finished (waiting or running)."""
        with self._cond:
            return len(self._queue) + (self._running is not None)

    def recent_job_seconds(self) -> float | None:
        """How long a plain job (no attribute check) has taken lately; None before the first. A moving average that
        believes a faster job at once: a first job that also set the model up (a CUDA-graph capture) must not make
        the memory think for long that jobs cannot keep up."""
        with self._cond:
            return self._recent

    def stats(self) -> dict[str, float]:
        """Jobs scored and dropped so far, the seconds spent scoring and their mean per scored job."""
        with self._cond:
            mean = self._seconds / self._scored if self._scored else 0.0
            return {"scored": self._scored, "dropped": self._dropped, "seconds": round(self._seconds, 3),
                    "mean_job_s": round(mean, 3)}  # fmt: skip

    def close(self, wait: float = 5.0) -> None:
        """Stop the worker: the running job may finish (up to `wait` seconds); waiting jobs get neutral verdicts."""
        with self._cond:
            self._closed = True
            for key, job in self._queue.items():
                self._results[key] = Verdict.neutral(len(job.frames), "verifier closed before this job ran")
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout=wait)

    def _next_key(self) -> Hashable:
        """The oldest waiting attribute check, else the newest waiting job (see the class docstring)."""
        return next((k for k, j in self._queue.items() if j.check_attributes), next(reversed(self._queue)))

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                self._running = self._queue.pop(self._next_key())
            start = time.perf_counter()
            verdict = _run_job(self.verifier, self._running)
            with self._cond:
                seconds = time.perf_counter() - start
                self._scored += 1
                self._seconds += seconds
                if not self._running.check_attributes:
                    slower = self._recent is not None and seconds > self._recent
                    self._recent = 0.7 * self._recent + 0.3 * seconds if slower else seconds
                # A job resubmitted under the same key while this one ran is newer; keep its slot.
                if self._running.key not in self._queue:
                    self._results[self._running.key] = verdict
                self._running = None
                self._cond.notify_all()


class ImmediateVerifier(_Runner):
    """A `Verifier` that scores on the caller's thread at `submit` (the "no async" ablation)."""

    def __init__(self, verifier: Scorer) -> None:
        self.verifier = verifier
        self._results: dict[Hashable, Verdict] = {}

    def _take(self, job: _Job) -> None:
        self._results[job.key] = _run_job(self.verifier, job)

    def result(self, key: Hashable, wait: bool = True, timeout: float | None = None) -> Verdict:
        if key not in self._results:
            logger.warning("no verifier job for key %r; neutral scores", key)
            return Verdict.neutral(0, f"unknown key {key!r}")
        return self._results[key]

    def started(self, key: Hashable) -> bool:
        """Every submitted job is done: it was scored at `submit`."""
        return key in self._results

    def pending(self) -> int:
        return 0

    def close(self) -> None:
        """Nothing runs in the background; part of the `Verifier` protocol."""
