"""``sparse-dit bench``: run the performance scripts in the repository's ``benchmarks/`` folder.

Benchmarks print ratios measured side by side in one run (MoE vs dense, ours vs DeepSpeed's MoE
layer, dense vs sparse training throughput); their results are recorded in BENCHMARKS.md. They
live in the source checkout, not in the installed package, so this command needs the
repository (an editable install, or ``--dir``).

    sparse-dit bench --list
    sparse-dit bench moe_layer [-- extra args for the script]
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

__all__ = ["add_arguments", "run", "find_benchmarks"]


def find_benchmarks(directory: str | None = None) -> Path:
    """The benchmarks folder: ``directory`` if given, else the one beside this checkout's package."""
    candidates = [Path(directory)] if directory else [Path(__file__).resolve().parents[1] / "benchmarks", Path.cwd() / "benchmarks"]
    for c in candidates:
        if c.is_dir():
            return c
    raise SystemExit(
        "sparse-dit bench: no benchmarks/ folder found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); run from a source checkout or pass --dir"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="benchmark script name without .py (see --list)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    parser.add_argument("--list", action="store_true", help="list the benchmark scripts")
    parser.add_argument("--dir", default=None, help="benchmarks folder (default: the checkout's)")


def run(args: argparse.Namespace) -> int:
    folder = find_benchmarks(args.dir)
    scripts = sorted(p.stem for p in folder.glob("*.py") if not p.name.startswith("_"))
    if args.list or not args.name:
        print("\n".join(scripts))
        return 0
    if args.name not in scripts:
        raise SystemExit(f"sparse-dit bench: unknown benchmark {args.name!r}; available: {', '.join(scripts)}")
    extra = [a for a in args.args if a != "--"]
    sys.argv = [str(folder / f"{args.name}.py"), *extra]
    runpy.run_path(sys.argv[0], run_name="__main__")
    return 0
