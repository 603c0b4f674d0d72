"""Entity extraction with a local instruct LLM (Qwen3-4B-Instruct-2507): the story's people and key objects, with
global IDs that stay the same across prompts.

Two steps, split so the rules can be tested without a model:

1. Per prompt, the LLM lists entities as JSON (`EXTRACT_SYSTEM`): name, kind, visual attributes and the exact words
   of the prompt that refer to each (`PromptEntity`). All prompts run in one left-padded batch before sampling, so the
   caller can `unload()` the LLM before the DiT needs the memory.
2. `assign_ids` gives global IDs. Reliable cases are decided by rules (same proper name; a mention that opens with
   "another" / "a second" / "a new" / "a different" as words; pronouns and "the protagonist"; "the <known name>"),
   the rest by a `Matcher` (here the LLM, asked `{"same_as": id | null}` with the registry so far and, per known
   entity, the words of its latest earlier prompts, so look-alikes such as twins are told apart by what they did).

A bad answer never crashes extraction: `parse_json_answer` repairs common damage (code fences, prose around the
object, trailing commas, single quotes, Python literals), an unreadable answer is retried once with a "JSON only"
nudge, and a prompt whose answer still cannot be read gets no entities and a note in `EntityRegistry.notes`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .entities import KINDS, Entity, EntityRegistry, Mention
from .greedy import Unsupported, fast_decoder
from .hf import chat_prompt, check_model_folder, end_tokens, free_model, greedy_config, resolve_dtype
from .jsonish import parse_json_answer

logger = logging.getLogger(__name__)

EXTRACT_SYSTEM = """\
You read one shot description from a video script and list its story entities: each person, and each object the \
story depends on (something that is held, given, lost, found, or has to look the same in later shots). Leave out \
scenery, weather, crowds and ordinary props.

Reply with one JSON object and nothing else:
{"entities": [{"name": "...", "proper_name": null, "kind": "person", "gender": "unknown", "attributes": ["..."], \
"mention": "..."}]}

name: 1 to 4 words; the given name if the text has one, else a short description such as "old fisherman" or \
"red notebook".
proper_name: the given name exactly as written in the text, or null.
kind: "person" or "object".
gender: "female", "male" or "unknown"; objects are "unknown".
attributes: short phrases for how the entity looks, from the text only. People: hair, face, clothing, colours, \
accessories, build, age. Objects: colour, material, shape, size. No actions, poses, moods or places.
mention: the words of the text that refer to the entity, copied exactly, e.g. "a tall man in a grey coat" or "she".

List each entity once even if the text refers to it several times. With no people and no key objects, reply \
{"entities": []}."""

MATCH_SYSTEM = """\
You keep track of who is who across the shots of a video script. Decide whether an entity of the current shot is \
one of the entities known from earlier shots.

Reply with one JSON object and nothing else: {"same_as": <ID>} when it is that known entity, or {"same_as": null} \
when it is someone or something new.

