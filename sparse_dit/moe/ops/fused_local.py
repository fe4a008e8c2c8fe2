"""Backend ``"fused_local"``: the single-process MoE FFN as one autograd op (gather, batched
expert GEMMs, combine), in token space.

# T = tokens, R = routes, E = experts, D = model dim, F = expert hidden, K = routes per token,
# P = rows of the padded block layout (>= kept routes)

The CPU fast path of :class:`sparse_dit.moe.MoEFeedForward`, usable when the layer holds all
experts behind the plain local dispatcher (``"auto"`` picks it there unless grouped_mm fits).
It computes what ``LocalDispatcher.dispatch`` -> experts -> ``LocalDispatcher.combine``
compute, in one op with a hand-written backward.

**Block layout.** A per-expert loop of GEMMs runs each small GEMM on both cores and pays the
split's synchronisation; a batched GEMM (``torch.bmm``) hands whole GEMMs to each core instead:
for E=64 experts of width 252 it is 1.3x faster in fp32 and 4.4x faster in bf16
(BENCHMARKS.md). ``bmm`` needs equal row counts, so :func:`plan_routes` lays the routes out as
an (E, cap) block, each expert padded to ``cap`` rows, followed by *overflow spans*: the rows of
an expert past ``cap``, each run as that expert's own GEMM. :func:`choose_capacity` picks the
cap that minimises a cost model of padding rows against overflow rows and calls. A balanced
router gets a cap near its median load (a few % padding); a skewed one keeps its hot experts'
excess in a few large per-expert GEMMs; expert choice (equal loads) has neither. Padding rows
read token 0 and carry a zero combine weight, so they add exact zeros to every output and
gradient.

**Combine.** Token-choice routes are token-major (K per token): each token's output is the
weighted sum of its K expert rows, with no scatter: K gathers of (T, D) accumulated in place in
fp32, or in bf16 one gather of the K rows and a (T, 1, K) @ (T, K, D) ``bmm`` that accumulates
in fp32. A general route table (expert choice), and K >= 4 in
fp32, is combined with one ``index_add_`` over the weighted layout rows.

**Memory.** Saved for backward are the (P, F) pre-activations and activations (what a dense
FFN saves, over (T, 4D)) and three index vectors. The (P, D) gathered tokens and expert outputs
are not saved: the backward re-gathers the tokens, and it gets the router-weight gradient
``<grad_out[token], y_route>`` from the hidden side, ``<grad_out W2^T, h> + <grad_out, b2>``.
Temporaries of (P, D) and (T, D) live in a per-thread scratch workspace that is reused from
call to call: on Linux, glibc returns allocations over 32 MB to the OS on free, so a fresh
(R, D) buffer of a k=8 layer would pay its page faults on every call (about 15 ms per 67 MB
here). :func:`release_workspace` frees it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from sparse_dit.moe.ops.base import ExpertBackend, ExpertRows, ExpertWeights, check_expert_weights

__all__ = ["BlockPlan", "choose_capacity", "plan_routes", "fused_local_moe", "release_workspace", "run_fused_local", "FUSED_LOCAL"]

OVERFLOW_COST = 2.0
"""Cost of a row in an expert's own GEMM, in rows of the batched block (:func:`choose_capacity`),
with more than one intra-op thread: a per-expert GEMM is split across the threads and, at a few
dozen rows, runs at about half the batched GEMM's speed (which hands whole GEMMs to each
thread). With one thread both run alike and the cost is 1."""
SPAN_COST = 32.0
"""Call overhead of one per-expert overflow GEMM, in block rows (:func:`choose_capacity`)."""


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------
def choose_capacity(sizes: Sequence[int], overflow_cost: Optional[float] = None, span_cost: float = SPAN_COST) -> int:
    """Rows per expert of the batched block: the cap that minimises the modelled GEMM cost.

    ``cost(cap) = E * cap + overflow_cost * sum_e max(0, sizes[e] - cap) + span_cost * #{e: sizes[e] > cap}``:
    the block computes ``E * cap`` rows (padding included); the rows of an expert past ``cap``
    run as that expert's own GEMM, each row costing ``overflow_cost`` block rows and each such
    GEMM ``span_cost`` rows of call overhead. The optimum is one of the sizes (or 0).
    ``overflow_cost=None``: :data:`OVERFLOW_COST` with several intra-op threads, 1 with one.
    """
    if overflow_cost is None:
        overflow_cost = OVERFLOW_COST if torch.get_num_threads() > 1 else 1.0
    E = len(sizes)
    if E == 0:
        return 0
    desc = sorted(sizes, reverse=True)
    # cap = desc[i]: experts desc[:i] overflow (desc[:i] > cap or equal, equal costs nothing)
    best_cap, best = 0, overflow_cost * sum(desc) + span_cost * sum(1 for c in desc if c > 0)
    above, first = 0, 0  # sum of desc[:i]; first index holding the value desc[i]
    for i, cap in enumerate(desc):
        if i and cap != desc[i - 1]:
            first = i
        # desc[:first] overflow (size > cap); desc[first:i] equal cap and add nothing
        cost = E * cap + overflow_cost * (above - i * cap) + span_cost * first
        if cost < best:
            best_cap, best = cap, cost
        above += cap
    return best_cap


@dataclass(frozen=True)
class BlockPlan:
    """Where every route's row lives in the layout: a padded (E, cap) block, then overflow spans.

    Attributes:
        cap: rows per expert in the batched block (rows ``[0, E * cap)``, expert e at
            ``[e * cap, (e + 1) * cap)``; an expert with fewer routes is padded).
        spans: ``(expert, first row, end row)`` of each expert's routes past ``cap``, each run as
            that expert's own GEMM.
        rows: P, rows of the layout (padding included).
        num_experts: E.
        num_tokens: T.
        top_k: K when the routes are token-major (route r belongs to token r // K); ``None`` for
            a general route table.
        pos_route: (R,) int64 layout row of each route, in route order; ``rows`` for a dropped
            route (it reads a zero row).
        tok_pad: (P,) int64 token of each layout row. Padding rows read token 0 and carry a zero
            combine weight, so they add exact zeros to every output and gradient.
        expert_route: (R,) int64 expert of each route, ``num_experts`` for a dropped one.
        token_route: (R,) int64 token of each route for a general route table; ``None`` when
            token-major.
        kept: routes that are not dropped.
    """

    cap: int
    spans: tuple[tuple[int, int, int], ...]
    rows: int
    num_experts: int
    num_tokens: int
    top_k: Optional[int]
    pos_route: torch.Tensor
    tok_pad: torch.Tensor
    expert_route: torch.Tensor
    token_route: Optional[torch.Tensor]
    kept: int

    @property
    def padding(self) -> float:
        """Padding rows as a fraction of the kept rows."""
        return (self.rows - self.kept) / max(self.kept, 1)


def plan_routes(
    expert_idx: torch.Tensor,
    num_experts: int,
    num_tokens: int,
    token_idx: Optional[torch.Tensor] = None,
    cap: Optional[int] = None,
) -> BlockPlan:
    """Sort routes by expert and lay them out for :func:`fused_local_moe`; one device-to-host sync.

    Args:
        expert_idx: token choice: (T, K) expert per route, ``num_experts`` for a dropped route;
            with ``token_idx``: any shape, one expert per route.
        num_experts: E.
        num_tokens: T.
        token_idx: the token of each route (same shape as ``expert_idx``) for a general route
            table; ``None`` = token-major.
        cap: rows per expert of the batched block; ``None`` = :func:`choose_capacity`.
    """
    e_R = expert_idx.reshape(-1)
    R = e_R.numel()
    if token_idx is None:
        if expert_idx.ndim != 2 or expert_idx.shape[0] != num_tokens:
            raise ValueError(f"token-major expert_idx must be ({num_tokens}, K), got {tuple(expert_idx.shape)}")
        top_k: Optional[int] = expert_idx.shape[1]
    else:
        if token_idx.shape != expert_idx.shape:
            raise ValueError(f"token_idx shape {tuple(token_idx.shape)} != expert_idx shape {tuple(expert_idx.shape)}")
        top_k = None
    if cap is not None and cap < 0:
        raise ValueError(f"cap={cap} must be >= 0")
    dev = e_R.device
    E = num_experts
    sizes = torch.bincount(e_R, minlength=E + 1).tolist()[:E]  # the one host sync
    kept = sum(sizes)
    if cap is None:
        cap = choose_capacity(sizes)
    # Sorted position p of a route of expert e, rank j = p - start[e] within the expert:
    #   j < cap: row e * cap + j            (the block)
    #   else:    row ovf[e] + j - cap       (the expert's overflow span)
    start, ovf, spans, s, row = [], [], [], 0, E * cap
    for e, n in enumerate(sizes):
        start.append(s)
        ovf.append(row)
        if n > cap:
            spans.append((e, row, row + n - cap))
            row += n - cap
        s += n
    rows = row
    # Stable, so routes of one expert keep token order (deterministic layout). int32 keys sort
    # about 2x faster than int64 at R = 32k; dropped routes (sentinel E) sort last.
    e_sorted, perm = torch.sort(e_R.to(torch.int32), stable=True)
    e_sorted = e_sorted.long()
    p = torch.arange(R, device=dev)
    e_kept = e_sorted[:kept]
    rank = p[:kept] - torch.tensor(start, dtype=torch.int64, device=dev).index_select(0, e_kept)
    in_block = e_kept * cap + rank
    in_span = torch.tensor(ovf, dtype=torch.int64, device=dev).index_select(0, e_kept) + rank - cap
    pos_sorted = torch.full((R,), rows, dtype=torch.int64, device=dev)
    pos_sorted[:kept] = torch.where(rank < cap, in_block, in_span)
    pos_route = torch.empty_like(pos_sorted).index_copy_(0, perm, pos_sorted)
    if top_k is not None:
        tok_sorted = torch.div(perm[:kept], top_k, rounding_mode="floor")
    else:
        tok_sorted = token_idx.reshape(-1).index_select(0, perm[:kept])
    tok_pad = torch.zeros(rows, dtype=torch.int64, device=dev)
    tok_pad.index_copy_(0, pos_sorted[:kept], tok_sorted)
    token_route = None if token_idx is None else token_idx.reshape(-1)
    return BlockPlan(cap, tuple(spans), rows, E, num_tokens, top_k, pos_route, tok_pad, e_R, token_route, kept)


# ---------------------------------------------------------------------------------------------
# Scratch workspace
# ---------------------------------------------------------------------------------------------
_tls = threading.local()


def _scratch(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A reusable buffer of ``shape`` (uninitialised), private to this thread and op phase.

    Buffers made under ``torch.inference_mode`` are inference tensors, which may not be written
    outside it: each mode keeps its own."""
    cache = getattr(_tls, "buffers", None)
    if cache is None:
        cache = _tls.buffers = {}
    key = (name, like.dtype, like.device, torch.is_inference_mode_enabled())
    n = 1
    for d in shape:
        n *= d
    buf = cache.get(key)
    if buf is None or buf.numel() < n:
        buf = cache[key] = torch.empty(n, dtype=like.dtype, device=like.device)
    return buf[:n].view(shape)


def release_workspace() -> None:
    """Free this thread's scratch buffers of the fused MoE op (they are re-created on demand)."""
    _tls.buffers = {}


def _rowdot(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[r] = <a[r], b[r]>`` in chunks of rows through a cache-sized scratch product (a batched
    (1, F) @ (F, 1) GEMM is 3-4x slower, ``linalg.vecdot`` allocates the full product)."""
    n, w = a.shape
    step = max(1, (1 << 20) // max(w, 1))
    tmp = _scratch("rowdot", (min(step, n), w), a)
    for r in range(0, n, step):
        e = min(n, r + step)
        torch.sum(torch.mul(a[r:e], b[r:e], out=tmp[: e - r]), 1, out=out[r:e])
    return out


def _gather_sum(src: torch.Tensor, pos_TK: torch.Tensor, weight_TK: Optional[torch.Tensor]) -> torch.Tensor:
    """``out[t] = sum_k weight[t, k] * src[pos[t, k]]`` (weight None = 1), summed in fp32.

    fp32: K gathers of (T, D) accumulated in place (a single (T*K, D) gather followed by a
    reduction measured up to 2x slower: the temporary falls out of cache). bf16/fp16: one
    (T*K, D) gather and a (T, 1, K) @ (T, K, D) ``bmm``, which accumulates in fp32 inside the
    GEMM and rounds once, with no fp32 copies of the rows (dtype conversions cost about as much
    as the gathers here).
    """
    T, K = pos_TK.shape
    D = src.shape[1]
    if src.dtype in (torch.bfloat16, torch.float16):
        rows = torch.index_select(src, 0, pos_TK.reshape(-1), out=_scratch("groute", (T * K, D), src))
        wt = weight_TK if weight_TK is not None else src.new_ones(T, K)
        return torch.bmm(wt.reshape(T, 1, K).to(src.dtype), rows.view(T, K, D)).view(T, D)
    tmp = _scratch("gsum_tmp", (T, D), src)
    out = torch.index_select(src, 0, pos_TK[:, 0])
    if weight_TK is not None:
        out.mul_(weight_TK[:, :1])
    for k in range(1, K):
        row = torch.index_select(src, 0, pos_TK[:, k], out=tmp)
        if weight_TK is None:
            out.add_(row)
        else:
            out.addcmul_(row, weight_TK[:, k : k + 1])
    return out


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of sums over routes: fp32 for bf16/fp16 inputs."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _combine_by_gather(top_k: Optional[int], dtype: torch.dtype) -> bool:
    """Token-major routes are combined by K gathers (:func:`_gather_sum`), except with many routes
    per token in fp32, where one ``index_add_`` over the layout rows measured 5 % faster for the
    whole layer at K=8 (in bf16 it would need an fp32 copy of the rows, and loses)."""
    return top_k is not None and (top_k < 4 or dtype in (torch.bfloat16, torch.float16))


def _route_matrix(T: int, E: int, w_route: torch.Tensor, expert_route: torch.Tensor, token_route: Optional[torch.Tensor], top_k: Optional[int]) -> torch.Tensor:
    """(T, E + 1) ``S[t, e]`` = combine weight of token t's route to expert e (column E collects
    dropped routes and is ignored). The output bias term is ``S @ b2`` and its gradient
    ``S^T @ grad_out``: per-expert biases handled in token space, with no pass over (R, D)."""
    S = w_route.new_zeros(T, E + 1)
    if top_k is not None:
        S.scatter_add_(1, expert_route.view(T, top_k), w_route.reshape(T, top_k))
    else:
        S.index_put_((token_route, expert_route), w_route.reshape(-1), accumulate=True)
    return S


class _Layout:
    """The GEMMs of the op over the plan's layout: one batched GEMM over the (E, cap) block, then
    one GEMM per overflow span."""

    def __init__(self, cap: int, spans: tuple[tuple[int, int, int], ...], num_experts: int) -> None:
        self.cap, self.spans, self.E = cap, spans, num_experts
        self.block_rows = num_experts * cap

    def _block(self, t: torch.Tensor) -> torch.Tensor:
        return t[: self.block_rows].view(self.E, self.cap, t.shape[-1])

    def rows(self, a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor] = None, accumulate: bool = False) -> None:
        """``out[rows of e] (+)= a[rows of e] @ w[e] (+ bias[e])`` for every expert (w may be a transposed view)."""
        if self.cap:
            ob = self._block(out)
            if accumulate:
                ob.baddbmm_(self._block(a), w)
            elif bias is not None:
                torch.baddbmm(bias[:, None, :], self._block(a), w, out=ob)
            else:
                torch.bmm(self._block(a), w, out=ob)
        for e, r0, r1 in self.spans:
            if accumulate:
                out[r0:r1].addmm_(a[r0:r1], w[e])
            elif bias is not None:
                torch.addmm(bias[e], a[r0:r1], w[e], out=out[r0:r1])
            else:
                torch.mm(a[r0:r1], w[e], out=out[r0:r1])

    def weight_grad(self, a: torch.Tensor, b: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Stacked ``[E, m, n]``: ``[e] = a[rows of e]^T @ b[rows of e]``."""
        if self.cap:
            out = torch.bmm(self._block(a).transpose(1, 2), self._block(b), out=a.new_empty(shape))
        else:
            out = a.new_zeros(shape)
        for e, r0, r1 in self.spans:
            out[e].addmm_(a[r0:r1].t(), b[r0:r1])
        return out

    def bias_grad(self, g: torch.Tensor) -> torch.Tensor:
        """``[E, n]`` per-expert row sums."""
        if self.cap:
            out = torch.sum(self._block(g), 1)
        else:
            out = g.new_zeros(self.E, g.shape[1])
        for e, r0, r1 in self.spans:
            out[e].add_(g[r0:r1].sum(0))
        return out


# ---------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------
class _FusedMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_route, w1, w2, w3, b1, b2, plan, activation):  # type: ignore[override]
        T, D = x.shape
        Fh = w1.shape[2]
        dt = x.dtype
        acc = _acc_dtype(dt)
        rows, K, E = plan.rows, plan.top_k, plan.num_experts
        L = _Layout(plan.cap, plan.spans, E)
        pos_route, tok_pad = plan.pos_route, plan.tok_pad
        # Combine weight of every layout row: padding rows get 0, dropped routes write the
        # extra slot `rows`, which is then cleared.
        w_pad = x.new_zeros(rows + 1)
        w_pad.index_copy_(0, pos_route, w_route.reshape(-1).to(dt))
        w_pad[rows] = 0
        # 1. gather the tokens into the layout
        xp = torch.index_select(x, 0, tok_pad, out=_scratch("a", (rows, D), x))
        # 2. first GEMM(s), bias fused
        if activation == "gelu_tanh":
            hp = x.new_empty(rows, Fh)
            L.rows(xp, w1, hp, bias=b1)
            h = F.gelu(hp, approximate="tanh")
            saved = (hp, h)
        else:
            a = x.new_empty(rows, Fh)
            g = x.new_empty(rows, Fh)
            L.rows(xp, w1, a)
            L.rows(xp, w3, g)
            h = F.silu(a).mul_(g)
            saved = (a, g, h)
        # 3. second GEMM (its bias is added in token space below), into a layout with a zero
        #    row at `rows` (read by dropped routes)
        y = _scratch("b", (rows + 1, D), x)
        y[rows].zero_()
        L.rows(h, w2, y)
        # 4. combine, then the output bias sum_k w[t, k] * b2[e(t, k)] = S @ b2
        if _combine_by_gather(K, dt):
            out = _gather_sum(y, pos_route.view(T, K), w_route.reshape(T, K).to(dt))
        else:
            yw = y[:rows].mul_(w_pad[:rows, None])
            out = torch.zeros(T, D, dtype=acc, device=x.device)
            out.index_add_(0, tok_pad, yw if acc == dt else yw.to(acc))
        S = None
        if b2 is not None:
            S = _route_matrix(T, E, w_route, plan.expert_route, plan.token_route, K)[:, :E].to(dt)
            out.addmm_(S.to(out.dtype), b2.to(out.dtype))
        ctx.save_for_backward(x, w_route, w_pad, S, w1, w2, w3, b2, *saved)
        ctx.plan, ctx.activation = plan, activation
        return out.to(dt)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, w_route, w_pad, S, w1, w2, w3, b2, *saved = ctx.saved_tensors
        plan, act = ctx.plan, ctx.activation
        need_x, need_w, need_w1, need_w2, need_w3, need_b1, need_b2 = ctx.needs_input_grad[:7]
        rows, K, E = plan.rows, plan.top_k, plan.num_experts
        L = _Layout(plan.cap, plan.spans, E)
        pos_route, tok_pad = plan.pos_route, plan.tok_pad
        T, D = x.shape
        Fh = w1.shape[2]
        h = saved[-1]
        gout = grad_out.contiguous()
        # 1. gather the output gradient of every layout row
        ge = torch.index_select(gout, 0, tok_pad, out=_scratch("a", (rows, D), x))
        # 2. u = ge @ W2^T: the hidden gradient before the combine weight
        u = _scratch("u", (rows, Fh), x)  # backward-only (P, F) temporaries live in the workspace
        L.rows(ge, w2.transpose(1, 2), u)
        gw = None
        if need_w:
            # dL/dw_route = <grad_out[t], y_route + b2[e]> = <u, h> + (grad_out @ b2^T)[t, e]
            gw_pad = x.new_zeros(rows + 1)  # slot `rows` (dropped routes) stays 0
            _rowdot(u, h, gw_pad[:rows])
            gw = gw_pad.index_select(0, pos_route)
            if b2 is not None:
                G = torch.cat([torch.mm(gout, b2.t()), gout.new_zeros(T, 1)], 1)  # (T, E + 1)
                tok = plan.token_route if K is None else torch.arange(T, device=x.device).repeat_interleave(K)
                gw = gw + G.view(-1).index_select(0, tok * (E + 1) + plan.expert_route)
            gw = gw.to(w_route.dtype).view_as(w_route)
        # 3. weight the rows (padding rows become exact zeros): dL/dy = w * ge, dL/dh = w * u
        wcol = w_pad[:rows, None]
        dw2 = L.weight_grad(h, ge.mul_(wcol), (E, Fh, D)) if need_w2 else None
        db2 = torch.mm(S.t(), gout) if need_b2 else None
        dh = u.mul_(wcol)
        # 4. activation backward over all rows
        if act == "gelu_tanh":
            dhp = torch.ops.aten.gelu_backward.grad_input(dh, saved[0], approximate="tanh", grad_input=dh)
            grads_in = [(dhp, w1, need_w1)]
        else:
            a, g = saved[0], saved[1]
            da = torch.mul(dh, g, out=_scratch("da", (rows, Fh), x))
            torch.ops.aten.silu_backward.grad_input(da, a, grad_input=da)
            dg = dh.mul_(F.silu(a))
            grads_in = [(da, w1, need_w1), (dg, w3, need_w3)]
        db1 = L.bias_grad(dhp) if act == "gelu_tanh" and need_b1 else None
        # 5. weight gradients on the re-gathered tokens, then the layout's input gradient
        xp = torch.index_select(x, 0, tok_pad, out=_scratch("a", (rows, D), x))
        dws = [L.weight_grad(xp, gin, (E, D, Fh)) if need else None for gin, _, need in grads_in]
        dx = None
        if need_x:
            dxp = _scratch("b", (rows + 1, D), x)
            dxp[rows].zero_()
            for j, (gin, wmat, _) in enumerate(grads_in):
                L.rows(gin, wmat.transpose(1, 2), dxp, accumulate=j > 0)
            # 6. back to the tokens: each token sums the input gradients of its routes
            if _combine_by_gather(K, x.dtype):
                dx = _gather_sum(dxp, pos_route.view(T, K), None)
            else:
                acc = _acc_dtype(x.dtype)
                dx = torch.zeros(T, D, dtype=acc, device=x.device)
                dx.index_add_(0, tok_pad, dxp[:rows] if acc == x.dtype else dxp[:rows].to(acc))
            dx = dx.to(x.dtype)
        if act == "gelu_tanh":
            return dx, gw, dws[0], dw2, None, db1, db2, None, None
        return dx, gw, dws[0], dw2, dws[1], None, None, None, None


