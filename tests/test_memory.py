"""Identity-aware memory, MemFlow bank helpers, sparse activation, and memory settings (CPU, tiny models)."""

import gc
import logging
import time

import pytest
import torch

from iamflow_core.cache import sparse_select
from iamflow_core.memory.archive import ArchivedFrame, HostBuffers, evict, greedy_cover
from iamflow_core.memory.identity import RESERVED_FRAMES, IdentityMemory, frames_to_reserve
from iamflow_core.memory.pacing import PROBE_EVERY, VerdictPacing
from iamflow_core.memory.scoring import entity_token_weights, text_query
from iamflow_core.models.attention import attention
from iamflow_core.pipeline import StreamingPipeline
from iamflow_core.presets import tiny_models, tiny_tokenizer
from iamflow_core.settings import MemorySettings, build_memory, sampler_config
from iamflow_core.story import Segment, Story
from iamflow_core.story.entities import EntityRegistry
from iamflow_core.verify import AsyncVerifier, Verdict


def _frame(frame: int, entities: tuple[int, ...], visual: float = 0.5, nbytes: int = 100) -> ArchivedFrame:
    half = nbytes // 8  # float32 k and v of `half` elements each
    return ArchivedFrame(frame, frame, 0, entities, 0.0, visual, torch.zeros(half), torch.zeros(half))


# host buffers of the archive ------------------------------------------------------------------------------------
def _counting_maker(made: list[int]):
    def make(nbytes: int) -> torch.Tensor:
        made.append(nbytes)
        return torch.zeros(nbytes, dtype=torch.uint8)

    return make


def test_host_buffers_come_back_when_the_frame_copy_is_dropped_and_are_lent_again():
    made: list[int] = []
    pool = HostBuffers(make=_counting_maker(made))
    shape = torch.Size((2, 1, 6, 2, 4))
    k = pool.lend(shape, torch.bfloat16)
    assert k.shape == shape and k.dtype == torch.bfloat16 and made == [shape.numel() * 2]
    k.fill_(3)
    assert bool((k == 3).all())
    address = k.data_ptr()
    other = pool.lend(torch.Size((5,)), torch.float32)  # another size: a buffer of its own
    assert len(made) == 2 and other.data_ptr() != address
    del k
    gc.collect()
    again = pool.lend(shape, torch.bfloat16)  # the same buffer, nothing made
    assert again.data_ptr() == address and len(made) == 2
    assert pool.made(shape, torch.bfloat16) == 1


def test_host_buffers_are_reserved_on_a_thread_ahead_of_the_frames():
    made: list[int] = []
    pool = HostBuffers(make=_counting_maker(made))
    shape = torch.Size((3, 4))
    pool.reserve(shape, torch.float32, 3)
    pool.wait()
    assert pool.made(shape, torch.float32) == 3 and len(made) == 3
    lent = [pool.lend(shape, torch.float32) for _ in range(3)]
    assert len(made) == 3 and len({t.data_ptr() for t in lent}) == 3  # three distinct reserved buffers
    pool.reserve(shape, torch.float32, 3)  # already there: nothing more
    pool.wait()
    assert len(made) == 3
    lent.append(pool.lend(shape, torch.float32))  # past the reserve: made on the spot
    assert len(made) == 4


def test_a_story_reserves_host_buffers_for_the_frames_its_archive_holds():
    full_size = 2 * 30 * 1560 * 1536 * 2  # K and V of one 480x832 frame, bf16: 287 MiB
    assert frames_to_reserve(2 * 2**30, full_size) == 8  # the default bound holds 7, one more comes in
    assert frames_to_reserve(2**30, full_size) == 4
    assert frames_to_reserve(2 * 2**30, 24 * 1024) == RESERVED_FRAMES  # tiny frames: the cap, not thousands


