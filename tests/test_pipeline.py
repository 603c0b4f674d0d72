"""The streaming story pipeline on tiny random models (CPU)."""

import threading

import numpy as np
import pytest
import torch

from iamflow_core.config import CacheConfig, SamplerConfig, TransitionConfig
from iamflow_core.decode import Decoder
from iamflow_core.memory import MemFlowMemory, NoMemory
from iamflow_core.models import fused
from iamflow_core.pipeline import StreamingPipeline
from iamflow_core.presets import tiny_models
from iamflow_core.story import Segment, Story
from iamflow_core.video import to_uint8_frames

SMALL = SamplerConfig(height=32, width=48, cache=CacheConfig(memory_frames=3))
STORY = Story(
    segments=(Segment("a woman reads in a library", 1.5), Segment("a man walks past the shelves", 1.5)),
    seed=7,
)


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=0)


def _run(models, config=SMALL, memory=None, vae=True, **kwargs):
    dit, te, v = models
    pipe = StreamingPipeline(dit, te, v if vae else None, **kwargs)
    return list(pipe.run(STORY, config, memory))


def test_chunk_and_frame_counts(models):
    events = _run(models)
    assert [e.index for e in events] == [0, 1, 2, 3]  # 1.5 s = 2 chunks of 0.75 s per segment
    assert [e.segment for e in events] == [0, 0, 1, 1]  # the switch lands on chunk 2
    assert [e.frames.shape[0] for e in events] == [9, 12, 12, 12]
    assert all(e.frames.shape[1:] == (32, 48, 3) and e.frames.dtype == np.uint8 for e in events)
    assert all(e.latents.shape == (1, 16, 3, 4, 6) for e in events)
    assert [e.start_frame for e in events] == [0, 3, 6, 9]


def test_seeded_runs_are_deterministic(models):
    a, b = _run(models), _run(models)
    for x, y in zip(a, b):
        assert torch.equal(x.latents, y.latents) and np.array_equal(x.frames, y.frames)
    other = list(StreamingPipeline(*models).run(Story(STORY.segments, seed=8), SMALL))
    assert not torch.equal(a[0].latents, other[0].latents)


def test_overlapped_decode_gives_the_same_frames_as_sequential(models):
    overlapped = _run(models, overlap_decode=True)
    sequential = _run(models, overlap_decode=False)
    for x, y in zip(overlapped, sequential):
        assert np.array_equal(x.frames, y.frames)


def test_a_chunk_still_decoding_is_handed_out_after_the_next_one_is_made_not_waited_for(models, monkeypatch):
    """With a decode worker (the VAE on its own GPU), the loop does not wait for the previous chunk's frames before it
    makes the next chunk: chunk 1, still decoding when chunk 2 is made, is handed out once chunk 3 is made (before,
    the loop waited for it after chunk 2). Order and frames stay."""
    made, log = threading.Event(), []
    decode, chunk = Decoder._decode, StreamingPipeline._chunk

    def slow_decode(self, i, latents, ready, eager=False):
        if i == 1:
            made.wait(10)  # chunk 1's frames come only once chunk 3 is made (a loop that waits for them: 10 s)
        return decode(self, i, latents, ready, eager)

    def logged_chunk(self, run, i):
        out = chunk(self, run, i)
        log.append(f"made {i}")
        if i == 3:
            made.set()
        return out

    monkeypatch.setattr(Decoder, "_decode", slow_decode)
    monkeypatch.setattr(StreamingPipeline, "_chunk", logged_chunk)
    dit, te, vae = models
    events = []
    for event in StreamingPipeline(dit, te, vae, overlap_decode=True).run(STORY, SMALL):
        log.append(f"out {event.index}")
        events.append(event)
    assert log.index("made 3") < log.index("out 1")
    assert [e.index for e in events] == list(range(len(events))) and all(e.frames is not None for e in events)
    sequential = _run(models, overlap_decode=False)
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(events, sequential))


def test_streamed_frames_equal_one_full_decode(models):
    events = _run(models)
    vae = models[2]
    latents = torch.cat([e.latents for e in events], dim=2)
    with torch.no_grad():
        full = vae.decode(latents)
    from iamflow_core.video import to_uint8_frames

    streamed = np.concatenate([e.frames for e in events])
    assert np.abs(streamed.astype(int) - to_uint8_frames(full).astype(int)).max() <= 1


@pytest.mark.parametrize("strategy", ["recache", "soft", "hard"])
def test_each_transition_strategy_runs_and_differs(models, strategy):
    config = SamplerConfig(
        height=32, width=48, cache=CacheConfig(memory_frames=0), transition=TransitionConfig(strategy)
    )
    events = _run(models, config, vae=False)
    recache = TransitionConfig("recache")
    baseline = _run(
        models, SamplerConfig(height=32, width=48, cache=CacheConfig(memory_frames=0), transition=recache), vae=False
    )
    assert len(events) == 4
    # Chunks before the switch are identical; the strategy only changes what happens from the switch on.
    assert torch.equal(events[1].latents, baseline[1].latents)
    if strategy != "recache":
        assert not torch.equal(events[2].latents, baseline[2].latents)
    if strategy == "soft":
        assert "transition_alpha" in events[2].memory