"another", "a second" or "a different" introduce a new entity. People who look alike are still different people \
when the text says so. A character who comes back may be described more briefly than before: matching hair, \
clothing or role points to the known entity. A different given name means a different entity."""

NUDGE = "Reply with the JSON object only, no other text."

MAX_ENTITIES_PER_PROMPT = 12
MAX_ATTRIBUTES = 12
MAX_ALIASES = 8
CONTEXT_PROMPTS = 3  # earlier prompts quoted per known entity in the matcher's question, most recent first
CONTEXT_CHARS = 160  # a quoted sentence longer than this is cut around the mention

# ---------------------------------------------------------------------------------------------------------------------
# One prompt's entities, as the LLM read them
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptEntity:
    """One entity of one prompt, before global IDs. `mention` is a verbatim span of the prompt or ""."""

    name: str
    kind: str = "person"
    attributes: tuple[str, ...] = ()
    mention: str = ""
    proper_name: str | None = None
    gender: str = "unknown"  # "female", "male" or "unknown"


def _wordset(words: str) -> frozenset[str]:
    return frozenset(words.split())


_FEMALE = _wordset(
    "woman women girl girls lady ladies she her hers herself mother mom sister daughter grandmother queen actress "
    "wife girlfriend aunt niece female bride princess waitress heroine"
)
_MALE = _wordset(
    "man men boy boys guy gentleman he him his himself father dad brother son grandfather king actor husband "
    "boyfriend uncle nephew male groom prince waiter hero"
)
_PRONOUNS = {"she": "female", "her": "female", "herself": "female", "he": "male", "him": "male", "himself": "male"}
_PROTAGONIST = re.compile(r"^(?:the|our)\s+(?:main\s+character|protagonist|hero|heroine|lead)$")
# A new entity is introduced by these words at the head of the mention (not anywhere: "the woman in a new dress",
# "his brother", "the newcomer" are not new-entity markers).
_NEW_MARKER = re.compile(
    r"^(?:yet\s+)?another(?!['’]s)\b"
    r"|^(?:a|an|some)\s+(?:(?:completely|entirely|totally|very)\s+)?(?:new|different|second|third|fourth|fifth)\b"
)
_DEFINITE = re.compile(r"^(?:the|this|that|his|her|their|its|our)\s+")
_ARTICLE = re.compile(r"^(?:the|this|that|his|her|their|its|our|a|an)\s+")
_PERSON_KINDS = _wordset("person people human character man woman boy girl child kid")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:['’][a-z]+)?", text.casefold())


def _phrase(text: str) -> str:
    """Lowercase words joined by single spaces, for comparing mentions."""
    return " ".join(_words(text))


def is_new_marker(text: str) -> bool:
    """Whether a mention opens with a word that introduces a new entity ("another woman", "a second man")."""
    return bool(_NEW_MARKER.match(_phrase(text)))


def is_pronoun(text: str) -> bool:
    return _phrase(text) in _PRONOUNS


def is_protagonist(text: str) -> bool:
    return bool(_PROTAGONIST.match(_phrase(text)))


def infer_gender(name: str, mention: str) -> str:
    """Gender from the words of the name, then of the mention (possessives of the mention are skipped: the "his" of
    "his sister" is someone else)."""
    if is_pronoun(mention):
        return _PRONOUNS[_phrase(mention)]
    for words in (_words(name), [w for w in _words(mention) if w not in ("his", "her", "their")]):
        female, male = any(w in _FEMALE for w in words), any(w in _MALE for w in words)
        if female != male:
            return "female" if female else "male"
    return "unknown"


def entities_from_answer(data: dict | None, prompt: str) -> list[PromptEntity] | None:
    """Validated entities from a parsed extraction answer; None when the answer does not have the asked-for shape.

    Items that cannot be read are dropped; mentions and proper names that are not in the prompt are discarded (the
    model invented them)."""
    if not isinstance(data, dict):
        return None
    items = data.get("entities")
    if items is None and isinstance(data.get("name"), str):
        items = [data]
    if not isinstance(items, list):
        return None
    out: list[PromptEntity] = []
    for item in items[:MAX_ENTITIES_PER_PROMPT]:
        entity = _prompt_entity(item, prompt) if isinstance(item, dict) else None
        if entity is not None and entity not in out:
            out.append(entity)
    return out


def _prompt_entity(item: dict, prompt: str) -> PromptEntity | None:
    name = _text(item.get("name") or item.get("entity"))
    mention = _span_in(prompt, _text(item.get("mention"))) or _span_in(prompt, name)
    if not name:
        name = mention
    if not name:
        return None
    proper = _proper_name(_text(item.get("proper_name")), prompt)
    kind = _kind(item.get("kind"))
    gender = _text(item.get("gender")).casefold()
    if kind == "object":
        gender = "unknown"
    elif gender not in ("female", "male"):
        gender = infer_gender(name, mention)
    return PromptEntity(proper or name, kind, _attributes(item.get("attributes", item.get("attrs"))), mention,
                        proper, gender)  # fmt: skip


def _text(value: Any) -> str:
    return " ".join(value.split())[:120] if isinstance(value, str) else ""


def _span_in(prompt: str, text: str) -> str:
    """`text` as it is written in the prompt (case-insensitive search), or "" when the prompt does not contain it."""
    if not text:
        return ""
    at = prompt.casefold().find(text.casefold())
    return prompt[at : at + len(text)] if at != -1 else ""


def _proper_name(name: str, prompt: str) -> str | None:
    """A given name the prompt really contains, capitalised, and not a pronoun or a description ("the woman")."""
    if not name or not name[0].isupper() or _ARTICLE.match(name.casefold()) or is_pronoun(name):
        return None
    return name if re.search(rf"\b{re.escape(name)}\b", prompt) else None


def _kind(value: Any) -> str:
    kind = _text(value).casefold()
    if kind in KINDS:
        return kind
    if not kind or kind in _PERSON_KINDS:
        return "person"
    return "object"


def _attributes(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list):
        return ()
    return _dedup(_text(v) for v in value if isinstance(v, str))[:MAX_ATTRIBUTES]


def _dedup(items: Any) -> tuple[str, ...]:
    seen: dict[str, str] = {}
    for item in items:
        if item and item.casefold() not in seen:
            seen[item.casefold()] = item
    return tuple(seen.values())


# ---------------------------------------------------------------------------------------------------------------------
# Global IDs
# ---------------------------------------------------------------------------------------------------------------------

# The mentions of the prompts before the current one: seen[i] holds prompt i's, with their global IDs.
Seen = tuple[tuple[Mention, ...], ...]
# matcher(entity, candidates, prompt_index, seen) -> the ID of the candidate it is, or None for a new entity.
Matcher = Callable[[PromptEntity, tuple[Entity, ...], int, Seen], int | None]


def no_matcher(entity: PromptEntity, candidates: tuple[Entity, ...], prompt_index: int, seen: Seen) -> None:
    """For runs without an LLM for the ambiguous cases: they become new entities."""
    return None


@dataclass
class _Known:
    """A registry entry while IDs are being assigned (mutable; frozen into an `Entity` at the end)."""

    id: int
    name: str
    kind: str
    gender: str
    proper_name: str | None
    attributes: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    prompts_seen: set[int] = field(default_factory=set)
    last_seen: int = 0

    def entity(self) -> Entity:
        aliases = [a for a in _dedup(self.aliases) if a.casefold() != self.name.casefold()]
        return Entity(
            self.id, self.name, self.kind, _dedup(self.attributes)[:MAX_ATTRIBUTES], tuple(aliases[:MAX_ALIASES])
        )

    def phrases(self) -> set[str]:
        return {_ARTICLE.sub("", _phrase(t)) for t in (self.name, *self.aliases)}


class _IdAssigner:
    def __init__(self, matcher: Matcher) -> None:
        self.matcher = matcher
        self.known: dict[int, _Known] = {}
        self.prompts: list[list[Mention]] = []
        self.notes: list[str] = []
        self.clock = 0

    def add_prompt(self, entities: Sequence[PromptEntity]) -> None:
        index, used = len(self.prompts), set()
        self.prompts.append([])
        for e in entities:
            entity_id, rule = self.resolve(e, index, used)
            entity_id = self.record(e, entity_id, index)
            used.add(entity_id)
            self.prompts[index].append(Mention(entity_id, e.mention))
            logger.debug("prompt %d: %r (%r) -> id %d by %s", index + 1, e.name, e.mention, entity_id, rule)

    def resolve(self, e: PromptEntity, index: int, used: set[int]) -> tuple[int | None, str]:
        """The known ID `e` refers to (None: a new entity) and the rule that decided it."""
        same_kind = [k for k in self.known.values() if k.kind == e.kind]
        name = (e.proper_name or e.name).casefold()  # the LLM may leave proper_name out on a later mention
        hit = [k.id for k in same_kind if k.proper_name and k.proper_name.casefold() == name]
        if hit:
            return hit[0], "same name"
        if is_new_marker(e.mention) or is_new_marker(e.name):
            return None, "new marker"
        if e.kind == "person" and (is_pronoun(e.mention) or is_pronoun(e.name)):
            return self.latest_person(e.gender), "pronoun"
        if e.kind == "person" and (is_protagonist(e.mention) or is_protagonist(e.name)):
            return self.protagonist(), "protagonist"
        candidates = [k for k in same_kind if k.id not in used and not _names_differ(k, e) and _genders_fit(k, e)]
        if not candidates:
            return None, "no candidate"
        definite = self.definite_match(e, candidates)
        if definite is not None:
            return definite, "definite name"
        return self.ask(e, candidates, index), "matcher"

    def latest_person(self, gender: str) -> int | None:
        people = [k for k in self.known.values() if k.kind == "person"]
        if gender != "unknown":
            people = [k for k in people if k.gender in (gender, "unknown")]
        exact = [k for k in people if k.gender == gender] or people
        return max(exact, key=lambda k: k.last_seen).id if exact else None

    def protagonist(self) -> int | None:
        """The person seen in the most prompts so far; the earliest introduced on a tie."""
        people = [k for k in self.known.values() if k.kind == "person"]
        return min(people, key=lambda k: (-len(k.prompts_seen), k.id)).id if people else None

    @staticmethod
    def definite_match(e: PromptEntity, candidates: list[_Known]) -> int | None:
        """Matches "the red notebook" when exactly one candidate is called "red notebook"."""
        if not _DEFINITE.match(_phrase(e.mention)):
            return None
        wanted = {_ARTICLE.sub("", _phrase(t)) for t in (e.mention, e.name)} - {""}
        hits = [k.id for k in candidates if k.phrases() & wanted]
        return hits[0] if len(hits) == 1 else None

    def ask(self, e: PromptEntity, candidates: list[_Known], index: int) -> int | None:
        seen = tuple(tuple(p) for p in self.prompts[:index])
        answer = self.matcher(e, tuple(k.entity() for k in candidates), index, seen)
        if answer is None:
            return None
        if isinstance(answer, int) and not isinstance(answer, bool) and answer in {k.id for k in candidates}:
            return answer
        self.note(f"prompt {index + 1}: the matcher answered {answer!r} for {e.name!r}, not one of the candidate "
                  f"ids {[k.id for k in candidates]}; treated as a new entity")  # fmt: skip
        return None

    def record(self, e: PromptEntity, entity_id: int | None, index: int) -> int:
        self.clock += 1
        if entity_id is None:
            entity_id = max(self.known, default=0) + 1
            self.known[entity_id] = _Known(entity_id, e.name, e.kind, e.gender, e.proper_name)
        k = self.known[entity_id]
        if e.proper_name and not k.proper_name:
            k.aliases.append(k.name)
            k.name, k.proper_name = e.proper_name, e.proper_name
        if k.gender == "unknown":
            k.gender = e.gender
        k.attributes += e.attributes
        k.aliases += [t for t in (e.name, e.mention) if t and not is_pronoun(t)]
        k.prompts_seen.add(index)
        k.last_seen = self.clock
        return entity_id

    def note(self, text: str) -> None:
        logger.warning(text)
        self.notes.append(text)

    def registry(self, notes: Sequence[str]) -> EntityRegistry:
        entities = tuple(self.known[i].entity() for i in sorted(self.known))
        prompts = tuple(tuple(p) for p in self.prompts)
        return EntityRegistry(entities, prompts, "llm", (*notes, *self.notes))


def _names_differ(k: _Known, e: PromptEntity) -> bool:
    return bool(k.proper_name and e.proper_name and k.proper_name.casefold() != e.proper_name.casefold())


def _genders_fit(k: _Known, e: PromptEntity) -> bool:
    return "unknown" in (k.gender, e.gender) or k.gender == e.gender


def assign_ids(
    per_prompt_entities: Sequence[Sequence[PromptEntity]], matcher: Matcher = no_matcher, notes: Sequence[str] = ()
) -> EntityRegistry:
    """Global IDs for the entities of every prompt, in story order (IDs 1, 2, ... by first appearance).

    Rules, in order: the same proper name is the same entity; a mention that opens with "another", "a second",
    "a new", "a different" (as words) is a new entity; "he"/"she" is the most recent person of that gender (or of
    unknown gender); "the protagonist"/"the main character" is the person seen in the most prompts; "the X" where
    exactly one known entity is called X is that entity; otherwise `matcher` decides among the known entities of the
    same kind that are not already used in this prompt (two entities of one prompt never share an ID, so look-alikes
    stay apart), have no different proper name and no different gender; it is also given the mentions of the earlier
    prompts, so it can look up what each candidate did. No candidate left: a new entity. An invalid matcher answer
    gives a new entity and a note."""
    assigner = _IdAssigner(matcher)
    for entities in per_prompt_entities:
        assigner.add_prompt(entities)
    return assigner.registry(notes)


# ---------------------------------------------------------------------------------------------------------------------
# The extractor
# ---------------------------------------------------------------------------------------------------------------------


class EntityExtractor:
    """Entities with global IDs for a whole story, from a local Qwen3-Instruct folder (transformers, no remote code).

    Typical use: `registry = EntityExtractor(folder).extract(prompts)`, then `unload()` before sampling."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        max_new_tokens: int = 384,
        retries: int = 1,
        batch_size: int = 8,
    ) -> None:
        if max_new_tokens < 8 or retries < 0 or batch_size < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens} (>= 8), retries {retries} (>= 0) and batch_size "
                             f"{batch_size} (>= 1) are out of range")  # fmt: skip
        self.model_dir = check_model_folder(model_dir, "entity-extraction LLM (e.g. Qwen3-4B-Instruct-2507)")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_new_tokens, self.retries, self.batch_size = max_new_tokens, retries, batch_size
        self._model, self._tokenizer = self._load()
        self._greedy = fast_decoder(self._model, self.device, self._tokenizer.pad_token_id, "entity LLM")

    def _load(self) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        tokenizer.padding_side = "left"  # generation continues every row from its last real token
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype, local_files_only=True)
        logger.info("entity LLM loaded from %s on %s (%s)", self.model_dir, self.device, self.dtype)
        return model.to(self.device).eval(), tokenizer

    def unload(self) -> None:
        """Free the model's memory; `extract` cannot be called afterwards."""
        self._greedy = None
        if self._model is not None:
            model, self._model = self._model, None
            free_model(model, self.device)

    # The generate boundary: conversations in, answer texts out (a recorded-answer fake overrides only this).
    def generate_answers(self, conversations: Sequence[list[dict[str, str]]], max_new_tokens: int) -> list[str]:
        if self._model is None:
            raise RuntimeError("the entity LLM was unloaded; create a new EntityExtractor to extract again")
        answers: list[str] = []
        for start in range(0, len(conversations), self.batch_size):
            answers += self._generate_batch(conversations[start : start + self.batch_size], max_new_tokens)
        return answers

    @torch.inference_mode()
    def _generate_batch(self, conversations: Sequence[list[dict[str, str]]], max_new_tokens: int) -> list[str]:
        texts = [chat_prompt(self._tokenizer, c) for c in conversations]
        batch = self._tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
        config = greedy_config(self._model, max_new_tokens, self._tokenizer.pad_token_id)
        if self._greedy is not None:
            try:
                answers = self._greedy.generate(dict(batch), max_new_tokens, end_tokens(config, self._tokenizer))
                return self._tokenizer.batch_decode(answers, skip_special_tokens=True)
            except Unsupported as e:  # found at the first answer: every later one goes through generate
                logger.warning("entity LLM: CUDA-graph decoding does not cover this model (%s); using generate", e)
                self._greedy = None
        out = self._model.generate(**batch, generation_config=config)
        return self._tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    def extract(self, prompts: Sequence[str]) -> EntityRegistry:
        """The registry for a whole story: every prompt's entities first (batched), then global IDs."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a sequence of strings, got {type(prompts).__name__}")
        notes: list[str] = []
        per_prompt = self._read_entities(list(prompts), notes)
        registry = assign_ids(per_prompt, self._llm_matcher(list(prompts), notes))
        registry = replace(registry, notes=(*notes, *registry.notes))
        logger.info("entities: %d across %d prompts (%d notes)", len(registry.entities), len(prompts), len(notes))
        return registry

    def _read_entities(self, prompts: list[str], notes: list[str]) -> list[list[PromptEntity]]:
        results: list[list[PromptEntity] | None] = [[] if not p.strip() else None for p in prompts]
        for attempt in range(self.retries + 1):
            todo = [i for i, r in enumerate(results) if r is None]
            if not todo:
                break
            nudge = f"\n\n{NUDGE}" if attempt else ""
            conversations = [_extract_messages(prompts[i] + nudge) for i in todo]
            for i, answer in zip(todo, self.generate_answers(conversations, self.max_new_tokens)):
                logger.debug("prompt %d, attempt %d, answer: %r", i + 1, attempt + 1, answer)
                results[i] = entities_from_answer(parse_json_answer(answer, "entities"), prompts[i])
        for i, r in enumerate(results):
            if r is None:
                _note(notes, f"prompt {i + 1}: the LLM answer was not the asked-for JSON after {self.retries + 1} "
                             "attempt(s); no entities for this prompt")  # fmt: skip
        return [r or [] for r in results]

    def _llm_matcher(self, prompts: list[str], notes: list[str]) -> Matcher:
        def match(entity: PromptEntity, candidates: tuple[Entity, ...], index: int, seen: Seen) -> int | None:
            question = _match_question(prompts, index, entity, candidates, seen)
            for attempt in range(self.retries + 1):
                message = question + (f"\n\n{NUDGE}" if attempt else "")
                answer = self.generate_answers([_match_messages(message)], 32)[0]
                data = parse_json_answer(answer)
                if data is not None and "same_as" in data:
                    return _as_id(data["same_as"])
            _note(notes, f"prompt {index + 1}: no readable same_as answer for {entity.name!r}; treated as new")
            return None

        return match


def _note(notes: list[str], text: str) -> None:
    logger.warning(text)
    notes.append(text)


def _as_id(value: Any) -> Any:
    """An ID answer as an int where it plainly is one ("3", 3.0); anything else is passed on for validation."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, str) and value.strip().casefold() in ("null", "none", ""):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _extract_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": EXTRACT_SYSTEM}, {"role": "user", "content": prompt}]