def fused_local_moe(
    x_TD: torch.Tensor,
    weight_route: torch.Tensor,
    plan: BlockPlan,
    activation: str,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: Optional[torch.Tensor] = None,
    b1: Optional[torch.Tensor] = None,
    b2: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out[t] = sum over kept routes r of token t of weight[r] * FFN_{expert(r)}(x[t])``.

    Args:
        x_TD: (T, D) tokens.
        weight_route: combine weight of each route, in route order (the order of the
            ``expert_idx`` given to :func:`plan_routes`); differentiable.
        plan: from :func:`plan_routes`.
        activation: ``"gelu_tanh"`` (needs b1, b2) or ``"swiglu"`` (needs w3).
        w1, w2, w3, b1, b2: stacked expert weights ``[E, D, F]``, ``[E, F, D]``, ``[E, D, F]``,
            ``[E, F]``, ``[E, D]``.

    Returns:
        (T, D).
    """
    check_expert_weights(activation, x_TD.dtype, w1, w2, w3, b1, b2)
    if x_TD.ndim != 2 or x_TD.shape[0] != plan.num_tokens:
        raise ValueError(f"x_TD must be ({plan.num_tokens}, D) as planned, got {tuple(x_TD.shape)}")
    if weight_route.numel() != plan.pos_route.numel():
        raise ValueError(f"weight_route has {weight_route.numel()} routes, the plan {plan.pos_route.numel()}")
    if w1.shape[0] != plan.num_experts:
        raise ValueError(f"the plan is for {plan.num_experts} experts, the weights hold {w1.shape[0]}")
    return _FusedMoE.apply(x_TD.contiguous(), weight_route, w1, w2, w3, b1, b2, plan, activation)


def run_fused_local(x: torch.Tensor, rows: ExpertRows, activation: str, w: ExpertWeights) -> torch.Tensor:
    """The ``"fused_local"`` backend: :func:`fused_local_moe` on token-space rows."""
    if rows.weight is None:
        raise ValueError("backend 'fused_local' needs rows.weight (the combine weight of each planned route)")
    return fused_local_moe(x, rows.weight, rows.plan, activation, *w)


def _local(x: torch.Tensor, dim: int, hidden: int, local: bool) -> bool:
    return local


def _check_local(x: torch.Tensor, dim: int, hidden: int, local: bool) -> None:
    if not local:
        raise ValueError(
            "backend='fused_local' needs the layer to hold every expert behind the plain LocalDispatcher "
            "(no expert parallelism); use backend='auto' or 'loop'"
        )


FUSED_LOCAL = ExpertBackend(run=run_fused_local, token_space=True, auto=_local, check=_check_local)
"""One process holding every expert, any device (the plan costs one host sync)."""
