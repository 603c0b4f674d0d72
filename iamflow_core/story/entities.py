"""Entities of a story and their global IDs: the typed, serialisable registry the identity memory works from.

An `Entity` is a character or a key object with a global ID that stays the same across prompts ("the woman in the
beige sweater" in prompt 4 is entity 1 from prompt 1). Per story segment, `Mention`s say which entities appear and
with which words of the prompt (used to weight those prompt tokens when scoring frames).

The LLM extractor produces a registry; an artist can also write or edit one as JSON, and the pipeline uses it as
given. JSON form (`to_json` / `from_json`):

    {"entities": [{"id": 1, "name": "Nora", "kind": "person",
                   "attributes": ["short black curls", "beige sweater"], "aliases": ["the woman"]}],
     "prompts": [[{"id": 1, "text": "a woman with short black curls"}], [1], []]}

A prompt's list may hold mention objects or bare IDs. An entity may carry reference pictures,
``"images": ["rosa_front.png"]`` (paths relative to the registry file): each becomes a pinned frame of the identity
archive (`Reference`, `memory.identity`). `with_reference` adds one from an array (the CLI's `--reference`, the
Entity Reference node).

A registry file (`load_registries`) is either ``.json``, one registry as above, valid only for a story file with
a single story, or ``.jsonl``, one registry per line in the order of the stories (the n-th non-blank line belongs
to story n; blank lines are skipped, as in a stories ``.jsonl``; ``{}`` is a story without entities):

    {"entities": [{"id": 1, "name": "Rosa", ...}], "prompts": [[1], [1], [], [1], [], [1]]}
    {}
    {"entities": [{"id": 1, "name": "Mia", ...}, {"id": 2, "name": "Lea", ...}], "prompts": [[1, 2], [1], ...]}
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("person", "object")


class RegistryError(ValueError):
    """A registry that does not fit its story, or malformed registry JSON. The message names the field."""


@dataclass(frozen=True)
class Entity:
    id: int
    name: str
    kind: str = "person"
    attributes: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    images: tuple[str, ...] = ()  # reference pictures, as named in the registry (their pixels: `Reference`)

    def __post_init__(self) -> None:
        if not isinstance(self.id, int) or isinstance(self.id, bool) or self.id < 1:
            raise RegistryError(f"entity id must be a positive integer, got {self.id!r}")
        if not isinstance(self.name, str) or not self.name.strip():
            raise RegistryError(f"entity {self.id}: name must be a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise RegistryError(f"entity {self.id}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "attributes", tuple(self.attributes))
        object.__setattr__(self, "aliases", tuple(self.aliases))
        object.__setattr__(self, "images", tuple(self.images))

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "name": self.name, "kind": self.kind,
               "attributes": list(self.attributes), "aliases": list(self.aliases)}  # fmt: skip
        if self.images:
            out["images"] = list(self.images)
        return out

    def answers_to(self, key: str) -> bool:
        """Whether `key` names this entity: its id, name or an alias (case and spaces ignored)."""
        words = " ".join(key.split()).casefold()
        return words == str(self.id) or words in {" ".join(n.split()).casefold() for n in (self.name, *self.aliases)}


@dataclass(frozen=True)
class Reference:
    """A picture of entity `entity` (uint8 RGB [H, W, 3]): `name` says where it came from (a file name)."""

    entity: int
    name: str
    pixels: np.ndarray = field(repr=False, compare=False)


@dataclass(frozen=True)
class Mention:
    """Entity `entity` appears in a prompt, referred to by `text` (words of the prompt; may be empty)."""

    entity: int
    text: str = ""


@dataclass(frozen=True)
class EntityRegistry:
    entities: tuple[Entity, ...] = ()
    prompts: tuple[tuple[Mention, ...], ...] = ()
    source: str = "none"  # "llm", "user" or "none"
    notes: tuple[str, ...] = field(default=(), compare=False)  # warnings from extraction (kept for the story map)
    references: tuple[Reference, ...] = field(default=(), compare=False, repr=False)  # the entities' pictures

    def __post_init__(self) -> None:
        ids = [e.id for e in self.entities]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise RegistryError(f"entity id {dup} is used twice; give each entity its own id")
        known = set(ids)
        for i, mentions in enumerate(self.prompts):
            for m in mentions:
                if m.entity not in known:
                    raise RegistryError(
                        f"prompt {i + 1} mentions entity {m.entity}, which is not in the entities list"
                    )

    @classmethod
    def empty(cls, num_segments: int, source: str = "none", notes: tuple[str, ...] = ()) -> EntityRegistry:
        return cls((), ((),) * num_segments, source, notes)

    def entity(self, entity_id: int) -> Entity:
        for e in self.entities:
            if e.id == entity_id:
                return e
        raise KeyError(f"no entity {entity_id} (known: {[e.id for e in self.entities]})")

    def ids_in(self, segment: int) -> tuple[int, ...]:
        """IDs of the entities in story segment `segment`, without repeats, in order of mention."""
        return tuple(dict.fromkeys(m.entity for m in self.prompts[segment]))

    def find(self, key: int | str) -> Entity:
        """The entity named by `key`: its id, name or an alias. A clear error lists the entities there are."""
        for e in self.entities:
            if e.answers_to(str(key)):
                return e
        known = ", ".join(f"{e.id} {e.name}" for e in self.entities) or "none"
        raise RegistryError(
            f"no entity {str(key)!r} in the registry (entities: {known}); give one of these ids or names"
        )

    def with_reference(self, key: int | str, pixels: np.ndarray, name: str) -> EntityRegistry:
        """A new registry where the entity named by `key` also has the reference picture `pixels` (uint8 RGB)."""
        entity = self.find(key)
        entities = tuple(replace(e, images=(*e.images, name)) if e is entity else e for e in self.entities)
        return replace(self, entities=entities, references=(*self.references, Reference(entity.id, name, pixels)))

    def with_attributes(self, entity_id: int, attributes: list[str] | tuple[str, ...]) -> EntityRegistry:
        """A new registry with one entity's attributes replaced (e.g. corrected by the verifier)."""
        self.entity(entity_id)
        entities = tuple(replace(e, attributes=tuple(attributes)) if e.id == entity_id else e for e in self.entities)
        return replace(self, entities=entities)

    def check_story(self, num_segments: int) -> None:
        if len(self.prompts) != num_segments:
            raise RegistryError(
                f"the registry lists entities for {len(self.prompts)} prompts but the story has {num_segments}; "
                "give one list per prompt (an empty list for a prompt without entities)"
            )

    # JSON ----------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "entities": [e.to_dict() for e in self.entities],
            "prompts": [[{"id": m.entity, "text": m.text} for m in p] for p in self.prompts],
            "source": self.source,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_json(
        cls, text: str | dict, num_segments: int | None = None, source: str = "user", folder: Path | None = None
    ) -> EntityRegistry:
        """Parse (and validate) registry JSON, e.g. typed by an artist. Errors name the field and the fix.
        With `folder` (a registry file's folder) the entities' reference pictures ("images") are read now,
        relative to it; without it (a story map, a registry typed in a node) they stay names only."""
        try:
            data = json.loads(text) if isinstance(text, str) else text
        except json.JSONDecodeError as e:
            raise RegistryError(f"registry JSON is invalid at line {e.lineno} column {e.colno}: {e.msg}") from e
        if not isinstance(data, dict) or not isinstance(data.get("entities", []), list):
            raise RegistryError('registry JSON must be an object like {"entities": [...], "prompts": [[...], ...]}')
        unknown = set(data) - {"entities", "prompts", "source"}
        if unknown:
            raise RegistryError(f"registry JSON has unknown key(s) {sorted(unknown)}; allowed: entities, prompts")
        entities = tuple(_entity(item, i) for i, item in enumerate(data.get("entities", [])))
        prompts_raw = data.get("prompts", [])
        if not isinstance(prompts_raw, list):
            raise RegistryError('"prompts" must be a list with one list of entity ids or mentions per prompt')
        prompts = tuple(_mentions(p, i) for i, p in enumerate(prompts_raw))
        if num_segments is not None and not prompts_raw:
            prompts = ((),) * num_segments
        registry = cls(entities, prompts, data.get("source", source) if source == "llm" else source)
        if num_segments is not None:
            registry.check_story(num_segments)
        if folder is None:
            return registry
        references = tuple(_read_reference(e, image, folder) for e in entities for image in e.images)
        return replace(registry, references=references)


