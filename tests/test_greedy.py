"""The verifier's own greedy decoding (`story.greedy`) against transformers' `generate`, on tiny random Qwen3 and
Qwen3-VL models with weights large enough that every position and every layer changes the answer."""

import logging

import pytest
import torch

from iamflow_core.story.entities import Entity
from iamflow_core.story.greedy import GreedyDecoder, Unsupported
from iamflow_core.story.hf import end_tokens, greedy_config
from iamflow_core.story.vlm import FrameVerifier

from ._tiny_qwen import frames, tiny_qwen_folders
from ._unbuildable import UnbuildableKernel

NORA = Entity(1, "Nora", "person", ("short black curls", "beige sweater"))


def _loud(model: torch.nn.Module, seed: int = 1) -> None:
    """Random weights whose layers outweigh the (tied) embedding: the default init, or embeddings as large as the
    layers, answers every prompt with one repeated token."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and p.dim() >= 2:
                p.normal_(0, 0.1 if p.shape[0] > 100_000 else p[0].numel() ** -0.5)


@pytest.fixture(scope="module")
def verifier():
    v = FrameVerifier(tiny_qwen_folders().vlm, max_new_tokens=24, short_side=64)
    _loud(v._model)
    yield v
    v.unload()


def _generate(model, batch, config) -> list[int]:
    return _generate_all(model, batch, config)[0]


def _generate_all(model, batch, config) -> list[list[int]]:
    """transformers' greedy answers, each cut at its first end token."""
    eos = end_tokens(config, None)
    answers = []
    for out in model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1] :].tolist():
        answers.append(out[: next((i for i, t in enumerate(out) if t in eos), len(out))])
    return answers


@pytest.mark.parametrize("check, n", [(False, 3), (True, 2)])
def test_vlm_answers_match_generate(verifier, check, n):
    batch, config = verifier.request(frames(n, 48, 80, seed=n), "Nora reads in a cafe.", [NORA], check)
    expected = _generate(verifier._model, batch, config)
    decoder = GreedyDecoder(verifier._model, config, graphs=False)
    got = decoder.generate(batch, config.max_new_tokens, end_tokens(config, verifier._inputs.tokenizer))[0]
    assert len(expected) >= 16 and len(set(expected)) > 4  # a real answer, not one repeated token
    assert got == expected


def test_the_text_position_after_the_images_matters(verifier, monkeypatch):
    """The check above is sensitive to M-RoPE: one position off and the answer changes."""
    batch, config = verifier.request(frames(3, 48, 80), "Nora reads in a cafe.", [NORA], False)
    expected = _generate(verifier._model, batch, config)
    decoder = GreedyDecoder(verifier._model, config, graphs=False)
    [right] = decoder.next_positions(batch)
    assert right < batch["input_ids"].shape[1]  # images span fewer positions than their tokens
    monkeypatch.setattr(decoder, "next_positions", lambda b: [right + 1])
    eos = end_tokens(config, verifier._inputs.tokenizer)
    assert decoder.generate(batch, config.max_new_tokens, eos)[0] != expected


def test_llm_answers_match_generate_for_a_left_padded_batch():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_qwen_folders().llm
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    prompts = ["Nora reads a red notebook in a cafe; list the entities.", "A fox.", "Rain over an old harbour town"]
    batch = dict(tokenizer(prompts, return_tensors="pt", padding=True))
    assert not batch["attention_mask"].all()  # rows of different lengths: padding on the left
    config = greedy_config(model, 20, tokenizer.pad_token_id)
    expected = _generate_all(model, batch, config)
    decoder = GreedyDecoder(model, config, graphs=False)
    assert decoder.generate(batch, 20, end_tokens(config, tokenizer)) == expected
    assert all(len(e) >= 10 for e in expected) and len({tuple(e) for e in expected}) == 3
    # the same decoder again, one prompt (smaller buffers in use): the row's answer is the same
    single = dict(tokenizer(prompts[1:2], return_tensors="pt"))
    assert decoder.generate(single, 20, end_tokens(config, tokenizer)) == _generate_all(model, single, config)


