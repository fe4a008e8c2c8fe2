"""``sparse-dit study``: the plan (matched FLOPs, steps, curve points), the statistics of the report
(intervals, resolved/not resolved, Pareto front), bad specs as one line, and a study killed in
the middle of a cell's training that, rerun, completes without redoing finished cells and equals
an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from _launch import REPO, cli

TINY = REPO / "recipes" / "study" / "tiny.yaml"


def _spec(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw["base"] = str(REPO / "recipes" / "quickstart" / "dense.yaml")
    for k, v in changes.items():
        node = raw
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


def test_plan_gives_every_cell_the_flop_budget_and_matches_active_compute(tmp_path):
    from sparse_dit.flops import count
    from sparse_dit.recipes.study import load_spec, plan_study

    spec = load_spec(_spec(tmp_path, **{"budget.train_flops": 3.0e9, "budget.curve_points": 3}))
    cells = plan_study(spec, tmp_path, tmp_path / "out")
    assert [c.key for c in cells] == ["uniform/xs/dense/seed0", "uniform/xs/tc-E4A1/seed0",
                                      "uniform/xs/dense/seed1", "uniform/xs/tc-E4A1/seed1"]
    for c in cells:
        r = c.recipe
        macs = count(r.model, (3, r.data.num_frames, r.data.height, r.data.width))["macs"]
        per_step = 6 * macs * r.train.global_batch_size  # forward + backward = 3 forwards, 2 FLOPs per MAC
        steps = r.train.max_steps
        assert steps * per_step <= 3.0e9 < (steps + 1) * per_step  # the largest step count within the budget
        assert c.export_steps[-1] == steps and len(c.export_steps) == 3 and r.train.export_steps == c.export_steps
        assert r.output_dir == str(c.dir) and r.data.path == str(tmp_path / "out" / "data" / "uniform" / "train")
        assert r.train.seed == c.seed
    dense, sparse = cells[0].recipe, cells[1].recipe
    assert not dense.model.moe.enabled and (sparse.model.moe.num_experts, sparse.model.moe.top_k) == (4, 1)
    shape = (3, dense.data.num_frames, dense.data.height, dense.data.width)
    assert count(sparse.model, shape)["macs"] == pytest.approx(count(dense.model, shape)["macs"], rel=0.01)
    assert dense.train.max_steps == sparse.train.max_steps  # matched active compute: the same steps


def test_match_params_gives_the_dense_models_total_parameters(tmp_path):
    from sparse_dit.flops import count, match_params
    from sparse_dit.recipes.study import load_spec, plan_study

    spec = load_spec(_spec(tmp_path, **{"budget.match": "params", "budget.steps": 6}))
    dense, sparse = (c.recipe for c in plan_study(spec, tmp_path, tmp_path / "out")[:2])
    shape = (3, dense.data.num_frames, dense.data.height, dense.data.width)
    assert count(sparse.model, shape)["total_params"] == pytest.approx(count(dense.model, shape)["total_params"], rel=0.02)
    assert dense.train.max_steps == sparse.train.max_steps == 6
    # by hand: one MoE layer = router D*E + E experts of 2*D*H (+ biases); H = (2*D*F - D*E) / (E*2*D) ~ F/E
    D, F, E = dense.model.hidden_size, dense.model.ffn_hidden, 4
    assert sparse.model.moe.expert_hidden_dim == pytest.approx((2 * D * F - D * E) / (E * 2 * D), abs=1)
    assert match_params(dense.model, num_experts=4, top_k=1).moe.expert_hidden_dim == sparse.model.moe.expert_hidden_dim


UPCYCLED = {"name": "up-E4A1", "moe": {"num_experts": 4, "top_k": 1}, "upcycle": {"from": "dense", "at": 0.5}}


def test_an_upcycled_variant_starts_from_its_dense_cell_and_spends_the_rest_of_the_budget(tmp_path):
    from sparse_dit.upcycle import upcycle_config
    from sparse_dit.recipes.study import load_spec, plan_study

    raw = yaml.safe_load(TINY.read_text())
    spec = load_spec(_spec(tmp_path, variants=[*raw["variants"], UPCYCLED], seeds=[0], **{"budget.train_flops": 2.0e9}))
    dense, _, up = plan_study(spec, tmp_path, tmp_path / "out")
    s_up = round(0.5 * dense.recipe.train.max_steps)
    assert s_up in dense.export_steps and s_up in dense.recipe.train.export_steps  # the dense cell exports the start point
    assert up.upcycle_from == dense.dir / "exports" / f"step_{s_up:08d}" and up.recipe.train.init_from == str(up.dir / "init")
    assert up.flops_offset == s_up * dense.flops_per_step
    total = up.flops_offset + up.recipe.train.max_steps * up.flops_per_step
    assert total <= 2.0e9 < total + up.flops_per_step  # the dense part and the sparse part together fill the budget
    assert up.recipe.model == upcycle_config(dense.recipe.model, "E4A1")  # experts = copies of the dense FFN


def test_wall_time_budget_converts_seconds_with_the_probe_and_caches_it(tmp_path):
    from sparse_dit.recipes.study import _probe, _write_data, load_spec, plan_study

    raw = yaml.safe_load(TINY.read_text())
    spec = load_spec(_spec(tmp_path, variants=[*raw["variants"], UPCYCLED], seeds=[0],
                           budget={"match": "wall_time", "seconds": 30.0, "curve_points": 2, "probe_steps": 3}))
    timed = []
    cells = plan_study(spec, tmp_path, tmp_path / "out", probe=lambda r: timed.append(r.model.moe.num_experts) or 0.5)
    assert [c.recipe.train.max_steps for c in cells[:2]] == [60, 60]  # 30 s / 0.5 s per step
    assert timed == [0, 4, 4]  # one probe per (size, variant)
    # the real probe: a short run of the trainer on the study's data, cached so a rerun plans the same steps
    r = cells[2].recipe
    _write_data(spec, (r.data.num_frames, r.data.height, r.data.width), tmp_path / "out", lambda m: None)
    probe = _probe(tmp_path / "out", spec.budget.probe_steps)
    first = probe(cells[2].recipe)  # the upcycled variant: probed from fresh weights (its start does not exist yet)
    assert first > 0 and json.loads((tmp_path / "out" / "probes.json").read_text())
    assert probe(cells[2].recipe) == first


@pytest.mark.parametrize("change, needle", [
    ({"budget.train_flops": 1.0e7}, "fewer than budget.curve_points"),
    ({"seeds": [0, 0]}, "distinct seeds"),
    ({"budget.match": "wall"}, "budget.match"),
    ({"base": "nope.yaml"}, "does not exist"),
    ({"data.scenarios": ["nope"]}, "data.scenarios"),
    ({"variants": [{"name": "up", "moe": {"num_experts": 4, "top_k": 1}, "upcycle": {"from": "dense"}}, {"name": "dense"}]},
     "must name a dense variant listed before it"),
    ({"variants": [{"name": "dense"}, {"name": "up", "moe": {"num_experts": 4, "top_k": 1}, "upcycle": {"from": "dense", "at": 1.5}}]},
     "upcycle.at=1.5 is out of range"),
])
def test_bad_specs_are_one_line(tmp_path, capsys, change, needle):
    from sparse_dit.recipes.study import main

    spec = _spec(tmp_path, **change)
    assert main([str(spec), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_cli_study_dry_run_lists_the_cells(tmp_path):
    p = cli(["study", str(_spec(tmp_path)), "--out", str(tmp_path / "o"), "--dry-run"])
    assert p.returncode == 0, p.stderr
    assert p.stdout.count(" steps ") == 4 and "uniform/xs/tc-E4A1/seed1" in p.stdout
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
    p = cli(["study", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")])
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_export_steps_must_lie_within_the_run():
    from sparse_dit.config import ConfigError
    from sparse_dit.presets import load_recipe

    with pytest.raises(ConfigError, match=r"train.export_steps=\[5, 300\]: 300 is out of range"):
        load_recipe(REPO / "recipes" / "tiny" / "dense.yaml", ["train.max_steps=200", "train.export_steps=[5,300]"])


# --------------------------------------------------------------------------------------------
# The statistics of the report
# --------------------------------------------------------------------------------------------


def test_mean_interval_is_the_student_t_interval():
    from sparse_dit.evals.study_report import mean_interval

    m = mean_interval([1.0, 2.0, 3.0, 4.0])
    # by hand: mean 2.5, sample sd sqrt(5/3), t_{0.975, 3} = 3.182446305 (tables)
    half = 3.182446305 * math.sqrt(5 / 3) / 2
    assert m["mean"] == pytest.approx(2.5) and m["lo"] == pytest.approx(2.5 - half, rel=1e-8) and m["hi"] == pytest.approx(2.5 + half, rel=1e-8)
    one = mean_interval([0.7])
    assert one["mean"] == 0.7 and one["lo"] is None and one["n"] == 1  # one seed: no interval
    assert mean_interval([1.0, float("nan"), 3.0])["n"] == 2  # undefined values (nothing detected) are left out


def _agg(sparse_vals, dense_vals, key="id/velocity_error"):
    from sparse_dit.evals.study_report import STUDY_METRICS, mean_interval

    def group(vals, dense):
        metrics = {f"{s}/{k}": {**mean_interval([]), "lower_is_better": low} for s, k, low in STUDY_METRICS}
        metrics[key] = {**mean_interval(vals), "lower_is_better": True}
        return {"dense": dense, "metrics": metrics}

    return {"uniform": {"xs": {"dense": group(dense_vals, True), "moe": group(sparse_vals, False)}}}


def test_a_difference_is_resolved_only_where_the_intervals_do_not_overlap():
    from sparse_dit.evals.study_report import verdicts

    far = [v for v in verdicts(_agg([0.50, 0.52, 0.51], [0.90, 0.92, 0.91])) if v["metric"] == "id/velocity_error"][0]
    assert far["resolved"] and far["winner"] == "moe" and far["text"].startswith("moe beats dense on id velocity_error")
    worse = [v for v in verdicts(_agg([0.90, 0.92, 0.91], [0.50, 0.52, 0.51])) if v["metric"] == "id/velocity_error"][0]
    assert worse["resolved"] and worse["winner"] == "dense"  # lower is better: the dense model wins here
    near = [v for v in verdicts(_agg([0.50, 0.70, 0.60], [0.55, 0.75, 0.65])) if v["metric"] == "id/velocity_error"][0]
    assert not near["resolved"] and near["winner"] is None and "not resolved" in near["text"]
    single = [v for v in verdicts(_agg([0.1], [0.9])) if v["metric"] == "id/velocity_error"][0]
    assert not single["resolved"] and "one seed" in single["text"]  # a huge gap on one seed is still unresolved


def test_pareto_front():
    from sparse_dit.evals.study_report import pareto_front

    pts = [("a", 1.0, 5.0), ("b", 2.0, 3.0), ("c", 3.0, 3.5), ("d", 4.0, 1.0), ("e", 2.0, 3.0001)]
    assert pareto_front(pts) == ["a", "b", "d"]  # c is beaten by b on both; e by b on quality at equal cost


# --------------------------------------------------------------------------------------------
# End to end: an uninterrupted study, and one killed inside a cell's training then rerun
# --------------------------------------------------------------------------------------------


def _finals(out: Path) -> dict:
    return {r["scenario"] + "/" + r["variant"] + f"/{r['seed']}": r["eval"]["curve"]
            for r in json.loads((out / "report.json").read_text())["cells"]}


def test_study_killed_mid_cell_resumes_and_equals_an_uninterrupted_run(tmp_path):
    from sparse_dit.presets import load_recipe
    from sparse_dit.recipes.study import run_study, train_flops_per_step

    raw = yaml.safe_load(TINY.read_text())
    spec = _spec(tmp_path, seeds=[0], variants=[*raw["variants"], UPCYCLED])
    full = run_study(spec, tmp_path / "full", log=lambda m: None)
    out = tmp_path / "killed"
    assert set(full["aggregate"]["uniform"]["xs"]) == {"dense", "tc-E4A1", "up-E4A1"}
    cells = tmp_path / "full" / "cells" / "uniform" / "xs"
    up_recipe = load_recipe(cells / "up-E4A1" / "seed0" / "recipe.yaml")
    assert up_recipe.train.init_from == str(cells / "up-E4A1" / "seed0" / "init")
    assert (cells / "up-E4A1" / "seed0" / "init" / "model.safetensors").is_file()  # upcycled from the dense cell's export
    dense_recipe = load_recipe(cells / "dense" / "seed0" / "recipe.yaml")
    s_up = round(0.5 * dense_recipe.train.max_steps)
    assert (cells / "dense" / "seed0" / "exports" / f"step_{s_up:08d}").is_dir()
    first = {r["variant"]: r["eval"]["curve"][0] for r in full["cells"]}["up-E4A1"]
    offset = first["train_flops"] - first["step"] * train_flops_per_step(up_recipe)
    assert offset == pytest.approx(s_up * train_flops_per_step(dense_recipe))  # its curve counts the dense part
    assert (tmp_path / "full" / "report.md").is_file() and (tmp_path / "full" / "quality_vs_train_flops.png").is_file()
    assert "matched training FLOPs" in (tmp_path / "full" / "report.md").read_text()
    # the model-free references, scored on the same validation videos, in the report
    base = full["baselines"]["uniform"]
    assert set(base) == {"id", "ood"}
    for split in ("id", "ood"):
        gt, copy = base[split]["ground_truth"], base[split]["copy_last_frame"]
        assert gt["detection_rate"] > 0.95 and gt["velocity_error"] < 0.2  # the detector's floor
        assert copy["velocity_error"] > 5 * gt["velocity_error"]  # a moving ball: copying loses
    assert "*copy-last-frame*" in (tmp_path / "full" / "report.md").read_text()
    assert {b["variant"] for b in full["against_baseline"]} == {"dense", "tc-E4A1", "up-E4A1"}

    # Kill -9 once the second cell has a checkpoint but before it finishes.
    second = out / "cells" / "uniform" / "xs" / "tc-E4A1" / "seed0"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cpu"  # the in-process run above holds its rendezvous port; same threads as this process
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sparse_dit.cli", "study", str(spec), "--out", str(out)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (second / "checkpoints" / "latest").is_file():
            assert proc.poll() is None, "the study ended before it could be killed: " + (tmp_path / "killed.log").read_text()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    assert not (second / "eval.json").is_file()
    first_eval = (out / "cells" / "uniform" / "xs" / "dense" / "seed0" / "eval.json")
    stamp = first_eval.stat().st_mtime_ns

    logs: list[str] = []
    resumed = run_study(spec, out, log=logs.append)
    assert first_eval.stat().st_mtime_ns == stamp  # the finished cell was not redone
    assert any("(done)" in line and "dense/seed0" in line for line in logs)
    assert _finals(out) == _finals(tmp_path / "full")  # the same curves, to the last digit
    assert resumed["verdicts"] == full["verdicts"]


def test_cell_subprocess_env_shares_the_cores_and_drops_the_parents_rendezvous(monkeypatch):
    from sparse_dit.recipes.study import _cell_env
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    parent = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1", "PATH": "/bin"}
    env = _cell_env(4, 2, parent)
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "2"}  # 16 cores / (4 cells x 2 ranks)
    assert _cell_env(2, 1, parent)["OMP_NUM_THREADS"] == "8"
    assert _cell_env(32, 1, parent)["OMP_NUM_THREADS"] == "1"  # never 0
    assert _cell_env(2, 1, {**parent, "OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"  # the user's choice wins


def test_variants_against_a_model_free_baseline():
    from sparse_dit.evals.study_report import against_baseline

    def g(mean, lo, hi):
        return {"metrics": {"id/velocity_error": {"mean": mean, "lo": lo, "hi": hi}}}

    agg = {"uniform": {"xs": {"a": g(1.5, 1.0, 2.0), "b": g(4.5, 4.0, 5.0), "c": g(3.0, 2.0, 4.0), "d": g(9.0, None, None)}}}
    out = against_baseline(agg, {"uniform": {"id": {"copy_last_frame": {"velocity_error": 3.0}}}})
    assert {o["variant"]: o["verdict"] for o in out} == {"a": "beats", "b": "worse", "c": "not resolved", "d": "not resolved"}
    assert out[0]["text"] == "xs/a: 1.500 [1.000, 2.000] vs copy-last-frame 3.000: beats"
    assert against_baseline(agg, {}) == []  # no physics states: nothing to compare


def test_curves_keep_defined_points_and_draw_the_baselines(tmp_path, monkeypatch):
    import sparse_dit.evals.study_report as sr

    def pt(f, vel):
        m = {"mean": vel, "lo": None if vel is None else vel - 1, "hi": None if vel is None else vel + 1}
        return {"train_flops": f, "id/val_loss": {"mean": 0.2, "lo": 0.1, "hi": 0.3}, "id/velocity_error": m,
                "ood/velocity_error": m}

    g = {"curve": [pt(1e12, None), pt(2e12, 3.0), pt(3e12, 2.0)],  # no ball found at the first point
         "metrics": {"id/velocity_error": {"mean": 2.0, "lo": 1.0, "hi": 3.0}}}
    report = {"aggregate": {"uniform": {"xs": {"dense": g}}}, "costs": {"uniform/xs/dense": {"gmacs_per_video": 0.5}},
              "baselines": {"uniform": {"id": {"ground_truth": {"velocity_error": 0.05}, "copy_last_frame": {"velocity_error": 1.4}}}}}
    figs = []
    monkeypatch.setattr(sr.plt, "close", figs.append)
    sr.plot_study(report, tmp_path)
    vel = figs[0].axes[1]
    series = [c for c in vel.containers if c.get_label() == "uniform/xs/dense"]
    assert list(series[0].lines[0].get_xdata()) == [0.002, 0.003]  # the undefined point left out, not the series
    flat = sorted(float(ln.get_ydata()[0]) for ln in vel.get_lines() if "copy-last" in ln.get_label() or "floor" in ln.get_label())
    assert flat == [0.05, 1.4]
    assert "uniform: copy-last-frame" in [t.get_text() for t in vel.get_legend().get_texts()]
    assert any("copy-last" in ln.get_label() for ln in figs[1].axes[0].get_lines())  # the cost plot too
