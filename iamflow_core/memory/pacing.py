"""When the identity memory reads the verifier, and how long it waits: a slow verifier must not hold the sampler.

The memory chooses a chunk's frame a little after the chunk is made (just before its frames leave the window), so
the verifier has had a chunk's time to answer. `VerdictPacing` waits at most a small share of the sampler's chunk
time for a verdict (or the set `verifier_wait`), never for a job still queued behind others, and keeps the late
ones: a verdict that comes after its chunk's frame was chosen still corrects the registry's attributes. Nor does
it wait for a chunk's frames to be decoded when a job sent that instant could not finish within the wait anyway.

It also decides which chunks go to the verifier at all (`worth_scoring`). An attribute check always goes: its
corrections count whenever they come. A plain job only scores frames for the frame choice, so it goes when its
verdict can still reach that choice: the verifier is idle and its recent plain jobs took no longer than the time
left until the choice. Others would only take GPU time from the sampler (11 % of it on a shared H200); every
`PROBE_EVERY`-th of them goes anyway, so the verifier's job time stays known.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from ..verify import Verdict, Verifier

logger = logging.getLogger(__name__)

# Without a set `verifier_wait`, the loop waits for a late verdict at most this share of its chunk time, so a
# verifier slower than the sampler costs it at most that much; before the pace is known, FIRST_CHUNKS_WAIT seconds.
VERIFIER_SHARE = 0.05
FIRST_CHUNKS_WAIT = 0.05
# The longest the loop waits for a chunk's frames to be decoded and handed to the verifier, in seconds.
SUBMIT_TIMEOUT = 120.0
# Of the plain jobs that could not pay off, one in this many is sent anyway, to keep the job time up to date.
PROBE_EVERY = 8


class VerdictPacing:
    """The identity memory's side of the verifier: which chunks' frames went to it, and each chunk's verdict.

    wait: the longest the loop waits for a verdict the frame choice needs, in seconds; None: `VERIFIER_SHARE` of
    the sampler's recent chunk time.
    """

    def __init__(self, verifier: Verifier, wait: float | None) -> None:
        self.verifier, self.wait = verifier, wait
        self.submit_timeout = SUBMIT_TIMEOUT
        self.chunk_seconds: float | None = None  # moving average of the time between chunks
        self._last_chunk_at: float | None = None
        self._submitted: dict[int, threading.Event] = {}  # set once a chunk's frames went to the verifier
        self._late: list[int] = []
        self._skipped: set[int] = set()
        self._chosen: set[int] = set()  # chunks whose frame was chosen before their frames were decoded
        self._deciding = False  # inside `verdict`: frames handed over now are at their frame choice already
        self._skipped_in_row = 0
        self.late_verdicts = 0
        self.verdicts_used = 0  # frame choices made with the verifier's scores
        self.jobs_skipped = 0  # plain jobs not sent: their verdict could not have come in time

    def tick(self) -> None:
        """Once per chunk: keeps the sampler's pace."""
        now = time.perf_counter()
        if self._last_chunk_at is not None:
            period = now - self._last_chunk_at
            self.chunk_seconds = period if self.chunk_seconds is None else 0.7 * self.chunk_seconds + 0.3 * period
        self._last_chunk_at = now

    def wait_limit(self) -> float:
        if self.wait is not None:
            return self.wait
        if self.chunk_seconds is None:  # the first chunks: no pace known yet
            return FIRST_CHUNKS_WAIT
        return VERIFIER_SHARE * self.chunk_seconds

    def time_left(self) -> float | None:
        """Seconds until the frame choice of the chunk whose frames arrive now (None before the pace is known): the
        end of the chunk being made, or, when the frames arrive while that choice is being made, the wait alone."""
        if self._deciding:
            return self.wait_limit()
        if self.chunk_seconds is None or self._last_chunk_at is None:
            return None
        return max(0.0, self._last_chunk_at + self.chunk_seconds - time.perf_counter()) + self.wait_limit()

    def worth_scoring(self, check_attributes: bool, chunk: int | None = None) -> bool:
        """Whether a chunk's frames should go to the verifier now (see the module docstring)."""
        if check_attributes:
            return True
        if self.verifier.pending():
            return False  # it would wait behind another job: too late whatever the job time
        recent = self._recent_job_seconds()
        # A chunk whose frame is chosen already: its scores would not count, so only a probe of the job time goes.
        left = 0.0 if chunk in self._chosen else self.time_left()
        if recent is None or left is None or recent <= left:
            self._skipped_in_row = 0
            return True
        self._skipped_in_row += 1
        if self._skipped_in_row >= PROBE_EVERY:
            self._skipped_in_row = 0
            return True
        return False

    def skip(self, chunk: int) -> None:
        """The chunk's frames do not go to the verifier: its frame is chosen on text alone, without waiting."""
        self._skipped.add(chunk)
        self.jobs_skipped += 1
        self.submitted(chunk)

    def expect(self, chunk: int) -> None:
        """The chunk's frames will be decoded and submitted (call before its decode is queued: no race)."""
        self._submitted[chunk] = threading.Event()

    def submitted(self, chunk: int) -> None:
        """The chunk's frames reached the verifier (or failed to): the loop may stop waiting for them."""
        if chunk in self._submitted:
            self._submitted[chunk].set()

    def verdict(self, chunk: int, flush_frames: Callable[[], None]) -> Verdict | None:
        """The chunk's verdict for the frame choice, or None: no frames of it were sent, they were not decoded in
        time, or the verdict is late (then kept for `late_verdicts_ready`)."""
        submitted = self._submitted.get(chunk)
        if submitted is None:
            return None
        if not submitted.is_set() and self._too_slow_for_the_wait():
            # The frames are still decoding, and a job sent now would still be running when the wait ends: choose on
            # text at once instead of waiting for the decode (2x H200, iamflow, the VAE on the second GPU: the
            # sampler waited 93-100 ms for it, twice in a story's first ten chunks, with the DiT's GPU idle). Should
            # the frames go to the verifier still (an attribute check), its verdict is a late one.
            self._chosen.add(chunk)
            self._late.append(chunk)
            return None
        if not submitted.is_set():  # the frames may still be decoding: the loop waits only here
            self._deciding = True
            try:
                flush_frames()
            finally:
                self._deciding = False
        arrived = submitted.wait(self.submit_timeout)
        del self._submitted[chunk]  # only now: the decode worker looks the event up to set it
        if chunk in self._skipped:
            self._skipped.discard(chunk)
            return None
        if not arrived:
            logger.warning("chunk %d was not decoded within %.0f s; neutral visual scores", chunk, self.submit_timeout)
            return None
        # A job still waiting behind another cannot finish within the short wait: do not spend it.
        wait = self.wait_limit() if self.verifier.started(chunk) else 0.0
        verdict = self.verifier.result(chunk, wait=True, timeout=wait)
        if not verdict.ready:
            self._late.append(chunk)
            self.late_verdicts += 1
            return None
        self.verdicts_used += verdict.ok  # a dropped or failed job's neutral verdict carries no scores
        return verdict

    def _recent_job_seconds(self) -> float | None:
        """How long the verifier's recent plain jobs took (None before the first, or a verifier that does not say)."""
        return getattr(self.verifier, "recent_job_seconds", lambda: None)()

    def _too_slow_for_the_wait(self) -> bool:
        """Whether a job sent now would not be done when the loop stops waiting for its verdict: the verifier is busy
        (the job would queue), or its recent plain jobs took longer than the wait."""
        if self.verifier.pending():
            return True
        recent = self._recent_job_seconds()
        return recent is not None and recent > self.wait_limit()

    def late_verdicts_ready(self) -> Iterator[Verdict]:
        """Verdicts that came after their chunk's frame was chosen (each once)."""
        for chunk in list(self._late):
            if chunk in self._chosen:  # chosen before its frames were decoded: were they sent at all?
                submitted = self._submitted[chunk]
                if not submitted.is_set():
                    continue  # still decoding
                self._chosen.discard(chunk)
                del self._submitted[chunk]
                if chunk in self._skipped:  # not sent: no verdict will come
                    self._skipped.discard(chunk)
                    self._late.remove(chunk)
                    continue
                self.late_verdicts += 1
            verdict = self.verifier.result(chunk, wait=False)
            if verdict.ready:
                self._late.remove(chunk)
                yield verdict
