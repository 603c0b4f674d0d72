"""Device names checked against the devices of the machine: one ValueError that lists the devices there are."""

from __future__ import annotations

import pytest
import torch

from iamflow_core.devices import available_devices, resolve_device


@pytest.fixture()
def no_gpu(monkeypatch):
    """This machine as a CPU-only one, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture()
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_cpu_is_always_there(no_gpu):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert available_devices() == ["cpu"]


def test_cuda_on_a_pytorch_without_cuda_lists_the_devices_there_are(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    for name in ("cuda:0", "cuda"):
        with pytest.raises(ValueError) as info:
            resolve_device(name)
        assert str(info.value) == (
            f"device '{name}' is not on this machine (no CUDA GPU: this PyTorch is built without CUDA; install a "
            "CUDA build of PyTorch to use a GPU); devices here: cpu"
        )


def test_cuda_without_a_visible_gpu_says_where_to_look(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    with pytest.raises(ValueError, match=r"no CUDA GPU is visible: check the NVIDIA driver .*; devices here: cpu$"):
        resolve_device("cuda:0")


@pytest.mark.parametrize("name", ["gpu0", "cuda:-1", "cuda:x", "cuda:", "cpu:0", "", "mps:1"])
def test_malformed_names_are_refused(no_gpu, name):
    with pytest.raises(ValueError) as info:
        resolve_device(name)
    message = str(info.value)
    assert message.startswith(f"device {name!r} is not a device name; use cpu, cuda"), message
    assert message.endswith("devices here: cpu"), message


def test_gpus_that_are_there(two_gpus):
    assert available_devices() == ["cuda:0", "cuda:1", "cpu"]
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("CUDA:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)  # the current GPU, with its index


def test_a_gpu_past_the_last_one(two_gpus):
    with pytest.raises(ValueError) as info:
        resolve_device("cuda:2")
    assert str(info.value) == (
        "device 'cuda:2' is not on this machine (2 CUDA GPUs visible, numbered from 0); "
        "devices here: cuda:0, cuda:1, cpu"
    )


def test_mps_only_where_there_is_one(no_gpu, monkeypatch):
    with pytest.raises(ValueError, match="no Apple MPS device"):
        resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")
    assert available_devices() == ["mps", "cpu"]
