import json
import math
from pathlib import Path

import pytest

from iamflow_core.story import (
    DEFAULT_SECONDS,
    ChunkPlan,
    Segment,
    Story,
    StoryError,
    load_stories,
    load_story,
    parse_story_text,
    plan_chunks,
)
from iamflow_core.story.script import MAX_SEGMENT_SECONDS

# The benchmark scripts live in the project's shared folder, beside the checkout or inside it.
_REPO = Path(__file__).resolve().parents[1]
_CANDIDATES = [root / "shared/data/narrastream/streambench_324.jsonl" for root in (_REPO, _REPO.parent)]
NARRASTREAM = next((p for p in _CANDIDATES if p.exists()), _CANDIDATES[-1])
needs_narrastream = pytest.mark.skipif(not NARRASTREAM.exists(), reason=f"NarraStream-Bench data not at {NARRASTREAM}")


def story_of(*seconds: float) -> Story:
    return Story.from_prompts([f"prompt {i}" for i in range(len(seconds))], list(seconds))


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- Segment and Story ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0, -1, math.inf, math.nan])
def test_segment_rejects_bad_seconds(seconds):
    with pytest.raises(ValueError, match="seconds must be a positive finite number"):
        Segment("a cat", seconds)


def test_segment_rejects_empty_prompt_and_bad_types():
    with pytest.raises(ValueError, match="prompt is empty"):
        Segment("  ", 1.0)
    with pytest.raises(TypeError, match="seconds must be a number"):
        Segment("a cat", True)
    with pytest.raises(TypeError, match="prompt must be a string"):
        Segment(None, 1.0)


def test_story_validation():
    with pytest.raises(ValueError, match="segments is empty"):
        Story(())
    with pytest.raises(ValueError, match="seed must be in"):
        Story((Segment("a", 1),), seed=-3)
    story = Story([Segment("a", 1)], title="t", seed=7)  # a list is accepted and frozen into a tuple
    assert story.segments == (Segment("a", 1.0),)
    assert isinstance(story.segments[0].seconds, float)
    assert hash(story) == hash(Story((Segment("a", 1.0),), title="t", seed=7))


# --- planning --------------------------------------------------------------------------------------------------------


def test_plan_six_by_ten_seconds():
    plan = plan_chunks(story_of(*[10] * 6))
    assert plan.segment_chunks == (13,) * 6  # 10 / 0.75 = 13.33 -> 13 chunks = 9.75 s
    assert plan.num_chunks == 78
    assert plan.num_latent_frames == 234
    assert plan.num_video_frames == 1 + 4 * (234 - 1) == 933
    assert plan.seconds_actual == (9.75,) * 6
    assert plan.switch_chunks == (13, 26, 39, 52, 65)
    assert len(plan.rounding_notes()) == 6
    assert "10 s requested, 13 chunks of 0.75 s = 9.75 s (-0.25 s)" in plan.rounding_notes()[0]


@pytest.mark.parametrize(
    ("seconds", "chunks"),
    [(0.75, 1), (0.5, 1), (0.01, 1), (1.0, 1), (1.125, 2), (1.5, 2), (10.0, 13), (10.5, 14), (10.125, 14)],
)
def test_plan_rounds_to_nearest_chunk_ties_up(seconds, chunks):
    assert plan_chunks(story_of(seconds)).segment_chunks == (chunks,)


def test_rounding_notes_only_for_changed_segments():
    plan = plan_chunks(story_of(0.75, 0.5, 1.5))
    notes = plan.rounding_notes()
    assert len(notes) == 1
    assert notes[0].startswith("segment 2: 0.5 s requested, 1 chunk of 0.75 s = 0.75 s (+0.25 s)")
    assert plan_chunks(story_of(0.75)).rounding_notes() == []


def test_video_frames_per_chunk():
    plan = plan_chunks(story_of(0.75, 1.5))
    assert [plan.video_frames_of_chunk(i) for i in range(3)] == [9, 12, 12]
    assert sum(plan.video_frames_of_chunk(i) for i in range(plan.num_chunks)) == plan.num_video_frames == 33
    assert plan.video_seconds == 33 / 16


