"""Checkpoints read onto a GPU by several threads (`weights.reading.read_extents`) hold what the file holds."""

import pytest
import torch

from iamflow_core.weights import load_dit, load_t5, reading

from .. import _checkpoints as ck

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("piece", [4096, 16 << 20])
def test_models_read_onto_the_gpu_equal_those_read_on_the_cpu(tmp_path, monkeypatch, piece):
    """A umT5 stored in fp16 and cast to bf16 on the GPU, an FP8-scaled one dequantized there, and a DiT, each
    equal to the same file read on the CPU; small pieces make each tensor many copies from several workers."""
    monkeypatch.setattr(reading, "PIECE_BYTES", piece)
    t5 = ck.t5_state()
    for name, fp8 in (("umt5_xxl_fp16.safetensors", False), ("umt5_xxl_fp8_e4m3fn_scaled.safetensors", True)):
        path = ck.write_comfyui_t5(tmp_path / name, t5, fp8_scaled=fp8)
        on_gpu, on_cpu = load_t5(path, torch.bfloat16, "cuda"), load_t5(path, torch.bfloat16, "cpu")
        for (key, value), expected in zip(on_gpu.state_dict().items(), on_cpu.state_dict().values(), strict=True):
            assert value.is_cuda and value.dtype == expected.dtype, key
            assert torch.equal(value.cpu(), expected), key
    path = ck.write_comfyui_dit(tmp_path / "dit.safetensors", ck.dit_state(), dtype=torch.bfloat16)
    on_gpu, on_cpu = load_dit(path, dtype=torch.bfloat16, device="cuda"), load_dit(path, dtype=torch.bfloat16)
    for (key, value), expected in zip(on_gpu.state_dict().items(), on_cpu.state_dict().values(), strict=True):
        assert torch.equal(value.cpu(), expected), key


def test_the_callers_stream_waits_for_the_copies(tmp_path, monkeypatch):
    """A tensor is handed out once its copies are queued, not done: its first use on the caller's stream, launched at
    once, still sees all of its bytes (the stream waits for the workers' copies)."""
    monkeypatch.setattr(reading, "PIECE_BYTES", 1 << 20)
    from safetensors.torch import save_file

    x = torch.arange(8 << 20, dtype=torch.float32).reshape(8, -1)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    extent = reading._extents(tmp_path / "x.safetensors")["x"]
    (got,) = reading.read_extents([extent], torch.device("cuda"), tmp_path)
    assert got.sum(dtype=torch.float64).item() == x.sum(dtype=torch.float64).item()
