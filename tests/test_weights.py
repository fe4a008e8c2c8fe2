"""sparse_dit.weights: the one key/shape check of from_pretrained (DiT, VAE) and train.init_from."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparse_dit.weights import state_mismatch


def test_state_mismatch_names_keys_then_shapes():
    own = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert state_mismatch(own, {"a": torch.ones(2, 3), "b": torch.ones(4)}) is None
    assert state_mismatch(own, {"a": torch.ones(2, 3)}) == "does not fit: missing ['b'], unexpected []"
    assert state_mismatch(own, {**own, "c": torch.ones(1)}) == "does not fit: missing [], unexpected ['c']"
    assert state_mismatch(own, {"a": torch.ones(3, 2), "b": torch.ones(4)}, "needs") == "a has shape (3, 2), needs (2, 3)"


def test_init_from_refuses_weights_of_another_shape_in_one_line(tmp_path):
    from safetensors.torch import save_file

    from sparse_dit.config import ConfigError
    from sparse_dit.recipes.init_from import load_init_weights

    save_file({"weight": torch.ones(3, 2), "bias": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"train.init_from=.*: weight has shape \(3, 2\), the recipe's model expects \(2, 2\)"):
        load_init_weights(nn.Linear(2, 2), tmp_path)