def _match_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": MATCH_SYSTEM}, {"role": "user", "content": question}]


def _match_question(
    prompts: Sequence[str], index: int, e: PromptEntity, candidates: tuple[Entity, ...], seen: Seen
) -> str:
    """The same_as question: the current prompt and what it says around the mention, then each candidate with its
    names and looks and, under it, the earlier prompts that mention it (`_seen_lines`)."""
    looks = ", ".join(e.attributes) or "not described"
    written = e.mention or e.name
    lines = [f'Current shot (prompt {index + 1}): "{prompts[index]}"', "",
             f'Entity in this shot: {e.name} ({e.kind}), written as "{written}"; looks: {looks}',
             f'Around the mention: "{_context(prompts[index], written)}"', "",
             "Known entities, each with the earlier shots that mention it (most recent first):"]  # fmt: skip
    for c in candidates:
        also = f"; also called {', '.join(c.aliases)}" if c.aliases else ""
        lines.append(f"ID {c.id}: {c.name} ({c.kind}){also}; looks: {', '.join(c.attributes) or 'not described'}")
        lines += _seen_lines(c.id, prompts, seen)
    lines += ["", "Which known entity is it, if any?"]
    return "\n".join(lines)


def _seen_lines(entity_id: int, prompts: Sequence[str], seen: Seen) -> list[str]:
    """Up to `CONTEXT_PROMPTS` lines `  prompt 2, as "the twin": "<its sentence>"`, most recent prompt first."""
    lines: list[str] = []
    for i in reversed(range(len(seen))):
        mention = next((m for m in seen[i] if m.entity == entity_id), None)
        if mention is not None:
            written = f', as "{mention.text}"' if mention.text else ""
            lines.append(f'  prompt {i + 1}{written}: "{_context(prompts[i], mention.text)}"')
        if len(lines) == CONTEXT_PROMPTS:
            break
    return lines


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _context(prompt: str, mention: str, width: int = CONTEXT_CHARS) -> str:
    """The sentence of `prompt` that holds `mention` (as whole words; the first sentence when it is not found), cut
    to about `width` characters around the mention, with "…" where cut."""
    found = re.search(rf"(?<!\w){re.escape(mention)}(?!\w)", prompt, re.IGNORECASE) if mention else None
    start, end = found.span() if found else (0, 0)
    bounds = [0, *(m.end() for m in _SENTENCE_END.finditer(prompt)), len(prompt)]
    lo = max(b for b in bounds if b <= start)
    hi = min((b for b in bounds if b > lo and b >= end), default=len(prompt))
    return _around(prompt[lo:hi], start - lo, end - lo, width)


