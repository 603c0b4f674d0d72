import re

import numpy as np
import pytest
from PIL import Image

from iamflow_core import pictures
from iamflow_core.pictures import (
    BACKGROUND,
    StoryMapError,
    entity_colour,
    entity_sheet,
    entity_sheet_text,
    plan_picture,
    story_map_layout,
    story_map_picture,
    story_map_summary,
)
from iamflow_core.story import Story, plan_chunks
from iamflow_core.story.entities import Entity, EntityRegistry, Mention

PROMPTS = (
    "A woman in a red coat reads a worn notebook at a library table, warm afternoon light.",
    "A young man in a grey hoodie walks past the shelves and waves at her.",
    "The woman in the red coat closes the notebook and smiles, the library quiet again.",
)
# The woman (1) is in prompts 1 and 3, the young man (2) in prompt 2; the dog (3) is never seen.
REGISTRY = {
    "entities": [
        {"id": 1, "name": "woman", "kind": "person", "attributes": ["red coat"], "aliases": []},
        {"id": 2, "name": "young man", "kind": "person", "attributes": [], "aliases": []},
        {"id": 3, "name": "dog", "kind": "object", "attributes": ["brown"], "aliases": []},
    ],
    "prompts": [[{"id": 1, "text": "A woman"}], [{"id": 2, "text": ""}], [{"id": 1, "text": "The woman"}]],
    "source": "user",
}
CHUNKS_PER_PROMPT = 4
REPEATING = re.compile(r"[{}\[\]'=]")  # what printing a dict or a list leaves behind


def summary(frame: int, chunk: int, segment: int, entities: list[int]) -> dict:
    return {"frame": frame, "chunk": chunk, "segment": segment, "entities": entities,
            "text_score": 0.05, "visual_score": 0.5}  # fmt: skip


def identity_map(
    entity_lists: list[list[int]],
    chunks_per_prompt: int = CHUNKS_PER_PROMPT,
    registry: dict | None = None,
    stop_after: int | None = None,
) -> dict:
    """A story map as the identity memory writes it: chunk c archives a frame of chunk c - 1 (with its prompt's
    entities); at each switch, the newest archived frame of each wanted entity comes back (without a registry, the
    two newest frames)."""
    chunks, archive = [], []
    for c in range(len(entity_lists) * chunks_per_prompt):
        segment = c // chunks_per_prompt
        report = {"chunk": c, "segment": segment, "memory_frames": []}
        if c % chunks_per_prompt == 0 and c:
            wanted = entity_lists[segment]
            frames = [next(f for f in reversed(archive) if e in f["entities"]) for e in wanted
                      if any(e in f["entities"] for f in archive)]  # fmt: skip
            if registry is None:  # without entities the memory takes the frames closest to the prompt
                frames = archive[-2:]
            report["retrieved"] = {"wanted": wanted, "frames": frames}
        if c:
            archived = summary(
                3 * (c - 1) + 1, c - 1, (c - 1) // chunks_per_prompt, entity_lists[(c - 1) // chunks_per_prompt]
            )
            archive.append(archived)
            report["archived"] = [archived]
        report.update(archive_frames=len(archive), archive_mb=0.1 * len(archive))
        chunks.append(report)
        if stop_after is not None and c + 1 >= stop_after:
            break
    memory = {"registry": registry, "archive": archive, "archive_mb": 0.1 * len(archive),
              "peak_archive_mb": 0.1 * len(archive), "corrections": {}, "late_verdicts": 0, "events": []}  # fmt: skip
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(entity_lists))]
    return {"title": "library", "prompts": prompts, "registry": registry, "memory": memory, "chunks": chunks}


def three_prompt_map() -> dict:
    return identity_map([[1], [2], [1]], registry=REGISTRY)


