"""Frame verification: a tiny random Qwen3-VL with the real Qwen tokenizer through the real loader and
`FrameVerifier.score`, parsing of recorded verifier answers, and the asynchronous / immediate runners."""

import logging
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

from iamflow_core.story.entities import Entity
from iamflow_core.story.hf import ModelFolderError
from iamflow_core.story.vlm import FrameVerifier, parse_verdict, resize_frames, verifier_instruction
from iamflow_core.verify import AsyncVerifier, ImmediateVerifier, Status, Verdict

from ._tiny_qwen import frames, tiny_qwen_folders

NORA = Entity(1, "Nora", "person", ("short black curls", "beige sweater"))
NOTEBOOK = Entity(2, "red notebook", "object", ("red", "leather"))
PROMPT = "Nora reads a red notebook in a cafe."

# ---------------------------------------------------------------------------------------------------------------------
# The real loader and generation path on a tiny random Qwen3-VL
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verifier():
    v = FrameVerifier(tiny_qwen_folders().vlm, max_new_tokens=24, short_side=64)
    yield v
    v.unload()


@pytest.mark.parametrize("n, height, width", [(3, 48, 80), (1, 37, 53), (4, 120, 64)])
def test_tiny_vlm_garbage_answer_gives_a_neutral_verdict(verifier, caplog, n, height, width):
    clip = frames(n, height, width)
    answer = verifier.answer(clip, PROMPT, [NORA, NOTEBOOK], True)  # the model really ran on n images
    assert isinstance(answer, str)
    with caplog.at_level(logging.WARNING):
        verdict = verifier.score(clip, PROMPT, [NORA, NOTEBOOK], check_attributes=True)
    assert verdict == Verdict((0.5,) * n, {}, Status.NEUTRAL, note=verdict.note) and verdict.note
    assert "neutral" in caplog.text
    assert verifier.graph_captures == 0  # on the CPU, transformers' generate decodes: no CUDA graphs


def test_image_placeholders_expand_to_the_vision_token_count(verifier):
    images = resize_frames(frames(2, 48, 80), 64)
    batch = verifier._inputs.encode("<|vision_start|><|image_pad|><|vision_end|>" * 2 + "hi", images)
    grids = batch["image_grid_thw"]
    image_tokens = int((batch["input_ids"] == verifier._model.config.image_token_id).sum())
    assert image_tokens == int(grids.prod(-1).sum()) // 4 == int(batch["mm_token_type_ids"].sum())
    assert batch["pixel_values"].shape[0] == int(grids.prod(-1).sum())


def test_model_errors_give_a_neutral_verdict(verifier, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(verifier, "answer", broken)
    with caplog.at_level(logging.WARNING):
        verdict = verifier.score(frames(2), PROMPT, [NORA])
    assert verdict.scores == (0.5, 0.5) and not verdict.ok and "out of memory" in verdict.note
    assert "out of memory" in caplog.text


def test_recorded_answer_through_score(verifier, monkeypatch):
    answer = '```json\n{"scores": [0.9, 0.2, 1.7], "corrections": {"1": ["grey hoodie"]}}\n```'
    monkeypatch.setattr(verifier, "answer", lambda *args: answer)
    verdict = verifier.score(frames(3), PROMPT, [NORA, NOTEBOOK], check_attributes=True)
    assert verdict == Verdict((0.9, 0.2, 1.0), {1: ("grey hoodie",)}, Status.SCORED)


def test_bad_frames_are_refused(verifier):
    for bad in (frames(2).astype(np.float32), frames(2)[..., :2], frames(2)[0], frames(0)):
        with pytest.raises(ValueError, match=r"frames must"):
            verifier.score(bad, PROMPT, [])


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="Qwen3-VL-2B-Instruct"):
        FrameVerifier(tmp_path / "Qwen3-VL-2B-Instruct")


def test_token_budget_grows_with_corrections(verifier):
    plain = verifier.token_budget(3, [NORA], check_attributes=False)
    assert plain >= verifier.max_new_tokens and plain >= 16 + 3 * 6
    assert verifier.token_budget(3, [NORA, NOTEBOOK] * 3, check_attributes=True) >= plain + 6 * 48


