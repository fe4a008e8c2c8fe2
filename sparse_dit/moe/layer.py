"""The MoE feed-forward layer: router + dispatcher + grouped experts (+ shared experts).

# B = batch, N = tokens per sample, T = B*N, D = model dim, F = expert hidden, E = experts,
# K = top-k, R = routes

Drop-in for :class:`sparse_dit.modules.mlp.FeedForward` in a DiT block::

    y_BND, aux = moe(x_BND, cond=c_BD, timesteps=t_B)
    loss = diffusion_loss + aux.loss          # summed over MoE layers by the DiT
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import nn

from sparse_dit.modules.mlp import FeedForward
from sparse_dit.moe.dispatch import LocalDispatcher
from sparse_dit.moe.experts import GroupedExperts
from sparse_dit.moe.ops import EXPERT_BACKENDS, ExpertRows, plan_routes
from sparse_dit.moe.ops.inference import bookkeeping_threads
from sparse_dit.moe.routers import ROUTERS, RouterBase, Routing
from sparse_dit.moe.stats import MoEAux, max_violation, router_entropy, timestep_bin_load, z_loss

__all__ = ["MoEFeedForward", "expert_hidden_dim"]


def _linear_dtype(ffn: nn.Module, dtype: torch.dtype):
    """Call a dense FFN on inputs of ``dtype`` even when its weights are fp32 (mixed precision)."""
    w = next(ffn.parameters())
    if w.dtype == dtype:
        return ffn
    return lambda x: torch.func.functional_call(ffn, {n: p.to(dtype) for n, p in ffn.named_parameters()}, (x,))


def expert_hidden_dim(cfg: Any) -> int:
    """Expert hidden width of a :class:`~sparse_dit.config.ModelConfig`: ``moe.expert_hidden_dim``,
    else the dense FFN width divided by ``moe.granularity``."""
    moe = cfg.moe
    if moe.expert_hidden_dim is not None:
        return moe.expert_hidden_dim
    return max(1, cfg.ffn_hidden // moe.granularity)


class MoEFeedForward(nn.Module):
    """Mixture-of-Experts FFN, dropless by default.

    Args:
        dim: model width D.
        hidden_dim: hidden width F of one routed expert (shared experts use the same width).
        num_experts: routed experts E.
        top_k: experts per token (token choice) or average experts per token (expert choice).
        activation: ``"gelu_tanh"`` or ``"swiglu"``, as :class:`~sparse_dit.modules.mlp.FeedForward`.
        router: a key of :data:`sparse_dit.moe.routers.ROUTERS` (``"token_choice"``,
            ``"expert_choice"``).
        score_func: ``"softmax"`` or ``"sigmoid"``.
        renormalize: renormalise the top-k weights to sum to one (top_k > 1 only).
        shared_experts: always-on experts (DeepSeekMoE), run as one dense FFN of width
            ``shared_experts * hidden_dim``.
        cond_dim: conditioning width for timestep-aware routing; ``None`` = off.
        capacity_factor: ``None`` = dropless; else capacity-factor dropping (token choice) or the
            expert-choice capacity multiplier.
        aux_loss_coef: weight of the Switch balance loss in ``aux.loss``.
        z_loss_coef: weight of the router z-loss in ``aux.loss``.
        bias_update_rate: DeepSeek-V3 bias balancing step (0 = off); see
            :func:`sparse_dit.moe.update_balance_biases`.
        backend: expert compute backend: ``"auto"`` or a key of
            :data:`sparse_dit.moe.ops.EXPERT_BACKENDS` (``"grouped_mm"``, ``"fused_local"``,
            ``"loop"``, ``"megablocks"``).
        stat_timestep_bins: bins of [0, 1] for ``aux.load_per_timestep_bin``.
        expert_precision: under ``torch.autocast``, ``"auto"`` runs the experts in the autocast
            dtype (as autocast runs an ``nn.Linear``), ``"fp32"`` keeps them in fp32 (the
            quickstart's setting). Without autocast the experts run in the input's dtype.
        router_options: rule-specific router arguments (``noise_level``: ``boundaries``);
            :meth:`from_config` takes them from ``MoEConfig.router_options()``.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int,
        *,
        activation: str = "gelu_tanh",
        router: str = "token_choice",
        score_func: str = "softmax",
        renormalize: bool = True,
        shared_experts: int = 0,
        cond_dim: Optional[int] = None,
        capacity_factor: Optional[float] = None,
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        bias_update_rate: float = 0.0,
        backend: str = "auto",
        stat_timestep_bins: int = 4,
        expert_precision: str = "auto",
        router_options: Optional[dict] = None,
    ) -> None:
        super().__init__()
        if dim < 1 or hidden_dim < 1:
            raise ValueError(f"dim={dim} and hidden_dim={hidden_dim} must be >= 1")
        if shared_experts < 0:
            raise ValueError(f"shared_experts={shared_experts} must be >= 0")
        if aux_loss_coef < 0 or z_loss_coef < 0 or bias_update_rate < 0:
            raise ValueError(
                f"aux_loss_coef={aux_loss_coef}, z_loss_coef={z_loss_coef}, bias_update_rate={bias_update_rate} must be >= 0"
            )
        if expert_precision not in ("auto", "fp32"):
            raise ValueError(f"expert_precision={expert_precision!r} is not allowed; choose 'auto' or 'fp32'")
        self.expert_precision = expert_precision
        if stat_timestep_bins < 1:
            raise ValueError(f"stat_timestep_bins={stat_timestep_bins} must be >= 1")
        self.dim, self.hidden_dim, self.num_experts, self.top_k = dim, hidden_dim, num_experts, top_k
        self.activation = activation
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.bias_update_rate = bias_update_rate
        self.stat_timestep_bins = stat_timestep_bins
        if router not in ROUTERS:
            raise ValueError(f"router={router!r} is not supported; choose one of {list(ROUTERS)}")
        self.router: RouterBase = ROUTERS[router](
            dim, num_experts, top_k, score_func=score_func, renormalize=renormalize,
            cond_dim=cond_dim, capacity_factor=capacity_factor, bias_balancing=bias_update_rate > 0, **(router_options or {}),
        )
        self.experts = GroupedExperts(num_experts, dim, hidden_dim, activation, backend)
        self.shared = FeedForward(dim, shared_experts * hidden_dim, activation) if shared_experts else None
        self.num_shared_experts = shared_experts
        # Global experts [lo, hi) held by self.experts (all of them unless shard_experts ran).
        self.expert_slice = (0, num_experts)
        self.dispatcher: LocalDispatcher = LocalDispatcher()

    @classmethod
    def from_config(cls, cfg: Any, layer_idx: int = 0) -> "MoEFeedForward":
        """Build the MoE FFN of block ``layer_idx`` from a :class:`~sparse_dit.config.ModelConfig`.

        The router conditioning (timestep-aware routing) has width ``cfg.hidden_size``.
        ``layer_idx`` is accepted for symmetry with the dense blocks; placement is decided by
        :func:`sparse_dit.moe.is_moe_layer`.
        """
        moe = cfg.moe
        if not moe.enabled:
            raise ValueError(f"model.moe.num_experts={moe.num_experts}: MoE is off, build a dense FeedForward instead")
        return cls(
            cfg.hidden_size, expert_hidden_dim(cfg), moe.num_experts, moe.top_k,
            activation=cfg.activation, router=moe.router, score_func=moe.score_func, renormalize=moe.renormalize,
            shared_experts=moe.shared_experts, cond_dim=cfg.hidden_size if moe.timestep_routing else None,
            capacity_factor=moe.capacity_factor, aux_loss_coef=moe.aux_loss_coef, z_loss_coef=moe.z_loss_coef,
            bias_update_rate=moe.bias_update_rate, backend=moe.backend, stat_timestep_bins=moe.stat_timestep_bins,
            expert_precision=moe.expert_precision, router_options=moe.router_options(),
        )

    def reset_parameters(self) -> None:
        """Router gate normal(0.02), experts Xavier-uniform with zero biases (shared experts too)."""
        self.router.reset_parameters()
        self.experts.reset_parameters()
        if self.shared is not None:
            for lin in self.shared.modules():
                if isinstance(lin, nn.Linear):
                    nn.init.xavier_uniform_(lin.weight)
                    if lin.bias is not None:
                        nn.init.zeros_(lin.bias)

    def extra_repr(self) -> str:
        return f"experts held: [{self.expert_slice[0]}, {self.expert_slice[1]}) of {self.num_experts}, dispatcher={self.dispatcher!r}"

    # ----------------------------------------------------------------------------------------
    def shard_experts(self, ep_rank: int, ep_size: int, dispatcher: Optional[LocalDispatcher] = None) -> "MoEFeedForward":
        """Keep only experts ``[ep_rank * E / ep_size, (ep_rank + 1) * E / ep_size)`` and swap in
        ``dispatcher`` (an expert-parallel one; see :mod:`sparse_dit.moe.dispatch`).

        The router, its balancing bias and the shared experts stay replicated. The new expert
        parameters are fresh ``nn.Parameter`` slices of the old ones (build the optimizer after
        sharding). ``dispatcher.expert_offset`` / ``num_local_experts`` are set here.

        Args:
            ep_rank: this rank's index in the expert-parallel group.
            ep_size: expert-parallel group size; must divide ``num_experts``.
            dispatcher: the dispatcher to use from now on; ``None`` keeps the current one (only
                valid for ``ep_size == 1``).
        """
        E = self.num_experts
        if ep_size < 1 or E % ep_size:
            raise ValueError(f"num_experts={E} is not divisible by ep_size={ep_size}; choose an ep_size that divides it")
        if not 0 <= ep_rank < ep_size:
            raise ValueError(f"ep_rank={ep_rank} is out of range; allowed: 0..{ep_size - 1}")
        if self.expert_slice != (0, E):
            raise ValueError(f"experts are already sharded (holding {self.expert_slice}); shard a fresh layer")
        if dispatcher is None and ep_size > 1:
            raise ValueError("ep_size > 1 needs an expert-parallel dispatcher (sparse_dit.parallel provides it)")
        n = E // ep_size
        lo = ep_rank * n
        old = self.experts
        new = GroupedExperts(n, old.dim, old.hidden_dim, old.activation, old.backend).to(old.w1.device, old.w1.dtype)
        with torch.no_grad():
            for name in ("w1", "w2", "w3", "b1", "b2"):
                src = getattr(old, name)
                if src is not None:
                    getattr(new, name).copy_(src[lo : lo + n])
        self.experts = new
        self.expert_slice = (lo, lo + n)
        if dispatcher is not None:
            dispatcher.expert_offset, dispatcher.num_local_experts = lo, n
            self.dispatcher = dispatcher
        return self

    # ----------------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, cond: Optional[torch.Tensor] = None, timesteps: Optional[torch.Tensor] = None,
        need_aux: bool = True,
    ) -> tuple[torch.Tensor, Optional[MoEAux]]:
        """Route, run the experts, combine.

        With gradients off (``torch.no_grad``/``inference_mode``: the sampler, the evals) a layer
        holding every expert runs its experts through :mod:`sparse_dit.moe.ops.inference`: the
        same routes and the same output as the training path (to float rounding), without
        autograd bookkeeping or backward workspaces.

        Args:
            x: (B, N, D) tokens.
            cond: (B, D_cond) router conditioning (timestep + class/text embedding); used only
                with timestep-aware routing.
            timesteps: (B,) t in [0, 1]: ``aux.load_per_timestep_bin``, and the noise range of
                ``router="noise_level"`` (required there).
            need_aux: compute the :class:`MoEAux` (losses and statistics); ``False`` returns
                ``None`` in its place (the DiT passes its ``return_aux``: sampling asks for none).

        Returns:
            ``(y, aux)``: (B, N, D) output and the layer's :class:`MoEAux` (or ``None``).
        """
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, {self.dim}), got {tuple(x.shape)}")
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            # Autocast does not reach the expert kernels (they are not nn.Linear) and would turn
            # the router's fp32 linear into bf16: run with autocast off, experts in the autocast
            # dtype (differentiable weight casts, as autocast does) or in fp32, router in fp32.
            dtype = torch.float32 if self.expert_precision == "fp32" else torch.get_autocast_dtype(dev)
            with torch.autocast(dev, enabled=False):
                return self._forward(x.to(dtype), cond, timesteps, need_aux)
        return self._forward(x, cond, timesteps, need_aux)

    def _forward(
        self, x: torch.Tensor, cond: Optional[torch.Tensor], timesteps: Optional[torch.Tensor], need_aux: bool = True
    ) -> tuple[torch.Tensor, Optional[MoEAux]]:
        B, N, D = x.shape
        # 1. Route (fp32); with gradients off a small batch routes on one intra-op thread
        #    (bookkeeping_threads: waking a second thread costs more than it saves there)
        with bookkeeping_threads(B * N * D, x.device) if not torch.is_grad_enabled() else contextlib.nullcontext():
            r = self.router(x, cond if self.router.cond_proj is not None else None, timesteps)
        x_TD = x.reshape(B * N, D)
        local = type(self.dispatcher) is LocalDispatcher and self.expert_slice == (0, self.num_experts)
        backend = self.experts.resolve_backend(x_TD, local)
        if EXPERT_BACKENDS[backend].token_space and not torch.is_grad_enabled():
            # 2+3. Single process, gradients off: sort, per-expert GEMMs, combine, no autograd
            # (sparse_dit/moe/ops/inference.py), from the same routes as the training path.
            y_TD = self.experts(x_TD, ExpertRows(weight=r.weight, routes=r.expert_idx, route_tokens=r.token_idx))
        elif EXPERT_BACKENDS[backend].token_space:
            # 2+3. Single process: the backend gathers, runs the experts and combines itself
            # (sparse_dit/moe/ops/fused_local.py). Planning the layout is the one host sync.
            plan = plan_routes(r.expert_idx, self.num_experts, x_TD.shape[0], r.token_idx)
            y_TD = self.experts(x_TD, ExpertRows(plan=plan, weight=r.weight), backend)
        else:
            # 2. Dispatch: sort routes by expert, gather their rows (or exchange them under EP)
            x_sorted, counts_L, meta = self.dispatcher.dispatch(
                x_TD, r.expert_idx, r.weight, num_experts=self.num_experts, token_idx=r.token_idx, may_drop=r.may_drop
            )  # (R, D)
            # 3. Experts on contiguous row groups, then weighted un-sort
            y_sorted = self.experts(x_sorted, ExpertRows(counts_L, meta.local_split_sizes), backend)  # (R, D)
            y_TD = self.dispatcher.combine(y_sorted, meta)  # (T, D)
        # 4. Shared experts see every token
        if self.shared is not None:
            y_TD = y_TD + _linear_dtype(self.shared, x_TD.dtype)(x_TD)
        return y_TD.view(B, N, D), (self._aux(r, B, N, timesteps) if need_aux else None)

    def _aux(self, r: Routing, B: int, N: int, timesteps: Optional[torch.Tensor]) -> MoEAux:
        bal = self.router.balance_loss(r)  # the rule's own (zero for expert choice)
        z = z_loss(r.logits)
        loss = self.aux_loss_coef * bal + self.z_loss_coef * z
        load_bins = None
        if timesteps is not None:
            if timesteps.shape != (B,):
                raise ValueError(f"timesteps must have shape ({B},), got {tuple(timesteps.shape)}")
            e = r.expert_idx.reshape(-1)
            load_bins = timestep_bin_load(e, r.token_of_route(), N, timesteps, self.num_experts, self.stat_timestep_bins)
        return MoEAux(
            loss=loss, balance_loss=bal, z_loss=z, tokens_per_expert=r.counts.detach(),
            max_violation=max_violation(r.counts), router_entropy=router_entropy(r.probs),
            dropped_fraction=r.num_dropped.detach() / max(r.num_droppable, 1), load_per_timestep_bin=load_bins,
            # P_e with gradient, for the global-batch balance loss (sparse_dit/moe/global_balance.py)
            balance_probs=r.probs.float().mean(0) if self.router.switch_balance_loss and torch.is_grad_enabled() else None,
        )
