"""Analytic parameter and FLOP counting, and compute matching between dense and sparse models.

Counts are multiply-accumulates (MACs) of the matrix products of one forward pass for one
sample, split by component. DiT's paper reports these same numbers under the name "Gflops"
(DiT-XL/2 at 256x256: 118.6), so ``gmacs`` is what to compare with the paper; ``gflops`` is
2 x gmacs, the convention of ``torch.utils.flop_counter``. Elementwise work (norms, rotary
rotation, activations, softmax) is not counted: it is a few percent and bandwidth-bound.
Biases count as params, not MACs.

Active params/MACs are what one token actually uses: for an MoE layer, the router, the k routed
experts and the shared experts, not all E experts.

# D = model dim, F = dense FFN hidden, H = expert hidden, E = routed experts, K = top-k,
# S = shared experts, M = matrices per FFN (2 for GELU, 3 for SwiGLU)

An MoE FFN layer costs:

* router: ``D * E`` per token (the gate);
* timestep-aware routing: ``D * E`` per *sample* (the conditioning projection, computed once
  per sample and broadcast, :mod:`sparse_dit.moe.router`);
* experts: ``(K + S) * M * D * H`` per token (expert choice: ``K * capacity_factor``
  routed experts per token on average; batch-level routing: K per token on average over the
  micro-batch, as token choice; noise-level experts: K experts of the sample's one range).

:func:`match_compute` derives the MoE config whose forward MACs equal a dense one's. The
``sparse-dit flops`` command that prints these counts for a preset is :mod:`sparse_dit.flops_cli`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparse_dit.config import ModelConfig
from sparse_dit.moe.layer import expert_hidden_dim
from sparse_dit.moe.placement import is_moe_layer
from sparse_dit.schema import ConfigError

__all__ = ["count", "num_tokens", "moe_layer_counts", "dense_ffn_counts", "match_compute", "match_params", "COMPONENTS"]

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


def _mats(activation: str) -> int:
    return 3 if activation == "swiglu" else 2


def _ffn_params(D: int, H: int, activation: str) -> int:
    """Params of one FFN of hidden width H (GELU: with biases; SwiGLU: bias-free)."""
    return 3 * D * H if activation == "swiglu" else 2 * D * H + H + D


def dense_ffn_counts(cfg: ModelConfig) -> dict[str, int]:
    """Params and MACs per token of the dense FFN of ``cfg`` (for comparison)."""
    D, F = cfg.hidden_size, cfg.ffn_hidden
    p = _ffn_params(D, F, cfg.activation)
    return {"total_params": p, "active_params": p, "macs_per_token": _mats(cfg.activation) * D * F, "macs_per_sample": 0}


def moe_layer_counts(cfg: ModelConfig) -> dict[str, Any]:
    """Params and MACs of ONE MoE FFN layer of ``cfg`` (router, experts, shared experts).

    Args:
        cfg: a :class:`~sparse_dit.config.ModelConfig` with ``moe.num_experts > 0``.

    Returns:
        ``total_params``: all params (router gate, conditioning projection, all E experts,
        shared experts); ``active_params``: params one token uses (router, projection, K
        routed and S shared experts; expert choice: ``K * capacity_factor`` routed on average,
        rounded down); ``macs_per_token``; ``macs_per_sample``: the per-sample conditioning
        projection (0 without timestep-aware routing), so a sample of N tokens costs
        ``N * macs_per_token + macs_per_sample``; plus ``expert_hidden_dim``.
    """
    moe = cfg.moe
    if not moe.enabled:
        raise ConfigError(f"model.moe.num_experts={moe.num_experts}: moe_layer_counts needs an MoE config")
    D, E, K, S = cfg.hidden_size, moe.num_experts, moe.top_k, moe.shared_experts
    H = expert_hidden_dim(cfg)
    act, M = cfg.activation, _mats(cfg.activation)
    router = D * E
    cond = D * E if moe.timestep_routing else 0
    expert = _ffn_params(D, H, act)
    shared = _ffn_params(D, S * H, act) if S else 0
    k_eff = K * (moe.capacity_factor or 1.0) if moe.router == "expert_choice" else K
    total = router + cond + E * expert + shared
    active = router + cond + int(k_eff * expert) + shared
    macs_tok = router + int(round(k_eff * M * D * H)) + S * M * D * H
    return {
        "total_params": total,
        "active_params": active,
        "macs_per_token": macs_tok,
        "macs_per_sample": cond,
        "expert_hidden_dim": H,
    }


def _ffn_counts(config: ModelConfig, layer_idx: int) -> dict[str, int]:
    if is_moe_layer(config.moe, layer_idx):
        return moe_layer_counts(config)
    return dense_ffn_counts(config)


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


def _expert_width(exact: float, per_unit: float, dense_ffn: float) -> int:
    """``exact`` rounded to a multiple of 8 when that keeps the layer within 0.5 % of the dense
    FFN's ``dense_ffn`` (aligned strides for ``torch._grouped_mm`` and vector units), else to the
    nearest integer (>= 1); ``per_unit``: the layer's cost per unit of expert width."""
    aligned = max(8, int(round(exact / 8)) * 8)
    return aligned if abs(aligned - exact) * per_unit <= 0.005 * dense_ffn else max(1, int(round(exact)))


