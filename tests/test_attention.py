"""Attention backends on CPU: FP8 attention's per-head quantization, measured (with the keys centred) or bounded by
the q/k norms (emulated: the FA3 kernel itself runs in the GPU tests), and how `--attention auto` picks a backend."""

import pytest
import torch
import torch.nn.functional as F

from iamflow_core.models import attention as attn
from iamflow_core.models import fused


def _exact(q, k, v):
    return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)


def _fp8_emulated(q, k, v, centre_keys: bool):
    """What the FP8 kernel computes from `heads_fp8`'s output, up to its own rounding of the probabilities."""
    (q8, qs), (k8, ks), (v8, vs) = (fused.heads_fp8(x, c) for x, c in ((q, False), (k, centre_keys), (v, False)))
    back = [x8.float() * s[:, None, :, None] for x8, s in ((q8, qs), (k8, ks), (v8, vs))]
    return _exact(*back)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_heads_fp8_keeps_each_head_to_e4m3_precision_with_its_own_scale():
    torch.manual_seed(0)
    x = torch.randn(2, 300, 3, 64)
    x[:, :, 1] *= 100  # one loud head must not cost the others precision
    data, scale = fused.heads_fp8(x, False)
    assert data.dtype == torch.float8_e4m3fn and data.shape == x.shape
    assert scale.shape == (2, 3) and scale.dtype == torch.float32
    assert torch.allclose(scale, x.abs().amax(dim=(1, 3)) / 448)
    back = data.float() * scale[:, None, :, None]
    for head in range(3):
        assert _rel(back[:, :, head], x[:, :, head]) < 0.04  # 3 mantissa bits: ~2.5 % RMS
    centred, _ = fused.heads_fp8(x, True)
    assert not torch.equal(centred, data)


def test_centred_keys_leave_attention_unchanged_and_survive_a_shared_offset():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 256, 2, 64) for _ in range(3))
    k = k + 12 * torch.randn(1, 1, 2, 64)  # an offset every key shares (per head and channel)
    exact = _exact(q, k, v)
    assert _rel(_exact(q, k - k.mean(dim=1, keepdim=True), v), exact) < 1e-5  # softmax does not see it
    centred, plain = _rel(_fp8_emulated(q, k, v, True), exact), _rel(_fp8_emulated(q, k, v, False), exact)
    assert centred < 0.06 and centred * 3 < plain, (centred, plain)  # 4.8 % and 33 % here


def test_fp8_backend_off_the_gpu_runs_sdpa_and_cross_attention_stays_16_bit():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 64, 2, 32) for _ in range(3))
    assert torch.equal(attn.attention(q, k, v, "flash3_fp8"), attn.attention(q, k, v, "sdpa"))
    assert attn.precise("flash3_fp8") == "flash3" and attn.precise("sdpa") == "sdpa"


def test_auto_picks_fp8_attention_only_for_a_dit_with_fp8_linears_and_the_choice_is_checked(monkeypatch):
    assert attn.resolve_backend("auto") == attn.resolve_backend("auto", fp8=True) == "sdpa"  # no flash kernel here
    with pytest.raises(ValueError, match=r"'flash3_fp8' is not available on this machine \(available: auto, sdpa\)"):
        attn.resolve_backend("flash3_fp8")
    monkeypatch.setattr(attn, "available_backends", lambda: ["auto", "sdpa", "flash3", "flash3_fp8"])
    assert attn.resolve_backend("auto") == "flash3"  # a 16-bit DiT keeps 16-bit attention unless asked
    assert attn.resolve_backend("auto", fp8=True) == "flash3_fp8"
    assert attn.resolve_backend("flash3", fp8=True) == "flash3"  # a choice stands
    assert attn.resolve_backend("flash3_fp8") == "flash3_fp8"
    monkeypatch.setattr(attn, "available_backends", lambda: ["auto", "sdpa", "flash3"])  # an FA3 without FP8
    assert attn.resolve_backend("auto", fp8=True) == "flash3"


def _normed_rotated(x, weight, heads):
    """The DiT's q or k: RMSNorm over all channels with `weight`, then a rotation of each channel pair."""
    b, seq, dim = x.shape
    normed = fused.rms_norm(x, weight, 1e-6).view(b, seq, heads, -1, 2)
    angle = torch.rand(seq, 1, normed.shape[3]) * 6.3
    cos, sin = angle.cos(), angle.sin()
    a, c = normed[..., 0], normed[..., 1]
    return torch.stack((a * cos - c * sin, a * sin + c * cos), dim=-1).flatten(3)


def test_the_norm_bound_holds_for_any_token_and_keeps_e4m3_precision():
    torch.manual_seed(3)
    heads, dim = 4, 256
    weight = torch.rand(dim) * 2
    weight[70] = 9.0  # one loud channel widens its head's scale only
    x = torch.randn(2, 500, dim)
    x[0, 0] = 0
    x[0, 0, 70] = 1e4  # all of a token's energy in the loud channel: the largest element the norm can make
    x[0, 1] = 0
    x[0, 1, 200:202] = 50.0  # all of it in one rotated pair of another head
    y = _normed_rotated(x, weight, heads)
    bound = fused.rms_norm_bound(weight, heads)
    assert torch.allclose(bound, weight.view(heads, -1).amax(dim=1) * dim**0.5)
    assert (y.abs().amax(dim=(0, 1, 3)) <= bound * 1.0001).all()
    assert y[0, 0].view(heads, -1, 2).norm(dim=-1).max() > 0.999 * bound[1]  # a rotated pair reaches it: not loose
    data, scale = fused.heads_fp8_bounded(y, weight)
    assert data.dtype == torch.float8_e4m3fn and scale.shape == (2, heads)
    assert torch.equal(scale, (bound / 448).expand(2, -1))
    assert data.float().abs().max() <= 448 and torch.isfinite(data.float()).all()
    typical = y[1:]  # tokens without an outlier sit ~40x below the bound, still in e4m3's normal range
    back = data[1:].float() * scale[1:, None, :, None]
    for head in range(heads):
        assert _rel(back[..., head, :], typical[..., head, :]) < 0.04  # as precise as a scale measured per head


def test_bounded_fp8_attention_is_as_close_as_measured_scales():
    torch.manual_seed(4)
    heads, dim = 2, 128
    wq, wk = torch.rand(dim) + 0.5, torch.rand(dim) + 0.5
    q, k = (_normed_rotated(torch.randn(1, 256, dim), w, heads) for w in (wq, wk))
    v = torch.randn(1, 256, heads, dim // heads)
    exact = _exact(q, k, v)
    (q8, qs), (k8, ks) = fused.heads_fp8_bounded(q, wq), fused.heads_fp8_bounded(k, wk)
    v8, vs = fused.heads_fp8(v, False)
    bounded = _exact(*(x8.float() * s[:, None, :, None] for x8, s in ((q8, qs), (k8, ks), (v8, vs))))
    measured = _fp8_emulated(q, k, v, True)
    assert _rel(bounded, exact) < 1.5 * _rel(measured, exact) + 1e-3, (_rel(bounded, exact), _rel(measured, exact))
