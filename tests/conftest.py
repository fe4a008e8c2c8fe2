"""Shared pytest setup: deterministic torch on 2 CPU threads."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads
# stalled the MoE tests 20x (see benchmarks/moe_layer.py). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from 2 threads, and on a loaded machine OpenMP's spinning
    threads stall every parallel region (docs/moe.md): the MoE unit tests run single-threaded
    (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
