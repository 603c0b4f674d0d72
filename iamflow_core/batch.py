"""The batch renderer: many stories with the models loaded once per process, and many processes with torchrun.

`python -m iamflow_core batch STORIES --out DIR` reads STORIES (a NarraStream JSONL file, one story per line with an
optional "id"; a .json or .txt story; or a folder of such files) and renders story after story to `DIR/<id>.mp4`
with its story map (`<id>.story.json`, `<id>.story.png`). `DIR/manifest.jsonl` is written as it goes: one JSON
object per story (`manifest_record`; `eval` reads it).

Resuming: a rerun skips a story whose video holds every planned frame and whose story map says the render was not cut
short ("skipped"), and renders a partial one again over its files: the only files a batch ever replaces. A finished
video of another story under the same id is kept, and that story fails with a message saying so.

Failures: a story that cannot be read, or whose render raises, is recorded as "failed" with its one-line error and
the batch goes on; the exit status is 1 when any failed. A stop (Ctrl-C, SIGTERM, SIGHUP) keeps the frames of the
render in progress (`stops.py`), records it as "stopped" and exits with 128 + the signal number.

Ranks: under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) each process is one rank. It joins a process
group (gloo on the CPU, nccl on CUDA), takes its share of the stories (`shard`: longest first onto the least-loaded
rank, the same split on every rank), renders it on its own GPU `cuda:LOCAL_RANK`, or its own pair with
`--gpus-per-rank 2` (DiT on the first, VAE on the second), and writes `manifest.rank<k>.jsonl`; after a barrier,
rank 0 merges those into `manifest.jsonl`. Hosts of a multi-host run share one output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from . import runs
from .config import VIDEO_FPS, CacheConfig
from .model_presets import model_preset
from .outputs import check_output, output_files
from .pipeline import StreamingPipeline
from .render import render_story
from .runs import Say
from .settings import build_memory, sampler_config
from .stops import exit_code, stop_name
from .story import Story, StoryError, load_stories, plan_chunks, read_story_lines
from .story.entities import EntityRegistry, RegistryError
from .video import read_video_frame_count

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
STORY_SUFFIXES = (".json", ".jsonl", ".txt")
# The last barrier waits for the slowest rank, which may still be rendering a long story: far past the default 10 or
# 30 min. A dead rank cannot hang it: torchrun ends every rank when one dies.
BARRIER_TIMEOUT = timedelta(hours=24)
MAX_ID_CHARS = 200


class BatchError(ValueError):
    """A batch that cannot start (no stories, too few GPUs, a flag batch does not take); the message says the fix."""


# ---------------------------------------------------------------------------------------------------------------
# The stories


@dataclass(frozen=True)
class BatchStory:
    """One story of a batch: its position in STORIES, its id (the name of its files), where it comes from, and the
    story with its planned video frames, or the one-line error that kept it from being read (then it is recorded as
    failed)."""

    index: int
    id: str
    source: str
    story: Story | None
    frames: int = 0
    error: str | None = None


def read_stories(
    path: str | Path, default_seconds: float, chunk_frames: int = CacheConfig.chunk_frames
) -> list[BatchStory]:
    """Every story of STORIES: a file, or a folder of story files (by name; story maps and manifests skipped),
    planned in chunks of `chunk_frames` latent frames. A line or file that cannot be read becomes a story with an
    error, so the others still render."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(
            f for f in path.iterdir()
            if f.suffix.lower() in STORY_SUFFIXES and not f.name.endswith(".story.json")
            and not f.name.startswith("manifest")
        )  # fmt: skip
        if not files:
            raise BatchError(f"stories folder {path} holds no story files; put .jsonl, .json or .txt stories in it")
    elif path.is_file():
        files = [path]
    else:
        raise BatchError(f"stories {path} does not exist; give a .jsonl, .json or .txt story file or a folder of them")
    found = [entry for file in files for entry in _read_file(file, default_seconds)]
    return _with_ids(found, chunk_frames)


