"""``sparse-dit train-vae`` on the library trainer: a few steps of the debug VAE recipe (every
loss term on: L1, KL, perceptual, hinge GAN from step 2) write a run folder like the DiT's and a
``final/`` that ``CausalVideoVAE.from_pretrained`` loads, with the latent shift/scale measured on
the training clips; a bad VAE recipe is one line and exit 2."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from _launch import REPO, cli
from sparse_dit.recipes.batches import build_dataset, collate
from sparse_dit.recipes.train import add_arguments
from sparse_dit.recipes.train_vae import load_vae_recipe, run
from sparse_dit.vae import CausalVideoVAE
from sparse_dit.vae_losses import VAE_TERMS

DEBUG = REPO / "recipes" / "vae" / "debug.yaml"


def test_train_vae_writes_a_loadable_model_with_measured_latent_stats(tmp_path):
    out = tmp_path / "run"
    proc = cli(["train-vae", str(DEBUG), "--set", f"output_dir={out}", "train.max_steps=3", "train.save_every=3",
                "loss.edge_weight=5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_dir"] == str(out / "final") and summary["checkpoint"] == "step_00000003"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(k in r for k in VAE_TERMS) and r["perceptual"] > 0 and r["d_loss"] > 0 and r["edge"] > 0
        # L1 + KL + perceptual + edge (+ the GAN terms from step 2 = adversarial_start): the logged loss adds up
        want = r["l1"] + 1e-6 * r["kl"] + 0.1 * r["perceptual"] + 5 * r["edge"] + (0.1 * r["g_adv"] + r["d_loss"] if r["step"] > 2 else 0.0)
        assert abs(r["loss"] - want) < 1e-4 * max(1.0, abs(want)), r
    vae = CausalVideoVAE.from_pretrained(out / "final")
    # reference: per-channel mean/std of the raw posterior means over the first stats_videos clips
    recipe = load_vae_recipe(DEBUG, [f"output_dir={out}"])
    ds = build_dataset(recipe)
    videos = collate([ds[i] for i in range(recipe.loss.stats_videos)])["video"]
    with torch.no_grad():
        raw = vae.encode_dist(videos)[0]
    torch.testing.assert_close(vae.latent_shift, raw.mean(dim=(0, 2, 3, 4)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(1 / vae.latent_scale, raw.std(dim=(0, 2, 3, 4), unbiased=False), atol=1e-4, rtol=1e-4)
    assert vae.latent_scale.sub(1).abs().max() > 0.01  # measured, not the identity default
    with torch.no_grad():
        z = vae.encode(videos)
    assert z.mean().abs() < 1e-3 and (z.std(dim=(0, 2, 3, 4), unbiased=False) - 1).abs().max() < 1e-3


def test_bad_vae_recipe_is_one_line(capsys, tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for overrides, message in ((["data.num_frames=4"], "data.num_frames=4 must be 1 + a multiple"),
                               ([f"output_dir={tmp_path}", "train.sample_every=2"], "train.sample_every=2 is a DiT training option")):
        assert run(parser.parse_args([str(DEBUG), "--set", *overrides])) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_init_from_starts_a_vae_run_from_a_saved_vae(tmp_path, capsys):
    """``train.init_from`` in a VAE recipe: the saved VAE's weights, key by key (checked against the
    saved file, not through the loader); a DiT folder or a VAE of another shape is one line."""
    from safetensors.torch import load_file

    from sparse_dit.presets import vae_preset_config
    from sparse_dit.recipes.train_vae import VAE_TASK

    recipe = load_vae_recipe(DEBUG, [f"output_dir={tmp_path / 'run'}"])
    src = CausalVideoVAE(recipe.vae)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0.0, 0.2)
    src.save_pretrained(tmp_path / "init")
    saved = load_file(str(tmp_path / "init" / "model.safetensors"))
    model = VAE_TASK.build_model(recipe)
    assert any(not torch.equal(v, saved[k]) for k, v in model.vae.state_dict().items()), "a fresh VAE already equals the saved one"
    VAE_TASK.init_weights(model, str(tmp_path / "init"))
    own = model.vae.state_dict()
    assert set(own) == set(saved)
    for k, v in saved.items():
        assert torch.equal(own[k], v), k

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    # a finished run folder works too (its final/), and the trainer says what it read
    assert run(parser.parse_args([str(DEBUG), "--set", f"output_dir={tmp_path / 'ft'}", f"train.init_from={tmp_path / 'init'}",
                                  "train.max_steps=1", "train.save_every=1"])) == 0
    assert f"initialised from {tmp_path / 'init'}" in capsys.readouterr().out
    # not a VAE: a DiT's save_pretrained folder
    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (tmp_path / "dit" / "model.safetensors").write_bytes((tmp_path / "init" / "model.safetensors").read_bytes())
    # another shape: the light preset's weights in the debug recipe
    CausalVideoVAE(vae_preset_config("vae-2x4x4-c8")).save_pretrained(tmp_path / "light")
    for folder, message in ((tmp_path / "dit", "does not hold a VAE (config.json kind=None"),
                            (tmp_path / "light", "does not fit: missing ['decoder."),  # the mismatched keys, named
                            (tmp_path / "nothing", "no model.safetensors in it or in its final/")):
        code = run(parser.parse_args([str(DEBUG), "--set", f"output_dir={tmp_path / 'bad'}", f"train.init_from={folder}"]))
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_init_from_grows_the_decoder(tmp_path, capsys):
    """``train.init_from`` with a deeper ``vae.decoder_res_blocks`` (or ``num_res_blocks``) than
    the saved VAE's: the run starts from the saved VAE, grown (the same encode and decode), and says so; growing a VAE of
    another shape is one line naming the field."""
    from sparse_dit.recipes.train_vae import VAE_TASK

    small = load_vae_recipe(DEBUG, [f"output_dir={tmp_path / 'run'}"])
    src = CausalVideoVAE(small.vae).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0.0, 0.2)
    src.save_pretrained(tmp_path / "init")
    recipe = load_vae_recipe(DEBUG, [f"output_dir={tmp_path / 'run'}", "vae.decoder_res_blocks=2"])
    model = VAE_TASK.build_model(recipe)
    VAE_TASK.init_weights(model, str(tmp_path / "init"))
    assert "grew the decoder from 1 to 2 residual blocks per stage" in capsys.readouterr().out
    vae = model.vae.eval()
    assert len(vae.decoder) == len(src.decoder) + 2
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        z = src.encode(x)
        assert torch.equal(vae.encode(x), z) and torch.equal(vae.decode(z), src.decode(z))

    both = VAE_TASK.build_model(load_vae_recipe(DEBUG, [f"output_dir={tmp_path / 'run'}", "vae.num_res_blocks=2"]))
    VAE_TASK.init_weights(both, str(tmp_path / "init"))
    assert "grew the encoder from 1 to 2 and the decoder from 1 to 2 residual blocks per stage" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(both.vae.eval().decode(both.vae.encode(x)), src.decode(z))

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    code = run(parser.parse_args([str(DEBUG), "--set", f"output_dir={tmp_path / 'bad'}", f"train.init_from={tmp_path / 'init'}",
                                  "vae.decoder_res_blocks=2", "vae.latent_channels=3"]))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot grow a VAE with latent_channels=4 into one with latent_channels=3" in err and len(err.splitlines()) == 1, err


def _edge_map_reference(video: np.ndarray) -> np.ndarray:
    """edge_map by loops: forward differences, channel-mean squared magnitude, 3x3 max, / 2."""
    b, c, t, h, w = video.shape
    g = np.zeros((b, 1, t, h, w))
    for i in range(h):
        for j in range(w):
            dx = video[..., i, j + 1] - video[..., i, j] if j + 1 < w else np.zeros((b, c, t))
            dy = video[..., i + 1, j] - video[..., i, j] if i + 1 < h else np.zeros((b, c, t))
            g[:, 0, :, i, j] = np.sqrt((dx ** 2 + dy ** 2).mean(axis=1)) / 2
    out = np.zeros_like(g)
    for i in range(h):
        for j in range(w):
            out[..., i, j] = g[..., max(0, i - 1):i + 2, max(0, j - 1):j + 2].max(axis=(-1, -2))
    return np.minimum(out, 1.0)


def _moment_reference(e: np.ndarray, k: int) -> float:
    """moment_error by loops over every pixel's k x k window (zeros outside the frame)."""
    n, h, w = e.shape
    r = (k - 1) // 2
    total = 0.0
    for img in range(n):
        pad = np.pad(e[img], r)
        for i in range(h):
            for j in range(w):
                win = pad[i:i + k, j:j + k]
                off = np.arange(-r, r + 1) / r
                total += abs(win.mean()) + abs((win * off[None, :]).mean()) + abs((win * off[:, None]).mean())
    return total / (n * h * w)