def _read_reference(entity: Entity, image: str, folder: Path) -> Reference:
    from ..images import ImageError, load_image

    path = Path(image).expanduser()
    path = path if path.is_absolute() else folder / path
    try:
        return Reference(entity.id, image, load_image(path, f"reference image of entity {entity.id} ({entity.name})"))
    except ImageError as e:
        raise RegistryError(str(e)) from e


def _entity(item: Any, index: int) -> Entity:
    where = f"entities[{index}]"
    if not isinstance(item, dict):
        raise RegistryError(f"{where} must be an object with id, name, kind, attributes; got {type(item).__name__}")
    unknown = set(item) - {"id", "name", "kind", "attributes", "aliases", "images"}
    if unknown:
        raise RegistryError(
            f"{where} has unknown key(s) {sorted(unknown)}; allowed: id, name, kind, attributes, aliases, images"
        )
    for key in ("attributes", "aliases", "images"):
        value = item.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RegistryError(f'{where}."{key}" must be a list of strings, got {value!r}')
    try:
        return Entity(item.get("id"), item.get("name"), item.get("kind", "person"), tuple(item.get("attributes", [])),
                      tuple(item.get("aliases", [])), tuple(item.get("images", [])))  # fmt: skip
    except RegistryError as e:
        raise RegistryError(f"{where}: {e}") from e


