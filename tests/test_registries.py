"""Registry files: one registry per story (`load_registries`), and one clear error for every bad file."""

import json
from pathlib import Path

import pytest

from iamflow_core.story.entities import EntityRegistry, RegistryError, load_registries

ROSA = {
    "entities": [
        {"id": 1, "name": "Rosa", "kind": "person", "attributes": ["red scarf"]},
        {"id": 2, "name": "old fisherman", "kind": "person", "attributes": ["white beard"]},
    ],
    "prompts": [[1], [1, 2], [2]],
}
TWINS = {
    "entities": [
        {"id": 1, "name": "Mia", "kind": "person", "attributes": ["yellow raincoat"]},
        {"id": 2, "name": "Lea", "kind": "person", "attributes": ["green raincoat"]},
    ],
    "prompts": [[1, 2], [1], [2], [1, 2]],
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*registries: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in registries)


def error(path, num_stories, segments) -> str:
    with pytest.raises(RegistryError) as info:
        load_registries(path, num_stories, segments)
    return str(info.value)


# --- one registry per story ------------------------------------------------------------------------------------------


def test_a_json_registry_fits_a_single_story(tmp_path):
    path = write(tmp_path, "r.json", json.dumps(ROSA, indent=2))
    [registry] = load_registries(path, 1, [3])
    assert registry == EntityRegistry.from_json(ROSA, num_segments=3, source="user")
    assert registry.source == "user"


def test_a_json_registry_for_several_stories_is_refused(tmp_path):
    """Today's bug: one --registry with a 6-story JSONL applied Rosa and the fisherman to every story."""
    path = write(tmp_path, "r.json", json.dumps(ROSA))
    assert error(path, 6, [3] * 6) == (
        f"registry file {path} holds one registry for 6 stories; give a .jsonl file with one registry per line, "
        "in story order ({} for a story without entities)"
    )


def test_jsonl_gives_each_story_its_own_registry(tmp_path):
    text = "\n" + json.dumps(ROSA) + "\n\n   \n{}\n" + json.dumps(TWINS) + "\n\n"  # blank lines are skipped
    rosa, empty, twins = load_registries(write(tmp_path, "r.jsonl", text), 3, [3, 2, 4])
    assert [e.name for e in rosa.entities] == ["Rosa", "old fisherman"]
    assert empty == EntityRegistry.empty(2, source="user")  # {}: a story without entities
    assert [e.name for e in twins.entities] == ["Mia", "Lea"] and twins.ids_in(2) == (2,)
    assert {r.source for r in (rosa, empty, twins)} == {"user"}


def test_jsonl_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(jsonl(ROSA), encoding="utf-8-sig")
    assert load_registries(path, 1, [3])[0].entity(1).name == "Rosa"


@pytest.mark.parametrize(
    ("registries", "stories", "message"),
    [
        ((ROSA,), 6, "holds 1 registry for 6 stories"),
        ((ROSA, TWINS), 1, "holds 2 registries for 1 story"),
        ((), 2, "holds 0 registries for 2 stories"),
    ],
)
def test_jsonl_needs_one_line_per_story(tmp_path, registries, stories, message):
    path = write(tmp_path, "r.jsonl", jsonl(*registries))
    assert error(path, stories, [3] * stories) == (
        f"registry file {path} {message}; give one registry per line, in story order ({{}} for a story without "
        "entities)"
    )


def test_each_line_is_checked_against_its_own_story(tmp_path):
    path = write(tmp_path, "r.jsonl", jsonl(ROSA) + "\n" + jsonl(TWINS))
    assert error(path, 2, [3, 6]) == (
        f"registry file {path} line 3 (story 2): the registry lists entities for 4 prompts but the story has 6; "
        "give one list per prompt (an empty list for a prompt without entities)"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"entities": [}', "invalid JSON at column 15: Expecting value"),
        ('{"entities": [], "extra": 1}', "registry JSON has unknown key(s) ['extra']"),
        ('{"entities": [{"id": 0, "name": "x"}]}', "entities[0]: entity id must be a positive integer, got 0"),
        ('{"prompts": [[3], [], []]}', "prompt 1 mentions entity 3, which is not in the entities list"),
        ('"{}"', "must be one JSON object per registry, got str"),
        ("[1, 2]", "must be one JSON object per registry, got list"),
        ('{"prompts": [[' + "9" * 5000 + "]]}", "holds a number of more than 4300 digits"),
    ],
)
def test_a_bad_line_names_the_file_line_and_story(tmp_path, line, message):
    path = write(tmp_path, "r.jsonl", jsonl(ROSA) + line + "\n")
    assert error(path, 2, [3, 3]).startswith(f"registry file {path} line 2 (story 2): {message}")


def test_a_bad_json_file_names_the_file_line_and_column(tmp_path):
    path = write(tmp_path, "r.json", '{\n  "entities": [\n    {"id": 1 "name": "Rosa"}\n]}')
    assert error(path, 1, [3]) == f"registry file {path}: invalid JSON at line 3 column 14: Expecting ',' delimiter"


# --- files that cannot be read ---------------------------------------------------------------------------------------


def test_a_missing_file_says_it_is_the_registry(tmp_path):
    path = tmp_path / "nope.json"
    assert error(path, 1, [3]) == f"registry file {path} does not exist; check the path"


def test_a_folder_a_foreign_suffix_and_non_utf8(tmp_path):
    folder = tmp_path / "registries.jsonl"
    folder.mkdir()
    assert error(folder, 1, [3]).startswith(f"registry file {folder} is a folder; give a .json file")
    yaml = write(tmp_path, "r.yaml", "entities: []")
    assert error(yaml, 1, [3]).startswith(f"registry file {yaml} has suffix '.yaml'; use .json (one registry")
    latin1 = tmp_path / "r.json"
    latin1.write_bytes(b'{"entities": [{"id": 1, "name": "Jos\xe9"}]}')
    assert error(latin1, 1, [3]) == (
        f"registry file {latin1} is not UTF-8 text (invalid continuation byte at byte 36); save it as UTF-8"
    )


def test_an_unreadable_file(tmp_path, monkeypatch):
    path = write(tmp_path, "r.json", json.dumps(ROSA))

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)  # chmod does not stop root, who may run the tests
    assert error(path, 1, [3]) == (
        f"registry file {path} cannot be read (Permission denied); check that it is a readable file"
    )


def test_counts_must_agree():
    with pytest.raises(ValueError, match="got 2 segment counts for 3 stories"):
        load_registries("unused.jsonl", 3, [3, 3])
    with pytest.raises(ValueError, match="for at least one story"):
        load_registries("unused.jsonl", 0, [])
