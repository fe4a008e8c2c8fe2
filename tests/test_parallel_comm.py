"""parallel.comm.all_reduce_: host tensors reduce in place under gloo, and under NCCL (which
rejects CPU tensors) through a device copy that is written back."""

from __future__ import annotations

import torch
import torch.distributed as dist

from sparse_dit.parallel import comm


class _Acc:
    def current_device_name(self) -> str:
        return "cpu"  # no GPU here: the round trip still goes through a separate tensor


def _fake_group(monkeypatch, backend: str, seen: list) -> None:
    def fake_all_reduce(t, op=None, group=None):
        seen.append(t)
        if backend == "nccl" and t.device.type == "cpu" and t is ORIG[0]:
            raise RuntimeError("No backend type associated with device type cpu")  # what NCCL says
        t.mul_(2)  # a 2-rank SUM of equal values

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(comm, "get_accelerator", lambda: _Acc())


ORIG: list = []


def test_gloo_reduces_the_host_tensor_in_place(monkeypatch):
    seen: list = []
    _fake_group(monkeypatch, "gloo", seen)
    t = torch.tensor([1.0, 3.0], dtype=torch.float64)
    ORIG[:] = [t]
    assert comm.all_reduce_(t) is t and t.tolist() == [2.0, 6.0] and seen[0] is t


def test_nccl_reduces_a_device_copy_and_writes_it_back(monkeypatch):
    seen: list = []
    _fake_group(monkeypatch, "nccl", seen)
    t = torch.tensor([1.0, 3.0], dtype=torch.float64)
    ORIG[:] = [t]
    assert comm.all_reduce_(t) is t and t.tolist() == [2.0, 6.0]
    assert seen[0] is not t  # the collective never saw the host tensor itself


def test_no_process_group_is_a_no_op(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    t = torch.ones(3)
    assert comm.all_reduce_(t).tolist() == [1.0, 1.0, 1.0]
