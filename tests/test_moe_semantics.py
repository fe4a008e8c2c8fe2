"""Exact MoE semantics (issue 11), each against a reference written here, never through the
code under test: V-MoE capacity priority, the router and its balance loss computed from the
gate weights directly, the global-batch balance loss (one process and 2 gloo ranks), and an EMA
that copies buffers.
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sparse_dit.config import GLOBAL_BALANCE_ROUTERS, ConfigError, MoEConfig
from sparse_dit.diffusion import EMA
from sparse_dit.moe import GlobalBalance, MoEFeedForward, reset_global_balance
from sparse_dit.dit import SparseDiT
from sparse_dit.moe.routers import ROUTERS, capacity_drop
from sparse_dit.presets import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# References (plain torch and Python, from the weights)
# --------------------------------------------------------------------------------------------


def _scores(layer: MoEFeedForward, x_TD: torch.Tensor, score_func: str, cond_TC=None) -> torch.Tensor:
    """(T, E) float64 router scores from the gate weights: x W^T (+ c Wc^T), softmax or sigmoid."""
    logits = x_TD.double() @ layer.router.gate.weight.detach().double().t()
    if cond_TC is not None:
        logits = logits + cond_TC.double() @ layer.router.cond_proj.weight.detach().double().t()
    return torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)


def _expert(layer: MoEFeedForward, e: int, x_D: torch.Tensor) -> torch.Tensor:
    """Expert e (GELU-tanh) from its stacked weights, in float64."""
    ex = layer.experts
    h = F.gelu(x_D.double() @ ex.w1[e].detach().double() + ex.b1[e].detach().double(), approximate="tanh")
    return h @ ex.w2[e].detach().double() + ex.b2[e].detach().double()


def _shared(layer: MoEFeedForward, x_TD: torch.Tensor) -> torch.Tensor:
    s = layer.shared
    h = F.gelu(x_TD.double() @ s.fc1.weight.detach().double().t() + s.fc1.bias.detach().double(), approximate="tanh")
    return h @ s.fc2.weight.detach().double().t() + s.fc2.bias.detach().double()


def _token_choice_routes(s_TE: torch.Tensor, k: int, renormalize: bool, bias=None) -> list[list[tuple[int, float, float]]]:
    """Per token: [(expert, combine weight, score)] best first, by brute-force sorting."""
    routes = []
    for t in range(s_TE.shape[0]):
        key = [float(s_TE[t, e]) + (float(bias[e]) if bias is not None else 0.0) for e in range(s_TE.shape[1])]
        chosen = sorted(range(s_TE.shape[1]), key=lambda e: -key[e])[:k]
        w = [float(s_TE[t, e]) for e in chosen]
        if renormalize and k > 1:
            w = [v / sum(w) for v in w]
        routes.append([(e, wv, float(s_TE[t, e])) for e, wv in zip(chosen, w)])
    return routes


def _switch_loss(probs_TE: torch.Tensor, routes, E: int, k: int) -> float:
    """Switch/GShard balance loss as docs/moe.md defines it: E * sum_e f_e P_e, f_e = routes on e
    / (T k), P_e = mean over tokens of the per-token normalised scores."""
    T = probs_TE.shape[0]
    f = [0.0] * E
    for rt in routes:
        for e, _, _ in rt:
            f[e] += 1.0 / (T * k)
    P = probs_TE.double().mean(0)
    return E * sum(f[e] * float(P[e]) for e in range(E))


def _layer(E: int, k: int, seed: int = 0, **kw) -> MoEFeedForward:
    torch.manual_seed(seed)
    layer = MoEFeedForward(8, 12, E, k, **kw)
    with torch.no_grad():
        layer.router.gate.weight.normal_(std=0.7)  # distinct, decisive scores
        for p in (layer.experts.b1, layer.experts.b2):
            p.normal_(std=0.1)
    return layer


# --------------------------------------------------------------------------------------------
# 1. Capacity: V-MoE priority (first choices before second choices, then by score)
# --------------------------------------------------------------------------------------------


def test_capacity_never_lets_a_second_choice_evict_a_first_choice() -> None:
    # Token 0 wants e0 (0.5) then e1 (0.4); token 1 wants e1 (0.35) then e2 (0.33).
    # Expert e1 holds 1 route: token 1's *first* choice (0.35) beats token 0's *second* (0.4),
    # although 0.4 > 0.35. (Sorting all routes by score alone keeps token 0's second choice.)
    idx = torch.tensor([[0, 1], [1, 2]])
    prio = torch.tensor([[0.5, 0.4], [0.35, 0.33]])
    new, keep = capacity_drop(idx, prio, num_experts=3, capacity=1)
    assert keep.tolist() == [[True, False], [True, True]]
    assert new.tolist() == [[0, 3], [1, 2]]


def test_capacity_orders_by_score_within_a_choice_rank() -> None:
    # Expert 0: first choices of tokens 0 (0.6) and 2 (0.9), second choices of 1 (0.45), 3 (0.2).
    idx = torch.tensor([[0, 1], [1, 0], [0, 1], [2, 0]])
    prio = torch.tensor([[0.6, 0.3], [0.5, 0.45], [0.9, 0.05], [0.7, 0.2]])
    _, keep1 = capacity_drop(idx, prio, num_experts=3, capacity=1)
    assert keep1[:, 0].tolist() == [False, True, True, True] and keep1[:, 1].tolist() == [False, False, False, False]
    _, keep3 = capacity_drop(idx, prio, num_experts=3, capacity=3)
    # e0: firsts 2, 0, then the better second (token 1, 0.45); e1: first of token 1, seconds 0 (0.3), 2 (0.05)
    assert keep3.tolist() == [[True, True], [True, True], [True, True], [True, False]]


def _vmoe_keep(routes, E: int, capacity: int) -> set[tuple[int, int]]:
    """Reference: fill each expert choice rank by choice rank, best score first."""
    kept = set()
    for e in range(E):
        cand = [(j, -sc, t) for t, rt in enumerate(routes) for j, (ee, _, sc) in enumerate(rt) if ee == e]
        for j, _, t in sorted(cand)[:capacity]:
            kept.add((t, j))
    return kept


@pytest.mark.parametrize("k", [2, 3])
def test_router_capacity_follows_vmoe_priority_on_random_scores(k: int) -> None:
    E, T = 6, 40
    layer = _layer(E, k, seed=k, capacity_factor=0.6)
    x = torch.randn(1, T, 8, generator=torch.Generator().manual_seed(k))
    r = layer.router(x)
    routes = _token_choice_routes(_scores(layer, x[0], "softmax"), k, True)
    cap = math.ceil(0.6 * T * k / E)
    expected = _vmoe_keep(routes, E, cap)
    got = {(t, j) for t in range(T) for j in range(k) if int(r.expert_idx[t, j]) < E}
    assert got == expected and len(expected) < T * k  # the case drops routes


# --------------------------------------------------------------------------------------------
# 2. The router and the layer, from the gate weights (never through layer.router)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "score_func, k, renormalize, shared, timestep, bias",
    [
        ("softmax", 2, True, 0, False, False),
        ("softmax", 1, True, 0, False, False),  # renormalize ignored at k = 1
        ("softmax", 3, False, 1, True, False),
        ("sigmoid", 2, True, 0, False, True),  # DeepSeek-V3: biased selection, unbiased weights
        ("sigmoid", 2, False, 1, True, False),
    ],
)
def test_token_choice_layer_equals_the_gate_weights_reference(score_func, k, renormalize, shared, timestep, bias) -> None:
    E, B, N = 5, 2, 7
    layer = _layer(E, k, score_func=score_func, renormalize=renormalize, shared_experts=shared, cond_dim=8 if timestep else None,
                   bias_update_rate=0.01 if bias else 0.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if timestep:
            layer.router.cond_proj.weight.normal_(std=0.5, generator=g)
        if bias:
            layer.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1, -0.2]))
    x, cond = torch.randn(B, N, 8, generator=g), torch.randn(B, 8, generator=g)
    y, aux = layer.eval()(x, cond=cond if timestep else None)
    x_TD = x.reshape(-1, 8)
    cond_TC = cond.repeat_interleave(N, 0) if timestep else None
    s = _scores(layer, x_TD, score_func, cond_TC)
    routes = _token_choice_routes(s, k, renormalize, layer.router.expert_bias if bias else None)
    if bias:  # the bias really changes the selection in this case
        assert routes != _token_choice_routes(s, k, renormalize)
    y_ref = torch.stack([sum(w * _expert(layer, e, x_TD[t]) for e, w, _ in routes[t]) for t in range(B * N)])
    if shared:
        y_ref = y_ref + _shared(layer, x_TD)
    torch.testing.assert_close(y.reshape(-1, 8).double(), y_ref, rtol=1e-4, atol=1e-5)
    probs = s / s.sum(-1, keepdim=True)  # sigmoid scores normalised per token (softmax unchanged)
    assert float(aux.balance_loss.detach()) == pytest.approx(_switch_loss(probs, routes, E, k), rel=1e-5)
    counts = [sum(e == ee for rt in routes for ee, _, _ in rt) for e in range(E)]
    assert aux.tokens_per_expert.tolist() == [float(c) for c in counts]
    assert float(aux.max_violation) == pytest.approx(max(counts) / (sum(counts) / E) - 1, rel=1e-6)
    logits = x_TD.double() @ layer.router.gate.weight.detach().double().t()
    if timestep:
        logits = logits + cond_TC.double() @ layer.router.cond_proj.weight.detach().double().t()
    assert float(aux.z_loss) == pytest.approx(float((torch.logsumexp(logits, -1) ** 2).mean()), rel=1e-5)


def test_balance_loss_hand_values_for_top2() -> None:
    # E = 4, k = 2, every token's scores are (0.4, 0.3, 0.2, 0.1) (logits = log of them): all
    # tokens choose experts 0 and 1, f = (1/2, 1/2, 0, 0), P = (0.4, 0.3, 0.2, 0.1), so the
    # loss is 4 * (0.5 * 0.4 + 0.5 * 0.3) = 1.4. Uniform scores give exactly 1 whatever is chosen.
    layer = MoEFeedForward(4, 8, 4, 2)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.diag(torch.log(p)))
    x = torch.ones(1, 6, 4)  # logits = log p for every token
    _, aux = layer(x)
    assert float(aux.balance_loss) == pytest.approx(1.4, rel=1e-6)
    assert aux.tokens_per_expert.tolist() == [6.0, 6.0, 0.0, 0.0]
    assert float(aux.max_violation) == pytest.approx(1.0)  # 6 / 3 - 1
    with torch.no_grad():
        layer.router.gate.weight.zero_()
    _, aux = layer(torch.randn(1, 6, 4))
    assert float(aux.balance_loss) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("cf, shared", [(None, 0), (1.5, 1)])
def test_expert_choice_layer_equals_the_gate_weights_reference(cf, shared) -> None:
    E, k, B, N = 4, 2, 2, 9
    layer = _layer(E, k, router="expert_choice", capacity_factor=cf, shared_experts=shared)
    x = torch.randn(B, N, 8, generator=torch.Generator().manual_seed(2))
    y, aux = layer.eval()(x)
    C = min(N, math.ceil(N * k * (cf or 1.0) / E))
    s = _scores(layer, x.reshape(-1, 8), "softmax")
    y_ref = torch.zeros(B * N, 8, dtype=torch.float64)
    taken = set()
    for b in range(B):
        for e in range(E):
            best = sorted(range(N), key=lambda n: -float(s[b * N + n, e]))[:C]  # expert e's top C of sample b
            for n in best:
                t = b * N + n
                taken.add(t)
                y_ref[t] += float(s[t, e]) * _expert(layer, e, x[b, n])
    if shared:
        y_ref = y_ref + _shared(layer, x.reshape(-1, 8))
    torch.testing.assert_close(y.reshape(-1, 8).double(), y_ref, rtol=1e-4, atol=1e-5)
    assert aux.tokens_per_expert.tolist() == [float(B * C)] * E
    assert float(aux.dropped_fraction) == pytest.approx(1 - len(taken) / (B * N))
    assert float(aux.balance_loss) == 0.0


# --------------------------------------------------------------------------------------------
# 3. The global-batch balance loss
# --------------------------------------------------------------------------------------------


def test_global_balance_config_is_the_router_table() -> None:
    assert tuple(n for n, cls in ROUTERS.items() if cls.switch_balance_loss) == GLOBAL_BALANCE_ROUTERS
    with pytest.raises(ConfigError, match=r"balance_scope='global' has no effect with router='expert_choice'"):
        MoEConfig(num_experts=4, router="expert_choice", balance_scope="global").validate()


def _reference_global_loss(layer: MoEFeedForward, xs: list[torch.Tensor], upto: list[torch.Tensor], gate: torch.Tensor) -> torch.Tensor:
    """Switch loss of the concatenation of ``xs`` (differentiable in ``gate``), with f counted over
    the concatenation of ``upto`` (the step's micro-batches routed so far): E * sum_e f_e P_e."""
    E, k = layer.num_experts, layer.top_k
    x_all = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
    probs = torch.softmax(x_all @ gate.t(), -1)
    counts = torch.zeros(E, dtype=torch.float64)
    for x in upto:
        s = torch.softmax(x.reshape(-1, x.shape[-1]).double() @ gate.detach().t(), -1)
        for t in range(s.shape[0]):
            for e in sorted(range(E), key=lambda e: -float(s[t, e]))[:k]:
                counts[e] += 1
    return E * torch.dot(counts / counts.sum(), probs.mean(0))


def test_global_balance_over_micro_batches_in_one_process() -> None:
    # 3 micro-batches of different sizes: micro-batch m's loss uses f over micro-batches 0..m.
    layer = _layer(4, 2, seed=3, aux_loss_coef=0.5, z_loss_coef=0.0)
    gb = GlobalBalance()
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(1, n, 8, generator=g) for n in (5, 9, 3)]
    for m, x in enumerate(xs):
        _, aux = layer(x)
        (new,) = gb([aux], [0.5])
        ref = _reference_global_loss(layer, [x], xs[: m + 1], layer.router.gate.weight.detach().double())
        assert float(new.balance_loss) == pytest.approx(float(ref), rel=1e-5)
        assert float(new.loss) == pytest.approx(0.5 * float(ref), rel=1e-5)
        if m == 0:  # with one micro-batch the global value is the micro-batch value
            assert float(new.balance_loss) == pytest.approx(float(aux.balance_loss), rel=1e-6)
    gb.reset()
    _, aux = layer(xs[2])
    (new,) = gb([aux], [0.5])
    assert float(new.balance_loss) == pytest.approx(float(aux.balance_loss), rel=1e-6)  # a new window


