"""Dispatch + experts + combine against a naive per-token reference loop (issue 3).

The reference takes the layer's own routing decision and, token by token and route by route,
applies the chosen expert's weights with plain torch ops; outputs and gradients (input, expert
weights, biases, router gate) must match the layer's sorted/grouped path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparse_dit.moe import MoEFeedForward
from sparse_dit.moe.dispatch import LocalDispatcher
from sparse_dit.moe.experts import GroupedExperts
from sparse_dit.moe.ops import ExpertRows
from sparse_dit.moe.ops.grouped_mm import grouped_mm_autograd
from sparse_dit.moe.routers import capacity_drop, expert_choice_capacity


pytestmark = pytest.mark.usefixtures("one_thread")


def _expert(layer: MoEFeedForward, e: int, x: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    if ex.activation == "gelu_tanh":
        return F.gelu(x @ ex.w1[e] + ex.b1[e], approximate="tanh") @ ex.w2[e] + ex.b2[e]
    return (F.silu(x @ ex.w1[e]) * (x @ ex.w3[e])) @ ex.w2[e]


def reference_forward(layer: MoEFeedForward, x: torch.Tensor, cond=None) -> torch.Tensor:
    """Naive loop: y_t = sum over routes r of token t of weight_r * expert_{e_r}(x_t)."""
    B, N, D = x.shape
    r = layer.router(x, cond)
    x_TD = x.reshape(B * N, D)
    E = layer.num_experts
    rows = [x_TD.new_zeros(D) for _ in range(B * N)]
    e_flat, w_flat = r.expert_idx.reshape(-1), r.weight.reshape(-1)
    if r.token_idx is None:
        tok_flat = torch.arange(B * N).repeat_interleave(r.expert_idx.shape[1])
    else:
        tok_flat = r.token_idx.reshape(-1)
    for i in range(e_flat.numel()):
        e, t = int(e_flat[i]), int(tok_flat[i])
        if e == E:  # dropped by capacity
            continue
        rows[t] = rows[t] + w_flat[i] * _expert(layer, e, x_TD[t : t + 1])[0]
    y = torch.stack(rows)
    if layer.shared is not None:
        y = y + layer.shared(x_TD)
    return y.view(B, N, D)


def _compare(layer: MoEFeedForward, x: torch.Tensor, cond=None, atol: float = 1e-5) -> None:
    params = [p for p in layer.parameters() if p.requires_grad]
    g = torch.randn_like(x)
    x1 = x.clone().requires_grad_(True)
    y, _ = layer(x1, cond=cond)
    grads = torch.autograd.grad(y, [x1, *params], g, allow_unused=True)
    x2 = x.clone().requires_grad_(True)
    y_ref = reference_forward(layer, x2, cond)
    grads_ref = torch.autograd.grad(y_ref, [x2, *params], g, allow_unused=True)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=1e-4)
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, grads, grads_ref):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        if a is None:
            continue
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")


CASES = [(E, k) for E in (1, 4, 8, 64) for k in (1, 2, 4) if k <= E]

# "fused_local": the single-process op (token space); "auto-protocol": what "auto" runs behind a
# LocalDispatcher subclass, i.e. the dispatch()/combine() protocol that an expert-parallel
# dispatcher uses, with the loop over experts; "grouped_mm": torch._grouped_mm behind dispatch.
BACKENDS = ["fused_local", "auto-protocol", "grouped_mm"]


class _ProtocolDispatcher(LocalDispatcher):
    """A LocalDispatcher subclass: the layer then takes the dispatch/experts/combine path."""


def _layer(*args, backend: str = "fused_local", **kwargs) -> MoEFeedForward:
    layer = MoEFeedForward(*args, backend=backend.replace("-protocol", ""), **kwargs)
    if backend.endswith("-protocol"):
        layer.dispatcher = _ProtocolDispatcher()
    return layer


@pytest.mark.parametrize("E,k", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_choice_matches_reference(E: int, k: int, backend: str) -> None:
    torch.manual_seed(E * 10 + k)
    layer = _layer(16, 32, E, k, backend=backend)
    # Non-zero biases and a sharper router so that every weight matters.
    with torch.no_grad():
        layer.experts.b1.normal_()
        layer.experts.b2.normal_()
        layer.router.gate.weight.normal_(std=0.5)
    _compare(layer, torch.randn(2, 12, 16))


@pytest.mark.parametrize("E,k", [(4, 2), (8, 4)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_sigmoid_shared_timestep_matches_reference(E: int, k: int, backend: str) -> None:
    torch.manual_seed(7)
    layer = _layer(16, 32, E, k, activation="swiglu", score_func="sigmoid", shared_experts=1, cond_dim=8, backend=backend)
    with torch.no_grad():
        layer.router.cond_proj.weight.normal_()
    _compare(layer, torch.randn(2, 10, 16), cond=torch.randn(2, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_dropping_matches_reference(backend: str) -> None:
    torch.manual_seed(3)
    layer = _layer(16, 32, 4, 2, capacity_factor=0.5, backend=backend)
    with torch.no_grad():
        layer.router.gate.weight.normal_(std=1.0)
    x = torch.randn(2, 16, 16)
    r = layer.router(x)
    assert r.may_drop and int((r.expert_idx == 4).sum()) > 0  # the case really drops
    _compare(layer, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_choice_matches_reference(backend: str) -> None:
    torch.manual_seed(5)
    layer = _layer(16, 32, 8, 2, router="expert_choice", backend=backend)
    _compare(layer, torch.randn(3, 10, 16))


def test_capacity_drop_keeps_highest_priority() -> None:
    # Expert 0 is chosen by 5 routes with distinct scores; capacity 2 keeps the two best.
    idx = torch.tensor([[0], [0], [1], [0], [0], [0]])
    prio = torch.tensor([[0.3], [0.9], [0.5], [0.1], [0.7], [0.6]])
    new, keep = capacity_drop(idx, prio, num_experts=2, capacity=2)
    assert keep.view(-1).tolist() == [False, True, True, False, True, False]
    assert new.view(-1).tolist() == [2, 0, 1, 2, 0, 2]


def test_layer_capacity_drops_lowest_scores_and_reports_it() -> None:
    # 8 tokens, 2 experts, top-1, capacity ceil(0.5 * 8 / 2) = 2. Token i's logit for expert 0 is
    # (i + 1) and 0 for expert 1: every token prefers expert 0, scores rise with i, so exactly
    # tokens 6 and 7 are kept and tokens 0..5 are dropped (their MoE output is zero).
    layer = MoEFeedForward(2, 8, 2, 1, capacity_factor=0.5)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    x = torch.stack([torch.tensor([float(i + 1), 0.0]) for i in range(8)])[None]  # (1, 8, 2)
    y, aux = layer(x)
    zero = y[0].abs().sum(-1) == 0
    assert zero.tolist() == [True] * 6 + [False] * 2
    assert aux.dropped_fraction.item() == pytest.approx(6 / 8)
    assert aux.tokens_per_expert.tolist() == [8.0, 0.0]  # demand before dropping


def test_expert_choice_gives_every_expert_exactly_its_capacity() -> None:
    torch.manual_seed(0)
    B, N, E, k = 3, 20, 8, 2
    layer = MoEFeedForward(16, 32, E, k, router="expert_choice")
    r = layer.router(torch.randn(B, N, 16))
    C = expert_choice_capacity(N, E, k, None)
    assert C == 5
    per_expert = torch.bincount(r.expert_idx.view(-1), minlength=E)
    assert per_expert.tolist() == [B * C] * E
    # Per sample too: each expert takes exactly C distinct tokens of each sample.
    tok = r.token_idx.view(E, B, C)
    for e in range(E):
        for b in range(B):
            assert len(set((tok[e, b] // N).tolist())) == 1 and int(tok[e, b, 0]) // N == b
            assert len(set(tok[e, b].tolist())) == C


def test_expert_choice_output_does_not_depend_on_the_batch() -> None:
    # The documented inference rule: routing groups are samples, so a sample's output is the
    # same alone (batch 1, as at inference) and inside a larger (training or CFG) batch.
    torch.manual_seed(1)
    layer = MoEFeedForward(16, 32, 8, 2, router="expert_choice")
    x = torch.randn(4, 12, 16)
    y_batch, _ = layer(x)
    y_alone, _ = layer(x[2:3])
    torch.testing.assert_close(y_batch[2:3], y_alone)


def test_dispatch_protocol_roundtrip_general_routes() -> None:
    # combine(identity experts) = per-token sum of weights * x, for an arbitrary route table.
    torch.manual_seed(2)
    x = torch.randn(6, 4)
    e = torch.tensor([[2], [0], [1], [2], [0], [3]])
    tok = torch.tensor([[5], [0], [0], [1], [5], [2]])
    w = torch.rand(6, 1)
    d = LocalDispatcher()
    xs, counts, meta = d.dispatch(x, e, w, num_experts=4, token_idx=tok)
    assert counts.tolist() == [2, 1, 2, 1]
    assert meta.token_sorted.tolist() == [0, 5, 0, 5, 1, 2]  # stable sort by expert
    out = d.combine(xs, meta)
    ref = torch.zeros_like(x)
    for i in range(6):
        ref[tok[i, 0]] += w[i, 0] * x[tok[i, 0]]
    torch.testing.assert_close(out, ref)


def test_local_dispatcher_refuses_sharded_experts() -> None:
    layer = MoEFeedForward(8, 16, 4, 2)
    with pytest.raises(ValueError, match="not divisible"):
        layer.shard_experts(0, 3, LocalDispatcher())
    layer.shard_experts(1, 2, LocalDispatcher())
    assert layer.experts.num_experts == 2 and layer.expert_slice == (2, 4)
    with pytest.raises(ValueError, match="expert-parallel dispatcher"):
        layer(torch.randn(1, 5, 8))


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
def test_sync_free_grouped_mm_path_matches_loop(activation: str) -> None:
    # The autograd-over-torch._grouped_mm path (used on CUDA, no host sync) against the loop op,
    # with a tail of rows that no expert owns (as capacity dropping leaves them).
    torch.manual_seed(4)
    ex = GroupedExperts(4, 16, 32, activation, backend="loop")
    if ex.b1 is not None:
        with torch.no_grad():
            ex.b1.normal_()
            ex.b2.normal_()
    counts = torch.tensor([5, 0, 7, 3])
    x = torch.randn(18, 16)
    g = torch.randn(18, 16)
    outs = []
    for fn in (lambda xx: ex(xx, ExpertRows(counts)), lambda xx: grouped_mm_autograd(xx, counts, activation, ex.params_in(xx.dtype))):
        xx = x.clone().requires_grad_(True)
        y = fn(xx)
        y = y.masked_fill(torch.arange(18)[:, None] >= 15, 0.0)  # tail rows are unspecified
        grads = torch.autograd.grad(y, [xx, *ex.parameters()], g)
        outs.append((y, grads[0][:15], *grads[1:]))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_layer_tracks_fp32(backend: str) -> None:
    # bf16 compute (router still fp32) stays within bf16 rounding of the fp32 layer, k=8 routes
    # per token included (the fused path accumulates them in fp32).
    torch.manual_seed(6)
    layer = _layer(16, 32, 16, 8, backend=backend)
    x = torch.randn(2, 12, 16)
    y32, _ = layer(x)
    y16, _ = layer.to(torch.bfloat16)(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=3e-2, rtol=3e-2)


# --------------------------------------------------------------------------------------------
# GPU-path pieces that run on CPU too (issue 16: what the H200 showed)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_weighted_sum_over_k_methods_agree_with_a_plain_sum(dtype, K):
    from sparse_dit.moe.dispatch import weighted_sum_over_k

    g = torch.Generator().manual_seed(K)
    y = torch.randn(37, K, 24, generator=g).to(dtype)
    w = torch.rand(37, K, generator=g)
    ref = sum(w[:, k, None].double() * y[:, k].double() for k in range(K))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for method in ("bmm", "elementwise", "auto"):
        yr, wr = y.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = weighted_sum_over_k(yr, wr, method)
        assert out.dtype == dtype and out.shape == (37, 24)
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        out.float().sum().backward()  # gradients flow to both inputs
        torch.testing.assert_close(wr.grad.double(), y.double().sum(-1), rtol=tol, atol=tol * 10)
    with pytest.raises(ValueError, match="method='nope'"):
        weighted_sum_over_k(y, w, "nope")


def test_count_indices_is_bincount_without_a_host_sync():
    from sparse_dit.moe.stats import count_indices

    g = torch.Generator().manual_seed(0)
    for n in (1, 5, 9):
        idx = torch.randint(0, n, (3, 50), generator=g)
        idx[0, :] = 0  # bins left empty at the top end too
        got = count_indices(idx, n + 3)
        assert got.dtype == torch.long and got.tolist() == torch.bincount(idx.reshape(-1), minlength=n + 3).tolist()


class _DataDependentOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records ops whose output size or value the host must read back (a sync on CUDA)."""

    WATCH = ("aten._local_scalar_dense", "aten.bincount", "aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = str(func.overloadpacket)
        if name.startswith(self.WATCH) or (name.startswith("aten.repeat_interleave") and (kwargs or {}).get("output_size") is None):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("router", ["token_choice", "noise_level"])
def test_the_grouped_mm_training_path_reads_nothing_back_to_the_host(router, monkeypatch):
    # On CUDA the grouped_mm backend runs sync-free (torch._grouped_mm with device offsets); the
    # layer around it must not read back either: each host read drains the GPU's queue (the H200
    # run counted 36 extra syncs per B/2-E8A2 step from torch.bincount). The CPU runs the CUDA
    # path here (grouped_mm_autograd) and watches every dispatched op, backward included.
    import dataclasses

    from sparse_dit.moe import MoEFeedForward
    from sparse_dit.moe.ops import EXPERT_BACKENDS
    from sparse_dit.moe.ops.grouped_mm import grouped_mm_autograd

    cuda_path = dataclasses.replace(EXPERT_BACKENDS["grouped_mm"], run=lambda x, rows, act, w: grouped_mm_autograd(x, rows.counts, act, w))
    monkeypatch.setitem(EXPERT_BACKENDS, "grouped_mm", cuda_path)
    options = {"boundaries": [0.5]} if router == "noise_level" else None
    torch.manual_seed(0)
    layer = MoEFeedForward(32, 64, 4, 2 if router == "token_choice" else 1, router=router, backend="grouped_mm", router_options=options)
    x = torch.randn(2, 16, 32, requires_grad=True)
    t = torch.tensor([0.2, 0.7])
    mode = _DataDependentOps()
    with mode:
        y, aux = layer(x, timesteps=t)
        (y.square().mean() + aux.loss).backward()
    assert x.grad is not None and layer.experts.w1.grad is not None
    assert mode.seen == [], f"host reads in the training path: {sorted(set(mode.seen))}"
