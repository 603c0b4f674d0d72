"""Prompt -> umT5 text embeddings, the way Wan2.1 prepares them for the DiT.

Wan cleans the prompt (ftfy, HTML entities, whitespace), tokenizes it to exactly `text_len` (512) tokens with `</s>`
appended, runs the umT5 encoder and zeros every position past the prompt's length. `TextEncoder` does the same;
`load_umt5_tokenizer` reads the tokenizer from a local folder (Wan ships it as `google/umt5-xxl/`).

The tokenizer (`Umt5Tokenizer`) runs on the Rust `tokenizers` library alone: importing transformers for it took
seconds of every process start (it pulls in Dynamo and torch.distributed), before the first frame.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .models import fused
from .models.t5 import UMT5Encoder

try:
    import ftfy
except ImportError:  # a declared dependency; without it only the repair of broken unicode is skipped
    ftfy = None

logger = logging.getLogger(__name__)

_EXPECTED = "expected tokenizer.json (and tokenizer_config.json) or spiece.model, as in Wan's google/umt5-xxl/ folder"


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: fix mojibake (ftfy, when installed), unescape HTML twice, collapse whitespace."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class Umt5Tokenizer:
    """umT5's tokenizer on a `tokenizers.Tokenizer`, called as a transformers tokenizer is for what this package asks
    of one: ids and attention masks, padded (to `max_length` or the longest) and truncated (`</s>` kept last), as
    lists or `return_tensors="pt"`; character offsets with `return_offsets_mapping`. One text gives flat lists."""

    def __init__(self, backend: Any, *, eos_token: str | None, pad_token: str | None, unk_token: str | None) -> None:
        self.backend = backend
        self.eos_token, self.pad_token, self.unk_token = eos_token, pad_token, unk_token
        self._lock = threading.Lock()  # padding and truncation are settings of the shared backend
        self.mark_special()

    def mark_special(self) -> None:
        """Make eos, pad and unk special tokens of the backend (as transformers does): one token each where a prompt
        spells them, and left out by `decode(..., skip_special_tokens=True)`."""
        self.backend.add_special_tokens([t for t in (self.eos_token, self.pad_token, self.unk_token) if t])

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __call__(
        self, text: str | list[str], *, padding: bool | str = False, padding_side: str = "right",
        max_length: int | None = None, truncation: bool = False, add_special_tokens: bool = True,
        return_tensors: str | None = None, return_offsets_mapping: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        single = isinstance(text, str)
        with self._lock:
            if truncation and max_length is not None:
                self.backend.enable_truncation(max_length)
            else:
                self.backend.no_truncation()
            if padding:
                if self.pad_token_id is None:
                    raise ValueError("this tokenizer has no pad token; umT5's is <pad>")
                length = max_length if padding == "max_length" else None
                self.backend.enable_padding(direction=padding_side, pad_id=self.pad_token_id,
                                            pad_token=self.pad_token, length=length)  # fmt: skip
            else:
                self.backend.no_padding()
            encodings = self.backend.encode_batch(
                [text] if single else list(text), add_special_tokens=add_special_tokens
            )
        out: dict[str, Any] = {"input_ids": [e.ids for e in encodings],
                               "attention_mask": [e.attention_mask for e in encodings]}  # fmt: skip
        if return_offsets_mapping:
            out["offset_mapping"] = [e.offsets for e in encodings]
        if return_tensors == "pt":
            return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt' or None")
        return {k: v[0] for k, v in out.items()} if single else out

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """`tokenizer.json` and `tokenizer_config.json` (its special tokens), as a tokenizer folder holds them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {"eos_token": self.eos_token, "pad_token": self.pad_token, "unk_token": self.unk_token}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _special_tokens(folder: Path) -> dict[str, str | None]:
    """eos/pad/unk of a tokenizer folder's tokenizer_config.json or special_tokens_map.json (a string or
    {"content": ...} each); None where neither names one."""
    found: dict[str, str | None] = {"eos_token": None, "pad_token": None, "unk_token": None}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in found:
            value = data.get(key) if isinstance(data, dict) else None
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                found[key] = value
    return found


