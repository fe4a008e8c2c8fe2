"""One autograd op: gather, expert FFNs, weighting and scatter-add, one expert at a time.

# T = tokens, R = routes kept (sorted by expert), D = model dim, F = expert hidden, E = experts

The single-process fast path of :class:`sparse_dit.moe.MoEFeedForward` (used when the layer
holds all experts and the expert backend is ``"loop"``). It computes the same thing as
``LocalDispatcher.dispatch`` -> experts -> ``LocalDispatcher.combine``, but never materialises
the (R, D) sorted copies of the tokens, of the expert outputs' un-sorting or of their
gradients: each expert gathers its rows into a small reused buffer, and its weighted output is
scatter-added (``index_add_``) straight into the (T, D) result while the chunk is still in
cache. With k=8 routes per token the (R, D) copies are 8x the layer's input; avoiding them is
what keeps fine-grained MoE close to the dense FFN (BENCHMARKS.md, issue 3).

Saved for backward: the (R, F) pre-activations and activations (as a dense FFN saves its (T, F)
ones) and the (R, D) unweighted expert outputs, which the router-weight gradient
``<grad_out[token], y_route>`` needs; the token rows are re-gathered from the input.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["fused_local_moe"]


class _FusedLocalMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tok, w, sizes, activation, w1, w2, w3, b1, b2):  # type: ignore[override]
        T, D = x.shape
        x = x.contiguous()
        spans, s = [], 0
        for e, n in enumerate(sizes):
            if n:
                spans.append((e, s, s + n))
            s += n
        kept = s
        nmax = max(sizes) if sizes else 0
        Fh = w1.shape[2]
        buf = x.new_empty(nmax, D)
        wc = w[:kept].to(x.dtype)[:, None]  # (R, 1) combine weights in the compute dtype
        # 1. gather each expert's rows (cache-sized buffer) and run the first GEMM(s)
        if activation == "gelu_tanh":
            hp = x.new_empty(kept, Fh)
            for e, s, t in spans:
                xe = torch.index_select(x, 0, tok[s:t], out=buf[: t - s])
                torch.addmm(b1[e], xe, w1[e], out=hp[s:t])
            h = F.gelu(hp, approximate="tanh")
        else:
            a = x.new_empty(kept, Fh)
            g = x.new_empty(kept, Fh)
            for e, s, t in spans:
                xe = torch.index_select(x, 0, tok[s:t], out=buf[: t - s])
                torch.mm(xe, w1[e], out=a[s:t])
                torch.mm(xe, w3[e], out=g[s:t])
            h = F.silu(a) * g
        # 2. second GEMM, weight the rows while hot, scatter-add into the tokens
        y = x.new_empty(kept, D)
        # Accumulate the k contributions per token in fp32 when computing in bf16/fp16 (as a
        # GEMM accumulates), not by repeated low-precision adds.
        acc = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
        out = torch.zeros(T, D, dtype=acc, device=x.device)
        for e, s, t in spans:
            if b2 is not None:
                torch.addmm(b2[e], h[s:t], w2[e], out=y[s:t])
            else:
                torch.mm(h[s:t], w2[e], out=y[s:t])
            yw = torch.mul(y[s:t], wc[s:t], out=buf[: t - s])
            out.index_add_(0, tok[s:t], yw if acc == x.dtype else yw.to(acc))
        out = out.to(x.dtype)
        if activation == "gelu_tanh":
            ctx.save_for_backward(x, tok, w, w1, w2, hp, h, y)
        else:
            ctx.save_for_backward(x, tok, w, w1, w2, w3, a, g, h, y)
        ctx.spans, ctx.kept, ctx.nmax, ctx.activation, ctx.w_dtype = spans, kept, nmax, activation, w.dtype
        ctx.num_routes, ctx.sizes = w.shape[0], sizes
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        spans, kept, act = ctx.spans, ctx.kept, ctx.activation
        need_x, _, need_w, _, _, need_w1, need_w2, need_w3, need_b1, need_b2 = ctx.needs_input_grad
        if act == "gelu_tanh":
            x, tok, w, w1, w2, hp, h, y = ctx.saved_tensors
        else:
            x, tok, w, w1, w2, w3, a, g, h, y = ctx.saved_tensors
        gout = grad_out.contiguous()
        T, D = x.shape
        E, _, Fh = w1.shape
        buf = x.new_empty(ctx.nmax, D)
        wc = w[:kept].to(x.dtype)[:, None]
        busy = {e for e, _, _ in spans}

        def stacked(flag: bool, shape: tuple[int, ...]) -> Optional[torch.Tensor]:
            if not flag:
                return None
            out = x.new_empty(shape)
            for e in range(shape[0]):
                if e not in busy:
                    out[e].zero_()  # idle experts; the others are overwritten with out=
            return out

        dw2 = stacked(need_w2, (E, Fh, D))
        db2 = stacked(need_b2, (E, D))
        gw = torch.zeros(ctx.num_routes, dtype=ctx.w_dtype, device=x.device) if need_w else None
        dh = x.new_empty(kept, Fh)
        # 1. per expert: gather the output gradient rows, router-weight gradient, then the
        #    gradient through the second GEMM
        for e, s, t in spans:
            ge = torch.index_select(gout, 0, tok[s:t], out=buf[: t - s])  # dL/d(weighted y)
            if gw is not None:
                gw[s:t] = torch.linalg.vecdot(ge, y[s:t]).to(ctx.w_dtype)
            ge.mul_(wc[s:t])  # dL/dy
            if dw2 is not None:
                torch.mm(h[s:t].t(), ge, out=dw2[e])
            if db2 is not None:
                torch.sum(ge, 0, out=db2[e])
            torch.mm(ge, w2[e].t(), out=dh[s:t])
        # 2. activation backward over all rows at once
        if act == "gelu_tanh":
            dhp = torch.ops.aten.gelu_backward(dh, hp, approximate="tanh")
            grads_in = [(dhp, w1)]
        else:
            da = torch.ops.aten.silu_backward(dh * g, a)
            dg = dh * F.silu(a)
            grads_in = [(da, w1), (dg, w3)]
        dws = [stacked(flag, (E, D, Fh)) for flag in ((need_w1,) if act == "gelu_tanh" else (need_w1, need_w3))]
        # 3. per expert: re-gather the token rows for the weight gradients, scatter-add dx
        acc = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
        dx = torch.zeros(T, D, dtype=acc, device=x.device) if need_x else None
        dxe_buf = x.new_empty(ctx.nmax, D)
        for e, s, t in spans:
            xe = torch.index_select(x, 0, tok[s:t], out=buf[: t - s])
            for j, (gin, wmat) in enumerate(grads_in):
                if dws[j] is not None:
                    torch.mm(xe.t(), gin[s:t], out=dws[j][e])
                if dx is not None:
                    if j == 0:
                        dxe = torch.mm(gin[s:t], wmat[e].t(), out=dxe_buf[: t - s])
                    else:
                        dxe.addmm_(gin[s:t], wmat[e].t())
            if dx is not None:
                dx.index_add_(0, tok[s:t], dxe if acc == x.dtype else dxe.to(acc))
        db1 = None
        if act == "gelu_tanh" and need_b1:
            # One index_add_ into the small [E, F] table, not E reductions (see expert_loop.py).
            expert_of_row = torch.repeat_interleave(
                torch.arange(E, device=x.device), torch.tensor(list(ctx.sizes), device=x.device), output_size=kept
            )
            db1 = x.new_zeros(E, Fh).index_add_(0, expert_of_row, dhp)
        if dx is not None:
            dx = dx.to(x.dtype)
        if act == "gelu_tanh":
            return dx, None, gw, None, None, dws[0], dw2, None, db1, db2
        return dx, None, gw, None, None, dws[0], dw2, dws[1], None, None


def fused_local_moe(
    x_TD: torch.Tensor,
    token_sorted: torch.Tensor,
    weight_sorted: torch.Tensor,
    sizes: Sequence[int],
    activation: str,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: Optional[torch.Tensor] = None,
    b1: Optional[torch.Tensor] = None,
    b2: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out[t] = sum over routes r of token t of weight[r] * FFN_{expert(r)}(x[t])``.

    Args:
        x_TD: (T, D) tokens.
        token_sorted: (R,) int64 token of each route, routes grouped by expert (``sizes[e]`` for
            expert e first, then any dropped routes, which are ignored).
        weight_sorted: (R,) combine weight of each route (differentiable).
        sizes: routes per expert on the host.
        activation: ``"gelu_tanh"`` (needs b1, b2) or ``"swiglu"`` (needs w3).
        w1, w2, w3, b1, b2: stacked expert weights ``[E, D, F]``, ``[E, F, D]``, ``[E, D, F]``,
            ``[E, F]``, ``[E, D]``.

    Returns:
        (T, D).
    """
    if activation == "gelu_tanh" and (b1 is None or b2 is None):
        raise ValueError("activation='gelu_tanh' needs biases b1 and b2")
    if activation == "swiglu" and w3 is None:
        raise ValueError("activation='swiglu' needs the gate weight w3")
    if any(p is not None and p.dtype != x_TD.dtype for p in (w1, w2, w3, b1, b2)):
        raise ValueError(f"expert weights must have the input dtype {x_TD.dtype}; cast the module (model.to(dtype))")
    return _FusedLocalMoE.apply(x_TD, token_sorted, weight_sorted, tuple(int(n) for n in sizes), activation, w1, w2, w3, b1, b2)
