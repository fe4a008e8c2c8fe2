"""Balancing losses and router statistics, returned per layer as :class:`MoEAux`.

# T = tokens, E = experts, K = top-k, B = batch, N = tokens per sample

Nothing here is stored in module or global state: the MoE layer returns an :class:`MoEAux` per
forward, the DiT collects one per MoE layer, the training loss adds ``sum(aux.loss)`` and the
trainer logs :func:`summarize_aux`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

__all__ = ["MoEAux", "balance_loss", "z_loss", "router_entropy", "max_violation", "timestep_bin_load", "summarize_aux", "count_indices"]


def count_indices(idx: torch.Tensor, n: int) -> torch.Tensor:
    """``torch.bincount(idx, minlength=n)`` for indices known to lie in ``[0, n)``: (n,) int64.

    ``torch.bincount`` sizes its output from the largest index, which on CUDA is read back to
    the host: a sync per call, three per MoE layer in the forward (router counts, dispatch
    layout, timestep load), which drained the GPU's queue 36 times per B/2-E8A2 step on the H200
    (BENCHMARKS.md, issue 16). A scatter-add of ones into ``n`` bins needs no host round trip.
    """
    flat = idx.reshape(-1)
    return torch.zeros(n, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.long))


class MoEAux(NamedTuple):
    """Auxiliary outputs of one MoE layer's forward.

    Attributes:
        loss: scalar, ``aux_loss_coef * balance_loss + z_loss_coef * z_loss``: add it to the
            training loss.
        balance_loss: unweighted Switch load-balancing loss (1.0 = perfectly balanced).
        z_loss: unweighted ST-MoE router z-loss.
        tokens_per_expert: (E,) routes each expert was chosen for (before capacity dropping), detached.
        max_violation: max load / mean load - 1 (0 = balanced), detached.
        router_entropy: mean entropy (nats) of the per-token score distribution, detached.
        dropped_fraction: dropped routes / routes (token choice) or tokens no expert chose / tokens
            (expert choice), detached.
        load_per_timestep_bin: (bins, E) kept routes per expert for tokens whose sample's t falls in
            each of ``bins`` equal bins of [0, 1]; ``None`` when no timesteps were passed.
        balance_probs: (E,) mean router probability ``P_e`` of this forward's tokens, with
            gradient, for rules whose balance loss is the Switch loss (``None`` otherwise):
            what :class:`sparse_dit.moe.global_balance.GlobalBalance` needs to recompute the
            loss over the global batch.
    """

    loss: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    max_violation: torch.Tensor
    router_entropy: torch.Tensor
    dropped_fraction: torch.Tensor
    load_per_timestep_bin: Optional[torch.Tensor] = None
    balance_probs: Optional[torch.Tensor] = None


def balance_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4): ``E * sum_e f_e P_e``.

    ``f_e`` is the fraction of the T*K routes sent to expert e (not differentiable) and ``P_e``
    the mean router probability of expert e (differentiable). It equals 1 under uniform routing.

    Args:
        probs_TE: (T, E) per-token probabilities (sum to one per token).
        counts_E: (E,) routes per expert.
        top_k: K.
    """
    T, E = probs_TE.shape
    f = counts_E.detach().float() / max(T * top_k, 1)
    P = probs_TE.float().mean(0)
    return E * torch.dot(f, P)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of ``logsumexp(logits)^2``."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy (nats) of the routing distribution; ``log E`` = uniform."""
    p = probs_TE.detach().float()
    return -(p * torch.log(p.clamp_min(1e-20))).sum(-1).mean()


def max_violation(counts_E: torch.Tensor) -> torch.Tensor:
    """``max load / mean load - 1`` (the imbalance measure of DeepSeek-V3's Fig. 2; 0 = balanced)."""
    c = counts_E.detach().float()
    return c.max() / c.mean().clamp_min(1e-9) - 1.0


