"""``sparse-dit flops``: analytic params and forward MACs of a preset or a recipe/model YAML.

The counting is :mod:`sparse_dit.flops`; this command also needs the preset table, which itself
needs :func:`sparse_dit.flops.match_compute`, so it lives apart (one module each way, no cycle).

    sparse-dit flops DiT-XL/2 --latent 4,1,32,32
    sparse-dit flops S/2-E8A2 --latent 4,8,32,32 --text-len 32 --json
    sparse-dit flops --list
"""

from __future__ import annotations

import argparse
import json

from sparse_dit.config import ModelConfig
from sparse_dit.flops import COMPONENTS, count
from sparse_dit.presets import list_presets, load_recipe, preset_config
from sparse_dit.schema import load_yaml

__all__ = ["add_arguments", "run"]


def _parse_latent(text: str) -> tuple[int, int, int, int]:
    try:
        parts = tuple(int(v) for v in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"--latent {text!r} must be four comma-separated ints C,T,H,W")
    return parts  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="preset name (see --list) or a recipe/model YAML")
    parser.add_argument("--latent", type=_parse_latent, default=None, help="C,T,H,W of the latent (default 4,1,32,32 or C,8,32,32 for video)")
    parser.add_argument("--text-len", type=int, default=0, help="caption tokens for cross-attention")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--list", action="store_true", help="print every preset name and exit")


def _resolve(name: str) -> ModelConfig:
    if name.endswith((".yaml", ".yml")):
        raw = load_yaml(name)
        if "model" in raw or "preset" in raw:
            return load_recipe(data=raw).model
        return ModelConfig.from_dict(raw, prefix="model")
    return preset_config(name)


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name in list_presets():
            print(name)
        return 0
    if not args.model:
        raise SystemExit("sparse-dit flops: give a preset name or YAML (or --list)")
    cfg = _resolve(args.model)
    latent = args.latent or (cfg.in_channels, 1 if cfg.num_classes else 8, 32, 32)
    out = count(cfg, latent, text_len=args.text_len)
    if args.json:
        print(json.dumps({"model": args.model, "latent": list(latent), "text_len": args.text_len, **out}))
        return 0
    print(f"{args.model}  latent C,T,H,W={','.join(map(str, latent))}  tokens={out['tokens']}  text_len={args.text_len}")
    print(f"{'component':<18}{'params (M)':>12}{'active (M)':>12}{'GMACs':>12}")
    for comp in COMPONENTS:
        print(
            f"{comp:<18}{out['params'][comp] / 1e6:>12.3f}{out['active_params_by_component'][comp] / 1e6:>12.3f}"
            f"{out['macs_by_component'][comp] / 1e9:>12.3f}"
        )
    print(f"{'total':<18}{out['total_params'] / 1e6:>12.3f}{out['active_params'] / 1e6:>12.3f}{out['gmacs']:>12.3f}")
    print(f"GFLOPs (2 x MACs): {out['gflops']:.3f}")
    return 0
