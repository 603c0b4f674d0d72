"""umT5 encoder parity with transformers' UMT5EncoderModel, and the Wan-style TextEncoder around it."""

import logging
import re

import pytest
import sentencepiece
import torch

from iamflow_core.config import T5Config
from iamflow_core.models.t5 import UMT5Encoder
from iamflow_core.text_encoder import TextEncoder, clean_prompt, load_umt5_tokenizer

from ._tiny_t5 import TINY_T5, hf_twin, tiny_encoder, write_spiece_folder

TRICKY = [
    "A cat walks",
    "  two   people\ttalk  ",
    "ＡＢＣ full-width ｃａｔ",
    "naïve café “quotes” ½ ﬁ",
    "",
    "①② ㎏ zebra",
]


@pytest.fixture(scope="module")
def encoder() -> UMT5Encoder:
    return tiny_encoder()


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
    return write_spiece_folder(tmp_path_factory.mktemp("tok") / "umt5-xxl")


@pytest.fixture(scope="module")
def text_encoder(encoder, spiece_dir) -> TextEncoder:
    return TextEncoder(encoder, spiece_dir)


def _padded_batch(lengths: list[int], total: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY_T5.vocab_size, (len(lengths), total), generator=g)
    mask = torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask.long()


# --- the encoder --------------------------------------------------------------------------------------------------


def test_parameter_names_are_the_wan_checkpoint_keys(encoder):
    per_block = ["norm1", "attn.q", "attn.k", "attn.v", "attn.o", "norm2", "ffn.gate.0", "ffn.fc1", "ffn.fc2"]
    expected = {"token_embedding.weight", "norm.weight"}
    for i in range(TINY_T5.num_layers):
        expected |= {f"blocks.{i}.{name}.weight" for name in per_block}
        expected.add(f"blocks.{i}.pos_embedding.embedding.weight")
    state = encoder.state_dict()
    assert set(state) == expected
    assert state["blocks.0.pos_embedding.embedding.weight"].shape == (TINY_T5.num_buckets, TINY_T5.num_heads)
    assert state["blocks.0.ffn.gate.0.weight"].shape == (TINY_T5.dim_ffn, TINY_T5.dim)


def test_matches_transformers_umt5_on_a_padded_batch(encoder):
    twin = hf_twin(encoder)
    # 160 > max_distance, so the log-spaced and the clipped far buckets are exercised too.
    ids, mask = _padded_batch([160, 37], total=160)
    with torch.no_grad():
        ours = encoder(ids, mask)
        theirs = twin(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert ours.shape == (2, 160, TINY_T5.dim)
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4


def test_padding_does_not_leak_into_real_positions(encoder):
    ids, mask = _padded_batch([23], total=64)
    with torch.no_grad():
        padded = encoder(ids, mask)[0, :23]
        trimmed = encoder(ids[:, :23])[0]
    torch.testing.assert_close(padded, trimmed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_finite_and_close(dtype):
    model = tiny_encoder()
    ids, mask = _padded_batch([40, 9], total=40)
    with torch.no_grad():
        ref = model(ids, mask)
        half = model.to(dtype)(ids, mask)
    real = mask.bool()
    assert half.dtype == dtype
    assert torch.isfinite(half).all()
    assert ((half.float() - ref)[real].norm() / ref[real].norm()).item() < 0.05


def test_rejects_mismatched_mask(encoder):
    ids, mask = _padded_batch([5], total=8)
    with pytest.raises(ValueError, match="does not match"):
        encoder(ids, mask[:, :4])


# --- the tokenizer ------------------------------------------------------------------------------------------------


def test_spiece_tokenizer_matches_sentencepiece(spiece_dir):
    tok = load_umt5_tokenizer(spiece_dir)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece_dir / "spiece.model"))
    for text in TRICKY:
        assert tok(text)["input_ids"] == sp.encode(text) + [sp.eos_id()], text
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)


def test_tokenizer_json_folder_loads_the_same(spiece_dir, tmp_path):
    tok = load_umt5_tokenizer(spiece_dir)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    again = load_umt5_tokenizer(tmp_path)
    for text in TRICKY:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    (tmp_path / "tokenizer_config.json").unlink()  # a lone tokenizer.json still knows <pad> and </s>
    assert load_umt5_tokenizer(tmp_path)("a cat", padding="max_length", max_length=8)["input_ids"][-1] == 0