def _read_file(file: Path, default_seconds: float) -> list[tuple[str, str, Story | StoryError]]:
    """(id, source, story or error) of each story of one file. A JSONL line's id is its "id", else
    `<file name>_<line index>` (000, 001, ...); a .json or .txt story's id is its file name."""
    try:
        if file.suffix.lower() != ".jsonl":
            return [(file.stem, str(file), load_stories(file, default_seconds)[0])]
        lines = read_story_lines(file, default_seconds)
    except StoryError as e:  # the whole file: not UTF-8, no stories, bad JSON in a .json
        return [(file.stem, str(file), e)]
    return [(given or f"{file.stem}_{i:03d}", f"{file} line {n}", story) for i, (n, given, story) in enumerate(lines)]


def _with_ids(found: Sequence[tuple[str, str, Story | StoryError]], chunk_frames: int) -> list[BatchStory]:
    """The stories with their ids checked: an id names files, so it must be a plain file name, used once."""
    stories: list[BatchStory] = []
    first: dict[str, str] = {}  # id -> where it was given first
    for index, (name, source, story) in enumerate(found):
        error = str(story) if isinstance(story, StoryError) else _id_problem(name, source, first)
        first.setdefault(name, source)
        if error:
            stories.append(BatchStory(index, name, source, None, error=error))
        else:
            frames = plan_chunks(story, chunk_frames=chunk_frames).num_video_frames
            stories.append(BatchStory(index, name, source, story, frames))
    return stories


def _id_problem(name: str, source: str, first: dict[str, str]) -> str | None:
    if not name or len(name) > MAX_ID_CHARS or name.startswith(".") or any(c in name for c in "/\\\0"):
        return (
            f'{source}: "id" {name!r} cannot name a file (empty, over {MAX_ID_CHARS} characters, a "/" or "\\" '
            'in it, or a dot first); use a plain name, e.g. "story_007"'
        )
    if name in first:
        return f'{source}: the id {name!r} is also the id of {first[name]}; give every story its own "id"'
    return None


# ---------------------------------------------------------------------------------------------------------------
# Sharding and resuming


