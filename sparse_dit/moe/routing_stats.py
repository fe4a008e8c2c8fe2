"""Router statistics for diffusion, per MoE layer (issues 11 and 15).

# L = MoE layers, E = experts, S = timestep bins, F = token frames, G = regions, T = tokens,
# B = batch, N = tokens per sample, R = routes

A per-expert load summed over layers hides a collapse in one layer (shared/PITFALLS.md), so
everything here keeps the layer axis. Two producers:

* **training**: :meth:`StepRouting.from_aux` takes the per-layer :class:`~sparse_dit.moe.stats.MoEAux`
  of one forward (the trainer already has them) and keeps, per layer, the routes per expert,
  the router entropy and the routes per timestep bin. Micro-steps add up with ``+``, ranks with
  one all-reduce of :meth:`StepRouting.pack`; :mod:`sparse_dit.recipes.tb` logs it.
* **sampling**: :class:`RoutingCollector` is a context manager that hooks every MoE router of a
  :class:`~sparse_dit.dit.SparseDiT` while the ordinary sampler or pipeline runs (no second
  sampler), and fills a :class:`RoutingStats`: routes per expert, per timestep bin, per token
  frame and per coarse spatial region, router entropy, and the fraction of tokens whose set of
  experts changes between consecutive sampler calls.

One definition of imbalance throughout: :func:`sparse_dit.moe.stats.max_violation`
(``max load / mean load - 1``), and of entropy: :func:`sparse_dit.moe.stats.router_entropy`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from sparse_dit.moe.layer import MoEFeedForward
from sparse_dit.moe.routers import Routing
from sparse_dit.moe.stats import MoEAux, max_violation, router_entropy

__all__ = ["StepRouting", "RoutingStats", "RoutingCollector", "relative_load"]


def relative_load(load: torch.Tensor) -> torch.Tensor:
    """Load divided by the mean load over the last (expert) axis: 1 = balanced, 0 = starved.

    Rows with no routes give 0 (nothing to compare). ``relative_load(x).amax(-1) - 1`` is
    :func:`~sparse_dit.moe.stats.max_violation` row by row.
    """
    x = load.double()
    mean = x.mean(-1, keepdim=True)
    return torch.where(mean > 0, x / mean.clamp_min(1e-12), torch.zeros_like(x))


# --------------------------------------------------------------------------------------------
# Training: per-layer values of one step
# --------------------------------------------------------------------------------------------


@dataclass
class StepRouting:
    """Per-layer routing of one training step (summed over micro-steps and ranks).

    Attributes:
        load: (L, E) routes per expert (as the router chose them, before capacity dropping).
        entropy_sum: (L,) router entropy (nats) summed over the forwards added together.
        forwards: how many forwards (micro-steps x ranks) were added (divides ``entropy_sum``).
        timestep_load: (L, S, E) kept routes per expert by the timestep bin of their sample, or
            ``None`` when the forwards had no timesteps.
    """

    load: torch.Tensor
    entropy_sum: torch.Tensor
    forwards: float
    timestep_load: Optional[torch.Tensor] = None

    @classmethod
    def from_aux(cls, auxes: Sequence[MoEAux]) -> Optional["StepRouting"]:
        """One forward's per-layer MoE outputs (e.g. ``DiTAux.moe``); ``None`` for a dense model."""
        if not auxes:
            return None
        L, E = len(auxes), auxes[0].tokens_per_expert.numel()
        parts = [torch.stack([a.tokens_per_expert.detach().double() for a in auxes]).flatten(),
                 torch.stack([a.router_entropy.detach().double() for a in auxes])]
        bins = [a.load_per_timestep_bin for a in auxes]
        with_bins = all(b is not None for b in bins)
        if with_bins:
            parts.append(torch.stack([b.detach().double() for b in bins]).flatten())  # type: ignore[union-attr]
        flat = torch.cat(parts).cpu()  # one device-to-host copy
        tl = flat[L * E + L :].view(L, -1, E) if with_bins else None
        return cls(flat[: L * E].view(L, E), flat[L * E : L * E + L], 1.0, tl)

    def __add__(self, other: "StepRouting") -> "StepRouting":
        tl = None
        if self.timestep_load is not None and other.timestep_load is not None:
            tl = self.timestep_load + other.timestep_load
        return StepRouting(self.load + other.load, self.entropy_sum + other.entropy_sum, self.forwards + other.forwards, tl)

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    @property
    def router_entropy(self) -> torch.Tensor:
        """(L,) mean router entropy (nats) per layer; ``log E`` = uniform scores."""
        return self.entropy_sum / max(self.forwards, 1.0)

    @property
    def max_violation(self) -> torch.Tensor:
        """(L,) ``max load / mean load - 1`` of each layer's total load."""
        return torch.stack([max_violation(row) for row in self.load]).double()

    def pack(self) -> torch.Tensor:
        """One flat float64 tensor (for a single SUM all-reduce); :meth:`unpack` reverses it."""
        parts = [self.load.flatten(), self.entropy_sum, torch.tensor([self.forwards], dtype=torch.float64)]
        if self.timestep_load is not None:
            parts.append(self.timestep_load.flatten())
        return torch.cat(parts)

    def unpack(self, flat: torch.Tensor) -> "StepRouting":
        """A :class:`StepRouting` of this one's shapes from ``flat`` (e.g. after an all-reduce)."""
        L, E = self.load.shape
        load, ent, fw = flat[: L * E].view(L, E), flat[L * E : L * E + L], float(flat[L * E + L])
        tl = flat[L * E + L + 1 :].view(self.timestep_load.shape) if self.timestep_load is not None else None
        return StepRouting(load.clone(), ent.clone(), fw, tl.clone() if tl is not None else None)


