"""The single-process fused MoE op: its route layout and its outputs/gradients (issue 3).

The layer-level tests (test_moe_dispatch.py) compare the whole layer with a per-token loop; the
tests here pin the layout planner and drive the op with chosen layouts (all rows in per-expert
overflow GEMMs, all rows in the padded batched block, and mixtures), which random routing alone
would not reach reliably.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from sparse_dit.moe import MoEFeedForward
from sparse_dit.moe.ops import fused_local as fl
from sparse_dit.moe.ops.fused_local import choose_capacity, fused_local_moe, plan_routes, release_workspace


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# choose_capacity
# ---------------------------------------------------------------------------------------------
def _cost(sizes, cap, overflow_cost, span_cost):
    return len(sizes) * cap + sum(overflow_cost * max(0, c - cap) + (span_cost if c > cap else 0) for c in sizes)


@pytest.mark.parametrize("seed", range(20))
def test_choose_capacity_minimises_the_cost_model(seed: int) -> None:
    # Reference: brute force over every cap from 0 to the largest size.
    g = torch.Generator().manual_seed(seed)
    E = int(torch.randint(1, 12, (1,), generator=g))
    sizes = torch.randint(0, 40, (E,), generator=g).tolist()
    for oc, sc in [(2.0, 32.0), (1.0, 0.0), (3.5, 5.0)]:
        best = min(_cost(sizes, c, oc, sc) for c in range(max(sizes) + 1))
        assert _cost(sizes, choose_capacity(sizes, oc, sc), oc, sc) == pytest.approx(best)


def test_choose_capacity_on_typical_loads() -> None:
    assert choose_capacity([64] * 8) == 64  # balanced: one block, no padding, no spans
    assert choose_capacity([0] * 5) == 0
    assert choose_capacity([]) == 0
    # One hot expert: the block takes the typical load, the hot expert's excess is one span.
    assert choose_capacity([100, 100, 100, 1000]) == 100
    # Expensive spans: pad everything to the largest load instead.
    assert choose_capacity([100, 101, 102, 103], overflow_cost=2.0, span_cost=1000.0) == 103


# ---------------------------------------------------------------------------------------------
# plan_routes
# ---------------------------------------------------------------------------------------------
def _check_layout(plan, expert_route, token_route) -> None:
    E, rows, cap = plan.num_experts, plan.rows, plan.cap
    pos = plan.pos_route.tolist()
    kept = [r for r, e in enumerate(expert_route) if e < E]
    assert plan.kept == len(kept)
    # dropped routes read the zero row; kept routes own distinct layout rows
    assert all(pos[r] == rows for r, e in enumerate(expert_route) if e == E)
    assert len({pos[r] for r in kept}) == len(kept)
    spans = {e: (r0, r1) for e, r0, r1 in plan.spans}
    for r in kept:
        e, p = expert_route[r], pos[r]
        in_block = e * cap <= p < (e + 1) * cap
        in_span = e in spans and spans[e][0] <= p < spans[e][1]
        assert in_block or in_span, f"route {r} of expert {e} at row {p}"
        assert int(plan.tok_pad[p]) == token_route[r]
    # every span row is a real route; block rows not used by a route are padding (token 0)
    assert sum(r1 - r0 for r0, r1 in spans.values()) + sum(min(expert_route.count(e), cap) for e in range(E)) == len(kept)
    assert rows == E * cap + sum(r1 - r0 for r0, r1 in spans.values())
    assert plan.padding == pytest.approx((rows - len(kept)) / max(len(kept), 1))


@pytest.mark.parametrize("cap", [None, 0, 1, 3, 100])
def test_plan_routes_token_major_layout(cap) -> None:
    torch.manual_seed(0)
    T, K, E = 11, 3, 5
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    idx[2, 1] = E  # two dropped routes
    idx[7, 0] = E
    plan = plan_routes(idx, E, T, cap=cap)
    if cap is not None:
        assert plan.cap == cap
    assert plan.top_k == K and plan.token_route is None
    _check_layout(plan, idx.reshape(-1).tolist(), [r // K for r in range(T * K)])


def test_plan_routes_general_route_table() -> None:
    expert = torch.tensor([[0], [0], [0], [2], [2], [1]])
    token = torch.tensor([[4], [1], [3], [0], [4], [2]])
    plan = plan_routes(expert, 3, 5, token_idx=token, cap=2)
    assert plan.top_k is None
    assert plan.spans == ((0, 6, 7),)  # expert 0 has 3 routes: 2 in the block, 1 overflow row
    _check_layout(plan, expert.reshape(-1).tolist(), token.reshape(-1).tolist())


def test_plan_routes_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="token-major expert_idx"):
        plan_routes(torch.zeros(4, 2, dtype=torch.long), 3, 5)
    with pytest.raises(ValueError, match="token_idx shape"):
        plan_routes(torch.zeros(4, 1, dtype=torch.long), 3, 4, token_idx=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="cap=-1"):
        plan_routes(torch.zeros(4, 1, dtype=torch.long), 3, 4, cap=-1)


# ---------------------------------------------------------------------------------------------
# The op against a per-route reference
# ---------------------------------------------------------------------------------------------
def _params(E: int, D: int, Fh: int, activation: str, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    mk = lambda *s: (torch.randn(*s, generator=g, dtype=dtype) * 0.5).requires_grad_(True)  # noqa: E731
    if activation == "gelu_tanh":
        return [mk(E, D, Fh), mk(E, Fh, D), None, mk(E, Fh), mk(E, D)]
    return [mk(E, D, Fh), mk(E, Fh, D), mk(E, D, Fh), None, None]


def _reference(x, w_route, expert_route, token_route, activation, w1, w2, w3, b1, b2):
    E = w1.shape[0]
    rows = [x.new_zeros(x.shape[1]) for _ in range(x.shape[0])]
    for r, (e, t) in enumerate(zip(expert_route.tolist(), token_route.tolist())):
        if e == E:
            continue
        xt = x[t]
        if activation == "gelu_tanh":
            y = F.gelu(xt @ w1[e] + b1[e], approximate="tanh") @ w2[e] + b2[e]
        else:
            y = (F.silu(xt @ w1[e]) * (xt @ w3[e])) @ w2[e]
        rows[t] = rows[t] + w_route[r] * y
    return torch.stack(rows)


def _compare(T, E, expert_route, token_route, top_k, activation, cap):
    torch.manual_seed(2)
    D, Fh = 6, 10
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w = torch.rand(expert_route.numel(), dtype=torch.float64, requires_grad=True)
    params = _params(E, D, Fh, activation)
    if top_k is not None:
        plan = plan_routes(expert_route.view(T, top_k), E, T, cap=cap)
        w_in = w.view(T, top_k)
    else:
        plan = plan_routes(expert_route.view(-1, 1), E, T, token_idx=token_route.view(-1, 1), cap=cap)
        w_in = w.view(-1, 1)
    out = fused_local_moe(x, w_in, plan, activation, *params)
    ref = _reference(x, w, expert_route, token_route, activation, *params)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    leaves = [x, w] + [p for p in params if p is not None]
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(ref, leaves, g)
    names = ["x", "w_route"] + [n for n, p in zip(["w1", "w2", "w3", "b1", "b2"], params) if p is not None]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, msg=lambda m: f"grad of {name}: {m}")
    return plan


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
@pytest.mark.parametrize("cap", [0, 1, 2, None, 50])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_token_major_matches_reference_for_any_layout(activation: str, cap, top_k: int) -> None:
    # cap=0: every route in per-expert GEMMs; 50: everything padded into the batched block.
    # Skewed routing (expert 0 is hot, expert 4 idle) with dropped routes; k=4 takes the
    # index_add_ combine, k < 4 the gather combine.
    T, E = 9, 6
    g = torch.Generator().manual_seed(top_k)
    prob = torch.tensor([20.0, 1, 1, 1, 0, 1])  # expert 0 hot, expert 4 idle
    idx = torch.multinomial(prob.expand(T, E), top_k, replacement=False, generator=g)
    idx[1, -1] = E  # dropped routes
    idx[6, 0] = E
    plan = _compare(T, E, idx.reshape(-1), torch.arange(T).repeat_interleave(top_k), top_k, activation, cap)
    if cap == 0:
        assert plan.rows == plan.kept and plan.cap == 0
    if cap == 50:
        assert not plan.spans and plan.rows == E * 50


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
@pytest.mark.parametrize("cap", [0, 2, None])
def test_general_route_table_matches_reference(activation: str, cap) -> None:
    # Expert-choice-like table: several routes per token or none, in any order.
    expert = torch.tensor([2, 0, 0, 1, 2, 0, 3, 1, 0])
    token = torch.tensor([0, 3, 1, 1, 4, 0, 2, 3, 2])
    _compare(5, 4, expert, token, None, activation, cap)


def test_all_routes_dropped_gives_zero_output_and_gradients() -> None:
    T, E, K = 4, 3, 2
    idx = torch.full((T, K), E)
    x = torch.randn(T, 5, requires_grad=True)
    w = torch.rand(T, K, requires_grad=True)
    params = _params(E, 5, 7, "gelu_tanh", torch.float32)
    out = fused_local_moe(x, w, plan_routes(idx, E, T), "gelu_tanh", *params)
    assert torch.equal(out, torch.zeros(T, 5))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params if p is not None)


@pytest.mark.parametrize("top_k", [2, 8])
def test_bf16_accumulates_the_combine_in_fp32(top_k: int) -> None:
    # The k weighted rows of a token are summed in fp32, so bf16 stays within bf16 rounding of
    # the fp32 op (a bf16 running sum of 8 rows is measurably worse).
    torch.manual_seed(3)
    T, E, D, Fh = 64, 16, 32, 48
    idx = torch.stack([torch.randperm(E)[:top_k] for _ in range(T)])
    x = torch.randn(T, D)
    w = torch.softmax(torch.randn(T, top_k), -1)
    params = [p.detach() if p is not None else None for p in _params(E, D, Fh, "gelu_tanh", torch.float32)]
    plan = plan_routes(idx, E, T)
    ref = fused_local_moe(x, w, plan, "gelu_tanh", *params)
    out = fused_local_moe(x.bfloat16(), w, plan, "gelu_tanh", *[None if p is None else p.bfloat16() for p in params])
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 2e-2


def test_workspace_is_reused_and_can_be_released() -> None:
    T, E, K = 16, 4, 2
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    params = _params(E, 8, 12, "gelu_tanh", torch.float32)
    x = torch.randn(T, 8, requires_grad=True)
    w = torch.rand(T, K, requires_grad=True)
    plan = plan_routes(idx, E, T)
    first = fused_local_moe(x, w, plan, "gelu_tanh", *params)
    first.sum().backward()
    bufs = {k: v.data_ptr() for k, v in fl._tls.buffers.items()}
    assert bufs  # scratch buffers exist ...
    second = fused_local_moe(x, w, plan, "gelu_tanh", *params)
    assert {k: v.data_ptr() for k, v in fl._tls.buffers.items()} == bufs  # ... and are reused
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    release_workspace()
    assert fl._tls.buffers == {}
    torch.testing.assert_close(fused_local_moe(x, w, plan, "gelu_tanh", *params), first, rtol=0, atol=0)


def test_op_rejects_mismatched_inputs() -> None:
    T, E, K = 4, 3, 2
    plan = plan_routes(torch.zeros(T, K, dtype=torch.long), E, T)
    params = _params(E, 5, 7, "gelu_tanh", torch.float32)
    with pytest.raises(ValueError, match="as planned"):
        fused_local_moe(torch.randn(T + 1, 5), torch.rand(T, K), plan, "gelu_tanh", *params)
    with pytest.raises(ValueError, match="routes"):
        fused_local_moe(torch.randn(T, 5), torch.rand(T, K + 1), plan, "gelu_tanh", *params)
    with pytest.raises(ValueError, match="experts"):
        fused_local_moe(torch.randn(T, 5), torch.rand(T, K), plan, "gelu_tanh", *_params(E + 1, 5, 7, "gelu_tanh", torch.float32))
    with pytest.raises(ValueError, match="input dtype"):
        fused_local_moe(torch.randn(T, 5, dtype=torch.float64), torch.rand(T, K), plan, "gelu_tanh", *params)


def test_layout_choices_give_the_same_result() -> None:
    # Invariant: the layout (padding, spans) changes where rows are computed, not the result.
    torch.manual_seed(4)
    T, E, K = 40, 5, 2
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    x = torch.randn(T, 8, dtype=torch.float64)
    w = torch.rand(T, K, dtype=torch.float64)
    params = [p.detach() if p is not None else None for p in _params(E, 8, 12, "gelu_tanh")]
    outs = [fused_local_moe(x, w, plan_routes(idx, E, T, cap=c), "gelu_tanh", *params) for c in (0, 5, 16, 40)]
    for a, b in itertools.combinations(outs, 2):
        torch.testing.assert_close(a, b)


def test_backward_twice_with_retained_graph_gives_the_same_gradients() -> None:
    # The backward works in the workspace and never writes into its saved tensors, so a
    # retained graph can be differentiated again.
    torch.manual_seed(5)
    T, E, K = 12, 4, 2
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    for activation in ("gelu_tanh", "swiglu"):
        params = _params(E, 8, 12, activation, torch.float32)
        x = torch.randn(T, 8, requires_grad=True)
        w = torch.rand(T, K, requires_grad=True)
        out = fused_local_moe(x, w, plan_routes(idx, E, T), activation, *params)
        leaves = [x, w] + [p for p in params if p is not None]
        first = torch.autograd.grad(out.square().sum(), leaves, retain_graph=True)
        second = torch.autograd.grad(out.square().sum(), leaves)
        for a, b in zip(first, second):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_layer_handles_an_empty_token_set() -> None:
    layer = MoEFeedForward(8, 16, 4, 2)
    x = torch.randn(2, 0, 8, requires_grad=True)
    y, aux = layer(x)
    assert y.shape == (2, 0, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