def test_memflow_memory_records_and_injects(models):
    story = Story((Segment("a woman reads in a library", 3.0), Segment("a man walks past", 3.0)), seed=1)
    dit, te, _ = models
    memory = MemFlowMemory(bank_size=2, record_interval=2)
    events = list(StreamingPipeline(dit, te).run(story, SMALL, memory))
    recorded = [e.memory.get("recorded_frame") for e in events if "recorded_frame" in e.memory]
    assert recorded == [0, 6, 12, 18]  # the first frame of every second chunk
    assert events[-1].memory["memory_frames"]  # the bank is in the context
    assert len(events[-1].memory["memory_frames"]) == 2
    no_mem = list(StreamingPipeline(dit, te).run(story, SMALL, NoMemory()))
    assert not torch.equal(events[-1].latents, no_mem[-1].latents)


def test_memflow_bank_must_fit_the_memory_segment(models):
    dit, te, _ = models
    config = SamplerConfig(height=32, width=48, cache=CacheConfig(memory_frames=1))
    with pytest.raises(ValueError, match="memory segment"):
        list(StreamingPipeline(dit, te).run(STORY, config, MemFlowMemory(bank_size=3, record_interval=3)))


def test_cancel_keeps_every_finished_chunk(models):
    dit, te, vae = models
    cancel = threading.Event()
    story = Story((Segment("a woman reads", 4.5),), seed=3)
    events = []
    for event in StreamingPipeline(dit, te, vae).run(story, SMALL, cancel=cancel):
        events.append(event)
        if event.index == 1:
            cancel.set()
    assert [e.index for e in events] == [0, 1, 2]  # chunk 2 was already made when the cancel came
    assert all(e.frames is not None for e in events)


def test_bad_sampler_settings():
    with pytest.raises(ValueError, match="multiples of 16"):
        SamplerConfig(height=30, width=48)
    with pytest.raises(ValueError, match="transition strategy"):
        TransitionConfig("fade")


def test_the_first_chunk_is_handed_out_before_the_second_is_made_and_runs_eagerly(models, monkeypatch):
    from iamflow_core.models import fused

    dit, te, vae = models
    pipe = StreamingPipeline(dit, te, vae)
    made = []
    chunk = pipe._chunk

    def spy(run, i):
        made.append((i, fused.eager_now()))
        return chunk(run, i)

    monkeypatch.setattr(pipe, "_chunk", spy)
    events = pipe.run(STORY, SMALL)
    first = next(events)
    assert first.index == 0 and first.frames.shape[0] == 9
    assert made == [(0, True)]  # made without compiled kernels, handed out at once
    rest = list(events)
    assert [e.index for e in rest] == [1, 2, 3]
    assert made[1:] == [(1, False), (2, False), (3, False)] and not fused.eager_now()


def test_memflow_ranks_its_frames_only_when_they_or_the_prompt_change(models, monkeypatch):
    """Ranking reads scores back from the GPU (a wait for the queued chunks): not at every chunk."""
    story = Story((Segment("a woman reads in a library", 3.0), Segment("a man walks past", 3.0)), seed=1)
    dit, te, _ = models
    memory = MemFlowMemory(bank_size=2, record_interval=2)
    ranked = []
    scores = memory._scores
    monkeypatch.setattr(memory, "_scores", lambda ctx: ranked.append(ctx.chunk) or scores(ctx))
    config = SamplerConfig(height=32, width=48, cache=SMALL.cache, transition=TransitionConfig("recache"))
    events = list(StreamingPipeline(dit, te).run(story, config, memory))
    assert len(events) == 8
    # frames recorded after chunks 0, 2, 4, 6 (each ranked by the next chunk); the switch at chunk 4 ranks again
    assert ranked == [1, 3, 4, 5, 7]
    # a soft switch blends the prompts chunk by chunk: each blended chunk ranks under its own conditioning
    ranked.clear()
    list(StreamingPipeline(dit, te).run(story, SMALL, memory))
    assert ranked[:3] == [1, 3, 4] and len(ranked) > 5


def test_the_memory_hooks_run_inside_their_profiler_ranges(models):
    """`bench speed --trace` counts the memory's GPU work by these ranges: each hook of a render has one."""
    names = []

    class Recording(NoMemory):
        def _hook(self, name):
            names.append(name)

        def on_switch(self, ctx):
            self._hook("on_switch")

        def before_chunk(self, ctx):
            self._hook("before_chunk")

        def after_chunk(self, ctx):
            self._hook("after_chunk")

        def on_frames(self, chunk, frames):
            self._hook("on_frames")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _run(models, memory=Recording())
    ranges = [e.name for e in prof.events() if e.name.startswith("iamflow.memory.")]
    assert sorted(ranges) == sorted(f"iamflow.memory.{name}" for name in names)
    assert names.count("after_chunk") == names.count("on_frames") == 4 and names.count("on_switch") == 1


def test_a_decode_worker_holds_the_launch_lock_layer_by_layer_not_for_the_whole_decode(models, monkeypatch):
    """The sampler's thread launches its next chunk under the same lock: it must not wait for a whole decode."""
    monkeypatch.setattr(fused, "_enabled", True)  # the lock is held only with compiled kernels on
    steps, held_between = [], []
    turn = fused.launch_turn

    def spy():
        held_between.append(fused._launch_lock._is_owned())
        steps.append(1)
        return turn()

    monkeypatch.setattr(fused, "launch_turn", spy)
    vae = models[2]
    decoder = Decoder(vae, overlap=True)
    plain = vae.new_decode_state()
    latents = torch.randn(1, 16, 3, 4, 6)
    try:
        frames, _ = decoder.submit(0, latents).result()
    finally:
        decoder.close()
    with torch.no_grad():
        expected = to_uint8_frames(vae.decode_stream(latents, plain))
    assert np.array_equal(frames, expected)
    assert len(steps) > len(vae.decoder.upsamples) and not any(held_between)
