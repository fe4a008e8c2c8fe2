"""``sparse-dit flops``: analytic params and forward MACs of a preset or a recipe/model YAML.

The counting is :mod:`sparse_dit.flops`; this command also needs the preset table, which itself
needs :func:`sparse_dit.flops.match_compute`, so it lives apart (one module each way, no cycle).

    sparse-dit flops DiT-XL/2 --latent 4,1,32,32
    sparse-dit flops S/2-E8A2 --latent 4,8,32,32 --text-len 32 --json
    sparse-dit flops --list
    sparse-dit flops recipes/latent/dit.yaml --video 17,64,64    # the DiT on the recipe autoencoder's latent + the VAE apart
"""

from __future__ import annotations

import argparse
import json

from sparse_dit.autoencoder import autoencoder_config
from sparse_dit.config import ModelConfig
from sparse_dit.flops import COMPONENTS, count
from sparse_dit.presets import list_presets, load_recipe, preset_config
from sparse_dit.schema import from_dict, load_yaml
from sparse_dit.vae import CausalVideoVAE, VAEConfig, vae_macs

__all__ = ["add_arguments", "run"]


def _parse_latent(text: str) -> tuple[int, int, int, int]:
    try:
        parts = tuple(int(v) for v in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"--latent {text!r} must be four comma-separated ints C,T,H,W")
    return parts  # type: ignore[return-value]


def _parse_video(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(v) for v in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--video {text!r} must be three comma-separated ints T,H,W (pixels)")
    return parts  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="preset name (see --list) or a recipe/model YAML")
    parser.add_argument("--video", type=_parse_video, default=None,
                        help="T,H,W of a pixel video: the latent is the recipe autoencoder's (its encode/decode MACs listed apart)")
    parser.add_argument("--latent", type=_parse_latent, default=None, help="C,T,H,W of the latent (default 4,1,32,32 or C,8,32,32 for video)")
    parser.add_argument("--text-len", type=int, default=0, help="caption tokens for cross-attention")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--list", action="store_true", help="print every preset name and exit")


def _resolve(name: str) -> tuple[ModelConfig, str]:
    """The model config and the recipe's autoencoder (``identity`` for presets and model YAMLs)."""
    if name.endswith((".yaml", ".yml")):
        raw = load_yaml(name)
        if "model" in raw or "preset" in raw:
            recipe = load_recipe(data=raw)
            return recipe.model, recipe.autoencoder
        return ModelConfig.from_dict(raw, prefix="model"), "identity"
    return preset_config(name), "identity"


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name in list_presets():
            print(name)
        return 0
    if not args.model:
        raise SystemExit("sparse-dit flops: give a preset name or YAML (or --list)")
    cfg, spec = _resolve(args.model)
    vae: dict | None = None
    latent = args.latent or (cfg.in_channels, 1 if cfg.num_classes else 8, 32, 32)
    if args.video is not None:
        if args.latent is not None:
            raise SystemExit("sparse-dit flops: --video and --latent exclude each other")
        raw = autoencoder_config(spec)
        if raw is None:
            latent = (cfg.in_channels, *args.video)  # pixel space
        else:
            raw.pop("kind", None)
            vcfg = from_dict(VAEConfig, raw, "vae.")
            try:
                latent = CausalVideoVAE.latent_shape_of(vcfg, *args.video)
            except ValueError as exc:
                raise SystemExit(f"sparse-dit flops: --video {','.join(map(str, args.video))}: {exc}") from None
            m = vae_macs(vcfg, *args.video)
            vae = {"autoencoder": spec, "params": m["params"], "encode_gmacs": m["encode"] / 1e9, "decode_gmacs": m["decode"] / 1e9}
    out = count(cfg, latent, text_len=args.text_len)
    if args.json:
        print(json.dumps({"model": args.model, "latent": list(latent), "text_len": args.text_len, **out, "autoencoder": vae}))
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
    if vae is not None:  # apart from the DiT's: once per video, not per sampler step
        print(f"autoencoder {vae['autoencoder']} ({vae['params'] / 1e6:.3f}M params), per {','.join(map(str, args.video))} video: "
              f"encode {vae['encode_gmacs']:.3f} GMACs, decode {vae['decode_gmacs']:.3f} GMACs")
    return 0
