"""The no-autograd inference path of the MoE layer (sparse_dit/moe/ops/inference.py): it gives the
training path's output, the sampler takes it by itself, and a reference written here agrees."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparse_dit.config import ModelConfig, MoEConfig
from sparse_dit.diffusion import FlowMatching, sample
from sparse_dit.config import DiffusionConfig
from sparse_dit.dit import SparseDiT
from sparse_dit.moe import MoEFeedForward, release_workspace
from sparse_dit.moe.ops import ExpertRows, moe_inference

pytestmark = pytest.mark.usefixtures("one_thread")

# Every rule of the router table, and the layer options that change what the experts compute.
CONFIGS = {
    "token_choice_k1": dict(top_k=1),
    "token_choice_k2": dict(top_k=2),
    "token_choice_k4": dict(top_k=4, num_experts=6),  # K >= 4: the index_add combine in fp32
    "sigmoid_no_renorm": dict(top_k=2, score_func="sigmoid", renormalize=False),
    "expert_choice": dict(router="expert_choice", top_k=2),
    "expert_choice_cf": dict(router="expert_choice", top_k=2, capacity_factor=0.5),
    "shared_experts": dict(top_k=2, shared_experts=1),
    "capacity_dropping": dict(top_k=2, capacity_factor=0.5),
    "capacity_top1": dict(top_k=1, capacity_factor=0.3),
    "swiglu": dict(top_k=2, activation="swiglu"),
    "swiglu_expert_choice_shared": dict(router="expert_choice", top_k=2, activation="swiglu", shared_experts=2),
    "timestep_routing": dict(top_k=2, cond_dim=16),
    "batch": dict(router="batch", top_k=2),
    "noise_level": dict(router="noise_level", top_k=1, router_options={"boundaries": (0.5,)}),
}


def _layer(**kw) -> MoEFeedForward:
    kw = {"num_experts": 4, **kw}
    E = kw.pop("num_experts")
    k = kw.pop("top_k")
    moe = MoEFeedForward(16, 24, E, k, **kw)
    with torch.no_grad():  # non-trivial biases and a router that spreads the tokens
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
    return moe


def _reference(moe: MoEFeedForward, x: torch.Tensor, r) -> torch.Tensor:
    """out[t] = sum over kept routes of weight * expert(x[t]) (+ shared experts), one route at a time."""
    B, N, D = x.shape
    x_TD = x.reshape(B * N, D).double()
    ex = moe.experts
    out = torch.zeros_like(x_TD)
    e_R = r.expert_idx.reshape(-1).tolist()
    w_R = r.weight.reshape(-1).double().tolist()
    tok_R = r.token_of_route().tolist()
    for e, w, t in zip(e_R, w_R, tok_R):
        if e == moe.num_experts:  # dropped
            continue
        xt = x_TD[t]
        if ex.activation == "gelu_tanh":
            h = F.gelu(xt @ ex.w1[e].double() + ex.b1[e].double(), approximate="tanh")
            y = h @ ex.w2[e].double() + ex.b2[e].double()
        else:
            h = F.silu(xt @ ex.w1[e].double()) * (xt @ ex.w3[e].double())
            y = h @ ex.w2[e].double()
        out[t] += w * y
    if moe.shared is not None:
        out += moe.shared.double()(x_TD)
    return out.view(B, N, D)


@pytest.fixture(params=["native", "python"])
def path(request, monkeypatch) -> str:
    """Both inference paths: the native CPU op (sparse_dit/moe/ops/native.py; tests/test_moe_native.py
    checks it is built here) and the Python one (``SPARSE_DIT_NATIVE=0``)."""
    if request.param == "python":
        monkeypatch.setenv("SPARSE_DIT_NATIVE", "0")
    return request.param


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("training", [True, False])
def test_inference_path_equals_training_path(name: str, training: bool, path: str) -> None:
    cfg = dict(CONFIGS[name])
    moe = _layer(**cfg).train(training)
    x = torch.randn(3, 10, 16)
    cond = torch.randn(3, 16) if "cond_dim" in cfg else None
    t = torch.tensor([0.9, 0.2, 0.6])
    seen = []
    moe.experts.register_forward_hook(lambda m, args, out: seen.append(args[1].inference))
    with torch.no_grad():
        r = moe.router(x, cond, t)
        y_fast, aux_fast = moe(x, cond, t)
    y_train, aux_train = moe(x.requires_grad_(), cond, t)  # the autograd op ("fused_local")
    assert seen == [True, False], "no_grad must take the inference path, autograd the training one"
    torch.testing.assert_close(y_fast, y_train.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_fast.double(), _reference(moe, x.detach(), r), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux_fast.tokens_per_expert, aux_train.tokens_per_expert)
    torch.testing.assert_close(aux_fast.loss, aux_train.loss.detach())


def test_inference_op_drops_and_general_tables_against_reference(path: str) -> None:
    """The op alone: a general route table with dropped routes (sentinel E) and a token taken twice."""
    moe = _layer(top_k=2)
    x = torch.randn(1, 5, 16)
    E = moe.num_experts
    expert_idx = torch.tensor([[0], [0], [3], [E], [1], [3], [E]])
    token_idx = torch.tensor([[4], [1], [1], [2], [0], [0], [3]])
    weight = torch.rand(7, 1)
    with torch.no_grad():
        y = moe.experts(x[0], ExpertRows(weight=weight, routes=expert_idx, route_tokens=token_idx))

    class R:  # the reference's view of a routing
        pass

    r = R()
    r.expert_idx, r.weight = expert_idx, weight
    r.token_of_route = lambda: token_idx.reshape(-1)
    torch.testing.assert_close(y.double(), _reference(moe, x, r)[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(y[3], torch.zeros(16)), "token 3 has only a dropped route"


@pytest.mark.parametrize("cap", [0, 1, 3, None, 100])
@pytest.mark.parametrize("general", [False, True])
def test_any_layout_gives_the_reference(cap, general: bool, path: str) -> None:
    """Every block/overflow layout (cap 0 = one GEMM per expert, 100 = all padding), with drops."""
    moe = _layer(top_k=2, capacity_factor=0.6) if not general else _layer(router="expert_choice", top_k=2, capacity_factor=0.7)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        r = moe.router(x)
        y = moe_inference(x.view(18, 16), r.expert_idx, r.weight, 4, "gelu_tanh", moe.experts.params_in(x.dtype), r.token_idx, cap=cap)
    assert r.may_drop == (not general) and (r.expert_idx == 4).any() == (not general)
    torch.testing.assert_close(y.double(), _reference(moe, x, r).view(18, 16), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cap", [None, 3, 4])
@pytest.mark.parametrize("ids", [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 2, 2]])
def test_trailing_empty_experts_give_the_reference(cap, ids, path: str) -> None:
    """Routes to the first experts only (a noise-level router's one expert set at one t): the block
    then ends in rows no route fills. This crashed (a (T, D) gather into E x cap rows) at cap 3."""
    moe = _layer(top_k=1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 16, generator=g)
    w = moe.experts.params_in(x.dtype)
    e = torch.tensor(ids)[:, None]
    weight = torch.rand(6, 1, generator=g)
    y = moe_inference(x, e, weight, 4, "gelu_tanh", w, cap=cap)
    want = torch.stack([weight[t, 0] * (F.gelu(x[t] @ w.w1[k] + w.b1[k], approximate="tanh") @ w.w2[k] + w.b2[k])
                        for t, k in enumerate(ids)])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_every_route_dropped_gives_zero(path: str) -> None:
    moe = _layer(top_k=2)
    ex = moe.experts
    x = torch.randn(4, 16)
    y = moe_inference(x, torch.full((4, 2), 4), torch.rand(4, 2), 4, "gelu_tanh", ex.params_in(x.dtype))
    assert torch.equal(y, torch.zeros(4, 16))


def test_inference_layout_refuses_autograd() -> None:
    moe = _layer(top_k=1)
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="without autograd"):
        moe.experts(x, ExpertRows(weight=torch.rand(4, 1), routes=torch.zeros(4, 1, dtype=torch.long)))


def test_inference_mode_then_no_grad_then_training(path: str) -> None:
    """torch.inference_mode also takes the fast path, and its (inference-tensor) workspace does not
    leak into later no_grad or autograd calls (writing one outside inference mode raises)."""
    release_workspace()
    moe = _layer(top_k=2)
    x = torch.randn(2, 10, 16)
    with torch.inference_mode():
        y0, _ = moe(x)
    with torch.no_grad():
        y1, _ = moe(x)
    y2, _ = moe(x.clone().requires_grad_())
    y2.sum().backward()
    assert torch.equal(y0, y1)
    torch.testing.assert_close(y2.detach(), y1, rtol=1e-6, atol=1e-6)


def test_bf16_inference_matches_training_path() -> None:
    moe = _layer(top_k=2).to(torch.bfloat16)
    x = torch.randn(2, 12, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        y_fast, _ = moe(x)
    y_train, _ = moe(x.requires_grad_())
    # both accumulate the combine in fp32; the output bias is added in another order (bf16 rounding)
    torch.testing.assert_close(y_fast.float(), y_train.detach().float(), rtol=2e-2, atol=2e-2)


def _tiny_moe_dit(**moe) -> SparseDiT:
    cfg = ModelConfig(in_channels=3, patch_size=(1, 2, 2), hidden_size=32, depth=2, num_heads=2, pos_embed="rope",
                      num_classes=0, text_dim=0, cross_attention=False, moe=MoEConfig(num_experts=4, **moe))
    model = SparseDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def test_sampler_takes_the_inference_path_and_skips_the_statistics() -> None:
    model = _tiny_moe_dit(top_k=2, shared_experts=1)
    layers = [b.mlp for b in model.blocks if b.is_moe]
    paths, auxes = [], []
    for layer in layers:
        layer.experts.register_forward_hook(lambda m, args, out: paths.append(args[1].inference))
        layer.register_forward_hook(lambda m, args, out: auxes.append(out[1]))
    out = sample(model, (1, 3, 2, 8, 8), num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 2, 8, 8) and torch.isfinite(out).all()
    assert paths == [True] * 6 and auxes == [None] * 6  # 3 steps x 2 layers; nobody asked for statistics
    # the training objective asks for the aux loss and takes the autograd path
    paths.clear(), auxes.clear()
    loss = FlowMatching(DiffusionConfig()).training_losses(model, torch.randn(2, 3, 2, 8, 8), {})["loss"]
    loss.backward()
    assert paths == [False, False] and all(a is not None for a in auxes)
    # statistics still come under no_grad when asked for (evals of the held-out loss)
    with torch.no_grad():
        _, aux = model(torch.randn(1, 3, 2, 8, 8), torch.rand(1), return_aux=True)
    assert len(aux.moe) == 2 and paths[-2:] == [True, True]


def test_sampling_equals_sampling_through_the_training_path(path: str) -> None:
    """The whole sampler: the same latents whether the MoE layers run the inference path (no_grad)
    or the autograd op (forced here by enabling grad inside the model call)."""
    model = _tiny_moe_dit(top_k=1, capacity_factor=1.0)

    def with_grad(*args, **kwargs):
        with torch.enable_grad():
            return model(*args, **kwargs).detach()

    with_grad.config = model.config  # type: ignore[attr-defined]
    a = sample(model, (2, 3, 2, 8, 8), num_inference_steps=4, generator=torch.Generator().manual_seed(1))
    b = sample(with_grad, (2, 3, 2, 8, 8), num_inference_steps=4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _threads_seen(monkeypatch) -> list[int]:
    """Every thread count the code under test asks torch for, in order."""
    seen: list[int] = []
    real = torch.set_num_threads

    def record(n: int) -> None:
        seen.append(n)
        real(n)

    monkeypatch.setattr(torch, "set_num_threads", record)
    return seen


@pytest.mark.parametrize("name", ["token_choice_k1", "token_choice_k4", "expert_choice_cf", "capacity_dropping", "swiglu"])
@pytest.mark.usefixtures("passive")
def test_two_threads_route_and_plan_on_one_and_restore(name: str, monkeypatch) -> None:
    """With two intra-op threads and a small batch, the routing, the layout, the gather and the
    combine run on one thread (bookkeeping_threads), the GEMMs on two (expert threads switched
    off: they have their own test); the result is the reference's, and the thread count is 2
    again afterwards."""
    monkeypatch.setenv("SPARSE_DIT_EXPERT_THREADS", "0")
    moe = _layer(**CONFIGS[name])
    x = torch.randn(3, 10, 16)
    t = torch.tensor([0.9, 0.2, 0.6])
    torch.set_num_threads(2)  # the one_thread fixture restores the session's count after the test
    during_gemm: list[int] = []
    for op in ("baddbmm", "bmm", "mm", "addmm"):
        real = getattr(torch, op)
        monkeypatch.setattr(torch, op, lambda *a, _real=real, **k: (during_gemm.append(torch.get_num_threads()), _real(*a, **k))[1])
    seen = _threads_seen(monkeypatch)
    with torch.no_grad():
        r = moe.router(x, None, t)
        y, _ = moe(x, None, t, need_aux=False)
    assert torch.get_num_threads() == 2
    assert seen and set(seen) == {1, 2} and seen[-1] == 2, seen
    assert during_gemm and set(during_gemm) == {2}, "the expert GEMMs keep every thread"
    torch.testing.assert_close(y.double(), _reference(moe, x, r), rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("passive")
def test_bookkeeping_threads_leaves_large_batches_spinning_workers_and_the_switch_off(monkeypatch) -> None:
    from sparse_dit.moe.ops import inference

    torch.set_num_threads(2)
    seen = _threads_seen(monkeypatch)
    cpu = torch.device("cpu")
    with inference.bookkeeping_threads(inference.SMALL_OP_ELEMENTS + 1, cpu):
        assert torch.get_num_threads() == 2
    with inference.bookkeeping_threads(10, torch.device("meta")):  # tensors elsewhere: CPU threads untouched
        assert torch.get_num_threads() == 2
    with inference.bookkeeping_threads(inference.SMALL_OP_ELEMENTS, cpu):
        assert torch.get_num_threads() == 1
    assert seen == [1, 2]
    with pytest.raises(RuntimeError, match="boom"):  # restored on an error too
        with inference.bookkeeping_threads(10, cpu):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    for policy in ("ACTIVE", ""):  # spinning workers: no wake-up to save
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
        with inference.bookkeeping_threads(10, cpu):
            assert torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("SPARSE_DIT_SMALL_OP_THREADS", "0")
    with inference.bookkeeping_threads(10, cpu):
        assert torch.get_num_threads() == 2


# --- expert groups on their own threads (inference.expert_thread_groups) ------------------------


@pytest.fixture
def passive(monkeypatch):
    """Small layers use expert threads only with sleeping OpenMP workers (OMP_WAIT_POLICY=PASSIVE,
    read from the environment at each call); expert threads belong to the Python path."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("SPARSE_DIT_NATIVE", "0")


def _calling_thread_omp_threads():
    """This thread's OpenMP team size (libgomp's per-thread ``omp_get_max_threads``, which is what
    torch's parallel regions and oneDNN use); ``torch.get_num_threads`` reads a process-wide
    value that would not show a worker thread left at the default."""
    import ctypes

    paths = [line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line]
    if not paths:
        return torch.get_num_threads
    lib = ctypes.CDLL(paths[0])
    return lib.omp_get_max_threads


def _record_gemm_threads(monkeypatch) -> list[tuple[int, int]]:
    """(thread ident, intra-op threads) of every expert GEMM call, from whichever thread makes it."""
    import threading

    seen: list[tuple[int, int]] = []
    team = _calling_thread_omp_threads()
    for op in ("baddbmm", "bmm", "mm", "addmm"):
        real = getattr(torch, op)

        def rec(*a, _real=real, **k):
            seen.append((threading.get_ident(), team()))
            return _real(*a, **k)

        monkeypatch.setattr(torch, op, rec)
    return seen


@pytest.mark.parametrize("name", ["token_choice_k1", "token_choice_k2", "token_choice_k4", "expert_choice_cf", "capacity_dropping",
                                  "swiglu", "shared_experts", "noise_level"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.usefixtures("passive")
def test_expert_threads_give_the_reference(name: str, mode: str, monkeypatch) -> None:
    """Two intra-op threads, a small layer: the experts run in two groups, one on the caller's
    thread and one on a worker, each GEMM on one intra-op thread; the output is the per-route
    reference's (and the two-thread intra-op path's), in either no-autograd mode, and the caller
    has its two threads back."""
    from sparse_dit.moe.ops import inference

    moe = _layer(**CONFIGS[name])
    x = torch.randn(3, 10, 16)
    t = torch.tensor([0.9, 0.2, 0.6])
    torch.set_num_threads(2)  # the one_thread fixture restores the session's count after the test
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with ctx():
        r = moe.router(x, None, t)
        monkeypatch.setenv("SPARSE_DIT_EXPERT_THREADS", "0")
        y_intra, _ = moe(x, None, t, need_aux=False)
        monkeypatch.delenv("SPARSE_DIT_EXPERT_THREADS")
        before = inference._expert_threads.jobs_run
        seen = _record_gemm_threads(monkeypatch)
        y, _ = moe(x, None, t, need_aux=False)
    assert torch.get_num_threads() == 2
    threads = {ident for ident, _ in seen}
    assert len(threads) == 2, f"expected the expert GEMMs on two threads, saw {len(threads)}"
    assert inference._expert_threads.jobs_run == before + 1
    assert {n for _, n in seen} == {1}, "each group's GEMMs run on one intra-op thread"
    torch.testing.assert_close(y.double(), _reference(moe, x, r), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_intra, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("passive")
def test_expert_thread_groups_rule(monkeypatch) -> None:
    """Where the experts go on threads: CPU, several intra-op threads, at least two groups with
    rows, and (large GEMMs only) no group far above its share; never more groups than threads."""
    from sparse_dit.moe.ops.inference import EXPERT_THREAD_IMBALANCE, EXPERT_THREAD_MACS, expert_thread_groups

    cpu = torch.device("cpu")
    qs = [68, 78, 72, 70]  # the quickstart's layer: 288 tokens, D 128, F 512, E4A1
    assert expert_thread_groups(2, qs, 128, 512, cpu) == [(0, 2), (2, 4)]
    assert expert_thread_groups(8, qs, 128, 512, cpu) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # no more groups than experts
    assert expert_thread_groups(1, qs, 128, 512, cpu) == []
    assert expert_thread_groups(2, [288], 128, 512, cpu) == []
    assert expert_thread_groups(2, qs, 128, 512, torch.device("meta")) == []
    assert expert_thread_groups(2, [0, 288, 0, 0], 128, 512, cpu) == []  # one group with rows
    assert expert_thread_groups(4, [10, 0, 0, 10], 128, 512, cpu) == [(0, 1), (1, 4)]  # empty groups left out
    # uneven: fine for small GEMMs, the intra-op path for large ones
    skew = [700, 100, 100, 100]
    assert expert_thread_groups(2, skew, 16, 16, cpu) == [(0, 1), (1, 4)]
    big = EXPERT_THREAD_MACS // (16 * 16) + 1  # mean rows per expert just past the bound
    assert expert_thread_groups(2, [7 * big, big, big, big], 16, 16, cpu) == []
    share = int(EXPERT_THREAD_IMBALANCE * 5 * big)  # 10 * big rows in two groups: even share 5 * big
    assert expert_thread_groups(2, [share, 10 * big - share], 16, 16, cpu) == [(0, 1), (1, 2)]
    assert expert_thread_groups(2, [share + 1, 10 * big - share - 1], 16, 16, cpu) == []
    s2 = [530, 472, 538, 505, 484, 529, 526, 512]  # S/2-E8A2's: 2048 tokens, top-2, D 384, F 768
    assert expert_thread_groups(2, s2, 384, 768, cpu) == [(0, 4), (4, 8)]
    # spinning OpenMP workers: never under ACTIVE; under libgomp's default (unset, or a value
    # it does not know) only for large GEMMs
    for policy in ("ACTIVE", "active"):
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
        assert expert_thread_groups(2, qs, 128, 512, cpu) == [] and expert_thread_groups(2, s2, 384, 768, cpu) == []
    for policy in ("", "sometimes"):
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
        assert expert_thread_groups(2, qs, 128, 512, cpu) == [] and expert_thread_groups(2, s2, 384, 768, cpu) == [(0, 4), (4, 8)]
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert expert_thread_groups(2, qs, 128, 512, cpu) == [] and expert_thread_groups(2, s2, 384, 768, cpu) == [(0, 4), (4, 8)]
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert expert_thread_groups(2, qs, 128, 512, cpu) == [(0, 2), (2, 4)]
    monkeypatch.setenv("SPARSE_DIT_EXPERT_THREADS", "0")
    assert expert_thread_groups(2, qs, 128, 512, cpu) == []


@pytest.mark.parametrize(
    "sizes, n, want",
    [
        ([68, 78, 72, 70], 2, [(0, 2), (2, 4)]),
        ([100, 1, 1, 1], 2, [(0, 1), (1, 4)]),
        ([1, 1, 1, 100], 2, [(0, 3), (3, 4)]),
        ([5] * 8, 4, [(0, 2), (2, 4), (4, 6), (6, 8)]),
        ([10, 10], 4, [(0, 1), (1, 2)]),
        ([3, 9, 4, 4, 4, 0, 0, 8], 3, [(0, 2), (2, 4), (4, 8)]),  # rows 12, 8, 12
    ],
)
@pytest.mark.usefixtures("passive")
def test_expert_thread_groups_cut_near_equal_rows(sizes, n, want) -> None:
    """The cut before group k is where the running row count comes closest to k / n of all rows."""
    from sparse_dit.moe.ops.inference import expert_thread_groups

    assert expert_thread_groups(n, sizes, 4, 4, torch.device("cpu")) == want


def test_expert_threads_raise_a_workers_error_and_keep_working() -> None:
    from sparse_dit.moe.ops.inference import _ExpertThreads

    pool = _ExpertThreads()
    out: list[str] = []

    def boom() -> None:
        raise RuntimeError("boom in a worker")

    with pytest.raises(RuntimeError, match="boom in a worker"):
        pool.run([lambda: out.append("caller"), boom])
    assert out == ["caller"]  # the caller's job ran, and the error waited for every job
    pool.run([lambda: out.append("caller"), lambda: out.append("worker 1"), lambda: out.append("worker 2")])
    assert sorted(out) == ["caller", "caller", "worker 1", "worker 2"]
    assert pool.jobs_run == 2


def _forked_child_runs_a_layer(q) -> None:
    torch.manual_seed(0)
    moe = _layer(top_k=2)
    x = torch.randn(2, 8, 16)
    torch.set_num_threads(2)
    from sparse_dit.moe.ops import inference

    with torch.no_grad():
        y, _ = moe(x, need_aux=False)
    q.put((inference._expert_threads.jobs_run, float(y.abs().sum())))


@pytest.mark.usefixtures("passive")
def test_expert_threads_work_in_a_forked_child() -> None:
    """A child forked after the parent's workers started (DataLoader workers, multiprocessing)
    has none of their threads: it starts its own instead of waiting forever on the parent's."""
    from _launch import in_forked_child

    moe = _layer(top_k=2)
    torch.set_num_threads(2)
    with torch.no_grad():
        moe(torch.randn(2, 8, 16), need_aux=False)  # the parent's workers exist now
    jobs, total = in_forked_child(_forked_child_runs_a_layer, what="the child forked after the expert threads started")
    assert jobs == 1 and total > 0


@pytest.mark.usefixtures("passive")
def test_sampling_with_expert_threads_equals_one_thread(monkeypatch) -> None:
    """The sampler at two threads (expert groups on threads) gives what it gives at one."""
    model = _tiny_moe_dit(top_k=2).eval()
    a = sample(model, (2, 3, 2, 8, 8), num_inference_steps=4, generator=torch.Generator().manual_seed(1))
    torch.set_num_threads(2)
    from sparse_dit.moe.ops import inference

    before = inference._expert_threads.jobs_run
    b = sample(model, (2, 3, 2, 8, 8), num_inference_steps=4, generator=torch.Generator().manual_seed(1))
    assert inference._expert_threads.jobs_run > before
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
