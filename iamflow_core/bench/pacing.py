"""Which verifier jobs pay off at a given pace: the real `AsyncVerifier` and `VerdictPacing` with a stand-in VLM.

    python -m iamflow_core bench pacing [--chunk-ms 340] [--job-ms 1100] [--submit-at 0.5] [--chunks 156]

A stand-in sampler makes a chunk every `--chunk-ms`; chunk c's frames reach the verifier `--submit-at` of the way
through chunk c + 1 (about 0.5 with the VAE on its own GPU, near 1 on a shared one) and its frame is chosen at the
end of chunk c + 1, as the identity memory does with the default window (12 latent frames: sink, the chunk, two
chunks of history). Every 13th chunk opens a prompt and asks for an attribute check. The stand-in VLM takes
`--job-ms` per job. Times run `--scale` times faster than given, so a run takes seconds, on a CPU.

For two policies it prints the frame choices made with the verifier's scores, the jobs skipped, scored and dropped,
and the attribute checks scored: `current` (a plain job is sent only when its verdict can still count,
`VerdictPacing.worth_scoring`; the worker takes checks first, then the newest job; a full queue drops plain jobs
first) and `before` (every chunk sent, oldest job first, the oldest dropped), for comparison. Measured job times
are in the README.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Hashable, Iterator

import numpy as np

from ..memory.pacing import VerdictPacing
from ..verify import AsyncVerifier, Verdict

PROMPT_CHUNKS = 13  # the default 6 x 10 s story: a prompt every 13 chunks


class _Sleeper:
    """A stand-in VLM: `seconds` per job, full scores."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.checks = seconds, 0

    def score(self, frames, prompt, entities, check_attributes=False) -> Verdict:
        time.sleep(self.seconds)
        self.checks += check_attributes
        return Verdict((0.9,) * len(frames), {})


class _Fifo(AsyncVerifier):
    """The order before: the oldest job first, and a full queue drops the oldest, attribute checks included."""

    def _next_key(self) -> Hashable:
        return next(iter(self._queue))

    def _drop_oldest(self) -> None:
        key, job = self._queue.popitem(last=False)
        self._dropped += 1
        self._results[key] = Verdict.neutral(len(job.frames), "dropped")
        self._cond.notify_all()


def simulate(chunk_s: float, job_s: float, submit_at: float, chunks: int, policy: str, queue: int = 4) -> dict:
    """One run at real-time `chunk_s` and `job_s` (already scaled); the counts of what paid off."""
    scorer = _Sleeper(job_s)
    verifier = (_Fifo if policy == "before" else AsyncVerifier)(scorer, max_queue=queue)
    pacing = VerdictPacing(verifier, None)
    frames = np.zeros((3, 4, 4, 3), np.uint8)
    used = 0
    with verifier:
        for c in range(chunks):
            start = time.perf_counter()
            pacing.tick()
            pacing.expect(c)
            time.sleep(chunk_s * submit_at)
            check = (c - 1) % PROMPT_CHUNKS == 0
            if c >= 1 and (policy == "before" or pacing.worth_scoring(check)):
                verifier.submit(c - 1, frames, "prompt", [], check_attributes=check)
                pacing.submitted(c - 1)
            elif c >= 1:
                pacing.skip(c - 1)
            time.sleep(max(0.0, chunk_s - (time.perf_counter() - start)))
            if c >= 1:
                verdict = pacing.verdict(c - 1, lambda: None)
                used += verdict is not None and verdict.ok
        while verifier.pending():
            time.sleep(job_s / 10)
        stats = verifier.stats()
    return {"policy": policy, "frame_choices": chunks - 1, "with_scores": used, "skipped": pacing.jobs_skipped,
            "scored": stats["scored"], "dropped": stats["dropped"], "checks": len(range(0, chunks - 1, PROMPT_CHUNKS)),
            "checks_scored": scorer.checks}  # fmt: skip


def main(argv: list[str] | None = None) -> Iterator[str]:
    """Yield the result lines (comments start with #, results are JSON rows)."""
    parser = argparse.ArgumentParser(
        prog="python -m iamflow_core bench pacing", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--chunk-ms", type=float, default=340.0, help="time between chunks (2x H200: ~340)")
    parser.add_argument("--job-ms", type=float, default=1100.0, help="one verifier job (2x H200 in a render: ~1100)")
    parser.add_argument("--submit-at", type=float, default=0.5, help="when in the next chunk the frames arrive (0-1)")
    parser.add_argument("--chunks", type=int, default=156, help="chunks to simulate (two 60-s stories: 156)")
    parser.add_argument("--queue", type=int, default=4, help="jobs that may wait (the CLI's default: 4)")
    parser.add_argument("--scale", type=float, default=10.0, help="run this many times faster than real time")
    args = parser.parse_args(argv)
    lowest = {"--chunk-ms": (args.chunk_ms, 1.0), "--job-ms": (args.job_ms, 0.0), "--chunks": (args.chunks, 2),
              "--queue": (args.queue, 1), "--scale": (args.scale, 1.0)}  # fmt: skip
    for name, (value, low) in lowest.items():
        if value < low:
            parser.error(f"{name} {value:g}: give at least {low:g}")
    if not 0.0 <= args.submit_at <= 1.0:
        parser.error(f"--submit-at {args.submit_at:g}: give a share of a chunk from 0 to 1")
    yield (f"# chunk {args.chunk_ms:g} ms, job {args.job_ms:g} ms, frames in at {args.submit_at:g} of the next chunk, "
           f"{args.chunks} chunks, queue {args.queue}, {args.scale:g}x real time")  # fmt: skip
    for policy in ("current", "before"):
        yield json.dumps(simulate(args.chunk_ms / 1e3 / args.scale, args.job_ms / 1e3 / args.scale, args.submit_at,
                                  args.chunks, policy, args.queue))  # fmt: skip