def test_a_failed_reserve_is_logged_and_the_buffers_are_made_when_lent(caplog):
    calls: list[int] = []

    def make(nbytes: int) -> torch.Tensor:
        calls.append(nbytes)
        if len(calls) == 1:
            raise RuntimeError("cudaHostRegister: out of memory")
        return torch.zeros(nbytes, dtype=torch.uint8)

    pool = HostBuffers(make=make)
    with caplog.at_level(logging.WARNING):
        pool.reserve(torch.Size((8,)), torch.float32, 2)
        pool.wait()
    assert "reserving host buffers" in caplog.text and pool.made(torch.Size((8,)), torch.float32) == 0
    assert pool.lend(torch.Size((8,)), torch.float32).shape == (8,)


# set cover, eviction -------------------------------------------------------------------------------------------
def test_greedy_cover_takes_the_frame_covering_most_then_the_rest():
    archive = [_frame(1, (1,)), _frame(2, (2,)), _frame(3, (1, 2)), _frame(4, (3,))]
    chosen = greedy_cover(archive, (1, 2, 3), max_frames=4, min_frames_multi_entity=2)
    assert [f.frame for f in chosen] == [3, 4]


def test_greedy_cover_gives_two_frames_for_two_entities_even_when_one_covers_both():
    archive = [_frame(1, (1, 2), visual=0.9), _frame(2, (1,), visual=0.8), _frame(3, (5,))]
    chosen = greedy_cover(archive, (1, 2), max_frames=4, min_frames_multi_entity=2)
    assert [f.frame for f in chosen] == [1, 2]


def test_greedy_cover_respects_the_cap_and_prefers_quality():
    archive = [_frame(i, (i,), visual=i / 10) for i in range(1, 7)] + [_frame(7, (1,), visual=0.95)]
    chosen = greedy_cover(archive, (1, 2, 3, 4, 5, 6), max_frames=4, min_frames_multi_entity=2)
    assert len(chosen) == 4 and chosen[0].frame == 7  # the better of the two frames showing entity 1
    assert greedy_cover([], (1,), 4, 2) == [] and greedy_cover(archive, (), 4, 2) == []


def test_evict_keeps_the_archive_under_its_byte_budget_dropping_redundant_frames_first():
    archive = [_frame(1, (1,), 0.9), _frame(2, (1,), 0.2), _frame(3, (2,), 0.1), _frame(4, (1,), 0.5)]
    gone = evict(archive, limit_bytes=300, keep=1)
    assert sum(f.nbytes for f in archive) <= 300
    # frame 3 is the worst but the only frame of entity 2; frame 2 is the worst redundant one and goes first
    assert [f.frame for f in gone] == [2]


# entity tokens --------------------------------------------------------------------------------------------------
def test_entity_token_weights_fall_on_the_entity_words_of_the_real_prompt():
    tok = tiny_tokenizer()
    prompt = "a woman in a red coat reads at the library table"
    weights = entity_token_weights(tok, prompt, ["red coat"], text_len=512)
    ids = tok(prompt)["input_ids"]
    assert weights is not None and weights.shape == (512,)
    assert (weights[: len(ids)] > 0).all() and (weights[len(ids) :] == 0).all()  # padding gets nothing
    marked = [tok.decode([ids[i]]).strip() for i in range(len(ids)) if weights[i] == 2.5]
    assert "".join(marked).replace(" ", "") == "redcoat"


# sparse activation ---------------------------------------------------------------------------------------------
def test_sparse_select_with_topk_covering_everything_changes_nothing():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 5 * 3, 2, 8), torch.randn(1, 5 * 3, 2, 8)
    k_s, v_s = sparse_select(q, k, v, [0, 1, 2], tokens_per_frame=3, topk=3)
    assert torch.allclose(attention(q, k, v), attention(q, k_s, v_s), atol=1e-6)


