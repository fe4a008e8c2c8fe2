"""The generated DeepSpeed config, param groups, LR schedule, context masks, and a one-process run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _launch import TINY_DENSE, TINY_MOE, cli


def _recipe(path=TINY_MOE, overrides=()):
    from sparse_dit.presets import load_recipe

    return load_recipe(path, list(overrides))


def test_ds_config_follows_the_recipe_and_user_json_overrides_it(tmp_path):
    from sparse_dit.parallel import build_ds_config

    cfg = build_ds_config(_recipe(overrides=["train.global_batch_size=8", "train.micro_batch_size=2", "train.grad_clip=0.5"]), world_size=2)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (8, 2, 2)
    assert cfg["gradient_clipping"] == 0.5 and cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["contiguous_gradients"] and cfg["zero_optimization"]["reduce_scatter"]  # MoE needs both
    assert cfg["bf16"]["enabled"] is False  # "auto" is fp32 on CPU
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 2.0}))
    merged = build_ds_config(_recipe(overrides=[f"parallel.deepspeed_config={user}"]), world_size=1)
    assert merged["zero_optimization"] == {**cfg["zero_optimization"], "reduce_bucket_size": 1000}  # merged, not replaced
    assert merged["gradient_clipping"] == 2.0
    assert build_ds_config(_recipe(overrides=["parallel.precision=bf16"]), 1)["bf16"]["enabled"] is True
    assert "activation_checkpointing" in build_ds_config(_recipe(overrides=["train.activation_checkpointing=true"]), 1)


def test_ds_config_errors_name_the_field(tmp_path):
    from sparse_dit.config import ConfigError
    from sparse_dit.parallel import build_ds_config

    with pytest.raises(ConfigError, match=r"train.global_batch_size=8 must be divisible by the number of ranks \(3\)"):
        build_ds_config(_recipe(overrides=["train.global_batch_size=8"]), 3)
    with pytest.raises(ConfigError, match="train.micro_batch_size=3 must divide"):
        build_ds_config(_recipe(overrides=["train.global_batch_size=8", "train.micro_batch_size=3"]), 2)
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="set the stage with parallel.zero_stage"):
        build_ds_config(_recipe(overrides=[f"parallel.deepspeed_config={user}"]), 1)
    with pytest.raises(ConfigError, match="does not exist"):
        build_ds_config(_recipe(overrides=[f"parallel.deepspeed_config={tmp_path / 'nope.json'}"]), 1)


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    from sparse_dit.parallel import lr_at

    assert lr_at(0, 100, 10, 0.1) == pytest.approx(1 / 11)
    assert lr_at(9, 100, 10, 0.1) == pytest.approx(10 / 11)
    assert lr_at(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, 100, 10, 0.1) == pytest.approx(0.1) and lr_at(500, 100, 10, 0.1) == pytest.approx(0.1)


def test_no_weight_decay_on_vectors_and_expert_biases():
    from sparse_dit.dit import SparseDiT
    from sparse_dit.presets import preset_config
    from sparse_dit.parallel import param_groups

    model = SparseDiT(preset_config("debug-E4A2"))
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert "blocks.0.mlp.experts.b1" in no_decay and "blocks.0.mlp.experts.w1" in decay  # [E, F] biases are vectors
    assert all(not n.endswith("bias") for n in decay)
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_context_masks_cover_every_mode_and_leave_a_frame_to_generate():
    from sparse_dit.config import ContextConfig
    from sparse_dit.recipes.batches import context_mask

    g = torch.Generator().manual_seed(0)
    m = context_mask(2000, 6, ContextConfig(mode="random", prob=0.5), g)
    counted = m.sum(1)
    assert ((counted > 0).float().mean() - 0.5).abs() < 0.05  # context.prob
    assert (counted < 6).all()  # something is always generated
    first, last = m[:, 0], m[:, -1]
    assert ((first & ~last).sum() > 0) and ((~first & last).sum() > 0) and ((first & last).sum() > 0)  # predict, extend back, interpolate
    assert ((counted == 1) & first).sum() > 0  # image-to-video (and k = 1 prediction)
    # masks are contiguous prefixes and/or suffixes
    for row in m[counted > 0][:200]:
        idx = row.nonzero().flatten().tolist()
        runs = sum(1 for i, j in zip(idx, idx[1:]) if j != i + 1) + 1
        assert runs <= 2
    assert not context_mask(8, 1, ContextConfig(prob=1.0), g).any()  # images never get context


def test_context_prefix_gives_every_sample_its_first_frames():
    from sparse_dit.config import ContextConfig
    from sparse_dit.recipes.batches import context_mask

    g = torch.Generator().manual_seed(0)
    m = context_mask(5, 8, ContextConfig(mode="prefix", frames=3), g)
    expected = torch.tensor([[True] * 3 + [False] * 5] * 5)
    assert torch.equal(m, expected)
    assert not context_mask(5, 8, ContextConfig(mode="none"), g).any()
    with pytest.raises(ValueError, match="train.context.frames=8 leaves no frame"):
        context_mask(2, 8, ContextConfig(mode="prefix", frames=8), g)


def test_context_task_weights_select_tasks():
    from sparse_dit.config import ContextConfig
    from sparse_dit.recipes.batches import context_mask

    g = torch.Generator().manual_seed(1)
    # backward extension only: every masked sample keeps a suffix and never frame 0
    m = context_mask(500, 6, ContextConfig(prob=1.0, tasks={"extend_backward": 1.0}), g)
    assert m[:, -1].all() and not m[:, 0].any()
    # image-to-video only: exactly frame 0
    m = context_mask(500, 6, ContextConfig(prob=1.0, tasks={"image_to_video": 2.0, "predict": 0.0}), g)
    assert m[:, 0].all() and m.sum() == 500
    # weights 3:1 between prediction and backward extension
    m = context_mask(8000, 6, ContextConfig(prob=1.0, tasks={"predict": 3.0, "extend_backward": 1.0}), g)
    assert abs(m[:, 0].float().mean().item() - 0.75) < 0.02


def test_context_config_errors_name_the_field():
    from sparse_dit.config import ConfigError
    from sparse_dit.presets import load_recipe

    base = {"data": {"num_frames": 8}}
    with pytest.raises(ConfigError, match=r"train.context.mode='first' is not allowed"):
        load_recipe(data={**base, "train": {"context": {"mode": "first"}}})
    with pytest.raises(ConfigError, match=r"unknown key 'train.context.tasks.loop'"):
        load_recipe(data={**base, "train": {"context": {"tasks": {"loop": 1.0}}}})
    with pytest.raises(ConfigError, match=r"train.context.tasks.predict=-1"):
        load_recipe(data={**base, "train": {"context": {"tasks": {"predict": -1}}}})
    with pytest.raises(ConfigError, match=r"every task weight 0"):
        load_recipe(data={**base, "train": {"context": {"tasks": {"predict": 0}}}})
    with pytest.raises(ConfigError, match=r"train.context.frames=8 leaves no frame to generate in data.num_frames=8"):
        load_recipe(data={**base, "train": {"context": {"mode": "prefix", "frames": 8}}})
    with pytest.raises(ConfigError, match=r"unknown key 'train.context_prob'"):
        load_recipe(data={**base, "train": {"context_prob": 0.5}})
    r = load_recipe(data=base, overrides=["train.context.mode=prefix", "train.context.frames=3"])
    assert (r.train.context.mode, r.train.context.frames) == ("prefix", 3)


@pytest.mark.timeout(200)
def test_one_process_cli_run_without_a_launcher(tmp_path):
    proc = cli(["train", TINY_DENSE, "--set", "train.max_steps=3", "train.save_every=2", f"output_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["final_dir"] == str(tmp_path / "final")
    assert "1 rank(s), ZeRO-0" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)  # ZeRO-0 norm computed by the trainer
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == ["step_00000002", "step_00000003"]
    other = cli(["train", TINY_MOE, "--set", "train.max_steps=3", f"output_dir={tmp_path}"])  # reused output_dir
    assert other.returncode == 2 and "holds checkpoints of another recipe (a different model" in other.stderr, other.stderr[-2000:]
    bad = cli(["train", TINY_MOE, "--num-procs", "2", "--set", "parallel.ep_size=3"])
    assert bad.returncode == 2 and "parallel.ep_size=3 does not divide model.moe.num_experts=4" in bad.stderr
