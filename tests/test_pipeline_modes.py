"""Generation modes are one table (sparse_dit/pipeline.py GENERATION_MODES): every mode runs by
name through ``VideoPipeline.generate`` and equals the sampler called on a context layout
written out by hand here (issue 10)."""

from __future__ import annotations

import pytest
import torch

from sparse_dit.config import ModelConfig
from sparse_dit.diffusion import sample
from sparse_dit.dit import SparseDiT
from sparse_dit.pipeline import GENERATION_MODES, VideoPipeline

STEPS = 3


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    model = SparseDiT(ModelConfig(in_channels=3, patch_size=(1, 2, 2), hidden_size=32, depth=2, num_heads=2, text_dim=0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-trivial (random) velocity field
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return VideoPipeline(model)


def _video(T, seed=0):
    return torch.rand(2, 3, T, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _gen():
    return torch.Generator().manual_seed(7)


def _given(frames, T):
    """(B, T) mask with the listed frames given."""
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[:, frames] = True
    return mask


def _ref(pipe, shape, context=None, mask=None, **kw):
    with torch.no_grad():
        return sample(pipe.model, shape, {}, num_inference_steps=STEPS, generator=_gen(), context=context, context_mask=mask, **kw)


def _zeros(T):
    return torch.zeros(2, 3, T, 8, 8)


a, b, v3, v4 = _video(2, 0), _video(2, 1), _video(3, 2), _video(4, 3)

# mode -> (inputs, reference: the sampler on a hand-written layout)
CASES = {
    "text_to_video": (dict(height=8, width=8, num_frames=4, batch_size=2),
                      lambda p: _ref(p, (2, 3, 4, 8, 8))),
    "image": (dict(height=8, width=12, batch_size=2),
              lambda p: _ref(p, (2, 3, 1, 8, 12))),
    "image_to_video": (dict(image=a[:, :, 0], num_frames=4),
                       lambda p: _ref(p, (2, 3, 4, 8, 8), torch.cat([a[:, :, :1], _zeros(3)], 2), _given([0], 4))),
    "extend_forward": (dict(video=v3, num_new_frames=2),
                       lambda p: _ref(p, (2, 3, 5, 8, 8), torch.cat([v3, _zeros(2)], 2), _given([0, 1, 2], 5))),
    "extend_backward": (dict(video=v3, num_new_frames=2),
                        lambda p: _ref(p, (2, 3, 5, 8, 8), torch.cat([_zeros(2), v3], 2), _given([2, 3, 4], 5))),
    "interpolate": (dict(start=a, end=b, num_frames_between=3),
                    lambda p: _ref(p, (2, 3, 7, 8, 8), torch.cat([a, _zeros(3), b], 2), _given([0, 1, 5, 6], 7))),
    # loop with k = 1: [v[-1], _, _, v[0]] sampled, then the video + the 2 transition frames
    "loop": (dict(video=v4, num_transition_frames=2, context_frames=1),
             lambda p: torch.cat([v4, _ref(p, (2, 3, 4, 8, 8), torch.cat([v4[:, :, 3:], _zeros(2), v4[:, :, :1]], 2),
                                           _given([0, 3], 4))[:, :, 1:3]], 2)),
    "sdedit": (dict(video=v3, strength=0.5),
               lambda p: _ref(p, (2, 3, 3, 8, 8), init_latents=v3, strength=0.5)),
}


def test_every_mode_has_a_reference() -> None:
    assert set(CASES) == set(GENERATION_MODES)
    for name, mode in GENERATION_MODES.items():
        assert mode.name == name and mode.description
        assert set(CASES[name][0]) <= set(mode.inputs)


@pytest.mark.parametrize("mode", list(GENERATION_MODES))
def test_mode_through_the_table_equals_the_hand_written_layout(pipe, mode) -> None:
    inputs, reference = CASES[mode]
    out = pipe.generate(mode, num_inference_steps=STEPS, generator=_gen(), output_type="latent", **inputs)
    torch.testing.assert_close(out, reference(pipe), rtol=0, atol=0)


def test_generate_names_bad_modes_and_inputs(pipe) -> None:
    with pytest.raises(ValueError, match="allowed: .*'sdedit'"):
        pipe.generate("outpaint")
    with pytest.raises(ValueError, match="takes inputs"):
        pipe.generate("extend_forward", video=v3, num_new_frames=2, direction="forward")
    torch.testing.assert_close(pipe.generate("sdedit", video=v3, strength=0.0), v3)  # strength 0: the input