def test_sparse_select_keeps_each_heads_best_candidate_frames():
    q = torch.zeros(1, 2, 2, 4)
    q[..., 0, 0], q[..., 1, 1] = 1.0, 1.0  # head 0 looks along axis 0, head 1 along axis 1
    k = torch.zeros(1, 4 * 2, 2, 4)
    k[:, 0:2, :, 0] = 5.0  # frame 0 matches head 0
    k[:, 2:4, :, 1] = 5.0  # frame 1 matches head 1
    k_s, _ = sparse_select(q, k, k.clone(), [0, 1, 2], tokens_per_frame=2, topk=1)
    assert k_s.shape == (1, (1 + 1) * 2, 2, 4)  # one candidate + the non-candidate frame 3
    assert k_s[0, 0, 0, 0] == 5.0 and k_s[0, 0, 1, 1] == 5.0  # each head kept its own frame


def test_sparse_select_with_its_index_made_once_gives_the_same_frames():
    from iamflow_core.cache import frame_index

    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 6 * 2, 2, 8), torch.randn(1, 6 * 2, 2, 8)
    cand, rest = frame_index([1, 3, 4], 6, k.device)
    assert cand.tolist() == [1, 3, 4] and rest.tolist() == [0, 2, 5]
    made_here = sparse_select(q, k, v, [1, 3, 4], tokens_per_frame=2, topk=2)
    given = sparse_select(q, k, v, [1, 3, 4], tokens_per_frame=2, topk=2, index=(cand, rest))
    assert all(torch.equal(a, b) for a, b in zip(made_here, given))


def test_sparse_activation_runs_in_the_pipeline():
    dit, te, _ = tiny_models()
    story = Story((Segment("a woman reads", 3.0), Segment("a man walks", 3.0)), seed=2)
    settings = MemorySettings(mode="memflow", bank_size=3, record_interval=1, sparse_topk=2, transition="hard")
    dense = MemorySettings(mode="memflow", bank_size=3, record_interval=1, transition="hard")
    outs = []
    for s in (settings, dense):
        events = list(StreamingPipeline(dit, te).run(story, sampler_config(s, 32, 48), build_memory(s)))
        outs.append(events[-1].latents)
    assert not torch.equal(outs[0], outs[1])


# identity memory end to end ------------------------------------------------------------------------------------
RETURN_STORY = Story(
    (
        Segment("a woman in a red coat reads a notebook at a library table", 3.0),
        Segment("a young man in a grey hoodie walks between the shelves", 3.0),
        Segment("the woman in the red coat closes the notebook and smiles", 3.0),
    ),
    seed=5,
)
RETURN_REGISTRY = EntityRegistry.from_json(
    {
        "entities": [
            {"id": 1, "name": "woman", "kind": "person", "attributes": ["red coat"]},
            {"id": 2, "name": "young man", "kind": "person", "attributes": ["grey hoodie"]},
            {"id": 3, "name": "notebook", "kind": "object"},
        ],
        "prompts": [
            [{"id": 1, "text": "a woman in a red coat"}, {"id": 3, "text": "a notebook"}],
            [{"id": 2, "text": "a young man in a grey hoodie"}],
            [{"id": 1, "text": "the woman in the red coat"}, {"id": 3, "text": "the notebook"}],
        ],
    },
    num_segments=3,
)


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=0)


def _run(models, settings, registry=RETURN_REGISTRY, verifier=None):
    dit, te, vae = models
    memory = build_memory(settings, registry, verifier)
    events = list(
        StreamingPipeline(dit, te, vae if verifier else None).run(
            RETURN_STORY, sampler_config(settings, 32, 48), memory
        )
    )
    return events, memory