def test_switch_placement_and_segment_of_chunk():
    plan = plan_chunks(story_of(1.5, 0.75, 3.0))  # 2, 1, 4 chunks
    assert plan.segment_starts == (0, 2, 3)
    assert plan.switch_chunks == (2, 3)
    assert [plan.segment_of_chunk(i) for i in range(plan.num_chunks)] == [0, 0, 1, 2, 2, 2, 2]
    with pytest.raises(IndexError, match="chunk 7 is outside"):
        plan.segment_of_chunk(7)
    assert plan_chunks(story_of(5)).switch_chunks == ()


def test_plan_other_geometry():
    plan = plan_chunks(story_of(2.0), chunk_frames=1, fps=8, temporal_factor=4)  # 0.5 s per chunk
    assert (plan.num_chunks, plan.num_video_frames) == (4, 13)


def test_chunk_plan_validation():
    with pytest.raises(ValueError, match="at least one chunk"):
        ChunkPlan(segment_chunks=(2, 0), seconds_requested=(1.0, 1.0))
    with pytest.raises(ValueError, match="one per segment"):
        ChunkPlan(segment_chunks=(2,), seconds_requested=(1.0, 1.0))


# --- files -----------------------------------------------------------------------------------------------------------


@needs_narrastream
def test_narrastream_file_parses():
    stories = load_stories(NARRASTREAM)
    assert len(stories) == 324
    for story in stories:
        assert len(story.segments) == 6
        assert story.seconds_total == 60.0
    assert stories[2].title == "streambench_324 line 3"
    assert stories[0].prompts[0].startswith("In the library reading room, Noah")


def test_load_story_json(tmp_path):
    doc = {
        "title": "Library",
        "seed": 1,
        "segments": [{"prompt": "Noah enters", "seconds": 10}, {"prompt": "He sits", "seconds": 4.5}],
    }
    story = load_story(write(tmp_path, "s.json", json.dumps(doc, indent=2)))
    assert story == Story((Segment("Noah enters", 10.0), Segment("He sits", 4.5)), title="Library", seed=1)
    assert load_stories(tmp_path / "s.json") == [story]


def test_load_story_prompts_shape_and_bom(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"prompts": ["a", "b"], "seconds": [3, 6]}', encoding="utf-8-sig")
    assert load_story(path).segments == (Segment("a", 3.0), Segment("b", 6.0))


def test_jsonl_seconds_blank_lines_and_titles(tmp_path):
    text = '{"prompts": ["a", "b"]}\n\n{"prompts": ["c"], "seconds": 5, "seed": 3}\n'
    stories = load_stories(write(tmp_path, "s.jsonl", text), default_seconds=2)
    assert [s.seconds_total for s in stories] == [4.0, 5.0]
    assert stories[1].seed == 3
    assert stories[1].title == "s line 3"


def bad_json_story(tmp_path, text: str) -> StoryError:
    with pytest.raises(StoryError) as info:
        load_story(write(tmp_path, "bad.json", text))
    return info.value


def test_malformed_json_names_line_and_column(tmp_path):
    err = bad_json_story(tmp_path, '{\n  "segments": [\n    {"prompt": "a" "seconds": 1}\n  ]\n}')
    assert (err.line, err.column) == (3, 20)
    assert "bad.json line 3 column 20: invalid JSON: Expecting ',' delimiter" in str(err)


