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


def test_own_stream_skips_the_pools_streams_that_living_holders_have(monkeypatch):
    """PyTorch's pool hands its streams out in turn and wraps around; `own_stream` never hands out a stream that
    another living holder has, and takes it again once that holder is gone."""
    import gc

    from iamflow_core import devices

    class PoolStream:  # PyTorch's pool, 3 streams a GPU here
        turn = 0

        def __init__(self, device, priority=0):
            self.device = torch.device(device)
            self.cuda_stream = 1000 + PoolStream.turn % 3
            PoolStream.turn += 1

    class Holder:  # a decoder, a worker thread
        pass

    monkeypatch.setattr(torch.cuda, "Stream", PoolStream)
    monkeypatch.setattr(devices, "_STREAMS_PER_POOL", 3)
    monkeypatch.setattr(devices, "_streams_held", [])
    a, b, c = Holder(), Holder(), Holder()
    assert devices.own_stream("cuda:0", a).cuda_stream == 1000
    assert PoolStream("cuda:0").cuda_stream == 1001  # someone else's: the pool moves on
    assert devices.own_stream("cuda:0", None).cuda_stream == 1002  # the process's own, for good
    assert devices.own_stream("cuda:0", b).cuda_stream == 1001  # 1000 and 1002 are held; 1001 is not ours
    assert devices.own_stream("cuda:1", c).cuda_stream == 1002  # another GPU's streams are others
    del a
    gc.collect()
    assert devices.own_stream("cuda:0", c).cuda_stream == 1000  # its holder is gone: free again
    drawn = PoolStream.turn
    shared = devices.own_stream("cuda:0", Holder())  # all three held: after one round of the pool, one is shared
    assert PoolStream.turn == drawn + 3 and shared.cuda_stream in (1000, 1001, 1002)