def test_a_returning_character_brings_back_frames_tagged_with_its_id(models):
    events, memory = _run(models, MemorySettings())
    return_chunk = 8  # 3 s = 4 chunks per segment: segment 2 starts at chunk 8
    retrieved = events[return_chunk].memory["retrieved"]
    assert retrieved["wanted"] == [1, 3]
    assert retrieved["frames"], "frames of the woman and the notebook must come back"
    assert all(1 in f["entities"] and f["segment"] == 0 for f in retrieved["frames"])
    assert len(retrieved["frames"]) >= 2  # two entities -> at least two frames
    assert events[return_chunk].memory["memory_frames"] == sorted(f["frame"] for f in retrieved["frames"])
    # at the switch to the man (chunk 4), nothing of him exists yet: nothing tagged 2 is retrieved
    assert events[4].memory["retrieved"] == {"wanted": [2], "frames": []}
    story_map = memory.story_map()
    assert story_map["registry"]["entities"][0]["name"] == "woman"
    assert {f["segment"] for f in story_map["archive"]} == {0, 1, 2}


def test_budget_and_memory_mode_reach_the_pipeline(models):
    one, _ = _run(models, MemorySettings(max_frames=1, min_frames_multi_entity=1))
    assert len(one[8].memory["memory_frames"]) == 1
    none, _ = _run(models, MemorySettings(mode="none"))
    full, _ = _run(models, MemorySettings())
    assert "retrieved" not in none[8].memory
    assert not torch.equal(none[9].latents, full[9].latents)


def test_without_the_llm_memory_follows_prompt_relevance(models):
    events, memory = _run(models, MemorySettings(), registry=None)
    assert events[8].memory["retrieved"]["wanted"] == []
    assert len(events[8].memory["retrieved"]["frames"]) == 4  # the most relevant frames fill the budget


class _RecordingVerifier:
    """Stands in for the VLM at its boundary (the `Verifier` protocol): scores the last frame of each chunk
    highest."""

    def __init__(self):
        self.jobs = {}

    def submit(self, key, frames, prompt, entities, check_attributes=False):
        self.jobs[key] = (frames.shape, prompt, [e.id for e in entities], check_attributes)

    def result(self, key, wait=True, timeout=None):
        if key not in self.jobs:  # as AsyncVerifier: a key never submitted gets neutral scores at once
            return Verdict.neutral(3, "unknown key")
        return Verdict((0.1, 0.2, 0.9), {2: ("grey hoodie", "white sneakers")})

    def started(self, key):
        return key in self.jobs

    def pending(self):
        return 0

    def close(self):
        pass


def test_visual_scores_steer_the_frame_choice_and_correct_attributes(models):
    verifier = _RecordingVerifier()
    _, memory = _run(models, MemorySettings(visual_weight=1.0), verifier=verifier)
    assert verifier.jobs[0][0] == (3, 32, 48, 3)  # one pixel frame per latent frame
    assert verifier.jobs[4][3] is True and verifier.jobs[5][3] is False  # attributes checked on a prompt's first chunk
    assert all(f.frame % 3 == 2 for f in memory.archive)  # the frame the verifier liked best, every time
    assert memory.registry.entity(2).attributes == ("grey hoodie", "white sneakers")
    assert memory.verdicts_used == len(memory.archive) > 0 and memory.late_verdicts == 0
    assert memory.story_map()["verdicts_used"] == memory.verdicts_used


def test_memory_settings_validate():
    with pytest.raises(ValueError, match="memory mode"):
        MemorySettings(mode="bank")
    with pytest.raises(ValueError, match="min_frames_multi_entity"):
        MemorySettings(max_frames=2, min_frames_multi_entity=3)
    with pytest.raises(ValueError, match="max_frames"):
        IdentityMemory(
            None, max_frames=8, min_frames_multi_entity=2, visual_weight=0.3, archive_limit_bytes=2**30
        ).start(type("Ctx", (), {"cache": type("C", (), {"cfg": sampler_config(MemorySettings()).cache})()})())


