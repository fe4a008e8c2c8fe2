"""The generation API: every task keeps its given frames and fills the rest."""

import numpy as np
import pytest
import torch

from sparse_dit.data.text import HashTextEncoder
from sparse_dit.dit import SparseDiT
from sparse_dit.pipeline import VideoPipeline
from sparse_dit.presets import preset_config


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    model = SparseDiT(preset_config("debug"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-trivial (random) velocity field
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return VideoPipeline(model, text_encoder=HashTextEncoder(dim=32))


def _video(T, seed=0):
    return torch.rand(2, 3, T, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_text_to_video_and_image(pipe):
    g = torch.Generator().manual_seed(0)
    v = pipe("a red ball falls", height=8, width=8, num_frames=4, num_inference_steps=3, generator=g, batch_size=2)
    assert v.shape == (2, 3, 4, 8, 8) and v.abs().max() <= 1
    img = pipe("a red ball", height=8, width=12, num_frames=1, num_inference_steps=3, output_type="np")
    assert img.shape == (1, 1, 8, 12, 3) and img.dtype == np.uint8
    with pytest.raises(ValueError, match="no text_encoder"):
        VideoPipeline(pipe.model)("x", height=8, width=8, num_frames=1)


def test_image_to_video_keeps_first_frame(pipe):
    image = _video(1)[:, :, 0]
    out = pipe.image_to_video(image, num_frames=5, num_inference_steps=3, prompt="a ball")
    assert out.shape == (2, 3, 5, 8, 8)
    torch.testing.assert_close(out[:, :, 0], image)


def test_extend_forward_and_backward(pipe):
    v = _video(3)
    fwd = pipe.extend(v, 2, "forward", num_inference_steps=3)
    bwd = pipe.extend(v, 2, "backward", num_inference_steps=3)
    assert fwd.shape[2] == bwd.shape[2] == 5
    torch.testing.assert_close(fwd[:, :, :3], v)
    torch.testing.assert_close(bwd[:, :, 2:], v)
    assert not torch.allclose(fwd[:, :, 3:], torch.zeros_like(fwd[:, :, 3:]))


def test_interpolate_and_loop(pipe):
    a, b = _video(2, 0), _video(2, 1)
    out = pipe.interpolate(a, b, 3, num_inference_steps=3)
    assert out.shape[2] == 7
    torch.testing.assert_close(out[:, :, :2], a)
    torch.testing.assert_close(out[:, :, 5:], b)
    v = _video(4)
    looped = pipe.loop(v, 2, context_frames=1, num_inference_steps=3)
    assert looped.shape[2] == 6
    torch.testing.assert_close(looped[:, :, :4], v)


def test_sdedit_strength(pipe):
    v = _video(2)
    torch.testing.assert_close(pipe.sdedit(v, 0.0), v)
    diffs = []
    for s in (0.1, 0.5, 1.0):
        out = pipe.sdedit(v, s, num_inference_steps=10, generator=torch.Generator().manual_seed(0))
        diffs.append((out - v).abs().mean().item())
    assert diffs[0] < diffs[1] < diffs[2]
    with pytest.raises(ValueError, match="strength"):
        pipe.sdedit(v, 1.5)
