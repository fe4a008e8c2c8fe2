"""Chaos: kill -9 a 2-rank training run again and again, resume it each time, and check that
every resume used a complete checkpoint and that the final weights equal an uninterrupted run's.

Not run by CI (minutes of wall time). Usage::

    DS_ACCELERATOR=cpu python benchmarks/chaos.py --kills 8 --out /tmp/chaos

Each round starts the two ranks the way the deepspeed launcher does (RANK/WORLD_SIZE/... env),
waits for a moment chosen at random (half the time: the instant a checkpoint folder appears and
``latest`` does not name it yet, i.e. inside a save), sends SIGKILL to one rank, then to the other
(what a scheduler does with a job whose rank died). It then checks the newest complete checkpoint
(``latest``): every rank's files present and loadable weights-only. The next round resumes.
At the end the run finishes uninterrupted and its ``final/model.safetensors`` is compared with a
reference run that was never killed. Prints one JSON line: kills, kills inside a save, resumes,
corrupt checkpoints, lost steps (logged past the checkpoint a resume went back to), max |diff|.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from sparse_dit.parallel.checkpoint import CheckpointError, safe_load
from sparse_dit.parallel.engine import free_port

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny" / "moe.yaml")


def _overrides(args: argparse.Namespace, out: Path) -> list[str]:
    return [f"train.max_steps={args.steps}", f"train.save_every={args.save_every}", "train.global_batch_size=4", "data.num_videos=32",
            "train.log_every=1", "train.keep_last=2", "parallel.timeout_s=30", f"output_dir={out}"]


def _start(args: argparse.Namespace, out: Path, log: Path) -> list[subprocess.Popen]:
    port = free_port()
    cmd = [sys.executable, "-m", "sparse_dit.recipes.train", RECIPE, "--set", *_overrides(args, out)]
    procs = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, env=env, stdout=open(log.with_suffix(f".rank{r}.log"), "a"), stderr=subprocess.STDOUT))
    return procs


def _latest(out: Path) -> str | None:
    marker = out / "checkpoints" / "latest"
    return marker.read_text().strip() if marker.is_file() else None


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def _complete(out: Path, tag: str) -> bool:
    """Every file of a 2-rank checkpoint present and loadable weights-only."""
    folder = out / "checkpoints" / tag
    files = [folder / f"trainer_rank{r:05d}.pt" for r in range(2)] + [folder / "mp_rank_00_model_states.pt"]
    files += sorted(folder.glob("*optim_states.pt"))
    if len(files) < 5 or not all(f.is_file() for f in files):
        return False
    try:
        for f in files:
            safe_load(f)
    except CheckpointError:
        return False
    return True


def _wait(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank failed (exit codes {[p.returncode for p in procs]}); see the logs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/chaos"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    ref, run = args.out / "reference", args.out / "killed"

    t0 = time.monotonic()
    _wait(_start(args, ref, args.out / "reference"), 900)
    ref_seconds = time.monotonic() - t0

    stats = {"kills": 0, "kills_in_save": 0, "resumes": 0, "corrupt_checkpoints": 0, "lost_steps": 0}
    for _ in range(args.kills):
        before = _latest(run)
        if before is not None:
            stats["resumes"] += 1
        procs = _start(args, run, args.out / "killed")
        started = time.time()
        done = int(before.split("_")[1]) if before else 0
        in_save = rng.random() < 0.5
        # inside the save of a checkpoint 1-2 saves ahead, or after 1..2*save_every more steps
        target = (done // args.save_every + rng.randint(1, 2)) * args.save_every if in_save else done + rng.randint(1, 2 * args.save_every)
        target = min(target, args.steps - 1 if not in_save else args.steps)
        deadline = time.monotonic() + 600
        victim = rng.randrange(2)
        metrics = run / "metrics.jsonl"
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            if in_save:  # the folder of the target checkpoint exists and latest does not name it yet: a save is under way
                folder = run / "checkpoints" / f"step_{target:08d}"  # written by this start (not a partial one of before)
                if folder.is_dir() and folder.stat().st_mtime > started and _latest(run) != folder.name:
                    break
                time.sleep(0.002)
            else:  # rows logged by this start (the file is rewritten at resume, so newer than the start)
                if metrics.is_file() and metrics.stat().st_mtime > started and _steps_logged(run) >= target:
                    break
                time.sleep(0.01)
        if any(p.poll() is not None for p in procs):  # finished before the kill: the run is done
            _wait(procs, 60)
            break
        procs[victim].send_signal(signal.SIGKILL)
        time.sleep(rng.uniform(0.0, 0.5))
        procs[1 - victim].send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
        stats["kills"] += 1
        stats["kills_in_save"] += int(in_save)
        tag = _latest(run)
        if tag is not None:
            if not _complete(run, tag):
                stats["corrupt_checkpoints"] += 1
            stats["lost_steps"] += max(0, _steps_logged(run) - int(tag.split("_")[1]))
    stats["resumes"] += int(_latest(run) is not None)
    _wait(_start(args, run, args.out / "killed"), 900)  # finish uninterrupted

    a, b = load_file(str(ref / "final" / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    stats.update(steps=args.steps, save_every=args.save_every, final_weights_equal=all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys(),
                 max_abs_diff=diff, reference_seconds=round(ref_seconds, 1), cpu=_cpu())
    print(json.dumps(stats))
    return 0 if stats["final_weights_equal"] and not stats["corrupt_checkpoints"] else 1


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