def test_archive_stays_under_2_gib_for_a_60_s_story_at_full_size():
    """78 chunks of a 6 x 10 s story each archive one frame of full-size K/V (30 layers, 1560 tokens, 12 x 128,
    bf16: 287 MiB per frame, ~22 GB for the whole story in the reference). Meta tensors carry the real sizes."""
    frame_shape = (30, 1, 1560, 12, 128)
    archive: list[ArchivedFrame] = []
    peak = 0
    for chunk in range(78):
        k = torch.empty(frame_shape, dtype=torch.bfloat16, device="meta")
        entities = ((1,), (2,), (1, 3), (2, 4), (3,), (1, 2))[chunk // 13]
        archive.append(ArchivedFrame(3 * chunk, chunk, chunk // 13, entities, 0.0, (chunk * 7 % 10) / 10, k, k))
        evict(archive, limit_bytes=2 * 2**30, keep=4)
        peak = max(peak, sum(f.nbytes for f in archive))
    assert archive[0].nbytes == 2 * 30 * 1560 * 1536 * 2  # 287.6 MB per frame
    assert peak <= 2 * 2**30 and len(archive) == 7
    assert {e for f in archive for e in f.entities} == {1, 2, 3, 4}  # every entity keeps a frame


class _SlowScorer:
    """A verifier slower than the sampler: every verdict takes 0.3 s and corrects the man's attributes."""

    def score(self, clip, prompt, entities, check_attributes=False):
        import time

        time.sleep(0.3)
        return Verdict((0.1,) * len(clip), {2: ("grey hoodie",)} if check_attributes else {})


def test_a_slow_verifier_does_not_hold_the_sampler_and_its_late_corrections_still_count(models):
    with AsyncVerifier(_SlowScorer(), max_queue=16) as verifier:
        _, memory = _run(models, MemorySettings(verifier_wait=0.0), verifier=verifier)
        assert memory.late_verdicts > 0  # frames were chosen on text alone rather than waiting
        while verifier.pending():
            time.sleep(0.05)
    assert memory.story_map()["late_verdicts"] == memory.late_verdicts
    assert memory.corrections == {2: ["grey hoodie"]}  # the man's first chunk (4) was checked; its verdict came late


def test_the_loop_does_not_wait_for_a_verdict_whose_job_has_not_started(models):
    """With the VLM stuck on chunk 0's job (sink frames, never archived), every later job only queues: each chunk
    is decided at once instead of spending the (here long) verdict wait."""
    import threading

    gate = threading.Event()

    class Stuck(_SlowScorer):
        def score(self, clip, prompt, entities, check_attributes=False):
            gate.wait(10)
            return super().score(clip, prompt, entities, check_attributes)

    waits = []
    with AsyncVerifier(Stuck(), max_queue=16) as verifier:
        result = verifier.result

        def recorded(key, wait=True, timeout=None):
            waits.append((key, timeout))
            return result(key, wait, timeout)

        verifier.result = recorded
        _, memory = _run(models, MemorySettings(verifier_wait=0.2), verifier=verifier)
        gate.set()
    decided = [(key, timeout) for key, timeout in waits if timeout is not None]
    # the prompts' attribute checks queue behind the stuck job; plain jobs are not even sent (they would queue too)
    assert len(decided) >= 2 and all(timeout == 0.0 for _, timeout in decided)
    assert memory.late_verdicts == len(decided) and memory.jobs_skipped > 0


def test_plain_jobs_go_to_the_verifier_only_when_their_verdict_can_count():
    class Verifier:
        busy, recent = 0, None

        def pending(self):
            return self.busy

        def recent_job_seconds(self):
            return self.recent

    verifier = Verifier()
    pacing = VerdictPacing(verifier, None)
    assert pacing.worth_scoring(False)  # no pace known yet
    pacing.chunk_seconds, pacing._last_chunk_at = 0.3, time.perf_counter()
    verifier.recent = 0.1
    assert pacing.worth_scoring(False)  # fits in the ~0.3 s left before the frame choice
    verifier.recent = 1.0  # slower than that: skipped, but one in PROBE_EVERY goes to keep the job time known
    assert [pacing.worth_scoring(False) for _ in range(PROBE_EVERY)] == [False] * (PROBE_EVERY - 1) + [True]
    assert pacing.worth_scoring(True)  # an attribute check always goes
    verifier.busy, verifier.recent = 1, 0.01
    assert not pacing.worth_scoring(False)  # it would wait behind another job
    verifier.busy, verifier.recent, pacing._deciding = 0, 0.1, True
    assert not pacing.worth_scoring(False)  # frames handed over at their frame choice: only the 15-ms wait is left
    pacing._deciding = False
    pacing.expect(7)
    pacing.skip(7)
    assert pacing.verdict(7, lambda: None) is None  # chosen on text alone, at once, and not counted late
    assert pacing.late_verdicts == 0 and pacing.jobs_skipped == 1


def test_the_loop_does_not_wait_for_frames_whose_verdict_could_not_come_in_time():
    """A chunk whose frames are still decoding at its frame choice is chosen on text at once when a job sent then
    could not finish within the wait (the verifier is busy, or its jobs are slower than the wait). When its frames
    come, a plain job is not sent; an attribute check is, and its verdict counts as a late one."""

    class Verifier:
        busy, recent = 0, 1.0

        def pending(self):
            return self.busy

        def recent_job_seconds(self):
            return self.recent

        def result(self, key, wait=True, timeout=None):
            return Verdict((0.5,), {2: ("red scarf",)})

    verifier = Verifier()
    pacing = VerdictPacing(verifier, None)
    pacing.chunk_seconds, pacing._last_chunk_at = 0.3, time.perf_counter()  # a 15-ms wait, 1-s jobs
    pacing.submit_timeout = 0.1  # (a loop that waited for the frames would give up on them after this)
    flushed = []
    for chunk in (5, 6):
        pacing.expect(chunk)
        assert pacing.verdict(chunk, lambda c=chunk: flushed.append(c)) is None
    assert flushed == [] and list(pacing.late_verdicts_ready()) == []  # nothing waited for; frames still to come
    assert not pacing.worth_scoring(False, 5)  # chunk 5's frames: a plain job would not count any more
    pacing.skip(5)
    pacing._skipped_in_row = PROBE_EVERY - 1  # ... but a probe of the job time still goes, as for any chunk
    assert pacing.worth_scoring(False, 5)
    pacing._skipped_in_row = 0
    assert pacing.worth_scoring(True, 6)  # chunk 6's: an attribute check still goes
    pacing.submitted(6)
    assert [v.corrections for v in pacing.late_verdicts_ready()] == [{2: ("red scarf",)}]
    assert pacing.late_verdicts == 1 and not pacing._late and not pacing._submitted and not pacing._skipped
    verifier.recent = None  # the job time not known yet: the loop waits for the frames (they come here at once)
    pacing.expect(7)
    pacing.verdict(7, lambda: pacing.skip(7))
    verifier.busy = 1  # ... unless a job sent now would queue behind another
    pacing.expect(8)
    assert pacing.verdict(8, lambda: pytest.fail("waited for the frames")) is None


def test_verifier_wait_is_validated():
    with pytest.raises(ValueError, match="verifier_wait"):
        MemorySettings(verifier_wait=-1)


def test_the_default_verdict_wait_is_a_share_of_the_chunk_time():
    from iamflow_core.memory.pacing import FIRST_CHUNKS_WAIT, VERIFIER_SHARE

    pacing = VerdictPacing(_RecordingVerifier(), wait=None)
    assert pacing.wait_limit() == FIRST_CHUNKS_WAIT  # no pace yet
    pacing.chunk_seconds = 0.4
    assert pacing.wait_limit() == pytest.approx(VERIFIER_SHARE * 0.4)  # 20 ms of a 0.4-s chunk
    assert VerdictPacing(_RecordingVerifier(), wait=1.5).wait_limit() == 1.5


def test_archived_frames_keep_their_descriptor_so_ranking_never_reads_host_copies(models, monkeypatch):
    """Without a registry the archive is ranked at each switch: from descriptors made on the device when a frame
    was archived, not by averaging its K in host memory."""
    from iamflow_core.memory import archive, scoring

    events, memory = _run(models, MemorySettings(), registry=None)
    frames = memory.archive.frames
    assert frames and all(f.descriptor is not None for f in frames)
    expected = torch.stack([scoring.frame_descriptor(f.k, f.position, models[0].rope) for f in frames])
    monkeypatch.setattr(archive, "frame_descriptor", lambda *a: pytest.fail("descriptor made again"))
    assert torch.allclose(memory.archive.descriptors(models[0].rope, like=frames[0].k), expected, atol=1e-5)


def test_host_values_read_back_what_the_device_computed():
    from iamflow_core.memory.archive import HostValues

    values = HostValues(torch.tensor([0.5, 2.0]))
    assert values.ready() and values.tolist() == [0.5, 2.0]  # on the CPU nothing is on its way


def test_a_refresh_takes_every_frame_from_the_gpu_and_none_from_host_memory(models, monkeypatch):
    """Within a prompt, a better frame replaces a weaker one: the frames staying in the memory segment and the one
    just archived are copied on the device; host copies come back only at a switch."""
    from iamflow_core.memory import identity

    calls = []
    copy = identity.to_device
    refresh = IdentityMemory._refresh

    def recording_copy(frames, name, like, on_device=None):
        calls.append((refreshing[0], name, sum(id(f) in (on_device or {}) for f in frames), len(frames)))
        return copy(frames, name, like, on_device)

    refreshing = [False]

    def flagged_refresh(self, ctx, new):
        refreshing[0] = True
        try:
            refresh(self, ctx, new)
        finally:
            refreshing[0] = False

    monkeypatch.setattr(identity, "to_device", recording_copy)
    monkeypatch.setattr(IdentityMemory, "_refresh", flagged_refresh)
    events, _ = _run(models, MemorySettings())
    refreshes = [c for c in calls if c[0]]
    assert sum("refreshed" in e.memory for e in events) == len(refreshes) // 2 > 0
    assert all(on_device == n for _, _, on_device, n in refreshes)
    assert any(on_device < n for refreshing, _, on_device, n in calls if not refreshing)  # a switch brings back


def test_the_text_query_leaves_padding_out_and_weighs_entity_tokens():
    from iamflow_core.models.dit import CrossKV

    k = torch.randn(2, 1, 5, 3, 4)
    cross = CrossKV(k, torch.zeros_like(k))
    text = torch.cat([torch.randn(3, 8), torch.zeros(2, 8)])  # 3 real tokens, 2 padding
    torch.testing.assert_close(text_query(cross, text), k[:, :, :3].mean(2))
    weights = torch.tensor([1.0, 3.0, 1.0, 9.0, 9.0])  # padding stays out whatever its weight
    expected = (k[:, :, 0] + 3 * k[:, :, 1] + k[:, :, 2]) / 5
    torch.testing.assert_close(text_query(cross, text, weights), expected)
    torch.testing.assert_close(text_query(cross, torch.zeros(5, 8)), k.mean(2))  # all padding: every slot


def test_a_trace_names_the_identity_memorys_steps_and_a_host_buffer_made_on_the_spot(models):
    """`bench speed --trace` lists what each thread ran in the DiT GPU's idle gaps: the identity memory's steps inside
    `after_chunk` and a host buffer made on the sampler's thread (none was free) each have a range of their own
    (traces of 2x H200 stories showed 88-118 ms in `after_chunk` with nothing else named inside)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _run(models, MemorySettings(), registry=RETURN_REGISTRY)
        HostBuffers(make=_counting_maker([])).lend(torch.Size((4,)), torch.float32)
    names = {e.name for e in prof.events()}
    for step in ("identity.text_scores", "identity.decide", "identity.refresh", "archive.new_host_buffer"):
        assert f"iamflow.{step}" in names, step
