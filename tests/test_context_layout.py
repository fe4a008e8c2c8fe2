"""Context frames under a causal VAE (issue 12): every generation mode gives its given frames back
as the VAE reconstructs them in their place, wherever the clip sits.

The VAE is untrained but fixed (seeded); the DiT is tiny and freshly initialised, so it predicts
exactly zero velocity (adaLN-Zero) and the sampler leaves the initial latents where nothing is
held: the test checks the layout, not quality. For each mode the pixel layout (given frames in
place, free frames holding the nearest given frame) is written out by hand here, and

* the returned latents are the layout's encoding on the held groups and the initial noise
  elsewhere (which frames are held is listed by hand), and
* started from the layout's encoding, the decoded output equals the VAE's own reconstruction of
  the layout on every given frame (to float error).
"""

from __future__ import annotations

import pytest
import torch

from sparse_dit.config import ModelConfig
from sparse_dit.context_layout import frame_groups, place_clips
from sparse_dit.dit import SparseDiT
from sparse_dit.pipeline import VideoPipeline
from sparse_dit.vae import CausalVideoVAE, VAEConfig

FT = 4


@pytest.fixture(scope="module")
def pipe() -> VideoPipeline:
    torch.manual_seed(0)
    vae = CausalVideoVAE(VAEConfig(latent_channels=4, base_channels=8, channel_mult=(1, 1, 1), temporal_down=2)).eval()
    vae.set_latent_stats(torch.full((4,), 0.1), torch.full((4,), 2.0))
    model = SparseDiT(ModelConfig(in_channels=4, patch_size=(1, 1, 1), hidden_size=32, depth=2, num_heads=2, text_dim=0))
    return VideoPipeline(model, vae=vae, num_inference_steps=2)


def _video(T: int, seed: int) -> torch.Tensor:
    return torch.rand(1, 3, T, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _hold(clip: torch.Tensor, frame: int, n: int) -> torch.Tensor:
    return clip[:, :, frame : frame + 1].expand(-1, -1, n, -1, -1)


def _enc(pipe: VideoPipeline, video: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pipe.vae.encode(video)


def _rec(pipe: VideoPipeline, video: torch.Tensor) -> torch.Tensor:
    """The VAE's own reconstruction of a pixel video."""
    with torch.no_grad():
        return pipe.vae.decode(pipe.vae.encode(video)).clamp(-1, 1)


img, v5, v8, a5, b4 = _video(1, 1), _video(5, 2), _video(8, 3), _video(5, 4), _video(4, 5)

# mode -> (inputs, the pixel layout by hand, held latent frames, given pixel frames)
CASES = {
    "image_to_video": (dict(image=img[:, :, 0], num_frames=9), torch.cat([img, _hold(img, 0, 8)], 2), [0], range(0, 1)),
    "extend_forward": (dict(video=v5, num_new_frames=4), torch.cat([v5, _hold(v5, 4, 4)], 2), [0, 1], range(0, 5)),
    "extend_backward": (dict(video=v8, num_new_frames=5), torch.cat([_hold(v8, 0, 5), v8], 2), [2, 3], range(5, 13)),
    # frames 5, 6 are nearer a (frame 4); 7, 8 nearer b (frame 9)
    "interpolate": (dict(start=a5, end=b4, num_frames_between=4), torch.cat([a5, _hold(a5, 4, 2), _hold(b4, 0, 2), b4], 2),
                    [0, 1, 3], [*range(0, 5), *range(9, 13)]),
}


@pytest.mark.parametrize("mode", list(CASES))
def test_held_latents_are_the_encoding_of_the_layout(pipe, mode) -> None:
    inputs, layout, held, _ = CASES[mode]
    z = _enc(pipe, layout)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(9))
    out = pipe.generate(mode, latents=noise, output_type="latent", **inputs)
    free = [j for j in range(z.shape[2]) if j not in held]
    torch.testing.assert_close(out[:, :, held], z[:, :, held], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, :, free], noise[:, :, free], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", list(CASES))
def test_given_frames_come_back_as_the_vae_reconstructs_them(pipe, mode) -> None:
    inputs, layout, _, given = CASES[mode]
    out = pipe.generate(mode, latents=_enc(pipe, layout), **inputs)
    assert out.shape[2] == layout.shape[2]
    torch.testing.assert_close(out[:, :, list(given)], _rec(pipe, layout)[:, :, list(given)], atol=1e-5, rtol=0)


def test_loop_returns_the_video_as_reconstructed_then_the_transition(pipe) -> None:
    v9 = _video(9, 6)
    layout = torch.cat([v9[:, :, -5:], _hold(v9, 8, 3), _hold(v9, 0, 4), v9[:, :, :5]], 2)  # [v_end, 7 free, v_start]
    with pytest.warns(UserWarning, match=r"given frames \[12\]"):  # v_start's first frame shares group [9..12]
        out = pipe.generate("loop", video=v9, num_transition_frames=7, context_frames=5, latents=_enc(pipe, layout))
    assert out.shape[2] == 9 + 7
    torch.testing.assert_close(out[:, :, :9], _rec(pipe, v9), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, :, 9:], _rec(pipe, layout)[:, :, 5:12], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="output_type='latent' is not available"):
        pipe.generate("loop", video=v9, num_transition_frames=7, context_frames=5, output_type="latent")


def test_frame_groups_follow_the_causal_grouping() -> None:
    assert [list(g) for g in frame_groups(9, 4)] == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert [list(g) for g in frame_groups(3, 1)] == [[0], [1], [2]]
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        frame_groups(8, 4)


def test_partial_groups_are_named_and_bad_lengths_are_one_line(pipe) -> None:
    v9 = _video(9, 7)
    with pytest.warns(UserWarning, match=r"given frames \[4\] share a latent group"):
        out = pipe.generate("extend_backward", video=v9, num_new_frames=4, output_type="latent")  # v9[0] in group [1..4]
    layout = torch.cat([_hold(v9, 0, 4), v9], dim=2)
    torch.testing.assert_close(out[:, :, 2:], _enc(pipe, layout)[:, :, 2:], atol=1e-6, rtol=0)  # the rest is held
    with pytest.raises(ValueError, match=r"has 8 frames \(video 5 \+ num_new_frames=3\).*1 \+ 4k frames: change the counts by -3 or \+1"):
        pipe.generate("extend_forward", video=_video(5, 0), num_new_frames=3)
    lay = place_clips([3, torch.zeros(1, 3, 6, 8, 8)], pipe.vae.encode, FT)
    assert lay.mask.tolist() == [[False, False, True]] and lay.partial == (3, 4)
