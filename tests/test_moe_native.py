"""The native CPU op of the MoE inference path (sparse_dit/moe/ops/native.py, csrc/moe_cpu.cpp):
it is built here, gives a per-route reference written in this file at any thread count, in either
no-autograd mode, is what moe_inference runs on float32 CPU tensors, and falls back to the Python
path when it is switched off or cannot be built."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time

import pytest
import torch
import torch.nn.functional as F

from sparse_dit.moe import MoEFeedForward
from sparse_dit.moe.ops import ExpertWeights, inference, moe_inference, native
from sparse_dit.diffusion import sample

pytestmark = pytest.mark.usefixtures("one_thread")

HAVE_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None


@pytest.fixture
def op():
    """The built op (the first test to ask builds it: about 10 s)."""
    if not HAVE_COMPILER:
        pytest.skip("no C++ compiler on this machine: the native op cannot be built (the Python path is tested)")
    fn = native.native_moe_ffn()
    assert fn is not None, f"the native op did not build: {native.native_error()}"
    return fn


def _weights(E: int, D: int, Fh: int, swiglu: bool, bias: bool, seed: int = 0, grad: bool = False) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return torch.nn.Parameter(torch.randn(*shape, generator=g) * 0.3, requires_grad=grad)

    return ExpertWeights(t(E, D, Fh), t(E, Fh, D), t(E, D, Fh) if swiglu else None,
                         t(E, Fh) if bias else None, t(E, D) if bias else None)


def _reference(x, experts, weight, tokens, w: ExpertWeights) -> torch.Tensor:
    """out[t] = sum over routes r of token t with expert e < E of weight[r] * FFN_e(x[t]), in float64,
    one route at a time."""
    E = w.w1.shape[0]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e, wr, t in zip(experts.tolist(), weight.double().tolist(), tokens.tolist()):
        if e == E:
            continue
        xt = x[t].double()
        h = xt @ w.w1[e].double() + (w.b1[e].double() if w.b1 is not None else 0)
        h = F.silu(h) * (xt @ w.w3[e].double()) if w.w3 is not None else F.gelu(h, approximate="tanh")
        out[t] += wr * (h @ w.w2[e].double() + (w.b2[e].double() if w.b2 is not None else 0))
    return out


def _routes(T: int, K: int, E: int, seed: int, drop: float = 0.2, skew: float = 0.0):
    """Token-major routes (T, K): experts drawn at random (``skew``: the share sent to expert 0),
    a fraction dropped (expert E)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(0, E, (T, K), generator=g)
    if skew:
        e[torch.rand(T, K, generator=g) < skew] = 0
    e[torch.rand(T, K, generator=g) < drop] = E
    return e, torch.rand(T, K, generator=g)


