"""Full-size DiT checks on a CUDA GPU (random weights): bf16 parity with diffusers, FP8 path, backends agree."""

import pytest
import torch

from iamflow_core.config import CacheConfig, DiTConfig
from iamflow_core.models.attention import available_backends
from iamflow_core.models.dit import CausalWanDiT

from .._tiny_dit import diffusers_twin

pytestmark = pytest.mark.gpu


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def full_model():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = CausalWanDiT(DiTConfig())
    return model.eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 16, 3, 60, 104, device="cuda", generator=g)  # one 480x832 chunk
    text = torch.randn(1, 512, 4096, device="cuda", generator=g)
    text[:, 40:] = 0
    return x, text


@torch.no_grad()
def test_full_size_parity_with_diffusers(full_model, inputs, record_property):
    pytest.importorskip("diffusers")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    x, text = inputs
    t = torch.tensor([937.5], device="cuda")
    reference = diffusers_twin(full_model).cuda()
    ref = reference(x, t, text, return_dict=False)[0]
    ours32 = full_model(x, t, text)
    fp32_diff = (ours32 - ref).abs().max().item()
    del reference
    torch.cuda.empty_cache()
    bf16 = full_model.to(torch.bfloat16)
    ours16 = bf16(x, t, text)
    rel16 = _rel(ours16, ref)
    full_model.float()
    record_property("fp32_max_abs_diff", fp32_diff)
    record_property("bf16_rel_err_vs_fp32_reference", rel16)
    print(f"full-size fp32 max abs diff vs diffusers: {fp32_diff:.3e}; bf16 rel. error vs fp32 diffusers: {rel16:.4%}")
    assert fp32_diff <= 1e-3
    assert rel16 <= 0.02  # Wan's own bf16 policy is ~0.5-1 % relative on random weights (parity notes)


@torch.no_grad()
def test_backends_agree_on_a_streaming_chunk(full_model, inputs):
    x, text = inputs
    model = full_model.to(torch.bfloat16)
    outs = {}
    for backend in [b for b in available_backends() if b != "auto"]:
        model.attention_backend = backend
        cache = model.new_cache(CacheConfig(memory_frames=0), tokens_per_frame=30 * 52)
        cross = model.encode_text(text)
        model.forward_chunk(x, torch.tensor([0.0]), cross, cache, 0, commit=True)
        outs[backend] = model.forward_chunk(x, torch.tensor([625.0]), cross, cache, 3)
    model.attention_backend = "sdpa"
    model.float()
    base = outs.pop("sdpa")
    for backend, out in outs.items():
        rel = _rel(out, base)
        print(f"{backend} vs sdpa: relative difference {rel:.3e}")
        assert rel < 0.02, backend


@torch.no_grad()
def test_compiled_kernels_match_eager(full_model, inputs):
    from iamflow_core.models import fused

    x, text = inputs
    model = full_model.to(torch.bfloat16)
    t = torch.tensor([833.3], device="cuda")
    fused.enable(False)
    eager = model(x, t, text)
    fused.enable(True)
    compiled = model(x, t, text)
    fused.enable(False)
    model.float()
    rel = _rel(compiled, eager)
    print(f"compiled vs eager bf16 forward: relative difference {rel:.3e}")
    assert rel < 0.01


@torch.no_grad()
def test_the_ffn_gelu_in_the_gemm_is_wans_tanh_approximation():
    """`fused.linear_gelu` runs ffn.0 as one cuBLASLt GEMM with a GELU epilogue, which PyTorch documents for CUDA as
    the tanh approximation (Wan's FFN GELU), not the exact erf GELU: checked in float32 where the two differ by far
    more than rounding, then the bf16 path against a float32 reference."""
    import torch.nn.functional as F

    from iamflow_core.models import fused

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    linear = torch.nn.Linear(1536, 8960, device="cuda")
    x = torch.randn(3, 200, 1536, device="cuda")
    epilogue = torch._addmm_activation(linear.bias, x.flatten(0, 1), linear.weight.t(), use_gelu=True).view(3, 200, -1)
    tanh, erf = F.gelu(linear(x), approximate="tanh"), F.gelu(linear(x))
    assert _rel(epilogue, tanh) < 1e-5 and _rel(epilogue, erf) > 10 * _rel(epilogue, tanh)
    got = fused.linear_gelu(x.bfloat16(), linear.bfloat16(), torch.nn.GELU(approximate="tanh"))
    print(f"bf16 GEMM+GELU epilogue vs float32 tanh GELU: {_rel(got, tanh):.3e}")
    assert got.dtype == torch.bfloat16 and got.shape == tanh.shape and _rel(got, tanh) < 0.01


@torch.no_grad()
@pytest.mark.parametrize("dim,heads", [(1536, 12), (256, 2), (96, 3)])
def test_the_hand_written_norm_and_rotation_kernel_matches_plain_pytorch(dim, heads):
    """`kernels.rms_norm_rope` (q and k of every self-attention) against the plain function, the same roundings in
    bf16: into a fresh tensor and into a cache-like slot of a two-video batch (rows contiguous, batches apart)."""
    from iamflow_core.models import fused, kernels
    from iamflow_core.models.rope import RopeTables

    torch.manual_seed(0)
    tokens, head = 4 * 78, dim // heads
    x = torch.randn(2, tokens, dim, device="cuda", dtype=torch.bfloat16) * 3
    weight = (1 + 0.1 * torch.randn(dim, device="cuda")).bfloat16()
    split = DiTConfig(dim=dim, num_heads=heads).rope_split
    cos, sin = RopeTables(split, 1024, 10000.0).grid(range(7, 11), 6, 13, torch.device("cuda"))
    fused.enable(False)
    plain = fused.rms_norm_rope(x, weight, 1e-6, heads, cos, sin)
    got = kernels.rms_norm_rope(x, weight, 1e-6, heads, cos, sin)
    buffer = torch.zeros(3, 2, 5 * tokens, heads, head, device="cuda", dtype=torch.bfloat16)
    slot = buffer[1, :, tokens : 2 * tokens]
    assert kernels.rms_norm_rope(x, weight, 1e-6, heads, cos, sin, out=slot) is slot
    for result in (got, slot):
        assert result.shape == plain.shape and result.dtype == plain.dtype
        differ = (result != plain).float().mean().item()
        print(f"dim {dim}: {differ:.2%} of the values one bf16 rounding apart at most")
        assert differ < 0.02 and _rel(result, plain) < 2e-3
    assert buffer[0].abs().sum() == 0 and buffer[2].abs().sum() == 0 and buffer[1, :, :tokens].abs().sum() == 0
