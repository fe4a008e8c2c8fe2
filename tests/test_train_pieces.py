"""The trainer's pieces on their own (build, one step, logging, checkpointing, finish), the
quickstart's recipe files, and the bf16-autocast precision the quickstart trains in.

The pieces run in one rank started as the deepspeed launcher would (``_launch.launch``), in
a worker at the bottom of this file; the test reads what the worker recorded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from _launch import REPO, TINY_DENSE, TINY_MOE, cli, launch

QS_DENSE = REPO / "recipes" / "quickstart" / "dense.yaml"
QS_MOE = REPO / "recipes" / "quickstart" / "moe.yaml"


# --------------------------------------------------------------------------------------------
# The quickstart's recipe files
# --------------------------------------------------------------------------------------------


def test_quickstart_moe_recipe_is_the_compute_matched_twin_of_the_dense_one():
    from sparse_dit.flops import count, match_compute
    from sparse_dit.presets import load_recipe
    from sparse_dit.schema import to_dict

    dense, moe = load_recipe(QS_DENSE), load_recipe(QS_MOE)
    assert not dense.model.moe.enabled and moe.model.moe.enabled
    matched = match_compute(dense.model, num_experts=4, top_k=1)
    want = to_dict(matched)
    want["moe"]["expert_precision"] = "fp32"  # the one setting the matcher does not choose
    assert to_dict(moe.model) == want
    # same active MACs per sample within 1 % (the router's extra), same everything else
    shape = (3, dense.data.num_frames, dense.data.height, dense.data.width)
    assert count(moe.model, shape)["macs"] == pytest.approx(count(dense.model, shape)["macs"], rel=0.01)
    d, m = to_dict(dense), to_dict(moe)
    for section in ("diffusion", "train", "data", "parallel"):
        assert d[section] == m[section], section
    assert d["output_dir"] != m["output_dir"]
    # the world-model task: every sample continues its first 3 frames
    assert (dense.train.context.mode, dense.train.context.frames) == ("prefix", 3)
    assert dense.parallel.precision == "bf16-autocast"


def test_quickstart_recipes_follow_budget_and_folder(tmp_path):
    from sparse_dit.presets import load_recipe
    from sparse_dit.recipes.quickstart import quickstart_recipes

    full = quickstart_recipes(tmp_path, budget=1.0, seed=3)
    base = load_recipe(QS_DENSE)
    assert full["dense"].train.max_steps == base.train.max_steps and full["dense"].train.seed == 3
    assert full["sparse"].output_dir == str(tmp_path / "runs" / "sparse")
    assert full["dense"].data.path == str(tmp_path / "data" / "train")
    smoke = quickstart_recipes(tmp_path, budget=0.01)
    assert smoke["dense"].train.max_steps == 20 and smoke["dense"].train.warmup_steps == 5
    assert smoke["dense"].train.save_every == 20 and smoke["dense"].diffusion.num_inference_steps == 4


# --------------------------------------------------------------------------------------------
# Precision: bf16-autocast
# --------------------------------------------------------------------------------------------


def test_bf16_autocast_precision_turns_on_deepspeeds_torch_autocast_only():
    from sparse_dit.parallel.engine import build_ds_config
    from sparse_dit.presets import load_recipe

    cfg = build_ds_config(load_recipe(TINY_MOE, ["parallel.precision=bf16-autocast"]), 1)
    # gradients are all-reduced in fp32 (DeepSpeed would reduce nn.Linear gradients in bf16)
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]  # fp32 weights and optimizer
    cfg = build_ds_config(load_recipe(TINY_MOE, ["parallel.precision=bf16"]), 1)
    assert not cfg["torch_autocast"]["enabled"] and cfg["bf16"]["enabled"]


def test_expert_precision_fp32_keeps_the_experts_out_of_autocast():
    from sparse_dit.moe import MoEFeedForward

    torch.manual_seed(0)
    x = torch.randn(2, 24, 32)
    layer = MoEFeedForward(32, 64, 4, 1, expert_precision="fp32")
    plain, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32_experts, _ = layer(x)
        layer.expert_precision = "auto"
        bf16_experts, _ = layer(x)
    assert fp32_experts.dtype == torch.float32 and torch.equal(fp32_experts, plain)  # exactly the fp32 layer
    assert bf16_experts.dtype == torch.bfloat16 and not torch.equal(bf16_experts.float(), plain)
    assert torch.allclose(bf16_experts.float(), plain, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="expert_precision='fp16' is not allowed"):
        MoEFeedForward(32, 64, 4, 1, expert_precision="fp16")


# --------------------------------------------------------------------------------------------
# The trainer's pieces, one rank
# --------------------------------------------------------------------------------------------


def _pieces_worker(out: Path) -> None:
    from sparse_dit.presets import load_recipe
    from sparse_dit.recipes.train import build_run, finish, log_step, maybe_save, train_step

    torch.set_num_threads(1)
    recipe = load_recipe(TINY_MOE, ["train.max_steps=4", "train.save_every=2", "train.log_every=2", "train.global_batch_size=4",
                                    "parallel.precision=bf16-autocast", "train.context.mode=prefix", "train.context.frames=2",
                                    f"output_dir={out}"])
    rec: dict = {}
    run = build_run(recipe)
    rec["built"] = {"start_step": run.start_step, "end_step": run.end_step, "accum": run.accum, "dtype": str(run.dtype),
                    "recipe_yaml": (out / "recipe.yaml").is_file(), "autocast": bool(run.engine.torch_autocast_enabled()),
                    "comm_dtypes": sorted({str(getattr(p, "comm_dtype", p.dtype)) for p in run.model.parameters()})}
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    batches = run.source.loader(0, run.end_step, 0)
    res = train_step(run, 0, batches)
    rec["step0"] = {k: res.metrics[k] for k in ("step", "loss", "lr", "grad_norm", "samples")}
    rec["step0"]["layers_x_experts"] = list(res.tokens_per_expert.shape)
    rec["step0"]["changed"] = sum(not torch.equal(before[n], p) for n, p in run.model.named_parameters())
    rec["step0"]["params"] = len(before)
    rec["step0"]["master_dtype"] = str(next(run.model.parameters()).dtype)
    log_step(run, res)
    rec["save_after_step0"] = maybe_save(run, 0)  # step 1: not a save step
    res = train_step(run, 1, batches)
    log_step(run, res)
    rec["save_after_step1"] = maybe_save(run, 1)  # step 2: save_every
    rec["summary"] = finish(run)  # stopped early: no final export
    (out / "pieces.json").write_text(json.dumps(rec, default=str))


@pytest.mark.timeout(200)
def test_trainer_pieces_build_step_log_save_finish(tmp_path):
    launch([__file__, "pieces", str(tmp_path)], world=1)
    rec = json.loads((tmp_path / "pieces.json").read_text())
    b = rec["built"]
    assert (b["start_step"], b["end_step"], b["accum"]) == (0, 4, 1) and b["recipe_yaml"] and b["autocast"]
    assert b["dtype"] == "torch.float32"  # batches in the weights' dtype; autocast casts inside
    assert b["comm_dtypes"] == ["torch.float32"]  # gradients are reduced in fp32, as one rank would sum them
    s = rec["step0"]
    assert s["step"] == 1 and s["samples"] == 4 and s["loss"] > 0 and s["grad_norm"] > 0
    # the optimizer stepped the fp32 master weights (adaLN-Zero: at step 1 only the zero-initialised
    # modulation, final layer and what feeds them get gradients, so not every tensor moves yet)
    assert s["master_dtype"] == "torch.float32" and 0 < s["changed"] <= s["params"]
    assert s["layers_x_experts"] == [2, 4]  # tokens per expert per MoE layer (never summed over layers), 4 experts
    assert rec["save_after_step0"] is None and rec["save_after_step1"] == "step_00000002"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["batch_size"] == 4 and summary["final_dir"] is None  # 2 of 4 steps: no export
    assert not (tmp_path / "final").exists()
    assert summary["first_loss"] == pytest.approx(rows[0]["loss"]) and summary["last_loss"] == pytest.approx(rows[1]["loss"])
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"


@pytest.mark.timeout(300)
@pytest.mark.distributed
def test_quickstart_moe_recipe_trains_under_expert_parallelism(tmp_path):
    """The issue's command: the packaged sparse recipe, 2 ranks, EP=2 (a few steps on a small dataset)."""
    from sparse_dit.data import write_physics_dataset

    data = tmp_path / "data"
    write_physics_dataset(data, "uniform", "id", 16, 8, 24, 24, seed=0, fps=4.0, workers=1, progress=False)
    out = tmp_path / "run"
    proc = cli(["train", str(QS_MOE), "--num-procs", "2", "--set", "parallel.ep_size=2", "train.max_steps=3",
                f"data.path={data}", f"output_dir={out}"], timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "EP=2" in proc.stdout and "bf16-autocast" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["moe/dropped_fraction"] == 0.0 for r in rows)
    assert (out / "final" / "model.safetensors").is_file()
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["parallel"]["ep_size"] == 2 and saved["model"]["moe"]["num_experts"] == 4
    # issue 15: the checkpoint records its layout, and a one-process rerun is one line saying what to pass
    assert json.loads((out / "checkpoints" / "step_00000003" / "layout.json").read_text())["ep_size"] == 2
    proc = cli(["train", str(QS_MOE), "--set", "train.max_steps=4", f"data.path={data}", f"output_dir={out}"], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert "was written by 2 ranks, this run has 1" in proc.stderr and "--num-procs 2 --set parallel.ep_size=2" in proc.stderr


@pytest.mark.timeout(200)
def test_missing_dataset_is_one_clear_line(tmp_path):
    proc = cli(["train", str(QS_DENSE), "--set", f"data.path={tmp_path / 'nothing'}", f"output_dir={tmp_path / 'run'}"], timeout=180)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "data.path=" in proc.stderr and "sparse-dit data physics" in proc.stderr


def _compile_worker(out: Path) -> None:
    import time

    from sparse_dit.presets import load_recipe
    from sparse_dit.recipes.train import build_run, train_step

    torch.set_num_threads(1)
    rec: dict = {}
    for compiled in (False, True):
        recipe = load_recipe(TINY_DENSE, ["train.max_steps=2", "train.global_batch_size=2", "parallel.precision=fp32",
                                        "train.activation_checkpointing=true", f"train.compile={str(compiled).lower()}",
                                        f"output_dir={out / str(compiled)}"])
        run = build_run(recipe)
        batches = run.source.loader(0, 2, 0)
        t = time.perf_counter()
        losses = [train_step(run, s, batches).metrics["loss"] for s in range(2)]
        rec[str(compiled)] = {"losses": losses, "seconds": time.perf_counter() - t,
                              "compiled_blocks": sum(getattr(b, "_compiled_call_impl", None) is not None for b in run.model.blocks),
                              "blocks": len(run.model.blocks),
                              "params": {n: p.detach().clone().tolist() for n, p in list(run.model.named_parameters())[:3]}}
    (out / "compile.json").write_text(json.dumps(rec))


@pytest.mark.timeout(300)
def test_train_compile_compiles_every_block_and_trains_as_eager(tmp_path):
    # train.compile=true: each DiT block torch.compile-d in place (after the checkpointing
    # wrapper); two optimizer steps give the eager run's losses and weights (to float rounding).
    # Dense blocks: one graph, no breaks (about 20 s of inductor on this CPU); MoE blocks break
    # the graph at the routing's data-dependent ops (docs/training.md, "Compiling").
    launch([__file__, "compile", str(tmp_path)], world=1, timeout=280)
    rec = json.loads((tmp_path / "compile.json").read_text())
    eager, comp = rec["False"], rec["True"]
    assert eager["compiled_blocks"] == 0 and comp["compiled_blocks"] == comp["blocks"] > 0
    assert comp["losses"] == pytest.approx(eager["losses"], rel=1e-4)
    for n in eager["params"]:
        assert torch.allclose(torch.tensor(comp["params"][n]), torch.tensor(eager["params"][n]), rtol=1e-4, atol=1e-6), n


if __name__ == "__main__":
    if sys.argv[1] == "pieces":
        _pieces_worker(Path(sys.argv[2]))
    elif sys.argv[1] == "compile":
        _compile_worker(Path(sys.argv[2]))
