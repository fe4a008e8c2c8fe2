"""The trainer end to end on 2 CPU ranks: learning, TensorBoard, checkpoints, resume, NaN stop.

* A reference run goes through the real ``sparse-dit train --num-procs 2`` path (the deepspeed
  launcher): tiny MoE recipe, ZeRO-2, EP=2, 30 steps. Its loss must fall, its TensorBoard file
  must hold the scalars, the expert histogram and a sample GIF, and only the last K
  checkpoints may remain.
* Resume: the same recipe with ``train.stop_after=15``, run twice with the same command; the
  second run resumes from the first's checkpoint and its steps 16..30 must equal the
  reference run's.
* NaN: a one-rank run whose weights are poisoned after step 4 stops at step 5 with a clear
  message, and ``latest`` still names the step-4 checkpoint.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from _launch import TINY_MOE, cli, launch

STEPS = 30
RUN = [f"train.max_steps={STEPS}", "train.save_every=10", "train.keep_last=2", "train.log_every=5", "parallel.ep_size=2", "parallel.zero_stage=2"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    proc = cli(["train", TINY_MOE, "--num-procs", "2", "--set", *RUN, "train.sample_every=30", f"output_dir={out}"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "deepspeed --num_gpus 2" in proc.stdout
    port = re.search(r"--master_port (\d+)", proc.stdout).group(1)
    # DeepSpeed's CPU comm op makes one 66 MiB /dev/shm segment per rank and never unlinks it;
    # init_distributed unlinks them once every rank has mapped its peers'.
    leaked = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert leaked == [], leaked
    return out


@pytest.mark.timeout(320)
def test_zero2_ep2_tiny_moe_loss_falls(reference):
    rows = _rows(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert all(r["moe/dropped_fraction"] == 0.0 for r in rows)  # dropless


@pytest.mark.timeout(320)
def test_tensorboard_has_scalars_histogram_and_sample_gif(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    wanted = ["train/loss", "train/lr", "train/grad_norm", "moe/aux_loss", "moe/z_loss", "moe/max_violation",
              "moe/dropped_fraction", "perf/samples_per_s", "perf/tokens_per_s"]
    assert set(wanted) <= set(tags["scalars"]), sorted(tags["scalars"])
    assert len(acc.Scalars("train/loss")) == STEPS  # every step
    loss_tb = [e.value for e in acc.Scalars("train/loss")]
    assert loss_tb == pytest.approx([r["loss"] for r in _rows(reference)], rel=1e-6)
    for i in range(2):  # per MoE layer (a sum over layers hides a collapse): one bucket per expert, heat maps as images
        hist = acc.Histograms(f"moe/layer{i}/tokens_per_expert")[-1].histogram_value
        assert len(hist.bucket) == 4 and sum(hist.bucket) == hist.num > 0
        assert f"moe/layer{i}/max_violation" in tags["scalars"] and f"moe/layer{i}/router_entropy" in tags["scalars"]
    assert {"moe/load_layer_x_expert", "moe/load_expert_x_timestep_bin"} <= set(tags["images"])
    img = acc.Images("samples/prediction")[-1]
    assert img.encoded_image_string[:4] == b"GIF8" and img.step == STEPS
    assert (reference / "samples" / f"step_{STEPS:08d}.gif").is_file()


@pytest.mark.timeout(320)
def test_checkpoints_keep_last_k_and_final_export(reference):
    ckpt = reference / "checkpoints"
    tags = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
    assert tags == ["step_00000020", "step_00000030"]
    assert (ckpt / "latest").read_text().strip() == "step_00000030"
    assert sorted(p.name for p in (ckpt / "step_00000030").glob("trainer_rank*.pt")) == ["trainer_rank00000.pt", "trainer_rank00001.pt"]
    assert {p.name for p in (reference / "final").iterdir()} >= {"config.json", "model.safetensors"}


@pytest.mark.timeout(420)
def test_rerunning_the_same_command_resumes_exactly(reference, tmp_path):
    args = ["-m", "sparse_dit.recipes.train", TINY_MOE, "--set", *RUN, "train.stop_after=15", f"output_dir={tmp_path}"]
    launch(args, world=2)
    first = _rows(tmp_path)
    assert [r["step"] for r in first] == list(range(1, 16))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000015"
    assert not (tmp_path / "final").exists()  # stopped early: no export yet
    outs = launch(args, world=2)  # the same command again
    assert "resumed from" in outs[0] and "at step 15" in outs[0]
    rows, ref = _rows(tmp_path), _rows(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for mine, theirs in zip(rows, ref):
        for key in ("loss", "mse", "grad_norm", "lr"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), (mine["step"], key)
    assert (tmp_path / "final" / "model.safetensors").is_file()


@pytest.mark.timeout(300)
def test_any_size_batches_from_buckets_on_two_ranks(tmp_path):
    """A physics dataset of 16x16 and 16x24 clips, token budget 1536: 3 or 2 clips per batch."""
    import datasets

    from sparse_dit.data import write_physics_dataset

    for name, width, seed in (("a", 16, 0), ("b", 24, 1)):
        write_physics_dataset(tmp_path / name, "bounce", "id", 12, frames=8, height=16, width=width, seed=seed, progress=False, workers=1)
    datasets.concatenate_datasets([datasets.load_from_disk(tmp_path / n) for n in "ab"]).save_to_disk(tmp_path / "mixed")
    out = tmp_path / "run"
    launch(["-m", "sparse_dit.recipes.train", TINY_MOE, "--set", "train.max_steps=6", "data.source=physics",
            f"data.path={tmp_path / 'mixed'}", "data.token_budget=1536", "data.bucket_resolutions=[16]",
            "data.bucket_frame_counts=[8]", "parallel.ep_size=2", f"output_dir={out}"], world=2)
    rows = _rows(out)
    assert len(rows) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all(r["samples"] in (4, 5, 6) for r in rows)  # 2 ranks x (3 of 8x16x16 or 2 of 8x16x24)
    per_sample = {round(r["tokens_per_s"] / r["samples_per_s"]) for r in rows}
    assert all(512 <= t <= 768 for t in per_sample) and len(per_sample) > 1  # both shapes were trained on


# --------------------------------------------------------------------------------------------
# NaN stop (one rank)
# --------------------------------------------------------------------------------------------


def _nan_worker(out: Path) -> None:
    from sparse_dit.presets import load_recipe
    from sparse_dit.recipes.train import TrainingDiverged, train

    def poison(engine, step, metrics):
        if step + 1 == 5:  # after step 5 (not a save step: the save check would catch it), corrupt the live weights
            with torch.no_grad():
                engine.module.final_layer.linear.weight.fill_(float("nan"))

    recipe = load_recipe(TINY_MOE, ["train.max_steps=10", "train.save_every=2", "train.global_batch_size=2", f"output_dir={out}"])
    try:
        train(recipe, {"after_step": poison})
    except TrainingDiverged as exc:
        (out / "diverged.txt").write_text(str(exc))


@pytest.mark.timeout(200)
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    launch([__file__, "nan", str(tmp_path)], world=1)
    msg = (tmp_path / "diverged.txt").read_text()
    assert "train/loss is nan at step 6" in msg and "step_00000004" in msg
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert not (tmp_path / "checkpoints" / "step_00000006").exists()
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4, 5]
    assert not (tmp_path / "final").exists()


@pytest.mark.timeout(200)
def test_generate_cli_predicts_from_context_frames(reference, tmp_path):
    proc = cli(["generate", str(reference), "--out", str(tmp_path / "pred.gif"), "--context-frames", "2", "--steps", "3"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    import imageio.v3 as iio

    frames = iio.imread(tmp_path / "pred.gif")
    assert frames.shape[0] == 6  # the recipe's 6 frames


if __name__ == "__main__":
    if sys.argv[1] == "nan":
        _nan_worker(Path(sys.argv[2]))
