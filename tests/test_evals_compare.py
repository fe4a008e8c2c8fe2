"""`sparse-dit eval compare` on two tiny runs writes a complete report (evals/compare.py, report.py, cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from sparse_dit.cli import main
from sparse_dit.config import DataConfig, DiffusionConfig, ModelConfig, RecipeConfig, TrainConfig
from sparse_dit.dit import SparseDiT
from sparse_dit.evals.report import REQUIRED_MODEL_KEYS
from sparse_dit.flops import count, match_compute
from sparse_dit.schema import to_dict

T, H, W = 5, 16, 16  # 3 context frames + 2 generated (trajectory features need 2)


def _run(root: Path, name: str, cfg: ModelConfig, steps: int, seed: int) -> Path:
    torch.manual_seed(seed)
    model = SparseDiT(cfg)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)  # not the all-zero init
    out = root / name
    model.save_pretrained(out / "final")
    recipe = RecipeConfig(model=cfg, diffusion=DiffusionConfig(num_inference_steps=2),
                          train=TrainConfig(max_steps=steps, global_batch_size=4),
                          data=DataConfig(source="physics", num_frames=T, height=H, width=W), output_dir=str(out))
    (out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe)))
    (out / "summary.json").write_text(json.dumps({"steps": steps, "train_seconds": 1.0}))
    return out


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    from sparse_dit.data import write_physics_dataset

    root = tmp_path_factory.mktemp("compare")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds sync cost (10x on a busy machine)
    dense = ModelConfig(in_channels=3, patch_size=(1, 4, 4), hidden_size=32, depth=2, num_heads=2, text_dim=0)
    sparse = match_compute(dense, num_experts=4, top_k=1)
    runs = [_run(root, "dense", dense, 10, 0), _run(root, "sparse", sparse, 10, 1)]
    data = write_physics_dataset(root / "val", "uniform", "id", 3, T, H, W, seed=5, fps=5.0, workers=1, progress=False)
    assert len(data) == 3
    out = root / "report"
    rc = main(["eval", "compare", *map(str, runs), runs[0].as_posix(), "--out", str(out), "--data", f"id={root / 'val'}",
               "--size", "2,8,8", "--samples", "2", "--steps-sweep", "1", "--json"])
    torch.set_num_threads(threads)
    assert rc == 0
    return root, out


def test_compare_writes_every_artefact(report_dir):
    _, out = report_dir
    for name in ("report.md", "report.json", "quality_vs_train_flops.png", "quality_vs_inference.png", "samples_id.gif",
                 "samples_id.png", "quality_vs_steps.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert list((out / "tb" / "dense").glob("events.out.tfevents.*"))
    report = json.loads((out / "report.json").read_text())  # strict JSON: NaN became null
    assert set(report["models"]) == {"dense", "sparse", "dense_2"}
    for m in report["models"].values():
        assert all(k in m for k in REQUIRED_MODEL_KEYS), [k for k in REQUIRED_MODEL_KEYS if k not in m]
        assert set(m["splits"]) == {"id"}
        assert len(m["val_loss_per_t"]) == 10
    assert set(report["baselines"]) == {"ground_truth", "copy_last_frame", "constant_velocity", "uniform_noise", "gaussian_noise", "blank"}
    assert all(report["baselines"][b]["detection_rate"] < 0.05 for b in ("uniform_noise", "gaussian_noise", "blank"))
    gt = report["baselines"]["ground_truth"]
    assert gt["detection_rate"] == 1.0 and gt["velocity_error"] < 0.2
    # copy-last-frame's velocity error is the ground-truth speed (the frozen ball has v_hat = 0)
    cl = report["baselines"]["copy_last_frame"]
    assert cl["velocity_error"] == pytest.approx(cl["gt_speed"], rel=1e-6)
    md = (out / "report.md").read_text()
    assert "| dense |" in md and "| sparse |" in md and "copy_last_frame" in md and "uniform_noise" in md


def test_compare_costs_equal_flops_and_runs_see_the_same_noise(report_dir):
    root, out = report_dir
    report = json.loads((out / "report.json").read_text())
    for name in ("dense", "sparse"):
        m = report["models"][name]
        cfg = SparseDiT.from_pretrained(root / name / "final").config
        ref = count(cfg, (3, T, H, W))
        assert m["gmacs_per_sample"] == pytest.approx(ref["macs"] / 1e9, rel=1e-12)
        assert m["gmacs_per_video"] == pytest.approx(2 * ref["macs"] / 1e9, rel=1e-12)  # 2 Euler steps
        assert m["train_flops"] == pytest.approx(6 * ref["macs"] * 10 * 4, rel=1e-12)
        assert m["total_params"] == ref["total_params"] and m["active_params"] == ref["active_params"]
        assert m["cost"][0]["forward_macs"] == count(cfg, (3, 2, 8, 8))["macs"]
        assert len(m["latency_runs_ms"]) == 5
    d, s = report["models"]["dense"], report["models"]["sparse"]
    assert s["gmacs_per_sample"] == pytest.approx(d["gmacs_per_sample"], rel=0.01)  # compute-matched
    assert s["total_params"] > d["total_params"]
    # the same run evaluated twice sees bit-identical problems: identical numbers
    twin = report["models"]["dense_2"]
    for k in ("val_loss", "velocity_error", "position_error", "detection_rate", "psnr"):
        assert twin[k] == d[k], k


def test_compare_reports_the_sparse_models_routing_per_layer(report_dir):
    _, out = report_dir
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["dense"].get("routing") is None
    r = report["models"]["sparse"]["routing"]
    # collected while sampling the headline split: 3 videos in one batch, 2 Euler steps, no CFG
    assert r["calls"] == 2 and r["num_layers"] == 2 and r["num_experts"] == 4
    tokens = 3 * T * (H // 4) * (W // 4)
    for lay in r["layers"]:
        assert sum(lay["load"]) == 2 * tokens  # top-1, dropless: one route per token per call
        assert lay["change_fraction"] is not None and lay["router_entropy"] > 0
    md = (out / "report.md").read_text()
    assert "## Routing" in md and "### sparse" in md
    for kind in ("layer_x_expert", "expert_x_timestep", "spacetime"):
        assert (out / f"routing_sparse_{kind}.png").is_file()
