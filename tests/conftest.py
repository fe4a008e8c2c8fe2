"""Shared pytest setup: deterministic torch on 2 CPU threads."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