CASES = {  # T, K, E, D, F, swiglu, bias, skew
    "top1_gelu": (40, 1, 4, 16, 24, False, True, 0.0),
    "top2_gelu": (64, 2, 5, 16, 24, False, True, 0.0),
    "top4_swiglu": (33, 4, 6, 8, 12, True, False, 0.0),
    "one_expert_takes_most": (96, 2, 4, 16, 24, False, True, 0.9),  # the thread cuts fall inside expert 0
    "few_rows_inline": (5, 2, 3, 16, 24, False, True, 0.0),        # under 16 rows a chunk: no parallel region
    "gelu_without_bias": (50, 2, 4, 16, 24, False, False, 0.0),
}


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_token_major_routes_give_the_reference(op, name: str, threads: int) -> None:
    T, K, E, D, Fh, swiglu, bias, skew = CASES[name]
    w = _weights(E, D, Fh, swiglu, bias)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    e, wt = _routes(T, K, E, seed=2, skew=skew)
    torch.set_num_threads(threads)
    with torch.no_grad():
        y = op(x, e.reshape(-1), wt.reshape(-1), None, K, w.w1, w.b1, w.w2, w.b2, w.w3)
    tokens = torch.arange(T).repeat_interleave(K)
    torch.testing.assert_close(y.double(), _reference(x, e.reshape(-1), wt.reshape(-1), tokens, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_general_route_table_gives_the_reference(op, threads: int) -> None:
    """A route table with a token per route (expert choice): a token taken several times, tokens with
    no route (zero rows), dropped routes, routes in no particular order."""
    T, E, D, Fh = 30, 4, 16, 24
    w = _weights(E, D, Fh, False, True, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(T, D, generator=g)
    R = 70
    tokens = torch.randint(0, T - 5, (R,), generator=g)  # tokens T-5.. get no route
    experts = torch.randint(0, E + 1, (R,), generator=g)
    wt = torch.rand(R, generator=g)
    torch.set_num_threads(threads)
    with torch.no_grad():
        y = op(x, experts, wt, tokens, 0, w.w1, w.b1, w.w2, w.b2, w.w3)
    torch.testing.assert_close(y.double(), _reference(x, experts, wt, tokens, w), rtol=1e-5, atol=1e-5)
    assert torch.equal(y[T - 5:], torch.zeros(5, D))


def test_no_routes_kept_gives_zeros(op) -> None:
    w = _weights(3, 8, 12, False, True)
    x = torch.randn(6, 8)
    with torch.no_grad():
        y = op(x, torch.full((12,), 3), torch.rand(12), None, 2, w.w1, w.b1, w.w2, w.b2, w.w3)
    assert torch.equal(y, torch.zeros(6, 8))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_workers_run_in_the_callers_mode(op, mode: str) -> None:
    """Parameters that require grad, two threads: the workers' out= GEMMs fail outside the caller's
    no_grad (out= does not take autograd) or, on inference tensors, outside inference mode."""
    T, K, E, D, Fh = 80, 2, 4, 16, 24
    w = _weights(E, D, Fh, False, True, grad=True)
    x = torch.randn(T, D)
    e, wt = _routes(T, K, E, seed=5, drop=0.0)
    torch.set_num_threads(2)
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with ctx():
        y = op(x, e.reshape(-1), wt.reshape(-1), None, K, w.w1, w.b1, w.w2, w.b2, w.w3)
    assert torch.get_num_threads() == 2
    tokens = torch.arange(T).repeat_interleave(K)
    torch.testing.assert_close(y.double(), _reference(x, e.reshape(-1), wt.reshape(-1), tokens, w.__class__(
        *(None if p is None else p.detach() for p in w))), rtol=1e-5, atol=1e-5)


def test_bad_indices_raise_a_clear_error(op) -> None:
    w = _weights(3, 8, 12, False, True)
    x = torch.randn(4, 8)
    with torch.no_grad(), pytest.raises(RuntimeError, match="expert index 7 out of"):
        op(x, torch.tensor([0, 7, 1, 2]), torch.rand(4), None, 1, w.w1, w.b1, w.w2, w.b2, w.w3)
    with torch.no_grad(), pytest.raises(RuntimeError, match="token index 9 out of"):
        op(x, torch.tensor([0, 1]), torch.rand(2), torch.tensor([0, 9]), 0, w.w1, w.b1, w.w2, w.b2, w.w3)


def test_one_openmp_runtime_in_the_process(op) -> None:
    """The op's OpenMP is torch's (one libgomp mapped): a second runtime would bring a second pool of
    threads that neither torch.set_num_threads nor OMP_WAIT_POLICY's reader controls."""
    libs = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line or "libiomp" in line}
    assert len({os.path.realpath(p) for p in libs}) == 1, libs


def test_moe_inference_runs_the_op_on_float32_cpu_only(op, monkeypatch) -> None:
    """moe_inference hands float32 CPU tensors without a fixed cap to the op; bf16, a given cap and
    SPARSE_DIT_NATIVE=0 take the Python path; all agree."""
    calls: list[int] = []
    monkeypatch.setattr(inference, "native_moe_ffn", lambda: (lambda *a: (calls.append(1), op(*a))[1]))
    moe = MoEFeedForward(16, 24, 4, 2)
    x = torch.randn(20, 16)
    with torch.no_grad():
        r = moe.router(x[None])
        w = moe.experts.params_in(x.dtype)
        y_native = moe_inference(x, r.expert_idx, r.weight, 4, "gelu_tanh", w)
        assert calls == [1]
        y_cap = moe_inference(x, r.expert_idx, r.weight, 4, "gelu_tanh", w, cap=3)
        wb = moe.experts.params_in(torch.bfloat16)
        moe_inference(x.bfloat16(), r.expert_idx, r.weight, 4, "gelu_tanh", wb)
        assert calls == [1]
    monkeypatch.undo()
    monkeypatch.setenv("SPARSE_DIT_NATIVE", "0")
    assert native.native_moe_ffn() is None
    with torch.no_grad():
        y_python = moe_inference(x, r.expert_idx, r.weight, 4, "gelu_tanh", w)
    torch.testing.assert_close(y_native, y_cap, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_native, y_python, rtol=1e-6, atol=1e-6)


def test_a_failed_build_warns_once_and_the_python_path_runs(monkeypatch) -> None:
    def broken():
        raise RuntimeError("Error building extension 'sparse_dit_moe_cpu': c++: not found\nmore lines")

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_build", broken)
    moe = MoEFeedForward(16, 24, 4, 2)
    x = torch.randn(1, 12, 16)
    with pytest.warns(UserWarning, match=r"could not be built \(RuntimeError: Error building extension 'sparse_dit_moe_cpu': c\+\+: not found\)"):
        with torch.no_grad():
            y, _ = moe(x, need_aux=False)
    assert native.native_error() is not None and "more lines" not in native.native_error()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second build
        with torch.no_grad():
            y2, _ = moe(x, need_aux=False)
    y_train, _ = moe(x.clone().requires_grad_())
    torch.testing.assert_close(y, y_train.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(y, y2)


def test_a_stale_build_lock_is_removed(op, tmp_path, monkeypatch) -> None:
    """torch's build lock waits forever on the file of a killed build: one older than the limit goes."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    built: list[str] = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, **kw: built.append(name))
    lock = tmp_path / native._NAME / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    native._build()
    assert lock.exists(), "a fresh lock belongs to a build in progress"
    old = time.time() - native._STALE_LOCK_S - 10
    os.utime(lock, (old, old))
    native._build()
    assert not lock.exists() and built == [native._NAME, native._NAME]


def _child_runs_the_op(q, threads: int = 1) -> None:
    torch.set_num_threads(threads)
    w = _weights(4, 16, 24, False, True)
    x = torch.randn(64, 16)
    e, wt = _routes(64, 2, 4, seed=6)
    with torch.no_grad():
        y = native.native_moe_ffn()(x, e.reshape(-1), wt.reshape(-1), None, 2, w.w1, w.b1, w.w2, w.b2, w.w3)
    q.put(float(y.abs().sum()))


def test_the_op_runs_in_a_forked_child(op) -> None:
    """A child forked after the parent ran the op's parallel region (multiprocessing, DataLoader
    workers) runs it at one thread, as torch's DataLoader workers run. (At two threads such a child
    hangs in libgomp whatever the op: torch's own 2000x2000 matmul does, measured.)"""
    from _launch import in_forked_child

    _child_runs_the_op(mp.get_context("fork").SimpleQueue(), threads=2)  # the parent's team exists now
    assert in_forked_child(_child_runs_the_op, what="the child forked after the op ran") > 0


def test_sampling_at_two_threads_equals_one(op) -> None:
    from sparse_dit.config import MoEConfig, ModelConfig
    from sparse_dit.dit import SparseDiT

    cfg = ModelConfig(in_channels=3, patch_size=(1, 2, 2), hidden_size=32, depth=2, num_heads=2, pos_embed="rope",
                      num_classes=0, text_dim=0, cross_attention=False, moe=MoEConfig(num_experts=4, top_k=2))
    model = SparseDiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    a = sample(model, (2, 3, 2, 8, 8), num_inference_steps=4, generator=torch.Generator().manual_seed(1))
    torch.set_num_threads(2)
    b = sample(model, (2, 3, 2, 8, 8), num_inference_steps=4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