def test_dit_applies_the_global_balance_only_in_training_forwards() -> None:
    cfg = load_recipe("recipes/tiny/moe.yaml", ["model.moe.balance_scope=global"]).model
    torch.manual_seed(0)
    model = SparseDiT(cfg)
    with torch.no_grad():  # leave adaLN-Zero's identity so the MoE layers see distinct tokens
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(2, cfg.in_channels, 6, 12, 12, generator=g), torch.rand(2, generator=g), torch.randn(2, 5, 32, generator=g)
    x2 = torch.randn(2, cfg.in_channels, 6, 12, 12, generator=g)
    model.train()
    _, a1 = model(x, t, text_emb=text, return_aux=True)
    _, a2 = model(x2, t, text_emb=text, return_aux=True)  # second micro-batch: f over both
    per_micro = [float(a.balance_loss) for a in a2.moe]
    model.moe_balance = None
    _, b2 = model(x2, t, text_emb=text, return_aux=True)
    assert per_micro != pytest.approx([float(a.balance_loss) for a in b2.moe], rel=1e-6)  # it was applied
    model.moe_balance = GlobalBalance()
    assert reset_global_balance(model)
    _, c2 = model(x2, t, text_emb=text, return_aux=True)  # first of a new window: the micro-batch value
    assert [float(a.balance_loss) for a in c2.moe] == pytest.approx([float(a.balance_loss) for a in b2.moe], rel=1e-6)
    n_before = float(model.moe_balance.counts.sum())
    model.eval()(x, t, text_emb=text, return_aux=True)
    with torch.no_grad():
        model.train()(x, t, text_emb=text, return_aux=True)
    assert float(model.moe_balance.counts.sum()) == n_before  # eval / no-grad forwards do not count