def shard(weights: Sequence[int], ranks: int) -> list[list[int]]:
    """The story indices of each rank: longest first onto the least-loaded rank (ties go to the lower story index
    and the lower rank, so every rank computes the same split); each rank's list in story order."""
    if ranks < 1:
        raise ValueError(f"shard needs at least one rank, got {ranks}")
    loads, shares = [0] * ranks, [[] for _ in range(ranks)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        shares[rank].append(i)
        loads[rank] += weights[i]
    return [sorted(share) for share in shares]


def previous_render(out: Path, item: BatchStory) -> str:
    """What `out` holds of `item` from an earlier run: "none"; "partial" (render it again over its files);
    "complete" (skip it); or "other" (a finished render of other prompts or another length, or files this batch
    did not write: keep them, fail this story)."""
    video, map_path = out / f"{item.id}.mp4", out / f"{item.id}.story.json"
    if not video.exists() and not map_path.exists():
        return "none"
    try:
        data = json.loads(map_path.read_text(encoding="utf-8"))
        frames = read_video_frame_count(video)
    except (OSError, ValueError):  # missing, cut short by a kill, not a video
        return "partial"
    if not isinstance(data, dict) or "cancelled" not in data:
        return "other"
    if data["cancelled"] is not False or frames != data.get("planned_frames"):
        return "partial"
    if data.get("prompts") != list(item.story.prompts) or frames != item.frames:
        return "other"
    return "complete"


# ---------------------------------------------------------------------------------------------------------------
# The manifest


def manifest_record(
    item: BatchStory, status: str, frames: int = 0, error: str | None = None, *, rank: int = 0, wall_s=None
) -> dict:
    """One manifest line, the contract `eval` reads: id, video and story_map (file names relative to the manifest's
    folder), frames, seconds, status ("done", "failed", "stopped", "skipped"), error (one line, or None), rank and
    wall_s (seconds of its render, None when it was not rendered)."""
    return {
        "id": item.id, "video": f"{item.id}.mp4", "story_map": f"{item.id}.story.json", "frames": frames,
        "seconds": round(frames / VIDEO_FPS, 3), "status": status, "error": error, "rank": rank, "wall_s": wall_s,
    }  # fmt: skip


def rank_manifest(out: Path, rank: int, world: int) -> Path:
    return out / (MANIFEST if world == 1 else f"manifest.rank{rank}.jsonl")


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def merge_manifests(out: Path, world: int, stories: Sequence[BatchStory]) -> list[dict]:
    """Rank 0, once every rank is done: the rank manifests become `manifest.jsonl` in story order (written whole,
    then moved into place); the rank files are removed. The merged records."""
    position = {item.id: item.index for item in reversed(stories)}
    parts = [rank_manifest(out, k, world) for k in range(world)]
    records = sorted((r for part in parts for r in read_manifest(part)), key=lambda r: position.get(r["id"], 0))
    partial = out / (MANIFEST + ".partial")
    partial.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(partial, out / MANIFEST)
    for part in parts:
        part.unlink()
    return records


# ---------------------------------------------------------------------------------------------------------------
# Ranks and devices


@dataclass(frozen=True)
class Rank:
    """This process's place in a torchrun job (one rank of one when not under torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Rank:
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return cls()
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        found = {n: env.get(n, env["WORLD_SIZE"] if n == "LOCAL_WORLD_SIZE" else "0") for n in names}
        try:
            rank, world, local_rank, local_world = (int(found[n]) for n in names)
        except ValueError as e:
            raise BatchError(
                f"torchrun's variables {found} are not all integers; start the batch with torchrun"
            ) from e
        if not (0 <= rank < world and 0 <= local_rank < local_world):
            raise BatchError(f"torchrun's variables {found} are out of range; start the batch with torchrun")
        return cls(rank, world, local_rank, local_world)


def assign_devices(args: argparse.Namespace, rank: Rank) -> None:
    """This rank's devices: with CUDA, GPU LOCAL_RANK (DiT and VAE), or with --gpus-per-rank 2 the pair
    2*LOCAL_RANK (DiT, text) and 2*LOCAL_RANK+1 (VAE). One rank may name its devices with --device instead."""
    per_rank = args.gpus_per_rank
    given = (args.device, args.vae_device) != runs.default_devices()
    if not torch.cuda.is_available():
        if per_rank > 1:
            raise BatchError(f"--gpus-per-rank {per_rank} needs CUDA GPUs, this machine has none; leave it out")
        return
    if given:
        if rank.world > 1:
            raise BatchError(
                "--device/--vae-device name one process's devices, but this batch has "
                f"{rank.world} ranks, each on its own GPU(s); leave them out (--gpus-per-rank 2 puts the VAE on a "
                "second GPU)"
            )
        return
    need, have = rank.local_world * per_rank, torch.cuda.device_count()
    if have < need:
        raise BatchError(
            f"{rank.local_world} rank(s) on this host x {per_rank} GPU(s) per rank need {need} GPUs, this host has "
            f"{have}; start at most {have // per_rank} rank(s) here (torchrun --nproc-per-node) or use "
            "--gpus-per-rank 1"
        )
    first = rank.local_rank * per_rank
    args.device, args.vae_device = f"cuda:{first}", f"cuda:{first + per_rank - 1}"


@contextmanager
def process_group(rank: Rank, device: str) -> Iterator[None]:
    """Join the torchrun job's process group (nccl on CUDA, gloo on the CPU) for its barriers; none for one rank."""
    if rank.world == 1:
        yield
        return
    cuda = str(device).startswith("cuda")
    extra = {"device_id": torch.device(device)} if cuda else {}
    dist.init_process_group("nccl" if cuda else "gloo", timeout=BARRIER_TIMEOUT, **extra)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


@dataclass
class _Progress:
    """This rank's count of stories and frames, for the line after each story and its ETA (the frames still to
    render at the rate so far, the time between stories included)."""

    total: int
    frames_left: int
    prefix: str = ""
    start: float = field(default_factory=time.perf_counter)
    count: int = 0
    frames_done: int = 0

    def story(self, record: dict, planned: int) -> str:
        self.count += 1
        head = f"{self.prefix}[{self.count}/{self.total}] {record['id']}"
        if record["status"] == "skipped":
            return f"{head}: already complete ({record['frames']} frames), skipped"
        self.frames_left -= planned
        if record["status"] == "failed":
            return f"{head}: failed: {record['error']}"
        self.frames_done += record["frames"]
        fps = record["frames"] / record["wall_s"] if record["wall_s"] else 0.0
        line = f"{head}: {record['frames']} frames in {record['wall_s']:.1f} s ({fps:.1f} FPS)"
        rate = self.frames_done / (time.perf_counter() - self.start)
        return line + (f" · ETA {_duration(self.frames_left / rate)}" if self.frames_left > 0 and rate > 0 else "")


class _Renderer:
    """The models, loaded once, and what rendering one story needs: the sampler config, the memory settings, the
    verifier and the stories' entity registries."""

    def __init__(self, args: argparse.Namespace, items: Sequence[BatchStory], out: Path, say: Say) -> None:
        self.args, self.out, self.say = args, out, say
        self.settings = runs.memory_settings(args)
        size = runs.video_size(args)
        self.config = sampler_config(self.settings, size.height, size.width, model_preset(args.preset_model))
        # Entities first: the LLM is loaded once and gone before the DiT comes.
        t0 = time.perf_counter()
        self.registries = _batch_registries(args, items, self.settings)
        stories, found = [i.story for i in items], [self.registries[i.index] for i in items]
        extracted = runs.extraction_line(args, self.settings, stories, found, time.perf_counter() - t0)
        if extracted:
            say.out(extracted)
        dit, text_encoder, vae = runs.build_models(args)
        say.err(runs.dit_line(dit))
        self.pipe = StreamingPipeline(dit, text_encoder, vae, overlap_decode=False if args.no_overlap else None,
                                      clean_pass_device=args.clean_pass_device)  # fmt: skip
        self.verifier = runs.make_verifier(args, self.settings)

    def close(self) -> None:
        if self.verifier is not None:
            self.verifier.close()

    def render(self, item: BatchStory, replace: bool, stops: list) -> dict:
        """Render one story to OUT/<id>.mp4 and its story map; its manifest record ("done")."""
        target = self.out / f"{item.id}.mp4"
        registry = self.registries[item.index]
        if isinstance(registry, RegistryError):
            raise registry
        if replace:  # a partial render of an earlier run: its files are replaced
            for f in output_files(target):
                f.unlink(missing_ok=True)
        memory = build_memory(self.settings, registry, self.verifier)
        result = render_story(
            self.pipe, item.story, self.config, memory, out_path=target, keep_frames=False, keep_latents=False,
            on_stop=runs.on_stop(target, item.story, registry, stops, self.say),
        )  # fmt: skip
        self.say.out(runs.write_story_map(target, item.story, registry, result))
        return manifest_record(item, "done", result.frames_written, wall_s=round(result.timings["wall"], 2))


def _batch_registries(args: argparse.Namespace, items: Sequence[BatchStory], settings) -> dict:
    """The entity registry of each story to render, by story index: from --registry (a .jsonl, one line per story
    of STORIES; a bad line fails its story only), else from the LLM (`runs.registries`), else None."""
    if args.registry is None or settings.mode != "identity":
        return dict(zip((i.index for i in items), runs.registries(args, [i.story for i in items], settings)))
    path = Path(args.registry).expanduser()
    lines, registries = registry_lines(path), {}
    for item in items:
        number, text = lines[item.index]
        try:
            registries[item.index] = EntityRegistry.from_json(
                text, num_segments=len(item.story.segments), source="user", folder=path.parent
            )
        except RegistryError as e:
            registries[item.index] = RegistryError(f"registry file {path} line {number}: {e}")
    return registries


def registry_lines(path: Path) -> list[tuple[int, str]]:
    """The non-blank lines of a --registry .jsonl, with their 1-based numbers."""
    if path.suffix.lower() != ".jsonl":
        raise BatchError(f"--registry {path}: batch takes a .jsonl with one registry per story, in STORIES order")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"--registry {path} cannot be read ({e}); give a UTF-8 .jsonl, one registry per line") from e
    return [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _check_registry(args: argparse.Namespace, num_stories: int) -> None:
    """One --registry line per story, checked before anything loads (each line is read with its story)."""
    if args.registry is None:
        return
    path = Path(args.registry).expanduser()
    found = len(registry_lines(path))
    if found != num_stories:
        raise BatchError(
            f"--registry {path} holds {found} registries for {num_stories} stories; give one line per story, in "
            "STORIES order ({} for a story without entities)"
        )


def _error_line(e: Exception) -> str:
    """An exception as one line: the message of a user error, else its type and first line."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if isinstance(e, (StoryError, RegistryError)) else f"{type(e).__name__}: {text}".rstrip(": ")


def _story_record(renderer: _Renderer | None, item: BatchStory, state: str, out: Path, stops: list) -> dict:
    """The manifest record of one story: failed (unreadable, in the way of a kept render, or its render raised),
    skipped (complete) or done."""
    if item.story is None:
        return manifest_record(item, "failed", error=item.error)
    if state == "complete":
        return manifest_record(item, "skipped", item.frames)
    if state == "other":
        video = out / f"{item.id}.mp4"
        return manifest_record(
            item, "failed", error=f"{video} holds a finished render of other prompts or another length (or files "
            "this batch did not write); move it away or choose another --out to render this story",
        )  # fmt: skip
    try:
        return renderer.render(item, replace=state == "partial", stops=stops)
    except Exception as e:  # recorded in the manifest and on the progress line; the batch goes on
        logger.info("%s failed", item.id, exc_info=True)  # the traceback with -v
        return manifest_record(item, "failed", stops[-1][1].frames_written if stops else 0, _error_line(e))


def _render_share(
    args: argparse.Namespace, rank: Rank, out: Path, share: Sequence[BatchStory], states: Sequence[str], say: Say
) -> tuple[int | None, list[dict]]:
    """Render this rank's stories one after another, each recorded in its manifest as it ends. (exit status of a
    stop or None, the records)."""
    to_render = [s for s in share if s.story is not None and states[s.index] in ("none", "partial")]
    prefix = f"rank {rank.rank} " if rank.world > 1 else ""
    progress = _Progress(len(share), sum(s.frames for s in to_render), prefix)
    say.out(f"{prefix}{len(share)} stories, {len(to_render)} to render ({progress.frames_left} frames)")
    renderer = _Renderer(args, to_render, out, say) if to_render else None
    progress.start = time.perf_counter()  # the ETA counts rendering, not loading
    path, records = rank_manifest(out, rank.rank, rank.world), []
    try:
        with path.open("w", encoding="utf-8") as manifest:
            for item in share:
                stops: list = []
                try:
                    record = _story_record(renderer, item, states[item.index], out, stops)
                except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP: the frames so far stay in the video
                    frames = stops[-1][1].frames_written if stops else 0
                    record = {**manifest_record(item, "stopped", frames), "rank": rank.rank}
                    manifest.write(json.dumps(record) + "\n")
                    say.err(_stopped_line(stop, item, frames, progress, out, path))
                    return exit_code(stop), [*records, record]
                records.append({**record, "rank": rank.rank})
                manifest.write(json.dumps(records[-1]) + "\n")
                manifest.flush()  # written as it goes: a kill loses no finished story
                say.out(progress.story(records[-1], item.frames))
    finally:
        if renderer is not None:
            renderer.close()
    return None, records


def _stopped_line(stop: BaseException, item: BatchStory, frames: int, progress: _Progress, out: Path, path: Path):
    kept = f"{frames} frames kept in {out / (item.id + '.mp4')} (playable)" if frames else "no frames of it"
    return (
        f"stopped by {stop_name(stop)} during {item.id} after {progress.count} of {progress.total} stories: {kept}; "
        f"manifest: {path}; rerun the same command to go on (finished stories are skipped)"
    )


def _finish(rank: Rank, out: Path, records: Sequence[dict], start: float, say: Say) -> int:
    """The summary line; rank 0 speaks for the batch (its records are the merged ones): 1 if any story failed."""
    counts = {s: sum(r["status"] == s for r in records) for s in ("done", "skipped", "failed")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "nothing"
    took = _duration(time.perf_counter() - start)
    if rank.rank != 0:
        say.out(f"rank {rank.rank}: {summary} in {took}; rank 0 merges the manifests")
        return 0
    say.out(f"batch: {summary} of {len(records)} stories in {took}; manifest: {out / MANIFEST}")
    failed = [r["id"] for r in records if r["status"] == "failed"]
    if failed:
        shown = ", ".join(failed[:5]) + (", ..." if len(failed) > 5 else "")
        say.err(
            f"error: {len(failed)} of {len(records)} stories failed ({shown}); each one's error is in "
            f"{out / MANIFEST}; fix them and rerun (finished stories are skipped)"
        )
        return 1
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    """Flags of `generate` that give one story something; a batch has many."""
    if args.image:
        raise BatchError("--image gives one story its first frame; render that story with generate --image")
    if args.reference:
        raise BatchError(
            '--reference adds pictures to one story; put "images" in each story\'s line of the --registry .jsonl'
        )


def _seeded(story: Story | None, seed: int) -> Story | None:
    return None if story is None else dataclasses.replace(story, seed=seed)


def run(args: argparse.Namespace, say: Say) -> int:
    """The batch command, in steps; its exit status. Its progress and summary lines go to `say` (the CLI prints
    them)."""
    start = time.perf_counter()
    # 1. This process: its rank and devices; the flags and stories checked before anything loads.
    rank = Rank.from_env()
    _check_flags(args)
    if args.preset == "tiny" and rank.rank == 0:
        say.err(runs.SMOKE_TEST)
    assign_devices(args, rank)
    runs.check_devices(args)
    runs.memory_settings(args)  # a bad memory flag fails here
    size = runs.video_size(args)
    out = Path(args.out).expanduser()
    stories = read_stories(args.stories, args.seconds, model_preset(args.preset_model).chunk_frames)
    if args.seed is not None:  # the one seed of every story
        stories = [dataclasses.replace(s, story=_seeded(s.story, args.seed)) for s in stories]
    _check_registry(args, len(stories))
    # The output folder can be written and holds room for the longest video.
    check_output(out / "batch.mp4", max(s.frames for s in stories), size.width, size.height)
    with process_group(rank, args.device):
        # 2. What is done already and this rank's share; every rank looks at the files before any rank writes one.
        states = [previous_render(out, s) if s.story is not None else "none" for s in stories]
        weights = [s.frames if state in ("none", "partial") else 0 for s, state in zip(stories, states)]
        share = [stories[i] for i in shard(weights, rank.world)[rank.rank]]
        barrier()
        # 3. Story after story, each in this rank's manifest as it ends.
        code, records = _render_share(args, rank, out, share, states, say)
        if code is not None:
            return code
        # 4. Rank 0 merges the manifests once every rank is done.
        barrier()
        if rank.world > 1 and rank.rank == 0:
            records = merge_manifests(out, rank.world, stories)
    return _finish(rank, out, records, start, say)