def test_missing_field_names_segment_and_line(tmp_path):
    err = bad_json_story(tmp_path, '{"segments": [\n  {"prompt": "a", "seconds": 1},\n  {"prompt": "b"}\n]}')
    assert err.line == 3
    assert 'bad.json line 3: segments[1] is missing "seconds"; add e.g. "seconds": 10' in str(err)


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        ('[{"prompt": "a", "seconds": "10"}]', 'segments[0] "seconds" must be a number, got str'),
        ('[{"prompt": 5, "seconds": 10}]', 'segments[0] "prompt" must be a string, got int'),
        ('[{"prompt": "", "seconds": 10}]', "segments[0] prompt is empty"),
        ('[{"prompt": "a", "seconds": -2}]', "segments[0] seconds must be a positive finite number, got -2"),
        ('[{"prompt": "a", "seconds": true}]', 'segments[0] "seconds" must be a number, got bool'),
        ('[{"prompt": "a", "duration": 3}]', 'unknown key(s) "duration" (did you mean "seconds"?)'),
        ('[{"prompt": "a", "seconds": 1, "seconds": 2}]', '"seconds" appears twice'),
        ("[]", '"segments" must be a non-empty list'),
        ('["a"]', "segments[0] must be an object"),
    ],
)
def test_bad_segments(tmp_path, segments, message):
    err = bad_json_story(tmp_path, '{"title": "t",\n "segments": ' + segments + "}")
    assert "bad.json line 2: " in str(err)
    assert message in str(err)


def test_bad_top_level(tmp_path):
    assert 'needs "segments"' in str(bad_json_story(tmp_path, '{"name": "x"}'))
    err = bad_json_story(tmp_path, '{"segments": [{"prompt": "a", "seconds": 1}], "titel": "x"}')
    assert 'story has unknown key(s) "titel" (did you mean "title"?)' in str(err)
    assert "got list" in str(bad_json_story(tmp_path, "[1, 2]"))
    assert '"seed" must be an integer, got float 1.5' in str(
        bad_json_story(tmp_path, '{"seed": 1.5, "segments": [{"prompt": "a", "seconds": 1}]}')
    )


def test_bad_line_in_the_middle_of_jsonl(tmp_path):
    lines = ['{"prompts": ["a"]}', "", '{"prompts": 5}', '{"prompts": ["b"]}']
    with pytest.raises(StoryError) as info:
        load_stories(write(tmp_path, "stories.jsonl", "\n".join(lines)))
    assert str(info.value).endswith('stories.jsonl line 3: "prompts" must be a list of strings, got int 5')
    assert (info.value.line, info.value.field) == (3, '"prompts"')


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompts": ["a", 3]}', '"prompts" must be a list of strings'),
        ('{"prompts": ["a", " "]}', '"prompts"[1] prompt is empty'),
        ('{"prompts": []}', '"prompts" is empty'),
        ('{"prompts": ["a"], "seconds": [1, 2]}', '"seconds" has 2 durations for 1 prompts'),
        ('{"prompts": ["a"], "seconds": 0}', '"prompts"[0] seconds must be a positive finite number, got 0'),
        ('{"prompts": ["a"], "extra": 1}', 'unknown key(s) "extra"'),
        ('{"prompts": ["a"],}', "line 2 column 19: invalid JSON"),
        ('["a"]', "must be a JSON object"),
    ],
)
def test_bad_jsonl_lines(tmp_path, line, message):
    with pytest.raises(StoryError, match="s.jsonl line 2") as info:
        load_stories(write(tmp_path, "s.jsonl", '{"prompts": ["ok"]}\n' + line + "\n"))
    assert message in str(info.value)


def test_file_kinds(tmp_path):
    with pytest.raises(StoryError, match="has suffix '.yaml'"):
        load_stories(write(tmp_path, "s.yaml", "x"))
    with pytest.raises(StoryError, match="holds no stories"):
        load_stories(write(tmp_path, "s.jsonl", "\n\n"))
    (tmp_path / "latin1.json").write_bytes(b'{"prompts": ["caf\xe9"]}')
    with pytest.raises(StoryError, match="latin1.json: is not UTF-8 text"):
        load_story(tmp_path / "latin1.json")
    assert load_stories(write(tmp_path, "s.txt", "5s | a\nb")) == [Story.from_prompts(["a", "b"], [5, 10])]


# --- the text form ---------------------------------------------------------------------------------------------------