def _plain(value):
    """Tensors, tuples and lists as nested lists, to compare two tokenizers' answers."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def test_tokenizer_answers_as_transformers_does_over_the_same_backend(spiece_dir):
    """Umt5Tokenizer (no transformers import) gives what transformers' fast tokenizer gives over the same backend:
    padded and truncated batches as tensors, flat lists for one text, offsets."""
    import copy

    from transformers import PreTrainedTokenizerFast

    ours = load_umt5_tokenizer(spiece_dir)
    theirs = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(ours.backend), eos_token="</s>", pad_token="<pad>",
                                     unk_token="<unk>")  # fmt: skip
    long = " ".join(["a red cat walks on the beach at sunset"] * 40)  # past 64 tokens: truncated, </s> kept last
    texts = [*TRICKY, long, "a cat</s> and <pad> a <unk> dog"]  # special tokens spelled out in a prompt
    for kwargs in (
        dict(padding="max_length", padding_side="right", max_length=64, truncation=True, return_tensors="pt"),
        dict(padding=True, return_tensors="pt"),
        dict(add_special_tokens=True),
        dict(return_offsets_mapping=True, truncation=True, max_length=64),
    ):
        a, b = ours(texts, **kwargs), theirs(texts, **kwargs)
        for key in ("input_ids", "attention_mask", "offset_mapping"):
            if key in b:
                assert _plain(a[key]) == _plain(b[key]), (kwargs, key)
    assert ours(long, truncation=True, max_length=64)["input_ids"][-1] == ours.eos_token_id
    one, want = ours("a cat", return_offsets_mapping=True), theirs("a cat", return_offsets_mapping=True)
    assert _plain(one["input_ids"]) == _plain(want["input_ids"])
    assert _plain(one["offset_mapping"]) == _plain(want["offset_mapping"])
    assert len(ours) == len(theirs) and ours.get_vocab() == theirs.get_vocab()
    ids = ours(long)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_making_a_tokenizer_does_not_import_transformers(spiece_dir):
    """Seconds of every start: the CLI's tokenizer needs only `tokenizers`."""
    import subprocess
    import sys

    code = (
        "import sys; from iamflow_core.text_encoder import load_umt5_tokenizer; "
        f"t = load_umt5_tokenizer({str(spiece_dir)!r}); t(['a cat'], padding='max_length', max_length=8, "
        "truncation=True, return_tensors='pt'); print('transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_missing_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        load_umt5_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path))}.*empty folder.*spiece\.model"):
        load_umt5_tokenizer(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "spiece.model"))):
        load_umt5_tokenizer(tmp_path)


def test_broken_tokenizer_json_falls_back_to_spiece(spiece_dir, tmp_path, caplog):
    (tmp_path / "spiece.model").write_bytes((spiece_dir / "spiece.model").read_bytes())
    (tmp_path / "tokenizer.json").write_text("{broken")
    with caplog.at_level(logging.WARNING, logger="iamflow_core.text_encoder"):
        tok = load_umt5_tokenizer(tmp_path)
    assert "spiece.model" in caplog.text
    assert tok("a cat")["input_ids"] == load_umt5_tokenizer(spiece_dir)("a cat")["input_ids"]


# --- TextEncoder --------------------------------------------------------------------------------------------------


def test_clean_prompt():
    assert clean_prompt("  A &amp;amp; B\n\t C &lt;3  ") == "A & B C <3"


def test_encode_matches_wan_layout(text_encoder, encoder):
    prompts = ["a cat walks on the beach at sunset", "two people"]
    out = text_encoder.encode(prompts)
    ids, mask = text_encoder.tokenize(prompts)
    lengths = mask.sum(1).tolist()
    assert out.shape == (2, 512, TINY_T5.dim) and out.dtype == torch.float32
    assert ids[0, lengths[0] - 1] == 1 and ids[1, lengths[1] - 1] == 1  # each prompt ends with </s>
    assert lengths[0] > lengths[1]
    with torch.no_grad():
        direct = encoder(ids, mask)
    for i, n in enumerate(lengths):
        assert torch.equal(out[i, n:], torch.zeros_like(out[i, n:]))
        assert torch.equal(out[i, :n], direct[i, :n])
    assert torch.equal(text_encoder.encode(prompts), out)


def test_encode_cleans_text(text_encoder):
    messy = text_encoder.encode(["  a   cat &amp;amp;\n walks "])
    clean = text_encoder.encode(["a cat & walks"])
    assert torch.equal(messy, clean)


def test_long_prompt_is_truncated_with_a_warning(text_encoder, caplog):
    with caplog.at_level(logging.WARNING, logger="iamflow_core.text_encoder"):
        out = text_encoder.encode(["cat dog " * 400])
    assert "only the first 512" in caplog.text
    assert out.shape == (1, 512, TINY_T5.dim) and out[0, -1].abs().sum() > 0


def test_dtype_and_input_checks(spiece_dir):
    te = TextEncoder(tiny_encoder(), spiece_dir, dtype=torch.bfloat16)
    assert te.encode(["a cat"]).dtype == torch.bfloat16 and te.dtype == torch.bfloat16
    assert te.to("cpu") is te and te.device == torch.device("cpu")
    with pytest.raises(TypeError, match="list of strings"):
        te.encode("a cat")
    small = UMT5Encoder(T5Config(vocab_size=50, dim=16, dim_attn=16, dim_ffn=32, num_heads=2, num_layers=1))
    with pytest.raises(ValueError, match="100 tokens but the encoder embeds only 50"):
        TextEncoder(small, spiece_dir)


def test_an_offloaded_encoder_visits_its_device_without_copying_back(spiece_dir):
    """The offloaded text encoder's weights go to the GPU for an encode and come back as the very host tensors they
    were (no 11-GB copy back); "meta" stands in for the GPU here."""
    from iamflow_core.text_encoder import OffloadedTextEncoder, visiting

    module = tiny_encoder()
    before = {name: (t.data_ptr(), t.clone()) for name, t in module.state_dict().items()}
    params = dict(module.named_parameters())
    with visiting(module, "meta"):
        assert all(t.device.type == "meta" for t in module.state_dict().values())
    assert dict(module.named_parameters()) == params  # the same Parameter objects
    for name, t in module.state_dict().items():
        assert t.device.type == "cpu" and t.data_ptr() == before[name][0] and torch.equal(t, before[name][1])
    text = TextEncoder(tiny_encoder(), load_umt5_tokenizer(spiece_dir))
    expected = text.encode(["a red fox"])
    offloaded = OffloadedTextEncoder(text, "cpu")
    assert torch.equal(offloaded.encode(["a red fox"]), expected)
    assert text.device.type == "cpu"
