"""Issue 15 (and issue 11's "checkpoints store ep_size"): CLI failures are one line, never a
traceback; a checkpoint resumes only on the ranks and ``parallel.ep_size`` that wrote it, and the
message says what to pass; ``--overwrite`` starts over; the resolved DeepSpeed config is saved.

Checkpoints here are written by hand in the layout ``parallel/checkpoint.py`` documents (a
``layout.json`` per tag, or only rank 0's trainer file for older runs), so the refusals are
checked without training. One test trains one step (one rank, as a launcher starts it).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from _launch import TINY_MOE, launch

FAST = ["train.global_batch_size=2", "data.num_videos=8", "train.save_every=1", "train.log_every=1"]


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _fake_checkpoint(out: Path, world: int, ep: int | None, layout_json: bool = True, recipe_ep: int | None = None) -> Path:
    """A checkpoint folder as ``save_checkpoint`` leaves it (engine files omitted: never read here)."""
    from sparse_dit.presets import load_recipe
    from sparse_dit.schema import to_dict

    step = out / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text(step.name)
    state = {"ema": {}, "step": 2, "world_size": world, "rank": 0}
    if ep is not None:
        state["ep_size"] = ep
    torch.save(state, step / "trainer_rank00000.pt")
    if layout_json:
        (step / "layout.json").write_text(json.dumps({"step": 2, "world_size": world, "ep_size": ep}))
    recipe = to_dict(load_recipe(TINY_MOE, [*FAST, f"output_dir={out}", "train.max_steps=4"]))
    if recipe_ep is not None:
        recipe["parallel"]["ep_size"] = recipe_ep
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return step


def _train_cli(capsys, out: Path, *args: str) -> tuple[int, str]:
    from sparse_dit.cli import main

    rc = main(["train", TINY_MOE, *args, "--set", *FAST, f"output_dir={out}", "train.max_steps=4"])
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# 1. Resuming on another number of ranks or another ep_size: one line that says what to pass
# --------------------------------------------------------------------------------------------


def test_one_process_after_the_readme_2_rank_ep2_run_says_what_to_pass(tmp_path, capsys):
    out = tmp_path / "run"
    _fake_checkpoint(out, world=2, ep=2)
    rc, err = _train_cli(capsys, out)  # the README's 2-rank EP=2 run, rerun as one process
    line = _one_line(err)
    assert rc == 2 and line.startswith("sparse-dit train: ")
    assert "was written by 2 ranks, this run has 1 (parallel.ep_size=2 then, 1 now)" in line
    assert "--num-procs 2 --set parallel.ep_size=2" in line and "--overwrite" in line


def test_same_ranks_other_ep_size_is_refused_before_launching(tmp_path, capsys):
    out = tmp_path / "run"
    _fake_checkpoint(out, world=2, ep=2)
    rc, err = _train_cli(capsys, out, "--num-procs", "2")  # 2 ranks, but parallel.ep_size left at 1
    line = _one_line(err)
    assert rc == 2 and "written with parallel.ep_size=2, this run has parallel.ep_size=1" in line
    assert "--set parallel.ep_size=2" in line and "another recipe" not in line  # not the generic recipe check's advice


def test_checkpoints_from_before_layout_json_are_checked_from_the_trainer_file_and_recipe(tmp_path, capsys):
    out = tmp_path / "run"
    _fake_checkpoint(out, world=2, ep=None, layout_json=False, recipe_ep=2)  # an old save: no ep_size stored
    rc, err = _train_cli(capsys, out)
    line = _one_line(err)
    assert rc == 2 and "was written by 2 ranks, this run has 1" in line and "--num-procs 2 --set parallel.ep_size=2" in line


def test_the_matching_layout_passes_the_check(tmp_path):
    from sparse_dit.parallel.checkpoint import CheckpointError, check_layout

    root = tmp_path / "run"
    _fake_checkpoint(root, world=2, ep=2)
    check_layout(root / "checkpoints", 2, 2)  # no error
    with pytest.raises(CheckpointError, match="ep_size=2, this run has parallel.ep_size=1"):
        check_layout(root / "checkpoints", 2, 1)
    check_layout(root / "nothing" / "checkpoints", 1, 1)  # no checkpoint: nothing to check


def test_clear_run_removes_only_the_run_files(tmp_path):
    from sparse_dit.recipes.run_dir import RUN_FILES, clear_run

    out = tmp_path / "run"
    _fake_checkpoint(out, world=2, ep=2)
    (out / "final").mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    removed = clear_run(out)
    assert set(removed) == {"checkpoints", "final", "metrics.jsonl", "recipe.yaml"} and set(removed) <= set(RUN_FILES)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------------------------
# 2. Missing run folders and datasets of the wrong kind: one line from every command
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["generate", "{tmp}/no_run", "--out", "{tmp}/s.gif"],
    ["eval", "loss", "{tmp}/no_run"],
    ["eval", "compare", "{tmp}/no_run", "{tmp}/no_run2", "--out", "{tmp}/rep"],
    ["data", "info", "{tmp}/no_dataset"],
])
def test_a_missing_run_or_dataset_folder_is_one_line(tmp_path, capsys, argv):
    from sparse_dit.cli import main

    rc = main([a.format(tmp=tmp_path) for a in argv])
    line = _one_line(capsys.readouterr().err)
    assert rc != 0 and line.startswith(f"sparse-dit {argv[0]}") and "no_" in line, line


def test_any_subcommand_missing_file_is_one_line_and_sparse_dit_traceback_shows_it(tmp_path, monkeypatch, capsys):
    import sparse_dit.flops_cli
    from sparse_dit.cli import main

    def missing(args):
        raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "no_run"))

    monkeypatch.setattr(sparse_dit.flops_cli, "run", missing)  # a subcommand that does not catch it itself
    assert main(["flops", "debug"]) == 2
    assert _one_line(capsys.readouterr().err) == f"sparse-dit flops: {tmp_path / 'no_run'}: No such file or directory"
    monkeypatch.setenv("SPARSE_DIT_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        main(["flops", "debug"])


def test_a_folder_dataset_where_a_physics_one_is_needed_is_one_line(tmp_path, capsys):
    import numpy as np

    from sparse_dit.data.hf import DatasetKindError, encode_video, folder_features, write_dataset
    from sparse_dit.data.loaders import PhysicsVideoDataset

    frames = np.zeros((4, 8, 8, 3), np.uint8)
    row = {"video": encode_video(frames), "video_shape": [4, 8, 8, 3], "caption": "", "fps": 4.0, "source": "a.mp4"}
    ds_dir = tmp_path / "folder_ds"
    write_dataset([row], ds_dir, folder_features(), description=json.dumps({"kind": "sparse-dit video folder"}))
    with pytest.raises(DatasetKindError, match=r"is not a physics dataset \(kind: sparse-dit video folder\).*data.source=hf"):
        PhysicsVideoDataset(str(ds_dir))


# --------------------------------------------------------------------------------------------
# 3. A real run (one rank, as a launcher starts it): --overwrite, ep_size stored, ds_config.json
# --------------------------------------------------------------------------------------------


def _overwrite_worker(out: Path) -> None:
    """Record the config deepspeed.initialize receives, then train 1 step with --overwrite."""
    import deepspeed

    from sparse_dit.recipes.train import main

    seen = []
    real = deepspeed.initialize

    def spy(*args, **kwargs):
        seen.append(copy.deepcopy(kwargs["config"]))  # as passed, before DeepSpeed reads it
        return real(*args, **kwargs)

    deepspeed.initialize = spy
    rc = main([TINY_MOE, "--overwrite", "--set", *FAST, f"output_dir={out}", "train.max_steps=1"])
    (out.parent / "seen.json").write_text(json.dumps({"rc": rc, "configs": seen}))


@pytest.mark.timeout(200)
def test_overwrite_starts_over_stores_ep_size_and_saves_the_ds_config(tmp_path):
    out = tmp_path / "run"
    _fake_checkpoint(out, world=2, ep=2)  # would be refused without --overwrite
    (out / "notes.txt").write_text("mine")
    launch([__file__, "overwrite", str(out)], world=1, timeout=180)
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["rc"] == 0 and len(seen["configs"]) == 1
    assert (out / "notes.txt").read_text() == "mine"  # not a run file: kept
    assert not (out / "checkpoints" / "step_00000002").exists()  # the old checkpoint is gone
    assert json.loads((out / "ds_config.json").read_text()) == seen["configs"][0]
    assert not list(out.glob(".*.tmp"))  # written atomically: no leftovers
    step = out / "checkpoints" / "step_00000001"
    assert json.loads((step / "layout.json").read_text()) == {"step": 1, "world_size": 1, "ep_size": 1}
    assert torch.load(step / "trainer_rank00000.pt", weights_only=True)["ep_size"] == 1


if __name__ == "__main__":
    if sys.argv[1] == "overwrite":
        _overwrite_worker(Path(sys.argv[2]))
