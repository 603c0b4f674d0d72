"""DiT parity with diffusers and streaming exactness of the KV-cache path."""

import functools

import pytest
import torch

from iamflow_core.cache import KVCache, WindowState, block_causal_mask, commit_frames, frame_visibility, rope_positions
from iamflow_core.config import CacheConfig
from iamflow_core.models import fused
from iamflow_core.models.dit import CachedContext, CausalWanDiT, CrossKV

from ._tiny_dit import TINY_DIT, diffusers_twin, tiny_dit

H, W = 4, 6  # latent size -> 2x3 = 6 tokens per frame


def _inputs(frames: int, batch: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY_DIT.in_channels, frames, H, W, generator=g)
    text = torch.randn(batch, TINY_DIT.text_len, TINY_DIT.text_dim, generator=g)
    text[:, 20:] = 0  # zero padding past the prompt, as the text encoder gives it
    return x, text


@pytest.fixture(scope="module")
def model() -> CausalWanDiT:
    return tiny_dit()


@pytest.fixture(scope="module")
def reference(model):
    pytest.importorskip("diffusers")
    return diffusers_twin(model)


@pytest.mark.parametrize("t", [0.0, 1.0, 500.0, 937.5, 999.0])
def test_full_forward_matches_diffusers(model, reference, t):
    x, text = _inputs(frames=5, batch=2)
    timestep = torch.full((2,), t)
    with torch.no_grad():
        ours = model(x, timestep, text)
        theirs = reference(x, timestep, text, return_dict=False)[0]
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_per_frame_timesteps_match_diffusers(model, reference):
    """diffusers' per-token timestep path ([B, L]) carries per-frame timesteps; ours takes [B, F]."""
    frames = 4
    x, text = _inputs(frames=frames, batch=1)
    t_frames = torch.tensor([[0.0, 250.0, 625.0, 1000.0]])
    tokens_per_frame = (H // 2) * (W // 2)
    with torch.no_grad():
        ours = model(x, t_frames, text)
        theirs = reference(x, t_frames.repeat_interleave(tokens_per_frame, 1), text, return_dict=False)[0]
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_per_frame_timesteps_equal_scalar_when_equal(model):
    x, text = _inputs(frames=3)
    with torch.no_grad():
        a = model(x, torch.tensor([400.0]), text)
        b = model(x, torch.full((1, 3), 400.0), text)
    assert torch.equal(a, b)


def _stream(model, x, text, cfg, t_chunks):
    """Generate chunk by chunk through the cache, committing each chunk: returns the concatenated outputs."""
    cache = model.new_cache(cfg, tokens_per_frame=(H // 2) * (W // 2))
    cross = model.encode_text(text)
    outs = []
    for i, t in enumerate(t_chunks):
        s = i * cfg.chunk_frames
        outs.append(model.forward_chunk(x[:, :, s : s + cfg.chunk_frames], torch.tensor([t]), cross, cache, s, True))
    return torch.cat(outs, dim=2), cache


def _full_masked(model, x, text, cfg, t_chunks):
    frames = x.shape[2]
    t = torch.tensor(t_chunks).repeat_interleave(cfg.chunk_frames)[None, :frames]
    mask = block_causal_mask(frames, (H // 2) * (W // 2), cfg)
    return model(x, t, text, mask=mask)


def test_streaming_equals_block_causal_full_forward_when_window_covers_video(model):
    cfg = CacheConfig(chunk_frames=3, sink_frames=3, window_frames=12, memory_frames=0)
    x, text = _inputs(frames=12)  # 4 chunks: the last one sees every earlier frame
    t_chunks = [937.5, 0.0, 625.0, 833.3]
    with torch.no_grad():
        streamed, _ = _stream(model, x, text, cfg, t_chunks)
        full = _full_masked(model, x, text, cfg, t_chunks)
    assert (streamed - full).abs().max().item() <= 1e-4
    assert frame_visibility(12, cfg).all(dim=1)[-3:].all()  # the window really covers the video


def test_streaming_past_the_window_equals_sink_plus_window_mask(model):
    cfg = CacheConfig(chunk_frames=3, sink_frames=3, window_frames=9, memory_frames=0)
    x, text = _inputs(frames=18)  # 6 chunks; the window holds sink + 3 previous frames
    t_chunks = [0.0, 250.0, 500.0, 750.0, 1000.0, 0.0]
    with torch.no_grad():
        streamed, cache = _stream(model, x, text, cfg, t_chunks)
        full = _full_masked(model, x, text, cfg, t_chunks)
    assert (streamed - full).abs().max().item() <= 1e-4
    assert cache.state.sink == (0, 1, 2)
    assert sorted(cache.state.local) == [15, 16, 17]


@pytest.mark.parametrize("window", [9, 5], ids=["window-covers-video", "past-the-window"])
def test_frame_wise_streaming_equals_block_causal_full_forward(model, window):
    """One latent frame per chunk (Causal Forcing's frame-wise models): every frame sees the sink, the window's
    previous frames and itself, exactly as the frame-causal mask of the full sequence says."""
    cfg = CacheConfig(chunk_frames=1, sink_frames=3, window_frames=window, memory_frames=0)
    x, text = _inputs(frames=9)
    t_chunks = [1000.0, 0.0, 625.0, 250.0, 937.5, 0.0, 500.0, 833.3, 1000.0]
    with torch.no_grad():
        streamed, cache = _stream(model, x, text, cfg, t_chunks)
        full = _full_masked(model, x, text, cfg, t_chunks)
    assert (streamed - full).abs().max().item() <= 1e-4
    assert cache.state.sink == (0, 1, 2)
    assert sorted(cache.state.local) == list(range(9 - cfg.local_frames, 9))
    # the mask really differs from chunk-wise streaming: frame 4 does not see frame 5 of its 3-frame chunk
    assert not frame_visibility(9, cfg)[4, 5] and frame_visibility(9, CacheConfig(window_frames=9))[4, 5]


def test_denoising_passes_leave_the_cache_untouched(model):
    cfg = CacheConfig(chunk_frames=3, sink_frames=3, window_frames=12, memory_frames=0)
    x, text = _inputs(frames=6)
    cache = model.new_cache(cfg, tokens_per_frame=(H // 2) * (W // 2))
    cross = model.encode_text(text)
    with torch.no_grad():
        model.forward_chunk(x[:, :, :3], torch.tensor([0.0]), cross, cache, 0, commit=True)
        state, k_sink = cache.state, cache.k[:, :, : 3 * 6].clone()
        a = model.forward_chunk(x[:, :, 3:], torch.tensor([500.0]), cross, cache, 3)
        b = model.forward_chunk(x[:, :, 3:], torch.tensor([500.0]), cross, cache, 3)
    assert cache.state == state and torch.equal(cache.k[:, :, : 3 * 6], k_sink)
    assert torch.equal(a, b)


def test_runs_past_1024_latent_frames(model):
    """Positions slide back past the RoPE table instead of failing (Self-Forcing crashes here)."""
    cfg = CacheConfig(chunk_frames=3, sink_frames=3, window_frames=12, memory_frames=0)
    x, text = _inputs(frames=3)
    cache = model.new_cache(cfg, tokens_per_frame=(H // 2) * (W // 2))
    cross = model.encode_text(text)
    with torch.no_grad():
        model.forward_chunk(x, torch.tensor([0.0]), cross, cache, 0, commit=True)
        for start in range(1020, 1035, 3):
            out = model.forward_chunk(x, torch.tensor([0.0]), cross, cache, start, commit=True)
            assert torch.isfinite(out).all()
    assert cache.state.sink == (0, 1, 2)
    assert sorted(cache.state.local) == list(range(1029, 1035))


def test_memory_frames_join_the_context(model):
    cfg = CacheConfig(chunk_frames=3, sink_frames=3, window_frames=6, memory_frames=2)
    x, text = _inputs(frames=12)
    cache = model.new_cache(cfg, tokens_per_frame=(H // 2) * (W // 2))
    cross = model.encode_text(text)
    with torch.no_grad():
        for i in range(3):
            model.forward_chunk(x[:, :, 3 * i : 3 * i + 3], torch.tensor([0.0]), cross, cache, 3 * i, commit=True)
        # frame 4 has left the window (window 6 = sink 3 + chunk 3: no local frames); bring it back as memory.
        assert 4 not in cache.state.frames()
        without = model.forward_chunk(x[:, :, 9:12], torch.tensor([0.0]), cross, cache, 9)
        k1, v1, pos = cache.frame_kv(1)
        assert pos == 1
        cache.set_memory(k1, v1, [1], [pos])
        with_memory = model.forward_chunk(x[:, :, 9:12], torch.tensor([0.0]), cross, cache, 9)
    assert cache.layout.context_tokens == (3 + 3 + 1) * 6
    assert not torch.allclose(without, with_memory)


def test_cross_kv_blend():
    a = CrossKV(torch.zeros(2, 1, 4, 2, 8), torch.zeros(2, 1, 4, 2, 8))
    b = CrossKV(torch.ones(2, 1, 4, 2, 8), 2 * torch.ones(2, 1, 4, 2, 8))
    mid = a.blend(b, 0.25)
    assert torch.allclose(mid.k, torch.full_like(mid.k, 0.25)) and torch.allclose(mid.v, torch.full_like(mid.v, 0.5))
    assert torch.equal(a.k, torch.zeros_like(a.k))  # inputs are never mutated


# eviction and positions as pure functions ------------------------------------------------------------------------
def test_commit_frames_fills_sink_then_rolls_window():
    cfg = CacheConfig(chunk_frames=3, sink_frames=3, window_frames=12, memory_frames=0)
    state = WindowState.empty(cfg)
    state, placed = commit_frames(state, [0, 1, 2])
    assert state.sink == (0, 1, 2) and placed == [(0, 0), (1, 1), (2, 2)]
    for start in range(3, 30, 3):
        state, _ = commit_frames(state, [start, start + 1, start + 2])
        expected = list(range(max(3, start + 3 - cfg.local_frames), start + 3))
        assert sorted(f for f in state.local if f is not None) == expected
        assert state.sink == (0, 1, 2)


def test_commit_frames_without_local_slots_keeps_only_the_sink():
    cfg = CacheConfig(chunk_frames=3, sink_frames=3, window_frames=6, memory_frames=0)
    state, _ = commit_frames(WindowState.empty(cfg), [0, 1, 2])
    state, placed = commit_frames(state, [3, 4, 5])
    assert placed == [] and state.frames() == [0, 1, 2]


def test_sink_smaller_than_a_chunk():
    cfg = CacheConfig(chunk_frames=3, sink_frames=1, window_frames=7, memory_frames=0)
    state, _ = commit_frames(WindowState.empty(cfg), [0, 1, 2])
    assert state.sink == (0,)
    assert state.local == (1, 2, None)


def test_rope_positions_exact_below_limit_and_bounded_above():
    frames = [0, 1, 2, 500, 1000, 1001, 1002]
    assert rope_positions(frames, 1003, sink_frames=3, limit=1024) == frames
    above = rope_positions([0, 1, 2, 10, 2000, 2001, 2002], 2003, sink_frames=3, limit=1024)
    assert above[:3] == [0, 1, 2]
    assert above[3] == 3  # an old memory frame is clamped just after the sink
    assert above[4:] == [1021, 1022, 1023]  # the current chunk sits at the end of the table
    assert max(above) < 1024


def test_bad_chunk_inputs_give_clear_errors(model):
    cfg = CacheConfig(memory_frames=0)
    cache = model.new_cache(cfg, tokens_per_frame=6)
    cross = model.encode_text(torch.zeros(1, 512, TINY_DIT.text_dim))
    with pytest.raises(ValueError, match="channels"):
        model.forward_chunk(torch.zeros(1, 4, 3, H, W), torch.tensor([0.0]), cross, cache, 0)
    with pytest.raises(ValueError, match="exceed the 9 frames"):
        model.forward_chunk(torch.zeros(1, 16, 10, H, W), torch.tensor([0.0]), cross, cache, 0)
    with pytest.raises(ValueError, match="tokens per frame"):
        model.forward_chunk(torch.zeros(1, 16, 3, 8, 8), torch.tensor([0.0]), cross, cache, 0)


def test_kv_cache_rejects_going_back_in_time(model):
    cfg = CacheConfig(memory_frames=0)
    cache: KVCache = model.new_cache(cfg, tokens_per_frame=6)
    x, text = _inputs(frames=9)
    cross = model.encode_text(text)
    with torch.no_grad():
        for s in (0, 3, 6):
            model.forward_chunk(x[:, :, s : s + 3], torch.tensor([0.0]), cross, cache, s, commit=True)
    with pytest.raises(ValueError, match="already holds frame"):
        model.forward_chunk(x[:, :, :3], torch.tensor([0.0]), cross, cache, 3)


def test_recache_rewrites_the_window_and_keeps_the_sink(model):
    """A recache (LongLive) re-runs the clean pass over the latest frames under a new prompt: the window's K/V
    change, the sink keeps the old prompt's K/V, frames older than the window are dropped again."""
    cfg = CacheConfig(chunk_frames=3, sink_frames=3, window_frames=12, memory_frames=0)
    x, text = _inputs(frames=15)
    cache = model.new_cache(cfg, tokens_per_frame=6)
    cross = model.encode_text(text)
    with torch.no_grad():
        for s in range(0, 15, 3):
            model.forward_chunk(x[:, :, s : s + 3], torch.tensor([0.0]), cross, cache, s, commit=True)
        state, k_before = cache.state, cache.k.clone()
        new_cross = model.encode_text(torch.randn_like(text))
        model.forward_chunk(x[:, :, 6:15], torch.tensor([0.0]), new_cross, cache, 6, commit=True)  # 9 frames
    assert cache.state == state  # same frames in the same slots: sink 0-2, window 9-14
    sink_tokens = 3 * 6
    assert torch.equal(cache.k[:, :, :sink_tokens], k_before[:, :, :sink_tokens])
    window = slice(sink_tokens, sink_tokens + 6 * 6)
    assert not torch.allclose(cache.k[:, :, window], k_before[:, :, window])


def test_past_the_table_a_chunk_sees_the_distances_it_would_see_at_the_end_of_it(model):
    """Past 1024 frames the window slides back (rope_positions): a chunk at frame 5000 with the sink and a memory
    frame must give what the same chunk gives at the end of the table, frames 1021-1023."""
    cfg = CacheConfig(chunk_frames=3, sink_frames=3, window_frames=6, memory_frames=1)  # no local frames
    x, text = _inputs(frames=6)
    cross = model.encode_text(text)
    outs = []
    with torch.no_grad():
        for start in (5000, 1021):
            cache = model.new_cache(cfg, tokens_per_frame=6)
            model.forward_chunk(x[:, :, :3], torch.tensor([0.0]), cross, cache, 0, commit=True)
            k, v, pos = cache.frame_kv(2)
            cache.set_memory(k, v, [2], [pos])
            outs.append(model.forward_chunk(x[:, :, 3:], torch.tensor([500.0]), cross, cache, start, commit=True))
            assert cache.state.sink == (0, 1, 2)
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-4


def test_a_residual_and_the_norm_after_it_in_one_pass_equal_the_two_steps():
    """The block's fused residual-then-norm functions (one kernel each on a GPU) compute what the separate ones do,
    in 16 bits and as FP8 rows."""
    torch.manual_seed(0)
    x, y = torch.randn(1, 12, 16) * 3, torch.randn(1, 12, 16, dtype=torch.bfloat16)
    gate, shift, scale = (torch.randn(1, 3, 1, 16) for _ in range(3))
    weight, bias, eps = torch.randn(16), torch.randn(16), 1e-6

    total, h = fused.gated_residual_norm(x, y, gate, 3, weight, bias, eps, torch.bfloat16)
    assert torch.equal(total, fused.gated_residual(x, y, gate, 3))
    assert torch.equal(h, fused.affine_norm(total, weight, bias, eps, torch.bfloat16))
    _, rows = fused.gated_residual_norm(x, y, gate, 3, weight, bias, eps, torch.bfloat16, fp8=True)
    for got, expected in zip(rows, fused.rows_fp8(fused.affine_norm(total, weight, bias, eps, torch.float32))):
        assert torch.equal(got.float(), expected.float())

    total, h = fused.residual_modulate(x, y, shift, scale, 3, eps, torch.bfloat16)
    assert torch.equal(total, fused.residual(x, y))
    assert torch.equal(h, fused.modulate(total, shift, scale, 3, eps, torch.bfloat16))
    _, rows = fused.residual_modulate(x, y, shift, scale, 3, eps, torch.bfloat16, fp8=True)
    for got, expected in zip(rows, fused.modulate_fp8(total, shift, scale, 3, eps)):
        assert torch.equal(got.float(), expected.float())

    total, h = fused.residual_modulate(x, y, shift, scale, 3, eps, torch.bfloat16, gate=gate)
    assert torch.equal(total, fused.gated_residual(x, y, gate, 3))
    assert torch.equal(h, fused.modulate(total, shift, scale, 3, eps, torch.bfloat16))
    _, rows = fused.residual_modulate(x, y, shift, scale, 3, eps, torch.bfloat16, fp8=True, gate=gate)
    for got, expected in zip(rows, fused.modulate_fp8(total, shift, scale, 3, eps)):
        assert torch.equal(got.float(), expected.float())


def test_the_ffn_linear_and_its_gelu_off_the_gpu_are_the_two_steps():
    """On the CPU (whose fused addmm-GELU computes the exact GELU, not Wan's tanh approximation) `linear_gelu` runs
    the linear, then the tanh GELU; a non-linear module (an FP8 layer) goes the same way."""
    torch.manual_seed(0)
    linear, x, gelu = torch.nn.Linear(16, 24), torch.randn(2, 5, 16), torch.nn.GELU(approximate="tanh")
    expected = torch.nn.functional.gelu(linear(x), approximate="tanh")
    assert torch.equal(fused.linear_gelu(x, linear, gelu), expected)
    assert torch.equal(fused.linear_gelu(x, torch.nn.Sequential(linear), gelu), expected)


def test_the_residual_stream_reaches_every_norm_with_contiguous_rows(model, monkeypatch):
    """The patch embedding gives tokens as a transposed view; kept so, its layout would travel through every residual
    add, and on a GPU each compiled norm would reduce along strided rows (three kernels per LayerNorm, measured)."""
    seen = []
    for name in ("modulate", "gated_residual_norm", "residual_modulate", "gated_residual"):
        original = getattr(fused, name)

        @functools.wraps(original)  # keeps __wrapped__, which the other fused functions call
        def spy(x, *args, _original=original, **kwargs):
            seen.append(x.is_contiguous())
            return _original(x, *args, **kwargs)

        monkeypatch.setattr(fused, name, spy)
    x, text = _inputs(3)
    with torch.no_grad():
        model(x, torch.tensor([500.0]), text)
    assert len(seen) == 3 * len(model.blocks) + 1 and all(seen)  # each block's FFN residual joins the next norm


def test_a_clean_pass_that_only_writes_the_cache_leaves_what_the_full_one_leaves(model):
    """`write_chunk` stops in the last block once its keys and values are written: every chunk of a stream, a
    memory segment and a recache of the window leave the same cache as `forward_chunk(..., commit=True)`."""
    cfg = CacheConfig(chunk_frames=3, sink_frames=3, window_frames=12, memory_frames=2)
    x, text = _inputs(frames=18)
    cross, new_cross = model.encode_text(text), model.encode_text(torch.randn_like(text))
    caches = [model.new_cache(cfg, tokens_per_frame=6) for _ in range(2)]
    with torch.no_grad():
        for full, cache in zip((True, False), caches):
            for s in range(0, 18, 3):
                if s == 9:
                    k, v, pos = cache.frame_kv(4)
                    cache.set_memory(k, v, [4], [pos])
                model.forward_chunk(x[:, :, s : s + 3], torch.tensor([500.0]), cross, cache, s)  # a denoising pass
                if full:
                    model.forward_chunk(x[:, :, s : s + 3], torch.tensor([0.0]), cross, cache, s, commit=True)
                else:
                    assert model.write_chunk(x[:, :, s : s + 3], torch.tensor([0.0]), cross, cache, s) is None
            if full:
                model.forward_chunk(x[:, :, 9:18], torch.tensor([0.0]), new_cross, cache, 9, commit=True)
            else:
                model.write_chunk(x[:, :, 9:18], torch.tensor([0.0]), new_cross, cache, 9)
    assert caches[0].state == caches[1].state
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)


def test_a_chunks_keys_and_values_are_made_in_the_cache_not_copied_there(model, monkeypatch):
    """Each layer's rotated keys and values are written by the kernels that make them into the cache's query slots,
    so the cache copies nothing; the full-sequence forward still gets fresh tensors."""
    written = []
    original = KVCache.context

    def spy(self, layer, k, v, q=None):
        slot_k, slot_v = self.query_slots(layer)
        written.append(k.data_ptr() == slot_k.data_ptr() and v.data_ptr() == slot_v.data_ptr())
        return original(self, layer, k, v, q)

    monkeypatch.setattr(KVCache, "context", spy)
    x, text = _inputs(frames=3)
    cross = model.encode_text(text)
    cache, reference = (model.new_cache(CacheConfig(memory_frames=0), tokens_per_frame=6) for _ in range(2))
    with torch.no_grad():
        out = model.forward_chunk(x, torch.tensor([500.0]), cross, cache, 0)
        monkeypatch.setattr(CachedContext, "slots", lambda self, layer: None)  # fresh tensors, copied by the cache
        assert torch.equal(model.forward_chunk(x, torch.tensor([500.0]), cross, reference, 0), out)
    n = len(model.blocks)
    assert len(written) == 2 * n and all(written[:n]) and not any(written[n:])
    assert torch.equal(cache.k, reference.k) and torch.equal(cache.v, reference.v)


def test_a_linear_written_into_a_buffer_equals_the_linear_and_refuses_what_it_cannot_write():
    torch.manual_seed(0)
    linear, x = torch.nn.Linear(16, 24), torch.randn(2, 5, 16)
    out = torch.full((2, 5, 24), 7.0)
    assert not fused.linear_into(x, linear, out)  # autograd on: out= has no backward
    with torch.no_grad():
        assert not fused.linear_into(x.transpose(0, 1), linear, torch.empty(5, 2, 24))  # rows not contiguous
        assert not fused.linear_into(x, torch.nn.Sequential(linear), out)  # not a plain linear (an FP8 layer)
        assert not fused.linear_into(x.double(), linear, out.double())  # not the weight's dtype
        hook = linear.register_forward_hook(lambda *args: None)
        assert not fused.linear_into(x, linear, out)  # a hook would be skipped
        hook.remove()
        assert torch.equal(out, torch.full_like(out, 7.0))  # nothing was written by the refusals
        assert fused.linear_into(x, linear, out)
        assert torch.allclose(out, linear(x), atol=1e-6)


def test_the_dit_benchmarks_profile_sorts_kernels_by_kind():
    """`bench dit --profile`'s breakdown: FA3's CUTLASS kernels are attention, not GEMMs; the hand-written q/k kernel
    counts with the fused Triton ones; the kinds add up to the total and the largest kernels come first."""
    from iamflow_core.bench import dit_chunk, kernel_time

    kernels = [
        ("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<...>>>", 125.1, 298),
        ("nvjet_sm90_tst_192x144_64x5_2x1_v_bz_coopB_bias_TNT", 51.1, 1045),
        ("triton_red_fused__to_copy_add_mul_native_layer_norm_view_0", 12.45, 448),
        ("_rms_norm_rope_kernel", 2.57, 299),
        ("Memcpy DtoD (Device -> Device)", 0.5, 10),
        ("void at::native::elementwise_kernel<128, 2, CUDAFunctor_add<float>>", 0.45, 158),
    ]
    row = kernel_time.summarize(kernels, dit_chunk.KINDS, top=2)
    assert row["profiled_ms"] == {"attention": 125.1, "gemm": 51.1, "fused (triton)": 15.0, "copy": 0.5,
                                  "other": 0.5, "total": 192.2}  # fmt: skip
    assert list(row["profiled_ms"])[:2] == ["attention", "gemm"]
    assert row["top_kernels"] == [[125.1, 298, kernels[0][0]], [51.1, 1045, kernels[1][0]]]


def test_a_qk_kernel_that_cannot_build_leaves_the_dit_to_plain_pytorch(monkeypatch, caplog):
    """The DiT's hand-written q/k kernel fails to build (a Triton without an op it uses, an old GPU): the keys are
    still written into the cache slot given, with the plain function's values, and the hand-written kernels go off
    for the process with one warning."""
    import logging
    from contextlib import nullcontext
    from types import SimpleNamespace

    from iamflow_core.models import fused, kernels

    from ._unbuildable import UnbuildableKernel

    unbuildable = UnbuildableKernel(AttributeError("module 'triton.language' has no attribute 'join'"))
    torch.manual_seed(0)
    x, weight = torch.randn(1, 6, 16), torch.rand(16) + 0.5
    angles = torch.rand(6, 4)
    expected = fused.rms_norm_rope(x, weight, 1e-6, 2, angles.cos(), angles.sin())  # plain PyTorch here
    monkeypatch.setattr(kernels, "triton", SimpleNamespace(next_power_of_2=lambda n: 1 << (n - 1).bit_length()))
    monkeypatch.setattr(kernels, "_off", None)
    monkeypatch.setattr(kernels, "_rms_norm_rope_kernel", unbuildable, raising=False)
    monkeypatch.setattr(kernels, "on_its_gpu", lambda x: nullcontext())
    monkeypatch.setattr(fused, "compiles", lambda x: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # as if on a GPU
    slot, again = torch.zeros(1, 6, 2, 8), torch.zeros(1, 6, 2, 8)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        assert fused.rms_norm_rope(x, weight, 1e-6, 2, angles.cos(), angles.sin(), out=slot) is slot
        fused.rms_norm_rope(x, weight, 1e-6, 2, angles.cos(), angles.sin(), out=again)
    monkeypatch.undo()
    torch.testing.assert_close(slot, expected, rtol=0, atol=0)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    assert unbuildable.launches == 1
    (record,) = caplog.records
    assert "q/k norm-and-rotate kernel failed" in record.getMessage() and "'join'" in record.getMessage()
