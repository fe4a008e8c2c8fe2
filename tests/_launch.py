"""Start N CPU ranks the way the deepspeed launcher does (env vars), for the distributed tests.

Launching ranks is the expensive part of these tests, so each launch runs several checks. The
ranks get exactly the env the ``deepspeed`` launcher sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) plus DS_ACCELERATOR=cpu and one thread each (2 ranks on 2 cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sparse_dit.parallel.engine import free_port

REPO = Path(__file__).resolve().parents[1]
TINY_MOE = str(REPO / "recipes" / "tiny" / "moe.yaml")
TINY_DENSE = str(REPO / "recipes" / "tiny" / "dense.yaml")


def rank_env(rank: int = 0, world: int = 1, port: int | None = None) -> dict:
    """The environment of one rank (also used for single-process runs: world 1)."""
    env = dict(os.environ)
    env.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port or free_port()), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO / "tests") + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def launch(args: list[str], world: int = 2, timeout: float = 240) -> list[str]:
    """Run ``python ARGS`` as ``world`` ranks; raise with every rank's output tail on failure.

    Returns:
        Each rank's combined stdout/stderr.
    """
    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, *args], env=rank_env(r, world, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        tails = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{o[-4000:]}" for r, (p, o) in enumerate(zip(procs, outs)))
        raise AssertionError(f"ranks failed:\n{tails}")
    return outs


def cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``sparse-dit ARGS`` (the console script's module) and return the completed process."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "sparse_dit.cli", *args], env=env, capture_output=True, text=True, timeout=timeout)


def in_forked_child(target, *args, timeout: float = 60.0, what: str = "the forked child"):
    """Run ``target(queue, *args)`` in a child forked from this process; return what it put on the
    queue. Raise when the child is still running after ``timeout`` s (killed) or exits with an error."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=target, args=(q, *args))
    proc.start()
    proc.join(timeout=timeout)
    if proc.is_alive():
        proc.kill()
        raise AssertionError(f"{what} hung (still running after {timeout:.0f} s)")
    if proc.exitcode != 0:
        raise AssertionError(f"{what} exited with {proc.exitcode}")
    return q.get(timeout=5)