def test_moment_error_against_loops_and_an_impulse():
    from sparse_dit.schema import ConfigError
    from sparse_dit.vae_losses import VAELossConfig, moment_error

    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 3, 2, 9, 11)).astype(np.float64)
    b = rng.normal(size=a.shape)
    got = float(moment_error(torch.from_numpy(a), torch.from_numpy(b), 5))
    want = _moment_reference((a - b).transpose(0, 1, 2, 3, 4).reshape(-1, 9, 11), 5)
    assert abs(got - want) < 1e-9
    # one pixel of error `amp` far from the borders: every window holding it has m0 = amp / k^2 and
    # |mx| = amp |dx| / (r k^2); summed over the k^2 windows: amp + 2 amp (r + 1) / k
    k, amp = 7, 0.8
    e = torch.zeros(1, 1, 1, 20, 20, dtype=torch.float64)
    e[0, 0, 0, 9, 10] = amp
    r = (k - 1) / 2
    assert abs(float(moment_error(e, torch.zeros_like(e), k)) - (amp + 2 * amp * (r + 1) / k) / 400) < 1e-12
    # a ball drawn 0.3 px to the right: the error has a first moment; the same ball: none
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    def ball(cx):  # 4x4 supersampled disc of radius 3.5
        sub = (np.arange(4) + 0.5) / 4 - 0.5
        cover = sum(((yy + dy - 30.2) ** 2 + (xx + dx - cx) ** 2 <= 3.5 ** 2) for dy in sub for dx in sub) / 16
        return torch.from_numpy(np.broadcast_to(2 * cover - 1, (1, 3, 1, 64, 64)).copy())
    assert float(moment_error(ball(31.3), ball(31.0), 9)) > 1e-4 and float(moment_error(ball(31.0), ball(31.0), 9)) == 0.0
    for bad in (4, 1):
        with pytest.raises((ConfigError, ValueError), match="odd"):
            VAELossConfig(moment_window=bad) if bad > 3 else moment_error(e, e, bad)