# --------------------------------------------------------------------------------------------
# Sampling: the accumulator and the hooks that feed it
# --------------------------------------------------------------------------------------------


class RoutingStats:
    """Accumulates routing decisions of several MoE layers over many forwards.

    Feed it :class:`~sparse_dit.moe.routers.Routing` results with :meth:`add` (the
    :class:`RoutingCollector` does that from hooks); read :meth:`summary`.

    Tokens are in the DiT's ``(t h w)`` order: token ``n`` of a sample sits at token frame
    ``n // (h*w)``, row ``(n % (h*w)) // w``, column ``n % w`` of the ``(t, h, w)`` token grid.
    The spatial grid is cut into ``regions x regions`` equal cells (coarse regions). A route
    counts in the timestep bin of its sample's ``t`` (``S`` equal bins of [0, 1]), context
    frames included (they are computed at every call too; see the per-frame loads).

    The change fraction: for each layer (and each CFG branch, i.e. the j-th call at the same
    t), the share of tokens whose *set* of experts (dropped routes count as an expert of their
    own) differs from the previous call's at a lower t in the same sampling run.

    Args:
        num_layers: L.
        num_experts: E.
        timestep_bins: S.
        regions: the spatial grid is cut into ``regions x regions`` cells.
        layer_names: a label per layer (default ``"0" .. "L-1"``).
    """

    def __init__(self, num_layers: int, num_experts: int, timestep_bins: int = 4, regions: int = 2,
                 layer_names: Optional[Sequence[str]] = None) -> None:
        if num_layers < 1 or num_experts < 1:
            raise ValueError(f"num_layers={num_layers} and num_experts={num_experts} must be >= 1")
        if timestep_bins < 1:
            raise ValueError(f"timestep_bins={timestep_bins} must be >= 1")
        if regions < 1:
            raise ValueError(f"regions={regions} must be >= 1")
        L, E, S = num_layers, num_experts, timestep_bins
        self.num_layers, self.num_experts, self.timestep_bins, self.regions = L, E, S, regions
        self.layer_names = list(layer_names) if layer_names is not None else [str(i) for i in range(L)]
        if len(self.layer_names) != L:
            raise ValueError(f"layer_names has {len(self.layer_names)} entries; expected num_layers={L}")
        f64 = torch.float64
        self.load = torch.zeros(L, E, dtype=f64)  # kept routes per expert
        self.dropped = torch.zeros(L, dtype=f64)  # dropped routes
        self.routes = torch.zeros(L, dtype=f64)  # all routes (kept + dropped)
        self.timestep_load = torch.zeros(L, S, E, dtype=f64)
        self.frame_load = torch.zeros(L, 0, E, dtype=f64)  # grows with the longest video seen
        self.region_load = torch.zeros(L, regions * regions, E, dtype=f64)
        self.entropy_sum = torch.zeros(L, dtype=f64)  # summed per-token entropy
        self.tokens = torch.zeros(L, dtype=f64)
        self.changed = torch.zeros(L, dtype=f64)
        self.compared = torch.zeros(L, dtype=f64)
        self.calls = 0  # forwards of layer 0
        self._prev: dict[tuple[int, int], torch.Tensor] = {}

    def new_sequence(self) -> None:
        """Forget the previous calls: the next call starts a new sampling run (no change counted)."""
        self._prev.clear()

    @torch.no_grad()
    def add(self, layer: int, routing: Routing, timesteps: torch.Tensor, grid: tuple[int, int, int], branch: int = 0) -> None:
        """Count one forward of one layer.

        Args:
            layer: index in ``[0, num_layers)``.
            routing: the router's result for ``B`` samples of ``N = t*h*w`` tokens.
            timesteps: (B,) t in [0, 1] of each sample.
            grid: the token grid ``(t, h, w)``.
            branch: which call at the same t this is (0, or 1 for CFG's unconditional call):
                the change fraction compares calls of the same branch.
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer={layer} is out of range; allowed: 0..{self.num_layers - 1}")
        E, S, G = self.num_experts, self.timestep_bins, self.regions
        ft, fh, fw = (int(g) for g in grid)
        N = ft * fh * fw
        t_B = timesteps.detach().reshape(-1).float().cpu()
        B = t_B.numel()
        T = routing.probs.shape[0]
        if T != B * N:
            raise ValueError(f"routing has {T} tokens; expected batch {B} x grid {grid} = {B * N}")
        e = routing.expert_idx.reshape(-1).cpu()  # (R,)
        tok = routing.token_of_route().cpu()  # (R,)
        kept = e < E
        e_k, tok_k = e[kept], tok[kept]
        self.load[layer] += torch.bincount(e_k, minlength=E).double()
        self.routes[layer] += e.numel()
        self.dropped[layer] += float((~kept).sum())
        # 1. by timestep bin of the route's sample
        sbin = (t_B * S).long().clamp_(0, S - 1)[tok_k // N]  # (R_kept,)
        self.timestep_load[layer] += torch.bincount(sbin * E + e_k, minlength=S * E).view(S, E).double()
        # 2. by token frame and by coarse spatial region
        pos = tok_k % N
        frame, rest = pos // (fh * fw), pos % (fh * fw)
        row, col = rest // fw, rest % fw
        if ft > self.frame_load.shape[1]:
            grow = torch.zeros(self.num_layers, ft - self.frame_load.shape[1], E, dtype=torch.float64)
            self.frame_load = torch.cat([self.frame_load, grow], 1)
        self.frame_load[layer, :ft] += torch.bincount(frame * E + e_k, minlength=ft * E).view(ft, E).double()
        region = (row * G // fh) * G + col * G // fw
        self.region_load[layer] += torch.bincount(region * E + e_k, minlength=G * G * E).view(G * G, E).double()
        # 3. entropy of the per-token score distribution
        self.entropy_sum[layer] += float(router_entropy(routing.probs)) * T
        self.tokens[layer] += T
        # 4. experts changed since the previous call of this layer and branch
        member = torch.zeros(T, E + 1, dtype=torch.bool)
        member[tok, e] = True  # dropped routes land in column E
        prev = self._prev.get((layer, branch))
        if prev is not None and prev.shape == member.shape:
            self.changed[layer] += float((prev != member).any(1).sum())
            self.compared[layer] += T
        self._prev[(layer, branch)] = member
        if layer == 0:
            self.calls += 1

    def summary(self) -> dict[str, Any]:
        """Everything as plain Python (JSON-ready).

        Keys: ``num_layers``, ``num_experts``, ``layer_names``, ``calls``, ``timestep_bins``
        (bin edges), ``regions``, ``router_entropy_uniform`` (``log E``); ``layers``: one dict
        per layer with ``load`` (routes per expert), ``load_fraction``, ``max_violation``,
        ``router_entropy``, ``dropped_fraction``, ``change_fraction`` (None before two calls);
        ``load_by_timestep_bin`` (L x S x E), ``load_by_frame`` (L x F x E),
        ``load_by_region`` (L x G*G x E, row-major cells), ``max_violation_by_timestep_bin``,
        ``max_violation_by_frame``, ``max_violation_by_region`` (L x bins, 0 for an empty one);
        ``max_violation_worst`` (over layers), ``max_violation_of_layer_sum`` (the imbalance of
        the load summed over layers, which can hide a collapsed layer), ``change_fraction``
        (over layers).
        """
        L, S = self.num_layers, self.timestep_bins
        layers = []
        for i in range(L):
            tot = float(self.load[i].sum())
            layers.append({
                "layer": self.layer_names[i],
                "load": self.load[i].tolist(),
                "load_fraction": (self.load[i] / tot).tolist() if tot > 0 else [0.0] * self.num_experts,
                "max_violation": float(max_violation(self.load[i])) if tot > 0 else None,
                "router_entropy": float(self.entropy_sum[i] / self.tokens[i]) if self.tokens[i] > 0 else None,
                "dropped_fraction": float(self.dropped[i] / self.routes[i]) if self.routes[i] > 0 else None,
                "change_fraction": float(self.changed[i] / self.compared[i]) if self.compared[i] > 0 else None,
            })

        def viol(x: torch.Tensor) -> list:
            return (relative_load(x).amax(-1) - 1).clamp_min(0).tolist()

        mv = [lay["max_violation"] for lay in layers if lay["max_violation"] is not None]
        total = self.load.sum(0)
        return {
            "num_layers": L,
            "num_experts": self.num_experts,
            "layer_names": self.layer_names,
            "calls": self.calls,
            "timestep_bins": [[i / S, (i + 1) / S] for i in range(S)],
            "regions": self.regions,
            "router_entropy_uniform": math.log(self.num_experts),
            "layers": layers,
            "load_by_timestep_bin": self.timestep_load.tolist(),
            "load_by_frame": self.frame_load.tolist(),
            "load_by_region": self.region_load.tolist(),
            "max_violation_by_timestep_bin": viol(self.timestep_load),
            "max_violation_by_frame": viol(self.frame_load),
            "max_violation_by_region": viol(self.region_load),
            "max_violation_worst": max(mv) if mv else None,
            "max_violation_of_layer_sum": float(max_violation(total)) if float(total.sum()) > 0 else None,
            "change_fraction": float(self.changed.sum() / self.compared.sum()) if float(self.compared.sum()) > 0 else None,
        }


def _layer_name(module_name: str, index: int) -> str:
    m = re.search(r"blocks\.(\d+)\.", module_name + ".")
    return f"block{m.group(1)}" if m else str(index)


class RoutingCollector:
    """Collect :class:`RoutingStats` while a :class:`~sparse_dit.dit.SparseDiT` samples.

    Hooks (removed on exit): a forward pre-hook on the model reads each call's ``t`` and token
    grid, a forward hook on each MoE layer's router reads its :class:`Routing`. Nothing about the
    sampler changes: run the ordinary sampler or pipeline inside the ``with`` block::

        with RoutingCollector(model) as rc:
            video = pipe(num_frames=8, num_inference_steps=20)
        rc.summary()        # None for a dense model

    A call whose ``t`` is higher than the previous call's (or whose input shape differs) starts a
    new sampling run; calls at the same ``t`` are CFG branches (0, 1, ...), and each branch is
    compared with its own previous call.

    Args:
        model: the DiT (called as ``model(x, t, ...)``, with ``x_embedder.grid``).
        timestep_bins: S (default: the MoE layers' ``stat_timestep_bins``).
        regions: the spatial token grid is cut into ``regions x regions`` cells.
    """

    def __init__(self, model: nn.Module, timestep_bins: Optional[int] = None, regions: int = 2) -> None:
        named = [(n, m) for n, m in model.named_modules() if isinstance(m, MoEFeedForward)]
        self.model = model
        self.layers = [m for _, m in named]
        self.stats: Optional[RoutingStats] = None
        if self.layers:
            if not hasattr(model, "x_embedder"):
                raise ValueError(f"RoutingCollector needs a SparseDiT (with x_embedder.grid); got {type(model).__name__}")
            E = {m.num_experts for m in self.layers}
            if len(E) != 1:
                raise ValueError(f"MoE layers have different num_experts {sorted(E)}; RoutingStats needs one E")
            bins = timestep_bins if timestep_bins is not None else self.layers[0].stat_timestep_bins
            names = [_layer_name(n, i) for i, (n, _) in enumerate(named)]
            self.stats = RoutingStats(len(self.layers), E.pop(), bins, regions, names)
        self._handles: list[Any] = []
        self._t: Optional[torch.Tensor] = None
        self._grid: Optional[tuple[int, int, int]] = None
        self._shape: Optional[tuple[int, ...]] = None
        self._branch = 0

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]
        t = args[1] if len(args) > 1 else kwargs["t"]
        t = torch.as_tensor(t).detach().float().reshape(-1).cpu()
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        shape = tuple(x.shape)
        if self._t is None or shape != self._shape or bool((t > self._t).any()):
            self.stats.new_sequence()  # type: ignore[union-attr]
            self._branch = 0
        elif torch.equal(t, self._t):
            self._branch += 1  # another call at the same t (CFG's unconditional branch)
        else:
            self._branch = 0
        self._t, self._shape = t, shape
        self._grid = tuple(self.model.x_embedder.grid(tuple(x.shape[2:])))  # type: ignore[union-attr, operator]

    def _router_hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple, out: Routing) -> None:
            if self._t is not None and self.stats is not None:
                self.stats.add(i, out, self._t, self._grid, self._branch)  # type: ignore[arg-type]
        return hook

    def __enter__(self) -> "RoutingCollector":
        if self.stats is not None:
            self._handles.append(self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            for i, layer in enumerate(self.layers):
                self._handles.append(layer.router.register_forward_hook(self._router_hook(i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def summary(self) -> Optional[dict[str, Any]]:
        """:meth:`RoutingStats.summary`, or ``None`` for a model without MoE layers."""
        return self.stats.summary() if self.stats is not None else None
