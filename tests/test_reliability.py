"""Issue 17: nothing in a run folder runs code, no poisoned checkpoint, crash-safe side files,
every bad input one clear line.

The trainer runs as ``sparse-dit train`` (one process, one rank) on the tiny MoE recipe cut to
two samples per step; each test starts as few processes as it can.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
import yaml

from _launch import REPO, TINY_MOE, cli, launch

FAST = ["train.global_batch_size=2", "data.num_videos=16", "train.save_every=2", "train.log_every=1"]


class _Payload:
    """Unpickling this runs ``touch MARKER`` (what a planted pickle payload does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _train(out: Path, *overrides: str, timeout: float = 200):
    return cli(["train", TINY_MOE, "--set", *FAST, f"output_dir={out}", *overrides], timeout=timeout)


def _one_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sparse-dit")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------------------------
# 1. Loading never unpickles arbitrary objects
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_planted_pickle_payloads_are_refused_and_never_run(tmp_path):
    out = tmp_path / "run"
    proc = _train(out, "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = out / "checkpoints" / "step_00000002"
    targets = [step / "trainer_rank00000.pt", step / "mp_rank_00_model_states.pt", next(step.glob("*optim_states.pt"))]
    # the payload is real: an ordinary torch.load runs it
    marker = tmp_path / "ran"
    torch.save({"x": _Payload(marker)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    for target in targets:
        good = target.read_bytes()
        state = torch.load(target, map_location="cpu", weights_only=False)  # ours: a dict, planted next to real tensors
        state["planted"] = _Payload(marker)
        torch.save(state, target)
        proc = _train(out, "train.max_steps=4")
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = _one_line(proc)
        assert str(target) in line and "refusing to load" in line and "posix.system" in line, line
        assert not marker.exists(), f"the payload in {target.name} ran"
        target.write_bytes(good)
    # the same launches check crash-safe side files (item 4) and the recipe comparison (item 3):
    # a kill mid-append tore the last metrics row; killed saves left .tmp files
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": 0.1')
    leftovers = [out / ".recipe.yaml.tmp", out / "checkpoints" / ".latest.x1y2.tmp", step / ".trainer_rank00000.pt.a9.tmp"]
    for f in leftovers:
        f.write_bytes(b"partial")
    proc = _train(out, "train.max_steps=4", "train.lr=0.002")  # another learning rate: refused, listed
    assert proc.returncode == 2
    line = _one_line(proc)
    assert "train.lr: 0.001 -> 0.002" in line and "--allow-changed train.lr" in line, line
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["lr"] == 0.001  # not rewritten by the refused run
    # accepted with the flag and logged; the untouched checkpoint resumes (DeepSpeed's optimizer records load weights-only)
    proc = cli(["train", TINY_MOE, "--allow-changed", "train.lr", "--set", *FAST, f"output_dir={out}", "train.max_steps=4",
                "train.lr=0.002"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step 2" in proc.stdout
    assert "resuming with a changed recipe:\n  train.lr: 0.001 -> 0.002" in proc.stdout
    assert "train.lr: 0.001 -> 0.002" in (out / "recipe_changes.log").read_text()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["lr"] == 0.002
    assert f"{out / 'metrics.jsonl'} line 3 is torn" in proc.stderr
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not any(f.exists() for f in leftovers)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 4
    assert not marker.exists()
    # files written through mkstemp follow the umask like any other file (not 0600)
    mode = stat.S_IMODE((out / "checkpoints" / "latest").stat().st_mode)
    want = 0o666 & ~_umask()
    assert mode == want and stat.S_IMODE((out / "checkpoints" / "step_00000004" / "trainer_rank00000.pt").stat().st_mode) == want


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_safe_load_names_the_file_for_garbage_and_keeps_plain_state(tmp_path):
    from sparse_dit.parallel import CheckpointError
    from sparse_dit.parallel.checkpoint import safe_load

    (tmp_path / "plain.pt").write_bytes(b"")
    torch.save({"ema": {"w": torch.ones(2)}, "step": 3, "world_size": 1}, tmp_path / "ok.pt")
    assert safe_load(tmp_path / "ok.pt")["step"] == 3
    with pytest.raises(CheckpointError, match="plain.pt cannot be read"):
        safe_load(tmp_path / "plain.pt")
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps(_Payload(tmp_path / "ran")))
    with pytest.raises(CheckpointError, match="raw.pkl"):
        safe_load(tmp_path / "raw.pkl")
    assert not (tmp_path / "ran").exists()


# --------------------------------------------------------------------------------------------
# 2. No checkpoint of non-finite weights, optimizer state or gradient norm
# --------------------------------------------------------------------------------------------


def _poison_worker(out: Path) -> None:
    from sparse_dit.presets import load_recipe
    from sparse_dit.recipes.train import TrainingDiverged, train

    torch.set_num_threads(1)

    def weights(engine, step, metrics):
        if step + 1 == 4:  # the step before a save: the loss check cannot see it
            with torch.no_grad():
                engine.module.final_layer.linear.weight[0, 0] = float("inf")

    def optim(engine, step, metrics):
        if step + 1 == 4:
            base = getattr(engine.optimizer, "optimizer", engine.optimizer)
            st = next(s for s in base.state.values() if "exp_avg_sq" in s)
            st["exp_avg_sq"].view(-1)[0] = float("nan")

    def grads(engine, step):
        if step + 1 == 4:
            p = engine.module.final_layer.linear.weight
            p.grad = torch.full_like(p, float("inf"))

    cases = {"weights": ({"after_step": weights}, []), "optim": ({"after_step": optim}, []),
             "grads": ({"before_step": grads}, ["parallel.zero_stage=0", "parallel.precision=fp32", "train.grad_clip=0"])}
    rec = {}
    for name, (hooks, extra) in cases.items():
        recipe = load_recipe(TINY_MOE, ["train.max_steps=6", *FAST, f"output_dir={out / name}", *extra])
        try:
            train(recipe, hooks)
            rec[name] = "no error"
        except TrainingDiverged as exc:
            rec[name] = str(exc)
    (out / "poison.json").write_text(json.dumps(rec))


@pytest.mark.timeout(200)
def test_a_save_of_non_finite_state_is_skipped_and_the_run_stops_naming_the_last_good_one(tmp_path):
    launch([__file__, "poison", str(tmp_path)], world=1)
    rec = json.loads((tmp_path / "poison.json").read_text())
    for name, what in (("weights", "weights not finite after step 4"), ("optim", "optimizer state not finite after step 4"),
                       ("grads", "gradient norm (inf)")):
        msg = rec[name]
        assert what in msg and "stopping without saving" in msg, (name, msg)
        assert msg.endswith("use parallel.precision=fp32.") and str(tmp_path / name / "checkpoints" / "step_00000002") in msg
        ckpts = tmp_path / name / "checkpoints"
        assert (ckpts / "latest").read_text().strip() == "step_00000002", name
        assert not (ckpts / "step_00000004").exists(), name
        assert not (tmp_path / name / "final").exists()


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "[0.9, .nan]"])
def test_non_finite_numbers_are_refused_at_validation(value):
    from sparse_dit.config import ConfigError
    from sparse_dit.presets import load_recipe

    key = "train.betas" if value.startswith("[") else "train.lr"
    with pytest.raises(ConfigError, match=rf"^{key}=.*(nan|inf).* is not allowed; expected a finite number$"):
        load_recipe(TINY_MOE, [f"{key}={value}"])


# --------------------------------------------------------------------------------------------
# 3. Resume compares the whole recipe
# --------------------------------------------------------------------------------------------


def _saved_run(tmp_path: Path, *overrides: str):
    from sparse_dit.presets import load_recipe
    from sparse_dit.schema import to_dict

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_00000002")
    recipe = load_recipe(TINY_MOE, [f"output_dir={out}", *overrides])
    (out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    return out, recipe


def test_resume_refuses_every_changed_field_and_lists_them(tmp_path):
    from sparse_dit.config import ConfigError
    from sparse_dit.presets import load_recipe
    from sparse_dit.recipes.run_dir import check_resume as _check_resume

    out, _ = _saved_run(tmp_path)
    changed = load_recipe(TINY_MOE, [f"output_dir={out}", "train.lr=0.002", "diffusion.shift=3.0", "data.num_frames=4"])
    with pytest.raises(ConfigError) as err:
        _check_resume(changed, out)
    msg = str(err.value)
    assert "another recipe:" in msg and "a different model" not in msg
    for part in ("train.lr: 0.001 -> 0.002", "diffusion.shift: 1.0 -> 3.0", "data.num_frames: 6 -> 4",
                 "--allow-changed data.num_frames,diffusion.shift,train.lr"):
        assert part in msg, msg
    # accepted by the flag: by field, by section, or all; the accepted changes come back for the log
    assert _check_resume(changed, out, ["train.lr", "diffusion", "data.num_frames"]) == [
        "data.num_frames: 6 -> 4", "diffusion.shift: 1.0 -> 3.0", "train.lr: 0.001 -> 0.002"]
    assert len(_check_resume(changed, out, ["all"])) == 3
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.001 -> 0\.002\. Resume"):
        _check_resume(changed, out, ["diffusion", "data"])
    with pytest.raises(ConfigError, match="a different model: use a new output_dir"):
        _check_resume(load_recipe(TINY_MOE, [f"output_dir={out}", "model.depth=3"]), out)


def test_resume_allows_extending_and_observing_a_run_by_default(tmp_path):
    from sparse_dit.presets import load_recipe
    from sparse_dit.recipes.run_dir import RESUME_FREE, check_resume as _check_resume

    out, _ = _saved_run(tmp_path)
    free = ["train.max_steps=500", "train.stop_after=3", "train.save_every=7", "train.log_every=3", "train.keep_last=5",
            "train.sample_every=9", "data.num_workers=2", f"output_dir={tmp_path / 'moved'}", "parallel.timeout_s=60",
            "train.export_steps=[5,10]"]
    assert sorted(o.split("=")[0] for o in free) == sorted(RESUME_FREE)
    lines = _check_resume(load_recipe(TINY_MOE, free), out)
    assert len(lines) == len(free) and "train.max_steps: 200 -> 500" in lines
    assert _check_resume(load_recipe(TINY_MOE, [f"output_dir={out}"]), out) == []


def test_a_field_added_to_the_schema_after_the_run_is_not_a_change(tmp_path):
    from sparse_dit.config import ConfigError
    from sparse_dit.presets import load_recipe
    from sparse_dit.recipes.run_dir import check_resume as _check_resume

    out, recipe = _saved_run(tmp_path)
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    del saved["model"]["moe"]["balance_scope"], saved["train"]["export_steps"]  # as written before these fields existed
    (out / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert _check_resume(recipe, out) == []
    with pytest.raises(ConfigError, match=r"model.moe.balance_scope: 'micro_batch' -> 'global'"):  # a real change still counts
        _check_resume(load_recipe(TINY_MOE, [f"output_dir={out}", "model.moe.balance_scope=global"]), out)


@pytest.mark.parametrize("content", ["", "\n", "[oops", "- a list\n"])
def test_an_empty_or_broken_saved_recipe_is_named_not_called_another_model(tmp_path, content):
    from sparse_dit.config import ConfigError
    from sparse_dit.recipes.run_dir import check_resume as _check_resume

    out, recipe = _saved_run(tmp_path)
    (out / "recipe.yaml").write_text(content)
    with pytest.raises(ConfigError) as err:
        _check_resume(recipe, out)
    msg = str(err.value)
    assert str(out / "recipe.yaml") in msg and "--allow-changed all" in msg and "different model" not in msg, msg
    assert ("is empty" in msg) == (not content.strip())
    assert ("not readable YAML" in msg) == content.startswith("[") and ("holds a list" in msg) == content.startswith("-")
    assert _check_resume(recipe, out, ["all"])[0].startswith(str(out / "recipe.yaml"))


# --------------------------------------------------------------------------------------------
# 5. data --overwrite: a new folder swapped in at the end, never the command's inputs
# --------------------------------------------------------------------------------------------


def _write_mp4(path: Path, frames, fps: float = 8.0) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _ramp(num_frames: int, size: int = 16):
    import numpy as np

    levels = (8 * np.arange(num_frames)).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, size, size, 3)).copy()


def test_overwrite_refuses_an_out_that_holds_the_inputs(tmp_path, capsys):
    from sparse_dit.cli import main as cli_main

    src = tmp_path / "project" / "clips"
    src.mkdir(parents=True)
    for i in range(2):
        _write_mp4(src / f"v{i}.mp4", _ramp(8))
    (tmp_path / "project" / "notes.txt").write_text("unrelated")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out in (src, src.parent):  # the source folder itself, or a folder above it
        rc = cli_main(["data", "folder", "--videos", str(src), "--out", str(out), "--frames", "4", "--resolution", "16x16",
                       "--workers", "0", "--no-progress", "--overwrite"])
        err = capsys.readouterr().err
        assert rc == 2 and f"out={str(out)!r} holds the input {str(src)!r}" in err and "Traceback" not in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing deleted, nothing left behind
    out = tmp_path / "ds"
    assert cli_main(["data", "folder", "--videos", str(src), "--out", str(out), "--frames", "4", "--resolution", "16x16",
                     "--workers", "0", "--no-progress"]) == 0


def test_overwrite_keeps_the_old_dataset_until_the_new_one_is_complete(tmp_path):
    import datasets

    from sparse_dit.data import generate_physics_videos, write_physics_dataset
    from sparse_dit.data.hf import physics_features, physics_record, write_dataset

    out = tmp_path / "ds"
    write_physics_dataset(out, "parabola", "id", 3, frames=4, height=16, width=16, seed=0, workers=1, progress=False)

    def rows():  # the generator dies after one row (a crash, a bad video, Ctrl-C)
        yield generate_physics_videos("parabola", "id", 1, frames=4, height=16, width=16, seed=1, workers=1)[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dataset(rows(), out, physics_features(), physics_record, overwrite=True)
    assert len(datasets.load_from_disk(str(out))) == 3  # the old dataset, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no .ds.new*/.ds.old* left behind
    write_physics_dataset(out, "parabola", "id", 2, frames=4, height=16, width=16, seed=5, workers=1, progress=False, overwrite=True)
    assert len(datasets.load_from_disk(str(out))) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


# --------------------------------------------------------------------------------------------
# 6. Truncated videos are skipped and named, never padded
# --------------------------------------------------------------------------------------------


def _ffmpeg_mp4(path: Path, frames: int = 24) -> Path:
    import subprocess

    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=32x32:rate=8",
                    "-frames:v", str(frames), "-pix_fmt", "yuv420p", "-c:v", "libx264", "-g", "4", "-movflags", "+faststart", str(path)],
                   check=True, timeout=60)
    return path


def test_a_truncated_video_is_skipped_and_named_never_padded(tmp_path, capsys):
    import datasets

    from sparse_dit.cli import main as cli_main
    from sparse_dit.data import TruncatedVideoError, VideoFolderDataset, probe_video, read_video

    src = tmp_path / "clips"
    src.mkdir()
    full = _ffmpeg_mp4(src / "whole.mp4")
    data = full.read_bytes()
    (src / "cut.mp4").write_bytes(data[: int(len(data) * 0.6)])  # the index (faststart) declares 24 frames; the tail is gone
    assert probe_video(full).num_frames == 24 and read_video(full).shape[0] == 24
    with pytest.raises(TruncatedVideoError, match=r"truncated: \d+ of the 24 frames it declares"):
        probe_video(src / "cut.mp4")
    with pytest.raises(ValueError):  # read on its own (no probe): an error or TruncatedVideoError, never 16 frames
        read_video(src / "cut.mp4", list(range(16)))
    with pytest.raises(TruncatedVideoError, match="frame 30 wanted, the last decodable one is 23"):  # was: frame 23 repeated
        read_video(full, [20, 30])
    with pytest.warns(UserWarning, match="cut.mp4"):
        ds = VideoFolderDataset(src, num_frames=16)
    assert len(ds) == 1 and ds.num_skipped == 1 and ds.skipped[0][0].endswith("cut.mp4") and "truncated" in ds.skipped[0][1]
    out = tmp_path / "ds"
    rc = cli_main(["data", "folder", "--videos", str(src), "--out", str(out), "--frames", "16", "--resolution", "32x32",
                   "--workers", "0", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0 and "skipped 1 undecodable" in printed and "skipped cut.mp4: TruncatedVideoError: truncated" in printed, printed
    assert datasets.load_from_disk(str(out))["source"] == ["whole.mp4"]


# --------------------------------------------------------------------------------------------
# 7. Malformed configs: one ConfigError line each
# --------------------------------------------------------------------------------------------

MALFORMED = {  # file text -> what the one line must say
    "syntax": (b"preset: debug-E4A2\nmodel: {depth: 2\n", "YAML syntax error at line 3, column 1: expected ',' or '}'"),
    "tab": (b"\t- x: 1\n", "YAML syntax error at line 1, column 1"),
    "latin1": ("preset: debug-E4A2\n# caf\u00e9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 24)"),
    "moe_scalar": (b"preset: debug-E4A2\nmodel:\n  moe: 4\n", "model.moe=4 has type int; expected a mapping"),
    "moe_list": (b"preset: debug-E4A2\nmodel:\n  moe: [1, 2]\n", "model.moe=[1, 2] has type list; expected a mapping"),
    "moe_scalar_no_preset": (b"model:\n  moe: 4\n", "model.moe=4 has type int; expected MoEConfig"),
    "preset_int": (b"preset: 5\n", "preset=5 has type int; expected a preset name"),
    "preset_list": (b"preset: [a]\n", "preset=['a'] has type list; expected a preset name"),
    "betas_short": (b"train:\n  betas: [0.9]\n", "train.betas=[0.9] has type list; expected a list of 2 (float, float)"),
    "betas_long": (b"train:\n  betas: [0.9, 0.99, 0.5]\n", "expected a list of 2 (float, float)"),
    "betas_high": (b"train:\n  betas: [1.5, 0.99]\n", "train.betas=[1.5, 0.99] is out of range; allowed: two numbers in [0, 1)"),
    "betas_one": (b"train:\n  betas: [0.9, 1.0]\n", "is out of range; allowed: two numbers in [0, 1)"),
    "betas_negative": (b"train:\n  betas: [-0.1, 0.99]\n", "is out of range"),
    "duplicate_key": (b"train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", "duplicate key 'lr' at line 3 (first at line 2)"),
    "duplicate_section": (b"train:\n  lr: 1.0e-3\ntrain:\n  seed: 2\n", "duplicate key 'train' at line 3 (first at line 1)"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_each_malformed_config_is_one_clear_line(tmp_path, case):
    from sparse_dit.config import ConfigError
    from sparse_dit.presets import load_recipe

    text, want = MALFORMED[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert want in msg and "\n" not in msg, msg


def test_malformed_config_from_the_cli_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(MALFORMED["duplicate_key"][0])
    proc = cli(["train", str(path)], timeout=120)
    assert proc.returncode == 2 and "duplicate key 'lr'" in _one_line(proc)



@pytest.mark.timeout(300)
def test_bad_run_settings_are_one_line_from_sparse_dit_train(tmp_path):
    from sparse_dit.presets import load_recipe
    from sparse_dit.schema import to_dict

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = _train(blocker / "run", "train.max_steps=1")  # output_dir under a file: cannot be created
    assert proc.returncode == 2 and f"output_dir={str(blocker / 'run')!r} cannot be written" in _one_line(proc)
    proc = _train(tmp_path / "enc", "train.max_steps=1", f"data.text_encoder={tmp_path / 'no_encoder'}")
    assert proc.returncode == 2 and f"data.text_encoder={str(tmp_path / 'no_encoder')!r}" in _one_line(proc)
    # a checkpoint written by 2 ranks, resumed by 1
    out = tmp_path / "two"
    step = out / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text(step.name)
    recipe = load_recipe(TINY_MOE, [*FAST, f"output_dir={out}", "train.max_steps=4"])
    (out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    torch.save({"ema": {}, "step": 2, "world_size": 2, "rank": 0}, step / "trainer_rank00000.pt")
    proc = _train(out, "train.max_steps=4")
    assert proc.returncode == 2 and "was written by 2 ranks, this run has 1" in _one_line(proc)

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _tiny_paths() -> list[str]:
    from sparse_dit.presets import load_recipe
    from sparse_dit.recipes.run_dir import flat_fields as _flat
    from sparse_dit.schema import to_dict

    return sorted(_flat(to_dict(load_recipe(TINY_MOE)))) + ["preset", "model.moe", "train.context", "nosuch", "train.nosuch"]


_PATHS = _tiny_paths()


def _one_config_error_or_none(fn) -> None:
    from sparse_dit.config import ConfigError

    try:
        fn()
    except ConfigError as exc:  # anything else is a traceback for the user
        assert "\n" not in str(exc) and 0 < len(str(exc)) < 2000, str(exc)


@hypothesis.settings(max_examples=300, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(path=st.sampled_from(_PATHS), value=_VALUES)
def test_any_value_at_any_recipe_field_is_valid_or_one_config_error(path, value):
    from sparse_dit.presets import load_recipe
    from sparse_dit.schema import load_yaml

    raw = load_yaml(TINY_MOE)
    node = raw
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
    node[leaf] = value
    _one_config_error_or_none(lambda: load_recipe(data=raw))


@hypothesis.settings(max_examples=300, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(key=st.sampled_from(_PATHS) | st.text(max_size=12), raw=st.text(max_size=16))
def test_any_override_text_is_valid_or_one_config_error(key, raw):
    from sparse_dit.presets import load_recipe

    _one_config_error_or_none(lambda: load_recipe(TINY_MOE, [f"{key}={raw}"]))


@hypothesis.settings(max_examples=150, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(data=st.binary(max_size=64) | st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_file_bytes_are_a_recipe_or_one_config_error(tmp_path_factory, data):
    from sparse_dit.presets import load_recipe

    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_bytes(data)
    _one_config_error_or_none(lambda: load_recipe(path))


# --------------------------------------------------------------------------------------------
# 8. A frozen rank; a stale build lock
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.distributed
def test_a_frozen_rank_makes_the_other_exit_within_parallel_timeout_s(tmp_path):
    import signal
    import subprocess
    import time

    from _launch import rank_env
    from sparse_dit.parallel.engine import free_port

    port, out = free_port(), tmp_path / "run"
    args = [sys.executable, "-m", "sparse_dit.recipes.train", TINY_MOE, "--set", *FAST, "train.max_steps=100000", "train.save_every=100000",
            f"output_dir={out}", "parallel.timeout_s=5"]
    logs = [open(tmp_path / f"rank{r}.log", "w") for r in range(2)]  # files, not pipes: a full pipe would block a rank
    procs = [subprocess.Popen(args, env=rank_env(r, 2, port), stdout=logs[r], stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        deadline = time.monotonic() + 200
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "rank0.log").read_text()[-3000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGSTOP)  # rank 1 freezes mid-run
        frozen_at = time.monotonic()
        procs[0].wait(timeout=120)
        waited = time.monotonic() - frozen_at
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for f in logs:
            f.close()
    err = (tmp_path / "rank0.log").read_text()
    assert procs[0].returncode == 4, err[-3000:]
    assert waited < 60, waited  # 5 s timeout (plus a step in flight), not DeepSpeed's 10 minutes
    lines = [line for line in err.splitlines() if line.startswith("sparse-dit train:")]
    assert len(lines) == 1 and "rank 0: rank 1 stopped answering (frozen or dead)" in lines[0] and "parallel.timeout_s=5" in lines[0], err[-3000:]
    assert "Traceback" not in err


def test_a_stale_deepspeed_build_lock_is_removed_and_a_fresh_one_reported(tmp_path, monkeypatch):
    import time

    from sparse_dit.parallel.engine import check_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert check_build_lock() is None
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(exist_ok=True)
    lock.touch()
    note = check_build_lock()
    assert lock.exists() and str(lock) in note and "waiting for another start's build" in note
    old = time.time() - 3600
    os.utime(lock, (old, old))
    note = check_build_lock()
    assert not lock.exists() and note.startswith(f"removed a stale DeepSpeed build lock {lock} (60 min old")


if __name__ == "__main__":
    {"poison": _poison_worker}[sys.argv[1]](Path(sys.argv[2]))


def test_a_field_added_after_a_vae_run_is_not_a_change_either(tmp_path):
    # the VAE's recipe is another class: a saved VAE recipe lacking a field added since (here
    # train.compile) resumes; a real change is still refused
    from sparse_dit.config import ConfigError
    from sparse_dit.recipes.run_dir import check_resume as _check_resume
    from sparse_dit.recipes.train_vae import load_vae_recipe
    from sparse_dit.schema import to_dict

    out = tmp_path / "vae-run"
    recipe = load_vae_recipe(REPO / "recipes" / "vae" / "light.yaml", [f"output_dir={out}"])
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_00000010\n")
    saved = to_dict(recipe)
    del saved["train"]["compile"]  # as written before the field existed
    (out / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert _check_resume(recipe, out) == []
    with pytest.raises(ConfigError, match=r"train.lr: 0.0005 -> 0.001"):
        _check_resume(load_vae_recipe(REPO / "recipes" / "vae" / "light.yaml", [f"output_dir={out}", "train.lr=0.001"]), out)