def _dist_worker(rank: int, port: int, failures) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        layer = _layer(4, 2, seed=7, aux_loss_coef=1.0, z_loss_coef=0.0)
        gb = GlobalBalance(reduce_fn=lambda t: dist.all_reduce(t))
        g = torch.Generator().manual_seed(11)
        # 2 micro-steps; rank 1 holds more tokens than rank 0 (token-weighted P)
        xs = [[torch.randn(1, n, 8, generator=g) for n in (6, 10)], [torch.randn(1, n, 8, generator=g) for n in (8, 4)]]
        values = []
        for m in range(2):
            _, aux = layer(xs[m][rank])
            (new,) = gb([aux], [1.0])
            (new.loss / 2).backward()  # gradient accumulation: DeepSpeed scales each micro-step by 1/accum
            v = new.balance_loss.detach().clone()
            dist.all_reduce(v)
            values.append(float(v) / 2)  # mean over ranks, what the trainer logs
        grad = layer.router.gate.weight.grad.clone()
        dist.all_reduce(grad)
        grad /= 2  # data-parallel average
        # reference in one process: the concatenated batch of both ranks
        gate = layer.router.gate.weight.detach().double().clone().requires_grad_(True)
        total = 0.0
        for m in range(2):
            ref = _reference_global_loss(layer, xs[m], [x for mm in range(m + 1) for x in xs[mm]], gate)
            assert values[m] == pytest.approx(float(ref), rel=1e-5), (m, values[m], float(ref))
            total = total + ref / 2
        total.backward()
        torch.testing.assert_close(grad.double(), gate.grad, rtol=1e-4, atol=1e-7)
    except Exception as exc:
        failures.append(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:  # not sparse_dit.parallel's: the spawned ranks would import deepspeed
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(120)
def test_global_balance_on_two_ranks_equals_the_concatenated_batch() -> None:
    ctx = mp.get_context("spawn")
    failures = ctx.Manager().list()
    mp.start_processes(_dist_worker, args=(_free_port(), failures), nprocs=2, start_method="spawn", join=True)
    assert not list(failures)


# --------------------------------------------------------------------------------------------
# 4. EMA: buffers are copied, parameters averaged
# --------------------------------------------------------------------------------------------


def test_ema_copies_buffers_and_averages_parameters() -> None:
    layer = MoEFeedForward(8, 12, 4, 2, bias_update_rate=0.1)
    ema = EMA(layer, decay=0.5, warmup=False)
    w0 = layer.router.gate.weight.detach().clone()
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.2, -0.2, 0.1, -0.1]))
        layer.router.gate.weight.add_(1.0)
    ema.update(layer)
    torch.testing.assert_close(ema.shadow["router.expert_bias"], torch.tensor([0.2, -0.2, 0.1, -0.1]))  # copied
    torch.testing.assert_close(ema.shadow["router.gate.weight"], w0 + 0.5)  # averaged
    averaged = ema.averaged_model(layer)
    torch.testing.assert_close(averaged.router.expert_bias, layer.router.expert_bias)
