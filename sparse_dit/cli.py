"""The ``sparse-dit`` console script: one entry point, one subcommand per job.

Each subcommand lives in the module that owns the work; that module exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
subcommand runs, so ``sparse-dit flops`` never pays for importing deepspeed.

    sparse-dit data physics ...        write a physics-world video dataset
    sparse-dit train RECIPE.yaml ...   train (one process, or N ranks via the deepspeed launcher)
    sparse-dit train-vae RECIPE.yaml   train a video VAE on the same trainer (recipes/vae/)
    sparse-dit generate RUN_DIR ...    sample videos from a trained model
    sparse-dit eval ...                quality / cost evaluations and dense-vs-sparse reports
    sparse-dit convert dit CKPT ...    an official DiT checkpoint -> a from_pretrained folder
    sparse-dit upcycle DENSE_DIR ...   a dense model -> an MoE model with the same output (sparse upcycling)
    sparse-dit flops PRESET ...        analytic params and MACs
    sparse-dit bench ...               performance benchmarks
    sparse-dit quickstart --out DIR    the end-to-end demo that `make demo` runs
    sparse-dit study SPEC --out DIR    a dense-vs-sparse grid of train runs, with intervals over seeds
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sparse_dit.schema import ConfigError

__all__ = ["main", "SUBCOMMANDS"]

# name -> (module implementing add_arguments/run, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "data": ("sparse_dit.data.cli", "build video datasets (physics world, folders of videos)"),
    "train": ("sparse_dit.recipes.train", "train a recipe under DeepSpeed (1 process or N ranks)"),
    "train-vae": ("sparse_dit.recipes.train_vae", "train a video VAE recipe (recipes/vae/) on the same trainer"),
    "generate": ("sparse_dit.recipes.generate", "sample videos from a trained model"),
    "eval": ("sparse_dit.evals.cli", "evaluate runs: quality, inference cost, dense-vs-sparse reports"),
    "convert": ("sparse_dit.convert", "official checkpoints (facebookresearch/DiT) -> a from_pretrained folder"),
    "upcycle": ("sparse_dit.upcycle", "a dense model -> an MoE model with the same output (sparse upcycling)"),
    "flops": ("sparse_dit.flops_cli", "analytic params and forward MACs of a preset or config"),
    "bench": ("sparse_dit.bench", "run the performance benchmarks"),
    "quickstart": ("sparse_dit.recipes.quickstart", "end-to-end demo: data, train both models, evaluate, report"),
    "study": ("sparse_dit.recipes.study", "a resumable dense-vs-sparse grid at matched compute, over seeds and sizes"),
}


def _load(name: str):
    module_name = SUBCOMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise SystemExit(f"sparse-dit {name}: this install has no {module_name} module") from exc
        raise


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-dit", description="Sparse (MoE) video diffusion transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (_, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # import only the module of the subcommand being run
            _load(name).add_arguments(p)
    return parser


# Errors that are about the user's input, not a bug: a missing file or folder (a run directory
# that does not exist), a bad value (ConfigError, and DatasetKindError, a dataset of the wrong
# kind, which subclasses it). The CLI prints them as one line; SPARSE_DIT_TRACEBACK=1 re-raises.
_USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, ConfigError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run ``sparse-dit ARGV``; returns the exit code (2 for input errors, printed as one line).

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(_load(args.command).run(args) or 0)
    except _USER_ERRORS as exc:
        if os.environ.get("SPARSE_DIT_TRACEBACK"):
            raise
        print(f"sparse-dit {args.command}: {_first_line(exc)}", file=sys.stderr, flush=True)
        return 2
    except BrokenPipeError:  # `sparse-dit flops --list | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