def test_text_form_durations_comments_and_defaults():
    text = """# my story
10s | a woman walks into the library
[5s] she sits down

she reads a book | 2.5 sec
  a cat jumps on the table [1.5s]
the end
"""
    story = parse_story_text(text, default_seconds=3)
    assert story.prompts == (
        "a woman walks into the library",
        "she sits down",
        "she reads a book",
        "a cat jumps on the table",
        "the end",
    )
    assert [s.seconds for s in story.segments] == [10, 5, 2.5, 1.5, 3]


def test_text_form_keeps_pipes_and_brackets_inside_prompts():
    story = parse_story_text("a sign reads [OPEN] | neon, night")
    assert story.segments == (Segment("a sign reads [OPEN] | neon, night", 10.0),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a\n[1] a scene", "story text line 2: has a number without a unit"),
        ("a\nb\n10 | c", "story text line 3: has a number without a unit"),
        ("10s | a | 5s", "story text line 1: has two durations"),
        ("a\n[5s]", "story text line 2: prompt is empty"),
        ("# only a comment\n\n", "has no segments"),
        ("10s |", "story text line 1: prompt is empty after the duration ('10s |'); write what happens"),
        ("10s", "story text line 1: is a duration without a prompt ('10s')"),
        ("a\n5 min", "story text line 2: is a duration without a prompt"),
        ("100000s | a bird", "story text line 1: seconds is 100000.0, more than the maximum of 86400 s (24 h)"),
        ("0s | a bird", "story text line 1: seconds must be a positive finite number, got 0.0"),
    ],
)
def test_text_form_errors(text, message):
    with pytest.raises(StoryError) as info:
        parse_story_text(text)
    assert message in str(info.value)


@needs_narrastream
def test_text_form_accepts_pasted_json():
    narrastream_line = NARRASTREAM.read_text(encoding="utf-8").splitlines()[0]
    story = parse_story_text(narrastream_line, default_seconds=4)
    assert len(story.segments) == 6 and story.seconds_total == 24
    story = parse_story_text('\n{"seed": 2, "segments": [{"prompt": "a", "seconds": 1.5}]}')
    assert story == Story((Segment("a", 1.5),), seed=2)


def test_text_form_json_errors_name_lines():
    with pytest.raises(StoryError, match=r"story text line 3: segments\[0\] \"seconds\" must be a number"):
        parse_story_text('{\n"segments": [\n {"prompt": "a", "seconds": null}]}')
    with pytest.raises(StoryError, match="line 2 column 1: invalid JSON: Extra data; give one story"):
        parse_story_text('{"prompts": ["a"]}\n{"prompts": ["b"]}')
    with pytest.raises(ValueError, match="default_seconds must be a positive number"):
        parse_story_text("a", default_seconds=0)
    with pytest.raises(ValueError, match="default_seconds must be a positive number"):
        load_stories("unused.jsonl", default_seconds=-1)


# --- every number in range -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "message"),
    [
        (1e308, "seconds is 1e+308, more than the maximum of 86400 s (24 h) per segment; give at most 86400"),
        (86400.5, "seconds is 86400.5, more than the maximum of 86400 s (24 h)"),
        (10**400, "seconds is 100000000000... (an integer of 401 digits), more than the maximum"),
        (math.inf, "seconds must be a positive finite number, got inf; give a duration in seconds above 0 and at "
                   "most 86400 (24 h)"),
        (math.nan, "got nan"),
        (-5, "got -5"),
        (0.0, "got 0.0"),
    ],
)  # fmt: skip
def test_segment_seconds_have_a_stated_range(seconds, message):
    with pytest.raises(ValueError, match="Segment seconds") as info:
        Segment("a bird", seconds)
    assert message in str(info.value)
    with pytest.raises(ValueError, match="Segment seconds"):
        Story.from_prompts(["a", "b"], [5, seconds])


