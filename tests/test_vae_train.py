"""``sparse-dit train-vae`` on the library trainer: a few steps of the debug VAE recipe (every
loss term on: L1, KL, perceptual, hinge GAN from step 2) write a run folder like the DiT's and a
``final/`` that ``CausalVideoVAE.from_pretrained`` loads, with the latent shift/scale measured on
the training clips; a bad VAE recipe is one line and exit 2."""

from __future__ import annotations

import argparse
import json

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
    proc = cli(["train-vae", str(DEBUG), "--set", f"output_dir={out}", "train.max_steps=3", "train.save_every=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_dir"] == str(out / "final") and summary["checkpoint"] == "step_00000003"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(k in r for k in VAE_TERMS) and r["perceptual"] > 0 and r["d_loss"] > 0
        # L1 + KL + perceptual (+ the GAN terms from step 2 = adversarial_start): the logged loss adds up
        want = r["l1"] + 1e-6 * r["kl"] + 0.1 * r["perceptual"] + (0.1 * r["g_adv"] + r["d_loss"] if r["step"] > 2 else 0.0)
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
