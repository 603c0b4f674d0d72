"""Reading JSON out of a language model's answer, tolerantly: the one parser the LLM and VLM answers go through."""

from __future__ import annotations

import json
import re
from typing import Any

_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)```", re.S)
_THINK = re.compile(r"<think>.*?(</think>|$)", re.S)
_PY_LITERALS = {"None": "null", "True": "true", "False": "false"}


def parse_json_answer(text: str, list_key: str | None = None) -> dict | None:
    """The JSON object in a model answer, repaired where that is safe; None when there is none.

    Handles code fences, prose before or after the object, trailing commas, single-quoted strings, unquoted keys and
    Python literals (None/True/False). A truncated object is not guessed at: it gives None (the caller retries).
    With `list_key`, an answer that is a bare JSON list is returned as `{list_key: [...]}`."""
    if not isinstance(text, str):
        return None
    body = _THINK.sub("", text)
    fenced = _FENCE.findall(body)
    sources = [*fenced, body] if fenced else [body]
    for source in sources:
        for candidate in _candidates(source, list_key is not None):
            value = _loads_lenient(candidate)
            if isinstance(value, dict):
                return value
            if isinstance(value, list) and list_key is not None:
                return {list_key: value}
    return None


def _candidates(text: str, allow_list: bool) -> list[str]:
    """Substrings that may hold the answer: the outermost {...} and everything from the first "{" on (the decoder
    stops after the first value, so trailing junk such as a second object is ignored); or, when lists are accepted
    and one opens before any "{", the outermost [...]. An inner list of a broken object is never taken for the answer.
    """
    start, end = text.find("{"), text.rfind("}")
    list_start, list_end = text.find("["), text.rfind("]")
    if allow_list and list_start != -1 and list_end > list_start and (start == -1 or list_start < start):
        return [text[list_start : list_end + 1], text[list_start:]]
    return [text[start : end + 1], text[start:]] if start != -1 and end > start else []


def _loads_lenient(candidate: str) -> Any:
    decoder = json.JSONDecoder()
    for attempt in (candidate, _normalise_json_like(candidate)):
        try:
            value, _ = decoder.raw_decode(attempt)
        except json.JSONDecodeError:
            continue
        return value
    return None


def _normalise_json_like(text: str) -> str:
    """Rewrite JSON-like text as JSON: strings in either quote re-emitted as JSON strings, Python literals mapped,
    bare keys quoted, trailing commas dropped. Works on a character scan so text inside strings is never touched."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "\"'":
            value, i = _read_string(text, i)
            out.append(json.dumps(value, ensure_ascii=False))
            continue
        if ch.isalpha() or ch == "_":
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            after = text[j:].lstrip()
            if after.startswith(":"):
                out.append(json.dumps(word))
            else:
                out.append(_PY_LITERALS.get(word, word))
            i = j
            continue
        if ch == "," and text[i + 1 :].lstrip()[:1] in ("}", "]"):
            i += 1
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _read_string(text: str, start: int) -> tuple[str, int]:
    """The content of the string literal opening at `start`, and the index after it (unclosed: runs to the end)."""
    quote, chars, i = text[start], [], start + 1
    escapes = {"n": "\n", "t": "\t", "r": "\r", "/": "/", "\\": "\\", '"': '"', "'": "'"}
    while i < len(text) and text[i] != quote:
        if text[i] == "\\" and i + 1 < len(text):
            chars.append(escapes.get(text[i + 1], text[i + 1]))
            i += 2
            continue
        chars.append(text[i])
        i += 1
    return "".join(chars), i + 1