def match_compute(
    dense_config: ModelConfig,
    num_experts: int,
    top_k: int,
    shared_experts: int = 0,
    granularity: int = 1,
    **moe_overrides: Any,
) -> ModelConfig:
    """A copy of ``dense_config`` with MoE FFNs whose forward MACs equal the dense FFN's.

    Fine-grained experts (DeepSeekMoE, Dai et al. 2024): each of the ``num_experts`` experts is
    split into ``granularity`` narrower ones, so the result has ``num_experts * granularity``
    experts, ``top_k * granularity`` active and ``shared_experts * granularity`` shared ones.
    The expert hidden width ``H`` then solves, per MoE layer and token,

        M * D * F  =  D * E  +  (K + S) * M * D * H

    (dense FFN = router + active experts), rounded to a multiple of 8 when that keeps the
    layer within 0.5 % (aligned strides for ``torch._grouped_mm`` and vector units), else to
    the nearest integer. Every other part of the model is unchanged, so the forward MACs per
    sample match to well within 1 % (the timestep-aware router's per-sample projection,
    ``D * E`` per layer and sample, is below 0.01 % for any real token count).

    Args:
        dense_config: the dense model (its ``moe`` must be off).
        num_experts: routed experts before fine-graining.
        top_k: active routed experts per token before fine-graining.
        shared_experts: shared experts before fine-graining.
        granularity: fine-grained split factor (1 = plain experts).
        **moe_overrides: other :class:`~sparse_dit.config.MoEConfig` fields (router, score_func,
            timestep_routing, every, first_dense, aux_loss_coef, ...).

    Raises:
        ConfigError: for a dense config that already has MoE, bad counts, or experts too
            narrow to match (H < 1).
    """
    if dense_config.moe.enabled:
        raise ConfigError(f"match_compute needs a dense config; got model.moe.num_experts={dense_config.moe.num_experts}")
    for name, value, lo in (("num_experts", num_experts, 1), ("top_k", top_k, 1), ("shared_experts", shared_experts, 0), ("granularity", granularity, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ConfigError(f"match_compute {name}={value!r} is out of range; allowed: int >= {lo}")
    for bad in ("num_experts", "top_k", "shared_experts", "granularity", "expert_hidden_dim"):
        if bad in moe_overrides:
            raise ConfigError(f"match_compute sets moe.{bad} itself; do not pass it in moe_overrides")
    E, K, S = num_experts * granularity, top_k * granularity, shared_experts * granularity
    if K > E:
        raise ConfigError(f"match_compute top_k={top_k} > num_experts={num_experts}")
    D, F, M = dense_config.hidden_size, dense_config.ffn_hidden, _mats(dense_config.activation)
    cf = moe_overrides.get("capacity_factor") if moe_overrides.get("router") == "expert_choice" else None
    k_eff = K * (cf or 1.0)
    target = M * D * F - D * E  # MACs per token left for the experts after the router
    per_unit = (k_eff + S) * M * D  # MACs per token per unit of expert width
    exact = target / per_unit
    if exact < 0.5:
        raise ConfigError(
            f"cannot compute-match: the router alone ({D * E} MACs/token) leaves no width for "
            f"{K} active + {S} shared experts (dense FFN: {M * D * F} MACs/token)"
        )
    H = _expert_width(exact, per_unit, M * D * F)
    moe = dataclasses.replace(
        dense_config.moe, num_experts=E, top_k=K, shared_experts=S, granularity=granularity,
        expert_hidden_dim=H, **moe_overrides,
    )
    return dataclasses.replace(dense_config, moe=moe)


def match_params(
    dense_config: ModelConfig,
    num_experts: int,
    top_k: int,
    shared_experts: int = 0,
    granularity: int = 1,
    **moe_overrides: Any,
) -> ModelConfig:
    """A copy of ``dense_config`` with MoE FFNs holding the dense FFN's parameters (``sparse-dit
    study``'s ``budget.match: params``): per MoE layer, router + all experts = the dense FFN,

        M * D * F  =  D * E  +  (E + S) * M * D * H   (+ the router's optional extras),

    so the total parameters match and each token runs ``(K + S) / (E + S)`` of them: the sparse
    model is cheaper per token than its dense twin, not compute-matched. Same arguments and
    errors as :func:`match_compute`; ``H`` is rounded to the nearest integer (to a multiple of 8
    when that stays within 0.5 %).
    """
    probe = match_compute(dense_config, num_experts, top_k, shared_experts, granularity, **moe_overrides)  # validates everything
    E, S = probe.moe.num_experts, probe.moe.shared_experts
    D, F, M = dense_config.hidden_size, dense_config.ffn_hidden, _mats(dense_config.activation)
    per_unit = (E + S) * M * D
    exact = (M * D * F - D * E) / per_unit
    if exact < 0.5:
        raise ConfigError(f"cannot parameter-match: {E} + {S} experts leave no width within the dense FFN's {M * D * F} parameters")
    H = _expert_width(exact, per_unit, M * D * F)
    return dataclasses.replace(probe, moe=dataclasses.replace(probe.moe, expert_hidden_dim=H))
