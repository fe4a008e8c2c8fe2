"""The DiT in latent space (issue 12): the recipe's ``autoencoder``, cached latents
(``sparse-dit data encode``), training on both through the library trainer, and loading the
run's autoencoder with ``VideoPipeline.from_pretrained``.

A tiny seeded VAE (untrained: the checks are about plumbing, shapes and identities) and a tiny
physics dataset; references are computed here with the VAE directly.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch

from sparse_dit.autoencoder import autoencoder_id, load_autoencoder
from sparse_dit.config import ConfigError
from sparse_dit.data.hf import write_physics_dataset
from sparse_dit.data.latents import LatentDataset
from sparse_dit import flops_cli
from sparse_dit.evals import cli as eval_cli
from sparse_dit.evals.compare import evaluate_run, load_run, load_split
from sparse_dit.evals.splits import training_data
from sparse_dit.pipeline import VideoPipeline
from sparse_dit.presets import load_recipe
from sparse_dit.recipes.generate import GenerateError, generate_videos
from sparse_dit.recipes.train import train
from sparse_dit.vae import CausalVideoVAE, VAEConfig, vae_macs

VAE = VAEConfig(latent_channels=4, base_channels=8, channel_mult=(1, 2), temporal_down=1)  # 2x temporal, 2x2 spatial


def _vae(path, seed: int):
    torch.manual_seed(seed)
    vae = CausalVideoVAE(VAE)
    vae.set_latent_stats(torch.full((4,), 0.05 * seed), torch.full((4,), 1.5))
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    data = root / "physics"
    write_physics_dataset(data, "uniform", "id", 4, 5, 16, 16, seed=0, workers=1, progress=False)
    w = {"root": root, "data": data, "vae": _vae(root / "vae", 1), "other": _vae(root / "other", 2)}
    w["live"] = train(_recipe(w, root / "run-live"))  # 2 steps, the videos encoded on the fly
    return w


def _recipe(world, out, **over):
    base = {"preset": "debug", "model": {"in_channels": 4, "patch_size": [1, 2, 2], "text_dim": 0, "cross_attention": False},
            "data": {"source": "physics", "path": str(world["data"]), "num_frames": 5, "height": 16, "width": 16},
            "train": {"max_steps": 2, "global_batch_size": 2, "save_every": 2, "log_every": 1, "warmup_steps": 0},
            "autoencoder": str(world["vae"]), "output_dir": str(out)}
    for k, v in over.items():
        sec, _, key = k.partition(".")
        if key:
            base[sec] = {**base[sec], key: v}
        else:
            base[sec] = v
    return load_recipe(data=base)


def test_recipe_names_a_missing_or_wrong_autoencoder_in_one_line(world, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"autoencoder='/no/such': no such folder; allowed: 'identity' or a VAE folder"):
        _recipe(world, tmp_path, autoencoder="/no/such")
    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "config.json").write_text(json.dumps({"kind": "sparse_dit"}))
    (tmp_path / "dit" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"is not a VAE folder \(config.json kind='sparse_dit'"):
        _recipe(world, tmp_path, autoencoder=str(tmp_path / "dit"))
    with pytest.raises(ConfigError, match=r"model.in_channels=3 does not fit autoencoder=.*latent_channels=4; set model.in_channels=4"):
        _recipe(world, tmp_path, model={"in_channels": 3, "patch_size": [1, 2, 2], "text_dim": 0, "cross_attention": False})
    with pytest.raises(ConfigError, match=r"data.num_frames=4 does not fit autoencoder=.*1 \+ 2k frames"):
        _recipe(world, tmp_path, **{"data.num_frames": 4})


def test_encode_cache_train_and_load_through_the_vae(world) -> None:
    root = world["root"]
    cache = root / "latents"
    cmd = [sys.executable, "-m", "sparse_dit.cli", "data", "encode", str(world["data"]), "--vae", str(world["vae"]), "--out", str(cache),
           "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "wrote 4 latent clips (c, t, h, w) = (4, 3, 8, 8)" in res.stdout
    # the cached latents are the VAE's encoding of the stored videos (decoded here from the npz bytes)
    row = datasets.load_from_disk(str(world["data"]))[2]
    frames = np.load(io.BytesIO(row["video"]))["video"]
    video = torch.from_numpy(frames).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
    vae = load_autoencoder(str(world["vae"]))
    with torch.no_grad():
        ref = vae.encode(video)[0]
    ds = LatentDataset(cache)
    assert len(ds) == 4 and ds.vae_id == autoencoder_id(vae)
    torch.testing.assert_close(ds[2]["latents"], ref, atol=1e-5, rtol=0)

    # train on the cached latents, then on the videos encoded on the fly: the same model inputs
    a = train(_recipe(world, root / "run-cached", **{"data.source": "latents", "data.path": str(cache)}))
    b = world["live"]
    assert a["steps"] == b["steps"] == 2
    assert training_data(load_recipe(root / "run-cached" / "recipe.yaml"))["kind"] == "physics world"  # what the cache encodes
    assert a["first_loss"] == pytest.approx(b["first_loss"], rel=1e-4)

    # latents of another VAE: one line
    with pytest.raises(ConfigError, match=r"is not the VAE the cached latents were encoded with"):
        train(_recipe(world, root / "run-bad", autoencoder=str(world["other"]), **{"data.source": "latents", "data.path": str(cache)}))

    # the run's autoencoder comes with the pipeline; samples are decoded pixels
    pipe = VideoPipeline.from_pretrained(root / "run-live", num_inference_steps=2)
    assert isinstance(pipe.vae, CausalVideoVAE) and autoencoder_id(pipe.vae) == autoencoder_id(vae)
    out = pipe(height=16, width=16, num_frames=5)
    assert out.shape == (1, 3, 5, 16, 16)


def test_evaluation_decodes_through_the_run_autoencoder(world) -> None:
    run = load_run(world["root"] / "run-live")
    assert isinstance(run.autoencoder, CausalVideoVAE)
    split = load_split("id", world["data"])
    m, videos = evaluate_run(run, [split], context_frames=3, num_inference_steps=2, latency_repeats=0, batch_size=4,
                             metrics=["heldout_loss", "physics"], log=lambda s: None)
    assert videos["id"].shape == split.videos.shape  # decoded pixels, the split's shape
    assert np.array_equal(videos["id"][:, :3], split.videos[:, :3])
    # the DiT's cost on the (4, 3, 8, 8) latent; the VAE's encode/decode reported apart
    assert m["tokens"] == 3 * 4 * 4
    ref = vae_macs(VAE, 5, 16, 16)
    assert m["vae_encode_gmacs"] == ref["encode"] / 1e9 and m["vae_decode_gmacs"] == ref["decode"] / 1e9
    assert np.isfinite(m["val_loss"])


def test_flops_lists_the_autoencoder_apart(world, capsys) -> None:
    recipe = world["root"] / "recipe.yaml"
    recipe.write_text((world["root"] / "run-live" / "recipe.yaml").read_text())
    parser = argparse.ArgumentParser()
    flops_cli.add_arguments(parser)
    assert flops_cli.run(parser.parse_args([str(recipe), "--video", "5,16,16", "--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    ref = vae_macs(VAE, 5, 16, 16)
    assert out["latent"] == [4, 3, 8, 8] and out["autoencoder"]["encode_gmacs"] == ref["encode"] / 1e9


def test_generate_cli_decodes_through_the_run_autoencoder(world) -> None:
    res = generate_videos(world["root"] / "run-live", mode="extend", context_frames=3, new_frames=2, num_samples=1, steps=2)
    assert res.videos.shape == (1, 3, 5, 16, 16) and res.reference is not None  # held-out clip continued, decoded
    with pytest.raises(GenerateError, match=r"--height=10 is not allowed; .*multiple of 4"):
        generate_videos(world["root"] / "run-live", mode="text", height=10, num_samples=1, steps=2)


def test_eval_loss_cli_measures_on_the_encoded_latents(world, capsys) -> None:
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    args = parser.parse_args(["loss", str(world["root"] / "run-live"), "--data", f"id={world['data']}", "--context-frames", "3",
                              "--num-t", "2", "--json"])
    assert eval_cli.run(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.isfinite(next(iter(out.values()))["id"]["loss"])


def test_buckets_under_a_vae_are_refused_in_one_line(world, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"data.token_budget=256 with autoencoder=.* is not supported"):
        _recipe(world, tmp_path, **{"data.token_budget": 256})


def test_encode_with_refinement_records_it_and_refuses_bad_settings(world, tmp_path, capsys) -> None:
    """``data encode --refine-steps N``: the cached latents are the VAE's refined encoding of the
    stored videos (CausalVideoVAE.encode with refine_steps, computed here clip by clip) and the
    dataset records the setting; bad settings are one line."""
    from sparse_dit.cli import main as cli_main

    cache = tmp_path / "refined"
    assert cli_main(["data", "encode", str(world["data"]), "--vae", str(world["vae"]), "--out", str(cache), "--no-progress",
                     "--refine-steps", "2", "--refine-lr", "0.02"]) == 0
    capsys.readouterr()
    row = datasets.load_from_disk(str(world["data"]))[1]
    video = torch.from_numpy(np.load(io.BytesIO(row["video"]))["video"]).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
    vae = load_autoencoder(str(world["vae"]))
    with torch.no_grad():
        plain, ref = vae.encode(video)[0], vae.encode(video, refine_steps=2, refine_lr=0.02)[0]
    ds = LatentDataset(cache)
    assert ds.meta["refine_steps"] == 2 and ds.meta["refine_lr"] == 0.02
    torch.testing.assert_close(ds[1]["latents"], ref, atol=1e-4, rtol=0)
    assert (ds[1]["latents"] - plain).abs().max() > 1e-3
    for argv, words in ((["--refine-steps", "-1"], "--refine-steps=-1 must be >= 0"), (["--refine-steps", "2", "--refine-lr", "0"], "--refine-lr=0.0 must be > 0")):
        assert cli_main(["data", "encode", str(world["data"]), "--vae", str(world["vae"]), "--out", str(tmp_path / "bad"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and words in err, err