def test_a_segment_of_24_hours_is_the_longest():
    assert Segment("a", MAX_SEGMENT_SECONDS).seconds == 86400.0
    assert plan_chunks(Story.from_prompts(["a", "b"], MAX_SEGMENT_SECONDS)).num_chunks == 2 * 115200


@pytest.mark.parametrize("value", ["1e308", "Infinity", "NaN", "-3", "0"])
def test_json_seconds_out_of_range_name_file_line_field_and_value(tmp_path, value):
    err = bad_json_story(tmp_path, '{"title": "t",\n "segments": [{"prompt": "a", "seconds": ' + value + "}]}")
    shown = {"1e308": "1e+308", "Infinity": "inf", "NaN": "nan"}.get(value, value)
    assert str(err).startswith(f"{tmp_path / 'bad.json'} line 2: segments[0] seconds ")
    assert f"{shown}," in str(err) or f"got {shown};" in str(err)
    assert "86400" in str(err) and (err.line, err.field) == (2, "segments[0]")


@pytest.mark.parametrize(
    ("seconds", "message"),
    [
        ("1e308", '"prompts"[0] seconds is 1e+308, more than the maximum of 86400 s'),
        ("[5, 1e308]", '"prompts"[1] seconds is 1e+308, more than the maximum'),
        ("[5, NaN]", '"prompts"[1] seconds must be a positive finite number, got nan'),
        ("-Infinity", '"prompts"[0] seconds must be a positive finite number, got -inf'),
        ("[-1, 5]", '"prompts"[0] seconds must be a positive finite number, got -1'),
        ("9" * 5000, "holds a number of more than 4300 digits"),
    ],
)
def test_narrastream_seconds_out_of_range(tmp_path, seconds, message):
    text = '{"prompts": ["ok"]}\n{"prompts": ["a", "b"], "seconds": ' + seconds + "}\n"
    with pytest.raises(StoryError) as info:
        load_stories(write(tmp_path, "s.jsonl", text))
    assert str(info.value).startswith(f"{tmp_path / 's.jsonl'} line 2: {message}")


def test_default_seconds_has_the_same_range():
    with pytest.raises(ValueError, match="default_seconds is 1e[+]308, more than the maximum of 86400 s"):
        parse_story_text("a", default_seconds=1e308)
    with pytest.raises(ValueError, match="default_seconds must be a positive number of seconds, got nan"):
        load_stories("unused.jsonl", default_seconds=math.nan)


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("-5s | a bird", "'-5s'"),
        ("abc s | a dog", "'abc s'"),
        ("5 ss | x", "'5 ss'"),
        ("[\u22123s] x", "'\u22123s'"),
        ("1e308s | x", "'1e308s'"),
        ("a bird | 5 min", "'5 min'"),
        ("a bird [5 sek]", "'5 sek'"),
        ("a bird | -2", "'-2'"),
        ("[ten seconds] a cat", "'ten seconds'"),
        ("10s | a bird | 5 ss", "'5 ss'"),  # after a valid duration, the rest is checked too
    ],
)
def test_text_form_malformed_durations_are_errors_with_the_line(line, shown):
    with pytest.raises(StoryError) as info:
        parse_story_text(f"a first line\n{line}")
    assert str(info.value).startswith(f"story text line 2: has {shown} where a duration goes, which is not a valid ")
    assert "write a positive number of seconds in digits with an `s` (at most 86400)" in str(info.value)
    assert info.value.line == 2


@pytest.mark.parametrize(
    "line",
    [
        "a clock showing 10 | 12 people",
        "a man climbs | 12 steps",
        "a city at night | 4K",
        "a dancer | 35mm film",
        "a race | 1st",
        "it's | a cat",
        "gone in seconds",
        "3 hours later, the room is empty",
        "a sign reads [OPEN] | neon, night",
    ],
)
def test_text_form_numbers_and_pipes_inside_prompts_stay_prompts(line):
    assert parse_story_text(line).segments == (Segment(line, DEFAULT_SECONDS),)
    assert parse_story_text(f"4s | {line}").segments == (Segment(line, 4.0),)