def load_umt5_tokenizer(path: str | os.PathLike) -> Umt5Tokenizer:
    """Load the umT5 tokenizer from a local folder (or a bare `spiece.model` file); never downloads.

    A folder with `tokenizer.json` is read by `tokenizers` (special tokens from its tokenizer_config.json or
    special_tokens_map.json, else umT5's names). A folder with only `spiece.model` is converted in code (see
    `umt5_tokenizer_from_spiece`), without the `protobuf` package.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"umT5 tokenizer path {path} does not exist; {_EXPECTED}")
    if path.is_file():
        if path.suffix != ".model":
            raise ValueError(f"umT5 tokenizer file {path} is not a SentencePiece .model; pass its folder instead")
        return _checked(umt5_tokenizer_from_spiece(path.read_bytes(), source=str(path)), path)

    found = sorted(p.name for p in path.iterdir())
    spiece = path / "spiece.model"
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            tokenizer = Umt5Tokenizer(Tokenizer.from_file(str(path / "tokenizer.json")), **_special_tokens(path))
        except Exception as err:  # the Rust `tokenizers` raises a bare Exception on a malformed tokenizer.json
            if not spiece.is_file():
                raise ValueError(f"could not load the umT5 tokenizer from {path} (found {found}): {err}") from err
            logger.warning("tokenizer.json of %s is unreadable (%s); building the tokenizer from spiece.model", path,
                           err)  # fmt: skip
            tokenizer = umt5_tokenizer_from_spiece(spiece.read_bytes(), source=str(spiece))
    elif spiece.is_file():
        tokenizer = umt5_tokenizer_from_spiece(spiece.read_bytes(), source=str(spiece))
    else:
        raise FileNotFoundError(f"no umT5 tokenizer in {path} (found {found or 'an empty folder'}); {_EXPECTED}")
    return _checked(tokenizer, path)


def _checked(tokenizer: Umt5Tokenizer, path: Path) -> Umt5Tokenizer:
    """Fail early on a tokenizer that cannot pad or does not end prompts with `</s>`, which Wan relies on."""
    # A lone tokenizer.json carries no special-token roles; umT5's pieces are named the T5 way.
    vocab = tokenizer.get_vocab()
    if tokenizer.pad_token is None and "<pad>" in vocab:
        tokenizer.pad_token = "<pad>"
    if tokenizer.eos_token is None and "</s>" in vocab:
        tokenizer.eos_token = "</s>"
    if tokenizer.unk_token is None and "<unk>" in vocab:
        tokenizer.unk_token = "<unk>"
    tokenizer.mark_special()
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(
            f"the tokenizer in {path} has pad token {tokenizer.pad_token!r} and eos token {tokenizer.eos_token!r}; "
            "umT5 needs both (<pad> and </s>); use the tokenizer files from google/umt5-xxl"
        )
    if tokenizer("a")["input_ids"][-1] != tokenizer.eos_token_id:
        raise ValueError(f"the tokenizer in {path} does not append </s> to prompts; use the one from google/umt5-xxl")
    return tokenizer


def umt5_tokenizer_from_spiece(data: bytes, source: str = "spiece.model bytes") -> Umt5Tokenizer:
    """A fast tokenizer equal to the SentencePiece unigram model serialized in `data`, plus `</s>` at the end.

    Takes bytes so that a tokenizer stored inside a checkpoint file needs no temp file; `source` names it in
    errors. The pieces and scores come from `sentencepiece`; the normalization table is read straight from the
    model's protobuf bytes, so the `protobuf` package is not needed. (transformers 5's `T5Tokenizer(vocab_file=...)`
    silently ignores the file, and `T5Tokenizer.from_pretrained` on a bare spiece.model needs protobuf.)
    """
    import sentencepiece
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    except RuntimeError as err:
        raise ValueError(f"{source} is not a valid SentencePiece model ({err}); {_EXPECTED}") from err
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    backend = Tokenizer(Unigram(pieces, unk_id=sp.unk_id(), byte_fallback=False))
    charsmap = _spm_precompiled_charsmap(data)
    if charsmap:
        backend.normalizer = normalizers.Precompiled(charsmap)
    # SentencePiece's defaults: drop extra whitespace, mark each word start with "▁" (add_dummy_prefix).
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    eos, pad, unk = (sp.id_to_piece(i) for i in (sp.eos_id(), sp.pad_id(), sp.unk_id()))
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", eos], pair=["$A", eos, "$B", eos], special_tokens=[(eos, sp.eos_id())]
    )
    return Umt5Tokenizer(backend, eos_token=eos, pad_token=pad, unk_token=unk)


def _spm_precompiled_charsmap(model_proto: bytes) -> bytes | None:
    """`ModelProto.normalizer_spec.precompiled_charsmap` (fields 3 then 2) from the protobuf wire format."""
    for field, value in _proto_fields(model_proto):
        if field == 3 and isinstance(value, bytes):
            return next((v for f, v in _proto_fields(value) if f == 2 and isinstance(v, bytes)), None)
    return None


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value) of one protobuf message; varints as int, length-delimited as bytes."""

    def varint(pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = buf[pos]
            value |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if byte < 0x80:
                return value, pos

    pos = 0
    while pos < len(buf):
        key, pos = varint(pos)
        wire = key & 7
        if wire == 0:
            value, pos = varint(pos)
        elif wire == 2:
            size, pos = varint(pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire in (1, 5):  # fixed 64 / 32 bit
            width = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + width], pos + width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in a SentencePiece model")
        yield key >> 3, value


class TextEncoder:
    """umT5 encoder + tokenizer: `encode(prompts)` gives Wan's `[B, text_len, dim]` context, zero past each prompt.

    `encoder` is moved (in place) to `device`, and cast to `dtype` when one is given; outputs come back there.
    `tokenizer` is a loaded tokenizer or a path for `load_umt5_tokenizer`.
    """

    def __init__(
        self,
        encoder: UMT5Encoder,
        tokenizer: Umt5Tokenizer | str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_umt5_tokenizer(tokenizer)
        vocab = encoder.cfg.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the encoder embeds only {vocab}; "
                "use the tokenizer that belongs to these weights (google/umt5-xxl for Wan)"
            )
        self.encoder = encoder.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.encoder.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.token_embedding.weight.dtype

    @property
    def text_len(self) -> int:
        return self.encoder.cfg.text_len

    def to(self, device: torch.device | str) -> TextEncoder:
        """Move the encoder to `device` (in place) and return self, like `nn.Module.to`."""
        self.encoder.to(device)
        return self

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned prompts -> (ids [B, text_len] int64, mask [B, text_len] int64), right-padded, on the CPU."""
        if isinstance(prompts, str) or not prompts:
            raise TypeError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        cleaned = [clean_prompt(p) for p in prompts]
        batch = self.tokenizer(
            cleaned,
            padding="max_length",
            padding_side="right",  # the zeroing in `encode` and the DiT both assume the prompt comes first
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        self._warn_if_truncated(cleaned)
        return batch["input_ids"], batch["attention_mask"]

    def _warn_if_truncated(self, cleaned: list[str]) -> None:
        # Wan truncates silently; a story prompt written by an LLM can run long, so say which ones lost words.
        lengths = [len(ids) for ids in self.tokenizer(cleaned, add_special_tokens=True)["input_ids"]]
        for i, n in enumerate(lengths):
            if n > self.text_len:
                logger.warning("prompt %d has %d tokens; only the first %d are used", i, n, self.text_len)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """prompts: B strings -> [B, text_len, dim] on `self.device` in `self.dtype`, zero past each prompt's end.

        The encoder runs only over the longest prompt's tokens, not all `text_len`: padding is masked out of every
        attention and the relative position bias depends on distances alone, so the real tokens' states are the
        same, and the rest is zeros either way (Wan's own encoder spends ~10x the work on padding)."""
        ids, mask = self.tokenize(prompts)
        used = max(int(mask.sum(1).max()), 1)
        ids, mask = ids[:, :used].to(self.device), mask[:, :used].to(self.device)
        with fused.launch_guard():  # never beside a compile's trace in another thread (see `fused._launch_lock`)
            out = self.encoder(ids, mask).masked_fill(mask[:, :, None] == 0, 0.0)
        return torch.nn.functional.pad(out, (0, 0, 0, self.text_len - used))


@contextmanager
def visiting(module: torch.nn.Module, device: torch.device | str) -> Iterator[torch.nn.Module]:
    """`module` with its weights copied to `device` for the block; afterwards it holds its own tensors again, where
    they were. Nothing is copied back (the weights do not change), so a visit costs one copy, not two: for umT5-XXL
    the 11 GB back to host memory."""
    home = [(m, name, p, p.data) for m in module.modules() for name, p in m._parameters.items() if p is not None]
    buffers = [(m, name, b) for m in module.modules() for name, b in m._buffers.items() if b is not None]
    module.to(device)
    try:
        yield module
    finally:
        for m, name, param, data in home:
            param.data = data
            m._parameters[name] = param
        for m, name, buffer in buffers:
            m._buffers[name] = buffer


class OffloadedTextEncoder:
    """A `TextEncoder` that lives on the CPU and visits `device` only to encode (on one GPU this frees the ~11 GB of
    umT5-XXL for the DiT). Same `encode` contract; outputs come back on `device`. Thread-safe."""

    def __init__(self, encoder: TextEncoder, device: torch.device | str) -> None:
        self.encoder, self.compute_device = encoder.to("cpu"), torch.device(device)
        self.tokenizer = encoder.tokenizer
        self._lock = threading.Lock()

    def encode(self, prompts: list[str]) -> torch.Tensor:
        with self._lock, visiting(self.encoder.encoder, self.compute_device):
            return self.encoder.encode(prompts)