def memflow_map() -> dict:
    chunks = []
    for c in range(12):
        report = {"chunk": c, "segment": c // 4, "memory_frames": [f for f in (0, 9, 18) if f < 3 * c]}
        if c % 3 == 0:
            report["recorded_frame"] = 3 * c
        chunks.append(report)
    return {"title": None, "prompts": list(PROMPTS), "registry": None, "memory": {"mode": "memflow"}, "chunks": chunks}


def no_memory_map() -> dict:
    chunks = [{"chunk": c, "segment": c // 4} for c in range(12)]
    return {"title": None, "prompts": list(PROMPTS), "registry": None, "memory": {"mode": "none"}, "chunks": chunks}


def marked_pixels(image: Image.Image, box: tuple[float, float, float, float], colour: tuple[int, int, int]) -> int:
    """Pixels in `box` within 40 of `colour` on every channel."""
    region = np.asarray(image.crop(tuple(round(v) for v in box)), dtype=np.int16)
    return int((np.abs(region - np.array(colour)) <= 40).all(axis=-1).sum())


def drawn_in_border(image: Image.Image, border: int = 3) -> bool:
    """Whether anything but the background is drawn within `border` px of the image's edge."""
    pixels = np.asarray(image)
    edges = (pixels[:border], pixels[-border:], pixels[:, :border], pixels[:, -border:])
    return any((edge != np.array(BACKGROUND)).any() for edge in edges)


# --- the story map picture -----------------------------------------------------------------------------------------


def test_story_map_picture_is_rgb_of_the_asked_width():
    image = story_map_picture(three_prompt_map(), width=1000)
    assert image.mode == "RGB"
    assert image.width == 1000
    assert 150 < image.height < 600


def test_a_returning_entity_gets_a_mark_in_its_lane_at_the_switch_chunk():
    story_map = three_prompt_map()
    image, layout = story_map_picture(story_map), story_map_layout(story_map)
    switch = 2 * CHUNKS_PER_PROMPT
    half = (layout.chunk_left(1) - layout.chunk_left(0)) / 2
    x = layout.chunk_x(switch)

    def at_switch(lane: int) -> tuple[float, float, float, float]:
        _, y0, _, y1 = layout.lane_box(lane)
        return x - half, y0, x + half, y1

    woman = marked_pixels(image, at_switch(1), entity_colour(1))
    assert woman > 20
    assert marked_pixels(image, at_switch(3), entity_colour(1)) == 0  # the dog's lane stays empty
    assert marked_pixels(image, at_switch(3), entity_colour(3)) == 0


def test_archived_frames_are_dotted_in_their_entity_lanes():
    story_map = three_prompt_map()
    image, layout = story_map_picture(story_map), story_map_layout(story_map)
    _, y0, _, y1 = layout.lane_box(2)
    young_man = (layout.chunk_left(CHUNKS_PER_PROMPT), y0, layout.chunk_left(2 * CHUNKS_PER_PROMPT), y1)
    assert marked_pixels(image, young_man, entity_colour(2)) > 50


def test_entity_colours_are_fixed_per_id_and_differ_between_neighbours():
    assert entity_colour(1) == entity_colour(1)
    assert len({entity_colour(i) for i in range(1, 11)}) == 10


def test_memflow_and_no_memory_maps_draw():
    for story_map in (memflow_map(), no_memory_map()):
        image = story_map_picture(story_map)
        assert image.mode == "RGB" and image.width == 1200
        assert not drawn_in_border(image)


def test_a_map_without_registry_draws_one_lane_of_frames():
    story_map = identity_map([[], [], []])
    layout = story_map_layout(story_map)
    assert layout.lanes == (0,)
    assert story_map_picture(story_map).width == 1200


def test_twelve_prompts_ten_entities_and_400_chunks_draw_inside_the_image():
    entities = [{"id": i, "name": f"character number {i} with a very long descriptive name"} for i in range(1, 11)]
    lists = [[1 + (p % 10), 1 + (p * 3 % 10)] for p in range(12)]
    registry = {"entities": entities, "prompts": [[{"id": i, "text": ""} for i in ids] for ids in lists]}
    story_map = identity_map(lists, chunks_per_prompt=34, registry=registry, stop_after=400)
    story_map["title"] = "a very long title " * 20
    image = story_map_picture(story_map)
    assert len(story_map_layout(story_map).lanes) == 10
    assert not drawn_in_border(image)
    assert not drawn_in_border(story_map_picture(story_map, width=600))


def test_a_cancelled_run_still_draws_and_says_which_prompts_were_not_rendered():
    story_map = identity_map([[1], [2], [1]], registry=REGISTRY, stop_after=6)
    image = story_map_picture(story_map)
    assert image.width == 1200
    lines = story_map_summary(story_map)
    assert any("prompt 3 was not rendered" in line for line in lines)


def test_an_empty_registry_and_no_chunks_still_draw():
    story_map = identity_map([[], []], registry={"entities": [], "prompts": [[], []]}, stop_after=1)
    assert story_map_picture(story_map).width == 1200
    story_map["chunks"] = []
    assert story_map_picture(story_map).width == 1200
    assert story_map_summary(story_map)


def test_a_story_map_without_chunks_is_refused_with_what_to_pass():
    with pytest.raises(StoryMapError, match="'chunks'.*story.json"):
        story_map_picture({"prompts": ["a"]})


def test_a_narrow_width_is_refused_with_the_smallest_that_works():
    with pytest.raises(ValueError, match="at least 400"):
        story_map_picture(three_prompt_map(), width=100)


# --- the story map in words ----------------------------------------------------------------------------------------


def test_summary_names_the_returning_entity_and_the_prompt_it_came_from():
    lines = story_map_summary(three_prompt_map())
    assert "prompt 3: the woman (#1) returns: 1 frame brought back from prompt 1" in lines
    assert "prompt 2: the young man (#2) is new: nothing to bring back yet" in lines
    assert any(line.startswith("memory: 11 frames archived (1.1 MB at most)") for line in lines)


def test_summary_lines_hold_no_python_repr():
    maps = [three_prompt_map(), memflow_map(), no_memory_map(), identity_map([[], [], []])]
    corrected = three_prompt_map()
    corrected["memory"]["corrections"] = {"2": ["grey hoodie"]}
    corrected["memory"]["events"] = [{"evicted": summary(1, 0, 0, [1])}]
    corrected["memory"]["late_verdicts"] = 2
    corrected["memory"]["verdicts_used"] = 5
    corrected["memory"]["verifier_skipped"] = 7
    for story_map in [*maps, corrected]:
        for line in story_map_summary(story_map):
            assert not REPEATING.search(line), line
    lines = story_map_summary(corrected)
    assert "the verifier corrected the young man (#2): grey hoodie" in lines
    assert any("1 of them later dropped" in line for line in lines)
    assert "5 chunks chose a frame with scores from the verifier" in lines
    assert "2 chunks chose a frame on text alone: the verifier was late" in lines
    assert any(line.startswith("7 chunks chose a frame on text alone without asking the verifier") for line in lines)


def test_summary_without_registry_says_frames_are_chosen_by_relevance():
    lines = story_map_summary(identity_map([[], [], []]))
    assert any("no entity registry" in line for line in lines)
    assert "prompt 3: 2 frames brought back from prompt 2, by prompt relevance" in lines


def test_memflow_summary_says_what_each_prompt_starts_with():
    lines = story_map_summary(memflow_map())
    assert "prompt 3: starts with 3 frames in memory, recorded in prompts 1 and 2" in lines


# --- the plan picture ----------------------------------------------------------------------------------------------


def test_plan_picture_is_a_small_preview():
    story = Story.from_prompts(list(PROMPTS), [3, 10, 2.6])
    image = plan_picture(plan_chunks(story), story.prompts)
    assert image.size == (600, 160) and image.mode == "RGB"
    assert not drawn_in_border(image)


def test_plan_picture_draws_twelve_short_prompts():
    story = Story.from_prompts([f"prompt number {i}" for i in range(12)], [0.5] * 11 + [60])
    assert not drawn_in_border(plan_picture(plan_chunks(story), story.prompts))


def test_plan_picture_wants_one_prompt_per_segment():
    plan = plan_chunks(Story.from_prompts(list(PROMPTS), 3))
    with pytest.raises(ValueError, match="2 prompts for a plan of 3 segments"):
        plan_picture(plan, PROMPTS[:2])


# --- the entity sheet ----------------------------------------------------------------------------------------------


def registry() -> EntityRegistry:
    return EntityRegistry.from_json(REGISTRY)


def test_entity_sheet_text_lists_each_entity_with_its_prompts():
    text = entity_sheet_text(registry())
    assert text.splitlines() == [
        "#1 woman (person): red coat; in prompts 1, 3",
        "#2 young man (person): no attributes; in prompt 2",
        "#3 dog (object): brown; in no prompt",
    ]
    assert not REPEATING.search(text)


def test_entity_sheet_text_without_entities_says_how_frames_are_chosen():
    assert "prompt" in entity_sheet_text(None)
    assert "no entities" in entity_sheet_text(EntityRegistry.empty(3))


def test_entity_sheet_grows_with_the_entities_and_stays_inside():
    small = entity_sheet(registry())
    many = EntityRegistry(
        tuple(Entity(i, f"entity {i} " * 8, attributes=("a long attribute",) * 9) for i in range(1, 11)),
        tuple((Mention(i),) for i in range(1, 11)),
    )
    large = entity_sheet(many)
    assert small.mode == large.mode == "RGB"
    assert small.width == large.width == 700
    assert large.height > small.height
    assert not drawn_in_border(large)
    assert entity_sheet(None).width == 700


# --- fonts ---------------------------------------------------------------------------------------------------------


def test_without_a_scalable_font_pictures_use_the_bitmap_font_and_say_so(monkeypatch, caplog):
    load_default = pictures.ImageFont.load_default

    def no_sizes(size=None):
        if size is not None:
            raise OSError("no FreeType")
        return load_default()

    monkeypatch.setattr(pictures.ImageFont, "load_default", no_sizes)
    pictures._font.cache_clear()
    try:
        with caplog.at_level("DEBUG", logger="iamflow_core.pictures"):
            assert story_map_picture(three_prompt_map()).width == 1200
        assert "bitmap font" in caplog.text
    finally:
        pictures._font.cache_clear()
