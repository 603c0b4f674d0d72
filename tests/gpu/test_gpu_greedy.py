"""The verifier's and the extractor's CUDA-graph decoding gives transformers' greedy answers, while another thread
keeps the GPU busy (as the VAE decoder does in a render), and captures a graph once per batch size and length."""

import threading

import pytest
import torch

from iamflow_core.story.greedy import CACHE_STEP, STEPS, GreedyDecoder
from iamflow_core.story.hf import end_tokens, greedy_config
from iamflow_core.story.llm import EntityExtractor
from iamflow_core.story.vlm import FrameVerifier

from .._tiny_qwen import frames, tiny_qwen_folders
from ..test_greedy import NORA, _generate_all, _loud

pytestmark = pytest.mark.gpu


class _Busy:
    """Another thread launching matmuls on the GPU until stopped."""

    def __enter__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        return self

    def _run(self) -> None:
        x = torch.randn(2048, 2048, device="cuda")
        with torch.cuda.stream(torch.cuda.Stream()):
            while not self.stop.is_set():
                x = torch.tanh(x @ x)
                torch.cuda.current_stream().synchronize()

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def test_the_verifier_decodes_with_cuda_graphs_and_answers_as_generate():
    verifier = FrameVerifier(tiny_qwen_folders().vlm, device="cuda", dtype="fp32", max_new_tokens=24, short_side=64)
    _loud(verifier._model)
    decoder = verifier._greedy
    assert decoder is not None and decoder.graphs_on
    tokenizer = verifier._inputs.tokenizer
    lengths = set()
    with _Busy():
        for seed, check in ((1, False), (2, False), (3, True)):
            batch, config = verifier.request(frames(3, 48, 80, seed=seed), "Nora reads in a cafe.", [NORA], check)
            expected = _generate_all(verifier._model, batch, config)
            assert decoder.generate(batch, config.max_new_tokens, end_tokens(config, tokenizer)) == expected
            assert len(expected[0]) >= 16
            # one graph per cache length (prompt + answer, in steps of 256): the second answer replays the first
            # one's graph; the attribute check (a longer answer) may need a longer cache and its own graph
            lengths.add(-(-(batch["input_ids"].shape[1] + config.max_new_tokens + STEPS) // CACHE_STEP))
            assert decoder.captures == len(lengths)
    batch, config = verifier.request(frames(3, 48, 80), "Nora reads in a cafe.", [NORA], False)
    expected = tokenizer.decode(_generate_all(verifier._model, batch, config)[0], skip_special_tokens=True)
    assert verifier.answer(frames(3, 48, 80), "Nora reads in a cafe.", [NORA], False) == expected
    verifier.unload()


def test_the_extractor_decodes_a_padded_batch_with_cuda_graphs():
    extractor = EntityExtractor(tiny_qwen_folders().llm, device="cuda", dtype="fp32", max_new_tokens=24)
    assert extractor._greedy is not None
    tokenizer = extractor._tokenizer
    prompts = ["Nora reads a red notebook in a cafe; list the entities.", "A fox.", "Rain over an old harbour town"]
    batch = dict(tokenizer(prompts, return_tensors="pt", padding=True).to("cuda"))
    config = greedy_config(extractor._model, 24, tokenizer.pad_token_id)
    with _Busy():
        got = extractor._greedy.generate(batch, 24, end_tokens(config, tokenizer))
    assert got == _generate_all(extractor._model, batch, config)
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    assert len(extractor.generate_answers(conversations, 24)) == 3
    extractor.unload()


def test_bf16_answers_start_as_generates_do():
    """In bf16 the step's kernels differ from transformers' (other rounding): the answers agree on their start."""
    verifier = FrameVerifier(tiny_qwen_folders().vlm, device="cuda", max_new_tokens=16, short_side=64)
    _loud(verifier._model)
    batch, config = verifier.request(frames(3, 48, 80), "Nora reads in a cafe.", [NORA], False)
    expected = _generate_all(verifier._model, batch, config)[0]
    got = GreedyDecoder(verifier._model, config).generate(batch, config.max_new_tokens, end_tokens(config, None))[0]
    assert got[:4] == expected[:4]
    verifier.unload()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_step_kernels_compute_what_the_plain_ops_do(dtype, monkeypatch):
    """The Triton kernels of the decoding step against the same functions as plain PyTorch on the same GPU: equal
    up to the float32 sums' order, and in bf16 at most one rounding step apart."""
    from iamflow_core.models import kernels
    from iamflow_core.story import greedy_ops as ops

    torch.manual_seed(0)
    rows, heads, kv_heads, head, dim, inter, length = 3, 16, 8, 128, 2048, 6144, 40
    make = lambda *shape, scale=1.0: (torch.randn(*shape, device="cuda") * scale).to(dtype)  # noqa: E731
    h, delta, weight = make(rows, 1, dim), make(rows, 1, dim), make(dim, scale=0.5) + 1
    qkv, q_w, k_w = make(rows, (heads + 2 * kv_heads) * head, scale=3.0), make(head) + 1, make(head) + 1
    angles = torch.rand(rows, head // 2, device="cuda") * 40
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    gate_up = make(rows, 1, 2 * inter, scale=2.0)
    slot = torch.tensor([17], device="cuda")

    def run():
        caches = [torch.zeros(rows + 1, kv_heads, length, head, device="cuda", dtype=dtype) for _ in range(2)]
        keys, values = (c[:rows] for c in caches)  # views with the strides of a larger buffer, as in the decoder
        q = ops.qk_norm_rope_store(qkv, heads, kv_heads, q_w, k_w, 1e-6, cos, sin, keys, values, slot)
        return (*ops.add_rms_norm(h, delta, weight, 1e-6), ops.add_rms_norm(h, None, weight, 1e-6)[1], q, *caches,
                ops.silu_mul(gate_up))  # fmt: skip

    fused = run()
    monkeypatch.setattr(kernels, "triton", None)  # the hand-written kernels off: plain PyTorch
    plain = run()
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    names = ("h + delta", "its norm", "the norm alone", "q", "keys", "values", "SiLU product")
    for name, got, expected in zip(names, fused, plain):
        torch.testing.assert_close(got, expected, **tol, msg=lambda m, name=name: f"{name}: {m}")
    assert fused[4][:, :, slot.item()].abs().sum() > 0 and fused[4][:, :, :17].abs().sum() == 0  # only the slot
    if dtype == torch.bfloat16:
        # bit for bit, except the rotated q and k: there the compiled kernel rounds differently from eager PyTorch's
        # three rounded ops (a fifth of the values one unit in the last place apart, measured on an H200)
        same = {name: (got == expected).float().mean().item() for name, got, expected in zip(names, fused, plain)}
        assert all(same[name] == 1.0 for name in names if name not in ("q", "keys")), same
        assert same["q"] > 0.7, same