def timestep_bin_load(
    expert_idx_R: torch.Tensor, token_idx_R: torch.Tensor, tokens_per_sample: int, timesteps_B: torch.Tensor, num_experts: int, bins: int
) -> torch.Tensor:
    """(bins, E) kept routes per expert, split by the timestep bin of each route's sample.

    Args:
        expert_idx_R: (R,) expert per route (``num_experts`` = dropped, not counted).
        token_idx_R: (R,) token per route.
        tokens_per_sample: N (token t belongs to sample t // N).
        timesteps_B: (B,) t in [0, 1].
        num_experts: E.
        bins: number of equal-width bins of [0, 1].
    """
    b = (timesteps_B.detach().float() * bins).long().clamp_(0, bins - 1)  # (B,)
    route_bin = b.index_select(0, torch.div(token_idx_R, tokens_per_sample, rounding_mode="floor"))
    flat = route_bin * (num_experts + 1) + expert_idx_R
    counts = count_indices(flat, bins * (num_experts + 1)).view(bins, num_experts + 1)
    return counts[:, :num_experts].float()


def summarize_aux(auxes: Sequence[MoEAux], prefix: str = "moe/") -> tuple[dict[str, float], Optional[torch.Tensor]]:
    """Merge the MoE outputs of all layers of one forward into TensorBoard-ready values.

    Scalars (one device-to-host transfer for all of them):

    * ``moe/aux_loss``: the sum over layers of the weighted ``loss`` (what the training loss adds);
    * ``moe/balance_loss``, ``moe/z_loss``: unweighted, mean over layers;
    * ``moe/max_violation``, ``moe/router_entropy``, ``moe/dropped_fraction``: mean over layers;
    * ``moe/max_violation_worst``: the largest over layers;
    * ``moe/timestep_bin{i}_max_violation``: mean over layers of the imbalance inside timestep
      bin i (only when timesteps were passed).

    Args:
        auxes: one :class:`MoEAux` per MoE layer (for example ``DiTAux.moe``).
        prefix: tag prefix.

    Returns:
        ``(scalars, tokens_per_expert)``: a dict of floats and the (E,) tokens-per-expert vector
        summed over layers, for ``SummaryWriter.add_histogram`` (``None`` for no layers).
    """
    if not auxes:
        return {}, None
    names = ["aux_loss", "balance_loss", "z_loss", "max_violation", "router_entropy", "dropped_fraction", "max_violation_worst"]
    values = [
        torch.stack([a.loss.detach().float() for a in auxes]).sum(),
        torch.stack([a.balance_loss.detach().float() for a in auxes]).mean(),
        torch.stack([a.z_loss.detach().float() for a in auxes]).mean(),
        torch.stack([a.max_violation.float() for a in auxes]).mean(),
        torch.stack([a.router_entropy.float() for a in auxes]).mean(),
        torch.stack([a.dropped_fraction.float() for a in auxes]).mean(),
        torch.stack([a.max_violation.float() for a in auxes]).max(),
    ]
    bin_loads = [a.load_per_timestep_bin for a in auxes if a.load_per_timestep_bin is not None]
    if bin_loads:
        per_bin = torch.stack([bl.float() for bl in bin_loads])  # (L', bins, E)
        mean = per_bin.mean(-1)
        # An empty bin (no sample's t fell in it) has no imbalance: report 0, not -1.
        viol = torch.where(mean > 0, per_bin.amax(-1) / mean.clamp_min(1e-9) - 1.0, torch.zeros_like(mean)).mean(0)  # (bins,)
        for i in range(viol.numel()):
            names.append(f"timestep_bin{i}_max_violation")
        values.extend(viol.unbind(0))
    flat = torch.stack(values).cpu().tolist()
    scalars = {f"{prefix}{n}": float(v) for n, v in zip(names, flat)}
    hist = torch.stack([a.tokens_per_expert.detach().float() for a in auxes]).sum(0).cpu()
    return scalars, hist