def test_resize_keeps_aspect():
    a, b = resize_frames(frames(2, 480, 832), 256)
    assert a.size == b.size == (444, 256)


# ---------------------------------------------------------------------------------------------------------------------
# The prompt and recorded answers
# ---------------------------------------------------------------------------------------------------------------------


def test_instruction_lists_entities_and_attributes_only_when_checking():
    plain = verifier_instruction(3, PROMPT, [NORA, NOTEBOOK], check_attributes=False)
    check = verifier_instruction(3, PROMPT, [NORA, NOTEBOOK], check_attributes=True)
    assert PROMPT in plain and "ID 1: Nora (person)" in plain and "ID 2: red notebook (object)" in plain
    assert "beige sweater" not in plain and "beige sweater" in check and '"1": [' in check
    assert '"scores": [<frame 1>, <frame 2>, <frame 3>]' in plain
    assert "judge the main subject" in verifier_instruction(2, PROMPT, [], check_attributes=True)


@pytest.mark.parametrize(
    "answer, scores, note",
    [
        ('{"scores": [0.8, 0.6, 0.4], "corrections": {}}', (0.8, 0.6, 0.4), ""),
        ('Here you go: {"scores": [1.4, -0.2, "0.5"]} done', (1.0, 0.0, 0.5), ""),
        ('{"scores": ["80%", 0.7]}', (0.8, 0.7, 0.5), "2 scores for 3 frames"),
        ('{"scores": [0.1, 0.2, 0.3, 0.4, 0.5]}', (0.1, 0.2, 0.3), "5 scores for 3 frames"),
        ('{"scores": [0.9, "high", null]}', (0.9, 0.5, 0.5), "non-numeric"),
        ("[0.3, 0.2, 0.1]", (0.3, 0.2, 0.1), ""),
        ('{"scores": [0.7, 0.8, 0.9], "corrections": {"1": ["grey hoo', (0.7, 0.8, 0.9), "scores only"),
    ],
)
def test_parse_verdict_scores(answer, scores, note):
    verdict = parse_verdict(answer, 3, [1, 2])
    assert verdict.ok and verdict.scores == pytest.approx(scores) and note in verdict.note


@pytest.mark.parametrize("answer", ["", "I see a woman.", '{"score": 0.8}', '{"scores": []}', '{"scores": 0.8}', None])
def test_parse_verdict_junk_is_neutral(answer):
    verdict = parse_verdict(answer, 3, [1])
    assert verdict.scores == (0.5, 0.5, 0.5) and not verdict.ok and verdict.corrections == {}


def test_parse_verdict_corrections():
    answer = """{"scores": [0.5, 0.5], "corrections": {
        "1": {"corrected_attrs": ["grey hoodie", " short  brown hair "]},
        "2": "blue, cloth", "9": ["not in this shot"], "x": ["junk"], "1 ": []}}"""
    verdict = parse_verdict(answer, 2, [1, 2], check_attributes=True)
    assert verdict.corrections == {1: ("grey hoodie", "short brown hair"), 2: ("blue", "cloth")}
    assert parse_verdict(answer, 2, [1, 2], check_attributes=False).corrections == {}
    assert parse_verdict('{"scores": [1, 1], "corrections": null}', 2, [1], True).corrections == {}


# ---------------------------------------------------------------------------------------------------------------------
# Running beside the DiT
# ---------------------------------------------------------------------------------------------------------------------


class FakeScorer:
    """A scorer at the model boundary: records the order of jobs, can block on an event, can fail on a prompt."""

    def __init__(self, gate=None):
        self.order, self.gate, self.threads = [], gate, set()

    def score(self, clip, prompt, entities, check_attributes=False):
        self.threads.add(threading.current_thread().name)
        if self.gate is not None:
            assert self.gate.wait(5)
        if prompt == "boom":
            raise KeyError("a bug inside the verifier")
        self.order.append(prompt)
        return Verdict(tuple(float(v) for v in clip[:, 0, 0, 0] / 255), {})