def test_moment_term_enters_the_loss_with_its_weight():
    from sparse_dit.vae import VAEConfig
    from sparse_dit.vae_losses import VAELossConfig, VAEObjective, moment_error

    torch.manual_seed(0)
    cfg = VAEConfig(latent_channels=4, base_channels=8, channel_mult=(1, 2), temporal_down=1, num_res_blocks=1)
    x = torch.rand(1, 3, 3, 12, 12) * 2 - 1
    on = VAEObjective(cfg, VAELossConfig(moment_weight=3.0, moment_window=5))
    off = VAEObjective(cfg, VAELossConfig())
    off.load_state_dict(on.state_dict())
    a = on(x, 0, torch.Generator().manual_seed(1))
    b = off(x, 0, torch.Generator().manual_seed(1))
    recon = on.vae(x, torch.Generator().manual_seed(1))[0].detach()
    want = float(moment_error(recon, x, 5))
    assert want > 0 and abs(float(a["moment"]) - want) < 1e-6 * max(1.0, want)
    assert abs(float(a["loss"].detach()) - float(b["loss"].detach()) - 3.0 * want) < 1e-4
    assert float(b["moment"]) == 0.0
    moment_error(on.vae(x, torch.Generator().manual_seed(1))[0], x, 5).backward()  # differentiable into the VAE
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in on.vae.parameters())


def test_edge_weighted_l1_weighs_the_targets_edges():
    from sparse_dit.vae import VAEConfig
    from sparse_dit.vae_losses import VAELossConfig, VAEObjective, edge_map

    # a disc on a flat background (a ball): the map is zero far from it and 1 across a -1 -> 1 step
    yy, xx = np.mgrid[0:12, 0:12]
    disc = np.where((yy - 5.3) ** 2 + (xx - 6.1) ** 2 <= 9.0, 1.0, -1.0)
    video = np.broadcast_to(disc, (2, 3, 3, 12, 12)).astype(np.float32).copy()
    video[1] = np.random.default_rng(0).uniform(-1, 1, size=video[1].shape)  # and noise
    got = edge_map(torch.from_numpy(video)).numpy()
    np.testing.assert_allclose(got, _edge_map_reference(video.astype(np.float64)), atol=1e-6)
    assert got[0, 0, 0, 0, 0] == 0.0 and got[0].max() == 1.0
    assert edge_map(torch.zeros(1, 3, 2, 8, 8)).abs().max() == 0.0  # flat: no edge, no weight

    torch.manual_seed(0)
    cfg = VAEConfig(latent_channels=4, base_channels=8, channel_mult=(1, 2), temporal_down=1, num_res_blocks=1)
    x = torch.from_numpy(video[:1])
    on = VAEObjective(cfg, VAELossConfig(edge_weight=7.0))
    off = VAEObjective(cfg, VAELossConfig())
    off.load_state_dict(on.state_dict())
    a = on(x, 0, torch.Generator().manual_seed(1))
    b = off(x, 0, torch.Generator().manual_seed(1))
    recon = on.vae(x, torch.Generator().manual_seed(1))[0].detach().numpy()
    want = (np.abs(recon - video[:1]) * _edge_map_reference(video[:1].astype(np.float64))).mean()
    assert abs(float(a["edge"]) - want) < 1e-5 * max(1.0, want)
    assert abs(float(a["loss"].detach()) - float(b["loss"].detach()) - 7.0 * want) < 1e-4
    assert float(b["edge"]) == 0.0
