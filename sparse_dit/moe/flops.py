"""Analytic params and MACs of one MoE FFN layer, and dense -> MoE compute matching.

# D = model dim, F = dense FFN hidden, H = expert hidden, E = routed experts, K = top-k,
# S = shared experts, M = matrices per FFN (2 for GELU, 3 for SwiGLU)

MACs are multiply-accumulates of the matrix products only (as :mod:`sparse_dit.flops`):

* router: ``D * E`` per token (the gate);
* timestep-aware routing: ``D * E`` per *sample* (the conditioning projection, computed once
  per sample and broadcast, :mod:`sparse_dit.moe.router`);
* experts: ``(K + S) * M * D * H`` per token (expert choice: ``K * capacity_factor``
  routed experts per token on average).

Biases count as params, not MACs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparse_dit.config import ConfigError, ModelConfig
from sparse_dit.moe.layer import expert_hidden_dim

__all__ = ["moe_layer_counts", "dense_ffn_counts", "match_compute"]


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
    H = max(1, int(round(exact)))
    aligned = max(8, int(round(exact / 8)) * 8)
    if abs(aligned - exact) * per_unit <= 0.005 * M * D * F:
        H = aligned
    moe = dataclasses.replace(
        dense_config.moe, num_experts=E, top_k=K, shared_experts=S, granularity=granularity,
        expert_hidden_dim=H, **moe_overrides,
    )
    return dataclasses.replace(dense_config, moe=moe)