def clip_of(value, n=3):
    return np.full((n, 4, 4, 3), value, dtype=np.uint8)


@contextmanager
def busy_runner(max_queue: int):
    """An AsyncVerifier whose worker is scoring job 0 ("running") until the gate opens: (runner, gate, scorer)."""
    gate = threading.Event()
    scorer = FakeScorer(gate)
    with AsyncVerifier(scorer, max_queue=max_queue, timeout=5) as runner:
        runner.submit(0, clip_of(255), "running", [])
        wait_until_running(runner)
        yield runner, gate, scorer


def test_async_runs_attribute_checks_first_then_the_newest_job_on_one_worker_thread():
    """With the worker busy, jobs pile up; it then takes the checks (oldest first), then the plain jobs newest
    first: the memory chooses a chunk's frame soon after submitting it, so the newest verdict is the one still used."""
    with busy_runner(max_queue=8) as (runner, gate, scorer):
        for i in range(1, 6):
            runner.submit(("p0", i), clip_of(51 * (i - 1)), f"chunk {i}", [NORA], check_attributes=i % 2 == 0)
        gate.set()
        verdicts = [runner.result(("p0", i)) for i in range(1, 6)]
        assert runner.pending() == 0
    assert scorer.order == ["running", "chunk 2", "chunk 4", "chunk 5", "chunk 3", "chunk 1"]
    assert scorer.threads == {"iamflow-verifier"}
    assert [v.scores[0] for v in verdicts] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])


def test_the_recent_job_time_believes_a_faster_job_at_once_and_a_slower_one_gradually():
    class Timed(FakeScorer):
        def score(self, clip, prompt, entities, check_attributes=False):
            time.sleep(float(prompt))
            return super().score(clip, prompt, entities, check_attributes)

    with AsyncVerifier(Timed(), max_queue=8) as runner:
        assert runner.recent_job_seconds() is None
        times = []
        for key, seconds in enumerate(("0.3", "0.01", "0.3")):
            runner.submit(key, clip_of(9), seconds, [])
            runner.result(key)
            times.append(runner.recent_job_seconds())
        runner.submit("check", clip_of(9), "0.3", [NORA], check_attributes=True)
        runner.result("check")
        assert runner.recent_job_seconds() == times[-1]  # attribute checks (longer answers) do not count
    assert times[0] >= 0.3 and times[1] < 0.1  # the first job (a setup, say) is forgotten at the next faster one
    assert 0.05 < times[2] < 0.25  # one slow job moves it part of the way


def test_submit_copies_frames():
    gate = threading.Event()
    with AsyncVerifier(FakeScorer(gate)) as runner:
        buffer = clip_of(255)
        runner.submit("k", buffer, "p", [])
        buffer[:] = 0  # the DiT reuses its buffer while the job waits
        gate.set()
        assert runner.result("k").scores == (1.0, 1.0, 1.0)


def test_timeout_gives_a_neutral_verdict_and_a_warning(caplog):
    gate = threading.Event()
    with AsyncVerifier(FakeScorer(gate), timeout=0.05) as runner:
        runner.submit("late", clip_of(255, n=2), "p", [])
        assert runner.pending() == 1
        with caplog.at_level(logging.WARNING):
            verdict = runner.result("late")
        assert verdict == Verdict((0.5, 0.5), {}, Status.NOT_READY, note="not ready after 0.05s")
        assert "not ready after" in caplog.text
        assert "not ready" in runner.result("late", wait=False).note
        caplog.clear()
        with caplog.at_level(logging.WARNING):  # a caller's own short deadline: being early is expected, no warning
            assert runner.result("late", timeout=0.01).note == "not ready after 0.01s"
        assert not caplog.text
        gate.set()
        runner.timeout = 5
        assert runner.result("late").scores == (1.0, 1.0)  # the late verdict still arrives