def test_prompts_of_other_lengths_reuse_one_graph(verifier, monkeypatch):
    """A graph per batch size and buffer length: a shorter prompt after a longer one decodes with the graph the
    longer one made (no capture mid-render), and both answers are still transformers' own."""
    from iamflow_core.story import greedy

    monkeypatch.setattr(greedy, "CACHE_STEP", 16)  # fine rounding: these tiny prompts differ by less than 256 tokens
    long_text = "Nora reads a red notebook in a crowded cafe by the window at dusk."
    requests = [verifier.request(frames(3, 48, 80, seed=3), long_text, [NORA], False),
                verifier.request(frames(2, 48, 80), "Nora.", [NORA], False)]  # fmt: skip
    decoder = GreedyDecoder(verifier._model, requests[0][1], graphs=False)
    graph, keys = decoder._graph, []
    monkeypatch.setattr(decoder, "_graph", lambda rows, length: keys.append((rows, length)) or graph(rows, length))
    for batch, config in requests:
        got = decoder.generate(batch, config.max_new_tokens, end_tokens(config, verifier._inputs.tokenizer))[0]
        assert got == _generate(verifier._model, batch, config)
    long_prompt, short_prompt = (batch["input_ids"].shape[1] for batch, _ in requests)
    assert short_prompt + 16 < long_prompt and keys[0] == keys[1]


def test_a_failed_capture_decodes_step_by_step_with_one_warning(verifier, caplog):
    """On this CPU build a CUDA graph cannot be made at all: the same answer comes back, step by step."""
    batch, config = verifier.request(frames(3, 48, 80), "Nora reads in a cafe.", [NORA], False)
    decoder = GreedyDecoder(verifier._model, config, graphs=False)
    decoder.graphs_on = True  # as on a GPU whose capture fails
    with caplog.at_level(logging.WARNING):
        got = decoder.generate(batch, config.max_new_tokens, end_tokens(config, verifier._inputs.tokenizer))[0]
        decoder.generate(batch, config.max_new_tokens, end_tokens(config, verifier._inputs.tokenizer))
    assert got == _generate(verifier._model, batch, config)
    assert caplog.text.count("CUDA graph capture failed") == 1 and not decoder.graphs_on and decoder.captures == 0


def test_settings_it_does_not_reproduce_are_refused(verifier):
    config = greedy_config(verifier._model, 16, None)
    config.repetition_penalty = 1.2
    with pytest.raises(Unsupported, match="repetition_penalty"):
        GreedyDecoder(verifier._model, config, graphs=False)
    batch, config = verifier.request(frames(3, 48, 80), "x", [], False)
    two = {k: torch.cat([v, v]) if k in ("input_ids", "attention_mask") else v for k, v in batch.items()}
    with pytest.raises(Unsupported, match="images in a batch"):
        GreedyDecoder(verifier._model, config, graphs=False).generate(two, 16, {0})


def test_a_capture_holds_the_process_wide_capture_lock(verifier, monkeypatch):
    """The answer step is captured under `graphs.capture_lock`, the lock the DiT's captures take too (two captures
    that overlapped in a render failed together)."""
    from iamflow_core.models import graphs

    from .test_graphs import _FakeStream, fake_captures

    held = fake_captures(monkeypatch)
    _, config = verifier.request(frames(3, 48, 80), "Nora reads in a cafe.", [NORA], False)
    decoder = GreedyDecoder(verifier._model, config, graphs=False)
    decoder.graphs_on, decoder.stream = True, _FakeStream()
    decoder._buffers(1, 256, 256)
    decoder._graph(1, 256)
    assert held == [True] and not graphs.capture_lock.locked()