def _mentions(items: Any, index: int) -> tuple[Mention, ...]:
    where = f"prompts[{index}]"
    if not isinstance(items, list):
        raise RegistryError(f'{where} must be a list of entity ids or {{"id": ..., "text": ...}} objects')
    out = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            out.append(Mention(item))
        elif isinstance(item, dict) and isinstance(item.get("id"), int) and isinstance(item.get("text", ""), str):
            out.append(Mention(item["id"], item.get("text", "")))
        else:
            raise RegistryError(f'{where} holds {item!r}; use an entity id or {{"id": 1, "text": "..."}}')
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------------------
# Registry files: one registry per story
# ---------------------------------------------------------------------------------------------------------------------


def load_registries(
    path: str | PathLike[str], num_stories: int, segments_per_story: Sequence[int]
) -> list[EntityRegistry]:
    """One user registry per story, in story order, each checked against its story's number of segments.

    A ``.json`` file holds one registry and fits only a single story; a ``.jsonl`` file holds one registry per
    line, the n-th non-blank line for story n (blank lines skipped, ``{}`` for a story without entities). Every
    problem is one `RegistryError` that names the file, and for ``.jsonl`` the line and the story."""
    if len(segments_per_story) != num_stories or num_stories < 1:
        raise ValueError(
            f"got {len(segments_per_story)} segment counts for {num_stories} stories; give one count per story, "
            "for at least one story"
        )
    path = Path(path)
    text = _read_registry_file(path)
    if path.suffix.lower() == ".json":
        return [_single_registry(text, path, segments_per_story)]
    if path.suffix.lower() == ".jsonl":
        return _registry_per_line(text, path, segments_per_story)
    raise RegistryError(
        f"registry file {path} has suffix {path.suffix!r}; use .json (one registry, for a single story) or "
        ".jsonl (one registry per line, one line per story)"
    )


def _single_registry(text: str, path: Path, segments_per_story: Sequence[int]) -> EntityRegistry:
    if len(segments_per_story) != 1:
        raise RegistryError(
            f"registry file {path} holds one registry for {len(segments_per_story)} stories; give a .jsonl file "
            "with one registry per line, in story order ({} for a story without entities)"
        )
    return _registry_from_text(text, f"registry file {path}", segments_per_story[0], path.parent)


def _registry_per_line(text: str, path: Path, segments_per_story: Sequence[int]) -> list[EntityRegistry]:
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if len(lines) != len(segments_per_story):
        raise RegistryError(
            f"registry file {path} holds {_count(len(lines), 'registry', 'registries')} for "
            f"{_count(len(segments_per_story), 'story', 'stories')}; give one registry per line, in story order "
            "({} for a story without entities)"
        )
    return [
        _registry_from_text(line, f"registry file {path} line {number} (story {story})", segments, path.parent)
        for story, ((number, line), segments) in enumerate(zip(lines, segments_per_story), start=1)
    ]


def _read_registry_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate the byte-order mark some editors write
    except FileNotFoundError as e:
        raise RegistryError(f"registry file {path} does not exist; check the path") from e
    except IsADirectoryError as e:
        raise RegistryError(
            f"registry file {path} is a folder; give a .json file (one story) or a .jsonl file (one registry per line)"
        ) from e
    except UnicodeDecodeError as e:
        raise RegistryError(
            f"registry file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from e
    except OSError as e:
        raise RegistryError(
            f"registry file {path} cannot be read ({e.strerror or e}); check that it is a readable file"
        ) from e


def _registry_from_text(text: str, where: str, num_segments: int, folder: Path) -> EntityRegistry:
    """Parse one registry; every error is prefixed with `where` (the file, and the line of a .jsonl)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if "\n" not in text else f"line {e.lineno} column {e.colno}"
        raise RegistryError(f"{where}: invalid JSON at {at}: {e.msg}") from e
    except ValueError as e:  # int() refuses integers of more than sys.get_int_max_str_digits() digits
        raise RegistryError(
            f"{where}: holds a number of more than {sys.get_int_max_str_digits()} digits; entity ids are small "
            "integers"
        ) from e
    if not isinstance(data, dict):  # from_json would read a JSON string as JSON once more
        raise RegistryError(f"{where}: must be one JSON object per registry, got {type(data).__name__}")
    try:
        return EntityRegistry.from_json(data, num_segments=num_segments, source="user", folder=folder)
    except RegistryError as e:
        raise RegistryError(f"{where}: {e}") from e


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"