def test_full_queue_drops_the_oldest_waiting_job():
    with busy_runner(max_queue=2) as (runner, gate, scorer):
        start = time.perf_counter()
        for key in (1, 2, 3):
            runner.submit(key, clip_of(255), f"job {key}", [])
        assert time.perf_counter() - start < 0.5  # submit never blocks
        dropped = runner.result(1, wait=False)
        assert not dropped.ok and "queue was full" in dropped.note and dropped.scores == (0.5,) * 3
        assert runner.pending() == 3
        assert runner.started(0) and not runner.started(2)  # running; waiting in the queue
        gate.set()
        assert all(runner.result(k).ok for k in (0, 2, 3))
        stats = runner.stats()
    assert scorer.order == ["running", "job 3", "job 2"]  # the newest first
    assert stats["scored"] == 3 and stats["dropped"] == 1 and stats["mean_job_s"] >= 0.0
    assert runner.started(2)  # done


def test_a_full_queue_drops_a_plain_job_before_an_attribute_check():
    with busy_runner(max_queue=2) as (runner, gate, scorer):
        runner.submit("check", clip_of(255), "first chunk", [NORA], check_attributes=True)
        for key in (1, 2):
            runner.submit(key, clip_of(255), f"job {key}", [])
        assert "queue was full" in runner.result(1, wait=False).note  # the plain job went, the older check stayed
        gate.set()
        assert runner.result("check").ok and runner.result(2).ok
    assert scorer.order == ["running", "first chunk", "job 2"]


def test_worker_survives_exceptions(caplog):
    scorer = FakeScorer()
    with AsyncVerifier(scorer) as runner, caplog.at_level(logging.WARNING):
        runner.submit("bad", clip_of(9), "boom", [])
        runner.submit("good", clip_of(255), "fine", [])
        bad, good = runner.result("bad"), runner.result("good")
    assert not bad.ok and "KeyError" in bad.note and bad.scores == (0.5,) * 3
    assert good.ok and scorer.order == ["fine"] and "KeyError" in caplog.text


def wait_until_running(runner):
    deadline = time.monotonic() + 5
    while runner._running is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert runner._running is not None


def test_unknown_keys_and_close():
    gate = threading.Event()
    runner = AsyncVerifier(FakeScorer(gate), timeout=5)
    unknown = runner.result("never submitted")
    assert not unknown.ok and unknown.scores == () and unknown.frame_score(2) == 0.5
    runner.submit("a", clip_of(255), "p", [])
    wait_until_running(runner)
    runner.submit("b", clip_of(255), "p", [])
    threading.Timer(0.1, gate.set).start()
    runner.close()  # "a" runs to its end; "b" never starts
    assert runner.result("a").ok
    assert not runner.result("b").ok and "closed" in runner.result("b").note
    with pytest.raises(RuntimeError, match="closed"):
        runner.submit("c", clip_of(1), "p", [])
    with pytest.raises(ValueError, match="max_queue"):
        AsyncVerifier(FakeScorer(), max_queue=0)


def test_immediate_verifier_has_the_same_interface(caplog):
    scorer = FakeScorer()
    runner = ImmediateVerifier(scorer)
    runner.submit(1, clip_of(255, n=2), "now", [NORA])
    assert scorer.order == ["now"] and runner.pending() == 0  # scored on submit, on this thread
    assert scorer.threads == {threading.current_thread().name}
    assert runner.result(1).scores == (1.0, 1.0)
    with caplog.at_level(logging.WARNING):
        runner.submit(2, clip_of(1), "boom", [])
    assert not runner.result(2).ok and "KeyError" in caplog.text
    assert runner.result("nope").scores == () and not runner.result("nope").ok
    runner.close()


def test_async_with_the_tiny_vlm(verifier):
    with AsyncVerifier(verifier, timeout=30) as runner:
        runner.submit(("p1", 0), frames(3), PROMPT, [NORA, NOTEBOOK], check_attributes=True)
        runner.submit(("p1", 1), frames(2, seed=1), PROMPT, [NORA])
        first, second = runner.result(("p1", 0)), runner.result(("p1", 1))
    assert first.scores == (0.5,) * 3 and second.scores == (0.5,) * 2
    assert "timed out" not in first.note + second.note
