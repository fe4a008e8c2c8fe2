"""Every router in the ROUTERS table obeys the routing contract; each rule against a brute-force
reference written here in plain torch (issue 10: each extension point is one table)."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch

import sparse_dit.config as config_module
from sparse_dit.config import MoEConfig
from sparse_dit.moe.routers import ROUTERS, RouterBase, Routing


pytestmark = pytest.mark.usefixtures("one_thread")

B, N, D, E = 3, 10, 16, 8


# Rule-specific constructor arguments (MoEConfig.router_options()): noise-level experts need boundaries.
OPTIONS = {"noise_level": {"boundaries": (0.5,)}}


def _router(name: str, k: int, **kwargs) -> RouterBase:
    torch.manual_seed(0)
    r = ROUTERS[name](D, E, k, **OPTIONS.get(name, {}), **kwargs)
    with torch.no_grad():
        r.gate.weight.normal_(std=0.5)  # distinct scores: no ties in the top-k
    return r


def _scores(router: RouterBase, x: torch.Tensor, score_func: str) -> torch.Tensor:
    logits = x.reshape(-1, D).double() @ router.gate.weight.detach().double().t()
    return torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)


def test_config_router_choices_are_the_table() -> None:
    choices = {f.name: f for f in dataclasses.fields(MoEConfig)}["router"].metadata["choices"]
    assert tuple(choices) == tuple(ROUTERS)


def test_config_does_not_import_the_model_code() -> None:
    tree = ast.parse(Path(config_module.__file__).read_text())
    mods = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + [
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    ]
    assert not [m for m in mods if m and m.startswith("sparse_dit.moe")]


@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_every_router_obeys_the_contract(name: str, k: int, score_func: str) -> None:
    router = _router(name, k, score_func=score_func)
    assert router.kind == name
    x = torch.randn(B, N, D)
    r = router(x, timesteps=torch.tensor([0.9, 0.1, 0.5]))  # used by noise-level routing only
    T = B * N
    assert isinstance(r, Routing)
    assert r.expert_idx.dtype == torch.int64 and r.weight.dtype == torch.float32
    assert r.expert_idx.ndim == 2 and r.weight.shape == r.expert_idx.shape
    if r.token_idx is None:
        assert r.expert_idx.shape[0] == T  # token-major
    else:
        assert r.token_idx.shape == r.expert_idx.shape and r.token_idx.dtype == torch.int64
        assert 0 <= int(r.token_idx.min()) and int(r.token_idx.max()) < T
    assert r.logits.shape == (T, E) and r.logits.dtype == torch.float32
    assert r.probs.shape == (T, E) and r.probs.dtype == torch.float32
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(T))
    assert r.counts.shape == (E,) and r.counts.dtype == torch.float32
    # dropless here: the counts are the bincount of the chosen experts
    assert not r.may_drop and int(r.expert_idx.max()) < E
    assert r.counts.tolist() == torch.bincount(r.expert_idx.reshape(-1), minlength=E).float().tolist()
    assert r.token_of_route().shape == (r.expert_idx.numel(),)
    assert 0 <= float(r.num_dropped) <= r.num_droppable
    bal = router.balance_loss(r)
    assert bal.shape == () and torch.isfinite(bal)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_token_choice_is_the_brute_force_top_k(k: int, score_func: str) -> None:
    router = _router("token_choice", k, score_func=score_func)
    x = torch.randn(B, N, D)
    r = router(x)
    s = _scores(router, x, score_func)
    for t in range(B * N):
        ranked = sorted(range(E), key=lambda e: -float(s[t, e]))[:k]  # brute force
        assert r.expert_idx[t].tolist() == ranked  # best first
        w = torch.tensor([float(s[t, e]) for e in ranked], dtype=torch.float64)
        if k > 1:
            w = w / w.sum()  # renormalised (ignored for top-1)
        torch.testing.assert_close(r.weight[t].double(), w, rtol=1e-5, atol=1e-6)
    assert float(r.num_dropped) == 0 and r.num_droppable == B * N * k


def test_token_choice_capacity_keeps_the_best_routes_per_expert() -> None:
    router = _router("token_choice", 2, capacity_factor=0.5)
    x = torch.randn(B, N, D)
    r = router(x)
    cap = math.ceil(0.5 * B * N * 2 / E)
    s = _scores(router, x, "softmax")
    full = torch.topk(s, 2, -1).indices  # what was chosen before dropping
    assert r.may_drop
    assert r.counts.tolist() == torch.bincount(full.reshape(-1), minlength=E).double().tolist()
    kept = r.expert_idx < E
    assert int((~kept).sum()) == float(r.num_dropped) > 0
    for e in range(E):
        # V-MoE priority: first choices before second choices, then the higher score
        routes = [(full[t].tolist().index(e), -float(s[t, e]), t) for t in range(B * N) if e in full[t].tolist()]
        best = {t for _, _, t in sorted(routes)[:cap]}
        assert {t for t in range(B * N) if e in r.expert_idx[t].tolist()} == best


@pytest.mark.parametrize("k,cf", [(1, None), (2, None), (2, 1.5)])
def test_expert_choice_takes_each_experts_best_tokens_per_sample(k: int, cf) -> None:
    router = _router("expert_choice", k, capacity_factor=cf)
    x = torch.randn(B, N, D)
    r = router(x)
    C = min(N, math.ceil(N * k * (cf or 1.0) / E))
    s = _scores(router, x, "softmax").view(B, N, E)
    assert r.counts.tolist() == [float(B * C)] * E
    got = {(int(e), int(t)): float(w) for e, t, w in zip(r.expert_idx.view(-1), r.token_idx.view(-1), r.weight.detach().view(-1))}
    assert len(got) == E * B * C  # no route twice
    chosen = set()
    for e in range(E):
        for b in range(B):
            best = sorted(range(N), key=lambda n: -float(s[b, n, e]))[:C]  # brute force, per sample
            for n in best:
                t = b * N + n
                chosen.add(t)
                assert got[(e, t)] == pytest.approx(float(s[b, n, e]), rel=1e-5)
    assert float(r.num_dropped) == B * N - len(chosen) and r.num_droppable == B * N
    assert float(router.balance_loss(r)) == 0.0


def test_bias_balancing_is_a_property_of_the_rule() -> None:
    for name, cls in ROUTERS.items():
        if cls.supports_bias_balancing:
            ROUTERS[name](D, E, 2, bias_balancing=True, **OPTIONS.get(name, {}))
        else:
            with pytest.raises(ValueError, match="bias balancing"):
                ROUTERS[name](D, E, 2, bias_balancing=True, **OPTIONS.get(name, {}))