def _around(text: str, start: int, end: int, width: int) -> str:
    """`text` cut to about `width` characters that keep text[start:end], at spaces, with "…" where cut."""
    if len(text.strip()) <= width:
        return text.strip()
    lo = max(0, min(start - max(0, width - (end - start)) // 2, len(text) - width))
    hi = max(end, min(len(text), lo + width))
    if lo > 0:
        lo = min(start, text.find(" ", lo) + 1 or start)
    if hi < len(text):
        hi = max(end, text.rfind(" ", end, hi))
    return ("…" if lo > 0 else "") + text[lo:hi].strip() + ("…" if hi < len(text) else "")


def registry_for_story(
    prompts: Sequence[str],
    *,
    user_registry: str | dict | EntityRegistry | None = None,
    extractor: EntityExtractor | None = None,
) -> EntityRegistry:
    """The story's registry: an artist-supplied one as given (validated against the story), else the extractor's,
    else an empty one (the "no LLM" ablation)."""
    if isinstance(user_registry, EntityRegistry):
        user_registry.check_story(len(prompts))
        return user_registry
    if user_registry is not None:
        return EntityRegistry.from_json(user_registry, num_segments=len(prompts), source="user")
    if extractor is not None:
        return extractor.extract(prompts)
    return EntityRegistry.empty(len(prompts))
