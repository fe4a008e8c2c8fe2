"""Analytic parameter and FLOP counting, and compute matching between dense and sparse models.

Counts are multiply-accumulates (MACs) of the matrix products of one forward pass for one
sample, split by component. DiT's paper reports these same numbers under the name "Gflops"
(DiT-XL/2 at 256x256: 118.6), so ``gmacs`` is what to compare with the paper; ``gflops`` is
2 x gmacs, the convention of ``torch.utils.flop_counter``. Elementwise work (norms, rotary
rotation, activations, softmax) is not counted: it is a few percent and bandwidth-bound.

Active params/MACs are what one token actually uses: for an MoE layer, the router, the k routed
experts and the shared experts, not all E experts.

CLI::

    sparse-dit flops DiT-XL/2 --latent 4,1,32,32
    sparse-dit flops S/2-E8A2 --latent 4,8,32,32 --text-len 32 --json
    sparse-dit flops --list
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from sparse_dit.config import ModelConfig, load_recipe, load_yaml, ConfigError

__all__ = ["count", "num_tokens", "match_compute", "add_arguments", "run", "COMPONENTS"]

COMPONENTS = ("embeddings", "adaln", "attention_proj", "attention_scores", "cross_attention", "ffn", "final")


def num_tokens(config: ModelConfig, latent_shape: tuple[int, int, int, int]) -> int:
    """Tokens N for a latent (C, T, H, W); raises when a dim is not divisible by the patch."""
    C, T, H, W = latent_shape
    if C != config.in_channels:
        raise ConfigError(f"latent channels C={C} do not match model.in_channels={config.in_channels}")
    n = 1
    for axis, size, p in zip("THW", (T, H, W), config.patch_size):
        if size < 1 or size % p:
            raise ConfigError(f"latent {axis}={size} must be a positive multiple of the patch size {p}")
        n *= size // p
    return n


def _dense_ffn_counts(config: ModelConfig) -> dict[str, int]:
    D, F = config.hidden_size, config.ffn_hidden
    if config.activation == "swiglu":
        return {"total_params": 3 * D * F, "active_params": 3 * D * F, "macs_per_token": 3 * D * F}
    params = 2 * D * F + F + D
    return {"total_params": params, "active_params": params, "macs_per_token": 2 * D * F}


def _ffn_counts(config: ModelConfig, layer_idx: int) -> dict[str, int]:
    from sparse_dit.moe.placement import is_moe_layer

    if is_moe_layer(config.moe, layer_idx):
        from sparse_dit.moe.flops import moe_layer_counts

        return moe_layer_counts(config)
    return _dense_ffn_counts(config)


def count(
    config: ModelConfig,
    latent_shape: tuple[int, int, int, int],
    text_len: int = 0,
) -> dict[str, Any]:
    """Params and forward MACs of one sample.

    Args:
        config: the model.
        latent_shape: (C, T, H, W) of the latent video.
        text_len: text tokens L fed to cross-attention (0 = no caption).

    Returns:
        ``{"total_params", "active_params", "macs", "gmacs", "gflops", "tokens",
        "params": {component: n}, "macs_by_component": {component: n}}``.
    """
    D, H = config.hidden_size, config.num_heads
    N = num_tokens(config, latent_shape)
    P = config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
    C = config.in_channels
    L = text_len if config.text_dim > 0 else 0
    params = {k: 0 for k in COMPONENTS}
    active = {k: 0 for k in COMPONENTS}
    macs = {k: 0 for k in COMPONENTS}

    def add(comp: str, p: int, m: int, a: int | None = None) -> None:
        params[comp] += p
        active[comp] += p if a is None else a
        macs[comp] += m

    # Embeddings: patches, timestep MLP, class table, text projections
    add("embeddings", C * P * D + D, N * C * P * D)
    Fq = config.timestep_freq_dim
    add("embeddings", Fq * D + D + D * D + D, Fq * D + D * D)
    if config.num_classes > 0:
        add("embeddings", (config.num_classes + 1) * D, 0, a=D)  # a lookup reads one row
    if config.text_dim > 0:
        Dt = config.text_dim
        add("embeddings", Dt, 0)  # learned null caption
        add("embeddings", Dt * D + D + D * D + D, (Dt * D + D * D) if L else 0)  # pooled -> adaLN
        if config.cross_attention:
            add("embeddings", Dt * D + D + D * D + D, L * (Dt * D + D * D))  # tokens -> cross-attn

    for i in range(config.depth):
        add("adaln", D * 6 * D + 6 * D, 6 * D * D)
        qkv_bias = 3 * D if config.qkv_bias else 0
        qk = 2 * (D // H) if config.qk_norm else 0
        add("attention_proj", 3 * D * D + qkv_bias + D * D + D + qk, N * 4 * D * D)
        add("attention_scores", 0, 2 * N * N * D)  # Q K^T and A V
        if config.cross_attention:
            add(
                "cross_attention",
                D * D + D + 2 * D * D + 2 * D + D * D + D + 2 * D + qk,  # q, kv, proj, LayerNorm, qk-norm
                N * 2 * D * D + L * 2 * D * D + 2 * N * L * D,
            )
        f = _ffn_counts(config, i)
        # macs_per_sample: per-sample work of an MoE layer (the timestep-aware router's projection)
        add("ffn", f["total_params"], N * f["macs_per_token"] + f.get("macs_per_sample", 0), a=f["active_params"])

    Co = config.out_channels
    add("final", D * 2 * D + 2 * D + D * P * Co + P * Co, 2 * D * D + N * D * P * Co)
    total_macs = sum(macs.values())
    return {
        "total_params": sum(params.values()),
        "active_params": sum(active.values()),
        "macs": total_macs,
        "gmacs": total_macs / 1e9,
        "gflops": 2 * total_macs / 1e9,
        "tokens": N,
        "params": params,
        "active_params_by_component": active,
        "macs_by_component": macs,
    }


def match_compute(dense_config: ModelConfig, **kwargs: Any) -> ModelConfig:
    """The MoE config whose forward MACs per sample equal ``dense_config``'s (see sparse_dit.moe.flops)."""
    from sparse_dit.moe.flops import match_compute as _match

    return _match(dense_config, **kwargs)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


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
    from sparse_dit.dit import preset_config

    if name.endswith((".yaml", ".yml")):
        raw = load_yaml(name)
        if "model" in raw or "preset" in raw:
            return load_recipe(data=raw).model
        return ModelConfig.from_dict(raw, prefix="model")
    return preset_config(name)


def run(args: argparse.Namespace) -> int:
    from sparse_dit.dit import list_presets

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
