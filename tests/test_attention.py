"""Attention backends on CPU: FP8 attention's per-head quantization and key centring (emulated: the FA3 kernel
itself runs in the GPU tests), and how `--attention auto` picks a backend."""

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


def test_auto_never_picks_fp8_attention_and_the_choice_is_checked(monkeypatch):
    assert attn.resolve_backend("auto") == "sdpa"  # this CPU machine has no flash kernel
    with pytest.raises(ValueError, match=r"'flash3_fp8' is not available on this machine \(available: auto, sdpa\)"):
        attn.resolve_backend("flash3_fp8")
    monkeypatch.setattr(attn, "available_backends", lambda: ["auto", "sdpa", "flash3", "flash3_fp8"])
    assert attn.resolve_backend("auto") == "flash3"  # FP8 attention is slower at the DiT's shapes: a choice only
    assert attn.resolve_backend("flash3_fp8") == "flash3_fp8"