def test_joined_projections_share_the_modules_weights_and_follow_a_move():
    """q/k/v and gate/up run as one matmul each over a joined weight whose row blocks are the modules' own weights
    (no second copy); weights given new storage after the decoder was made are joined again (with their new values),
    and answers stay transformers'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_qwen_folders().llm
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    _loud(model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = dict(tokenizer(["Nora reads a red notebook in a cafe."], return_tensors="pt"))
    config = greedy_config(model, 12, tokenizer.pad_token_id)
    decoder = GreedyDecoder(model, config, graphs=False)
    attention = model.model.layers[0].self_attn
    qkv, gate_up = decoder._joined[0]
    assert qkv.weight.shape[0] == sum(
        m.weight.shape[0] for m in (attention.q_proj, attention.k_proj, attention.v_proj)
    )
    assert attention.k_proj.weight.untyped_storage().data_ptr() == qkv.weight.untyped_storage().data_ptr()
    assert isinstance(attention.k_proj.weight, torch.nn.Parameter) and gate_up.intact()
    eos = end_tokens(config, tokenizer)
    before = decoder.generate(batch, 12, eos)
    assert before == _generate_all(model, batch, config)

    with torch.no_grad():  # new storage for every weight (as a move or a reload gives), new values for one
        for p in model.parameters():
            p.data = p.data.clone()
        attention.k_proj.weight.mul_(-1)
    assert not qkv.intact()
    after = decoder.generate(batch, 12, eos)
    assert after == _generate_all(model, batch, config) and after != before
    assert (
        qkv.intact()
        and attention.k_proj.weight.untyped_storage().data_ptr() == qkv.weight.untyped_storage().data_ptr()
    )


def test_projections_that_are_not_plain_linears_are_called_one_by_one():
    """A quantized model's linears (here: wrapped) are not joined; each is called and the outputs concatenated."""
    from iamflow_core.story.greedy import _Joined

    class Wrapped(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.inner = linear

        def forward(self, x):
            return self.inner(x)

    linears = [torch.nn.Linear(8, n, bias=False) for n in (4, 2, 2)]
    x = torch.randn(3, 1, 8)
    expected = torch.cat([m(x) for m in linears], dim=-1)
    joined = _Joined([Wrapped(m) for m in linears])
    assert joined.weight is None and joined.intact()
    torch.testing.assert_close(joined(x), expected)
    with_bias = _Joined([torch.nn.Linear(8, 4), torch.nn.Linear(8, 2)])
    assert with_bias.weight is None


@pytest.mark.parametrize("made_in_inference_mode", [True, False])
@pytest.mark.parametrize("joined_in_inference_mode", [True, False])
def test_joined_weights_work_in_and_out_of_inference_mode(made_in_inference_mode, joined_in_inference_mode):
    """ComfyUI runs nodes (and so loads models) in inference mode, the CLI does not, and a decoder joins weights
    again inside an answer (in inference mode): every combination computes the modules' outputs."""
    from iamflow_core.story.greedy import _Joined

    with torch.inference_mode(made_in_inference_mode):
        linears = [torch.nn.Linear(8, n, bias=False) for n in (4, 2, 2)]
        x = torch.randn(3, 8)
        expected = torch.cat([m(x) for m in linears], dim=-1)
    with torch.inference_mode(joined_in_inference_mode):
        joined = _Joined(linears)
    assert joined.weight is not None and joined.intact()
    for mode in (True, False):
        with torch.inference_mode(mode):
            torch.testing.assert_close(joined(x), expected)
            torch.testing.assert_close(torch.cat([m(x) for m in linears], dim=-1), expected)


def test_a_kernel_that_cannot_build_leaves_the_step_to_plain_pytorch(monkeypatch, caplog):
    """A Triton kernel that fails to build or launch (an old GPU, no C compiler) turns the step's kernels off for the
    process with one warning; every op then computes the same values as plain PyTorch."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from iamflow_core.models import kernels
    from iamflow_core.story import greedy_ops as ops

    no_compiler = RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")
    unbuildable = UnbuildableKernel(no_compiler)
    torch.manual_seed(0)
    h, delta, weight = torch.randn(2, 1, 16), torch.randn(2, 1, 16), torch.rand(16) + 0.5
    qkv, q_w, k_w = torch.randn(2, (4 + 2 * 2) * 8), torch.rand(8) + 0.5, torch.rand(8) + 0.5
    angles = torch.rand(2, 4)
    gate_up, slot = torch.randn(2, 1, 12), torch.tensor([3])

    def run():
        keys, values = torch.zeros(2, 2, 5, 8), torch.zeros(2, 2, 5, 8)
        q = ops.qk_norm_rope_store(qkv, 4, 2, q_w, k_w, 1e-6, angles.cos(), angles.sin(), keys, values, slot)
        return (*ops.add_rms_norm(h, delta, weight, 1e-6), q, keys, values, ops.silu_mul(gate_up))

    expected = run()  # no Triton here: plain PyTorch
    fake_triton = SimpleNamespace(next_power_of_2=lambda n: 1 << (n - 1).bit_length(), cdiv=lambda a, b: -(-a // b))
    monkeypatch.setattr(ops, "triton", fake_triton)
    monkeypatch.setattr(kernels, "triton", fake_triton)
    monkeypatch.setattr(kernels, "_off", None)
    monkeypatch.setattr(ops, "on_its_gpu", lambda x: nullcontext())
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # as if on a GPU
    for name in ("_add_rms_norm_kernel", "_qk_norm_rope_store_kernel", "_silu_mul_kernel"):
        monkeypatch.setattr(ops, name, unbuildable, raising=False)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        got, again = run(), run()
        off = kernels._off
    monkeypatch.undo()
    for g, a, e in zip(got, again, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert unbuildable.launches == 1 and "C compiler" in off  # the first failure turned the kernels off
    (record,) = [r for r in caplog.records if r.name == kernels.__name__]
    message = record.getMessage()
    assert "answer decoder" in message and "C compiler" in message and "plain PyTorch" in message
