"""The MoE FFN without autograd: what the single-process layer runs when gradients are off
(sampling, evaluation), in token space.

# T = tokens, R = routes, E = experts, D = model dim, F = expert hidden, K = routes per token

:class:`sparse_dit.moe.MoEFeedForward` takes this path by itself whenever
``torch.is_grad_enabled()`` is False and its backend resolves to ``"fused_local"`` (one process
holding every expert: the sampler and the evals run under ``torch.no_grad``). It computes what
``"fused_local"`` computes, from the same :class:`~sparse_dit.moe.routers.Routing` result, so it
does not care which router produced it (token-major routes, or a general route table with a token
per route; a route to expert ``E`` is dropped).

On float32 CPU tensors all of it runs as one C++ op with one OpenMP parallel region
(:mod:`sparse_dit.moe.ops.native`, compiled on first use) whenever that op can be built. What
follows is the Python path, which runs otherwise: other devices or dtypes, a fixed ``cap``,
``SPARSE_DIT_NATIVE=0``, no C++ compiler. What it leaves out is only what a backward needs:

* no autograd ``Function``, no saved tensors: the pre-activations are overwritten by the
  activation in place, and the temporaries live in the per-thread workspace;
* a lighter planner: the routes are sorted once by expert and laid out from the host-side
  expert sizes (the training op's (E, cap) block plus overflow spans, built in a few tensor ops);
  with one intra-op thread the cap is 0, one GEMM per expert over its contiguous rows (measured
  faster at the quickstart's 288 tokens); with several, the experts are cut into groups of about
  equal rows that run side by side, each on its own thread with one intra-op thread and the same
  one-GEMM-per-expert layout (:func:`expert_thread_groups`: expert parallelism across the cores),
  or, for large GEMMs under a router that sends most rows to one expert, the training op's
  block of :func:`~sparse_dit.moe.ops.fused_local.choose_capacity` on every intra-op thread;
* the output bias is fused into the second GEMM in row space, where the training op adds it in
  token space for its gradient; no route-weight matrix;
* no balance statistics: the layer computes :class:`~sparse_dit.moe.stats.MoEAux` only when the
  caller asks for it (the DiT passes its ``return_aux``; the sampler asks for none).

The combine is the training op's: token-major routes are K gathers of (T, D) accumulated in place
(fp32), or one gather and a (T, 1, K) @ (T, K, D) ``bmm`` that accumulates in fp32 (bf16/fp16);
a general route table, and K >= 4 in fp32, is one ``index_add_``. The result equals the training
path's to float rounding (the output bias is added in another order; bitwise for SwiGLU);
tests/test_moe_inference.py checks it to 1e-6 for every router of the table, expert choice,
shared experts and capacity dropping, and both against a per-route reference.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from sparse_dit.moe.ops.base import ExpertRows, ExpertWeights, check_expert_weights
from sparse_dit.moe.ops.fused_local import OVERFLOW_COST, _acc_dtype, _combine_by_gather, _gather_sum, _scratch, choose_capacity
from sparse_dit.moe.ops.native import native_moe_ffn

__all__ = ["bookkeeping_threads", "expert_thread_groups", "moe_inference", "run_inference"]

SMALL_OP_ELEMENTS = 1 << 18
"""Tensors up to this many elements are indexed, gathered and scaled on one intra-op thread in
this path (:func:`bookkeeping_threads`). Measured on the 2-core Xeon (BENCHMARKS.md): a (288, 128)
``index_select`` takes 86 us on two threads under ``OMP_WAIT_POLICY=PASSIVE`` (the wake-up of a
sleeping worker) and 6 us on one; spinning workers make both 6 us. Past a few hundred thousand
elements the second thread pays for itself again."""


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """The block on one intra-op thread (CPU tensors), the count restored on every exit."""
    n = torch.get_num_threads()
    if n == 1 or device.type != "cpu":
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@contextlib.contextmanager
def bookkeeping_threads(elements: int, device: torch.device) -> Iterator[None]:
    """Run the block on one intra-op thread when the OpenMP workers sleep (``OMP_WAIT_POLICY=PASSIVE``),
    its tensors are on the CPU and it touches at most :data:`SMALL_OP_ELEMENTS` elements (the
    routing, the layout, the gather and the combine of a small batch), and restore the thread count
    after; tensors on another device leave the CPU threads alone. With spinning workers (``ACTIVE``,
    or unset: libgomp spins, then sleeps) a parallel region costs no wake-up, and switching the
    thread count twice per layer cost more than it saved: quickstart sampling with the native op
    measured 1.24x dense with the switch against 1.16x without under ``ACTIVE``, 1.23 against 1.20
    unset (2-core Xeon, BENCHMARKS.md session 8). ``SPARSE_DIT_SMALL_OP_THREADS=0`` in the
    environment turns it off."""
    if (elements > SMALL_OP_ELEMENTS or os.environ.get("SPARSE_DIT_SMALL_OP_THREADS") == "0"
            or _omp_wait_policy() != "PASSIVE"):
        yield
        return
    with _one_thread(device):
        yield


EXPERT_THREAD_MACS = 1 << 25
"""Mean multiply-adds of one expert's GEMM (rows per expert x D x F) above which the GEMMs count as
large in :func:`expert_thread_groups`: uneven expert groups go back to the intra-op path, and
expert threads are used under libgomp's default wait policy too. Measured on the 2-core Xeon
(BENCHMARKS.md, session 7), one :func:`moe_inference` call, two threads, PASSIVE workers, one
expert taking a share f of the rows and the rest spread evenly: at S/2-E8A2's shape (2048 tokens,
top-2, D 384, F 768: 151 M MACs per expert GEMM) expert threads took 0.98x the intra-op path's
time at f = 0.5, 0.90-1.01x at 0.6, 1.18-1.20x at 0.7 and 1.43-1.46x at 0.9; at the quickstart's
(288 tokens, top-1, D 128, F 512: 4.7 M) 0.56-0.83x at every f up to 0.9."""

EXPERT_THREAD_IMBALANCE = 1.3
"""Past :data:`EXPERT_THREAD_MACS`, expert threads are used only while the largest group holds
at most this many times its even share of the rows (f <= 0.65 for two groups). The routes of a
freshly initialised S/2-E8A2 in the sampler (12 distinct layer calls replayed, BENCHMARKS.md
session 7) had shares 1.00-1.31, and expert threads beat the intra-op path on every one
(0.60-0.99x its time): uneven sizes pad the intra-op path's block too."""


def _omp_wait_policy() -> str:
    """``OMP_WAIT_POLICY`` from the environment: ``"PASSIVE"`` (idle workers sleep at once),
    ``"ACTIVE"`` (they spin) or ``""`` (unset or invalid: libgomp spins for a while, then sleeps).
    The OpenMP runtime reads it once at start-up: set it before the process starts, not after."""
    p = os.environ.get("OMP_WAIT_POLICY", "").strip().upper()
    return p if p in ("PASSIVE", "ACTIVE") else ""


def expert_thread_groups(threads: int, sizes: list[int], dim: int, hidden: int, device: torch.device) -> list[tuple[int, int]]:
    """The consecutive expert ranges ``[a, b)`` to run side by side, each on its own thread with
    one intra-op thread; ``[]``: run the experts' GEMMs one after another on every intra-op thread.

    Small GEMMs split poorly across intra-op threads: each is a parallel region that wakes the
    other workers (86 us under ``OMP_WAIT_POLICY=PASSIVE`` on the 2-core Xeon) and every thread
    streams every expert's weights through its cache. Giving each thread whole experts (expert
    parallelism across the cores of one CPU) wakes one thread per layer and halves each core's
    weights: measured on the 2-core Xeon (PASSIVE, both in the same rounds of each process), the
    sampler's sparse / dense latency was 1.15 with expert threads against 1.22 without at the
    quickstart size, 1.08 against 1.18 at S/2 (BENCHMARKS.md, session 7).

    The experts are cut where the running row count comes closest to k / n of all rows
    (n = min(threads, experts)); groups without rows are left out. Used for CPU tensors with
    several intra-op threads and at least two groups with rows, by the OpenMP wait policy
    (``OMP_WAIT_POLICY``; an idle OpenMP worker of the caller that spins takes the core an expert
    thread needs):

    * ``PASSIVE`` (workers sleep): always, unless the experts' GEMMs are large (mean over
      :data:`EXPERT_THREAD_MACS` multiply-adds) and the largest group holds more than
      :data:`EXPERT_THREAD_IMBALANCE` times its share (a router that sends most rows to one
      expert: there the intra-op path splits that expert's GEMM across the threads);
    * unset (libgomp spins for a while, then sleeps): only for large GEMMs, with the same
      balance rule. Measured: quickstart 1.52 with expert threads against 1.38 without; S/2 1.15
      against 1.23;
    * ``ACTIVE`` (workers spin): never (quickstart 1.57 against 1.37).

    ``SPARSE_DIT_EXPERT_THREADS=0`` in the environment turns it off.

    Args:
        threads: the caller's intra-op threads (``torch.get_num_threads()``).
        sizes: kept routes per expert (E,).
        dim, hidden: D and the expert hidden width F.
        device: where the tensors are.
    """
    E = len(sizes)
    policy = _omp_wait_policy()
    if (threads < 2 or E < 2 or device.type != "cpu" or policy == "ACTIVE"
            or os.environ.get("SPARSE_DIT_EXPERT_THREADS") == "0"):
        return []
    total = sum(sizes)
    large = total / E * dim * hidden > EXPERT_THREAD_MACS
    if policy != "PASSIVE" and not large:
        return []
    n = min(threads, E)
    cum = [0]
    for c in sizes:
        cum.append(cum[-1] + c)
    cuts = [0]
    for k in range(1, n):
        target = total * k / n
        cuts.append(min(range(cuts[-1], E + 1), key=lambda j: abs(cum[j] - target)))
    cuts.append(E)
    groups = [(a, b) for a, b in zip(cuts, cuts[1:]) if cum[b] > cum[a]]
    if len(groups) < 2:
        return []
    largest = max(cum[b] - cum[a] for a, b in groups)
    if large and largest > EXPERT_THREAD_IMBALANCE * total / len(groups):
        return []
    return groups


class _ExpertThreads:
    """Worker threads for :func:`expert_thread_groups`: each runs on one intra-op thread (set once,
    by the worker itself: torch's intra-op count is per thread for OpenMP and MKL) and takes jobs
    from its own queue. ``run`` hands ``jobs[1:]`` to the workers, runs ``jobs[0]`` on the calling
    thread and waits for all; the first error is raised in the caller. Gradient and inference mode
    are per thread in torch: each job runs in the caller's."""

    def __init__(self) -> None:
        self._workers: list[tuple[queue.SimpleQueue, queue.SimpleQueue]] = []
        self._lock = threading.Lock()
        self.jobs_run = 0  # jobs the workers have run (tests check that they do)

    def _grow(self, n: int) -> None:
        while len(self._workers) < n:
            inbox: queue.SimpleQueue = queue.SimpleQueue()
            outbox: queue.SimpleQueue = queue.SimpleQueue()
            t = threading.Thread(target=self._work, args=(inbox, outbox), name=f"sparse-dit-experts-{len(self._workers) + 1}", daemon=True)
            t.start()
            outbox.get()  # the worker has set its thread count
            self._workers.append((inbox, outbox))

    def _work(self, inbox: queue.SimpleQueue, outbox: queue.SimpleQueue) -> None:
        torch.set_num_threads(1)  # this thread's OpenMP and MKL count (the caller restores its own)
        outbox.put(None)
        while True:
            job, inference = inbox.get()
            try:
                with torch.inference_mode() if inference else torch.no_grad():
                    job()
                self.jobs_run += 1
                outbox.put(None)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                outbox.put(e)

    def run(self, jobs: list[Callable[[], None]]) -> None:
        with self._lock:  # one caller at a time owns the workers
            self._grow(len(jobs) - 1)
            inference = torch.is_inference_mode_enabled()
            for (inbox, _), job in zip(self._workers, jobs[1:]):
                inbox.put((job, inference))
            first: Optional[BaseException] = None
            try:
                jobs[0]()
            except BaseException as e:  # noqa: BLE001 - raised after the workers are done
                first = e
            for _, outbox in self._workers[: len(jobs) - 1]:
                err = outbox.get()
                first = first or err
            if first is not None:
                raise first


_expert_threads = _ExpertThreads()


def _reset_after_fork() -> None:
    global _expert_threads
    _expert_threads = _ExpertThreads()  # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _expert_ffn(xp: torch.Tensor, h: torch.Tensor, g: Optional[torch.Tensor], y: torch.Tensor, weights: ExpertWeights,
                activation: str, cap: int, spans: list[tuple[int, int, int]], lo: int, hi: int) -> None:
    """``y[rows] = FFN_e(xp[rows])`` for the block (``cap`` rows per expert) and ``spans``, whose
    rows are ``[lo, hi)``: the first GEMM(s) with their biases, the activation in place, the second."""
    w1, w2, w3, b1, b2 = weights
    _gemms(xp, w1, b1, h, cap, spans)
    if activation == "gelu_tanh":
        torch.ops.aten.gelu_(h[lo:hi], approximate="tanh")
    else:
        _gemms(xp, w3, None, g, cap, spans)
        F.silu(h[lo:hi], inplace=True).mul_(g[lo:hi])
    _gemms(h, w2, b2, y, cap, spans)


def _layout(sizes: list[int], cap: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]], int, bool]:
    """Where the routes sorted by expert go: the (E, cap) block, then one overflow span per expert
    past ``cap`` (the layout of :func:`~sparse_dit.moe.ops.fused_local.plan_routes`, from host sizes).

    Returns:
        ``pieces``: (first sorted position, count, first layout row) runs of consecutive rows;
        ``spans``: (expert, first row, end row) of the overflow GEMMs; ``rows``: layout rows
        (padding included); ``identity``: sorted position p is row p and there are no other rows
        (no padding, no reordering).
    """
    E = len(sizes)
    pieces, spans = [], []
    s, ovf = 0, E * cap
    for e, n in enumerate(sizes):
        m = min(n, cap)
        if m:
            pieces.append((s, m, e * cap))
        if n > cap:
            pieces.append((s + cap, n - cap, ovf))
            spans.append((e, ovf, ovf + n - cap))
            ovf += n - cap
        s += n
    # Identity also needs no trailing padding: with sizes (cap, m < cap, 0, 0) every piece starts
    # where it is sorted, yet the block holds E x cap rows for sum(sizes) routes.
    identity = ovf == sum(sizes) and all(p == r for p, _, r in pieces)
    return pieces, spans, ovf, identity


def _gemms(a: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor, cap: int,
           spans: list[tuple[int, int, int]]) -> None:
    """``out[rows of e] = a[rows of e] @ w[e] (+ bias[e])``: one batched GEMM over the block, one GEMM per span."""
    E = w.shape[0]
    if cap:
        a_b, out_b = a[: E * cap].view(E, cap, -1), out[: E * cap].view(E, cap, -1)
        if bias is None:
            torch.bmm(a_b, w, out=out_b)
        else:
            torch.baddbmm(bias[:, None, :], a_b, w, out=out_b)
    if spans:
        ws = w.unbind(0)
        bs = bias.unbind(0) if bias is not None else None
        for e, r0, r1 in spans:
            if bs is None:
                torch.mm(a[r0:r1], ws[e], out=out[r0:r1])
            else:
                torch.addmm(bs[e], a[r0:r1], ws[e], out=out[r0:r1])


@torch.no_grad()
def moe_inference(
    x_TD: torch.Tensor,
    expert_idx: torch.Tensor,
    weight: torch.Tensor,
    num_experts: int,
    activation: str,
    weights: ExpertWeights,
    token_idx: Optional[torch.Tensor] = None,
    cap: Optional[int] = None,
) -> torch.Tensor:
    """``out[t] = sum over kept routes r of token t of weight[r] * FFN_{expert(r)}(x[t])``, no autograd.

    Args:
        x_TD: (T, D) tokens.
        expert_idx: the routes' experts, ``num_experts`` for a dropped route: (T, K) token-major
            (row t holds token t's routes), or any 2-D shape with ``token_idx``.
        weight: combine weight of each route, same shape (any float dtype).
        num_experts: E.
        activation: ``"gelu_tanh"`` (needs b1, b2) or ``"swiglu"`` (needs w3).
        weights: stacked expert weights in ``x_TD``'s dtype (:class:`ExpertWeights`).
        token_idx: the token of each route for a general route table; ``None`` = token-major.
        cap: rows per expert of the batched block (the Python path); ``None`` = the native op on
            float32 CPU tensors when it is built, else expert threads where
            :func:`expert_thread_groups` picks them (one GEMM per expert), else
            :func:`~sparse_dit.moe.ops.fused_local.choose_capacity` (the training op's rule). A
            given ``cap`` always runs the Python path on the intra-op threads.

    Returns:
        (T, D) in ``x_TD``'s dtype.
    """
    w1, w2, w3, b1, b2 = weights
    dt = x_TD.dtype
    check_expert_weights(activation, dt, w1, w2, w3, b1, b2)
    if x_TD.ndim != 2:
        raise ValueError(f"x_TD must be (tokens, dim), got shape {tuple(x_TD.shape)}")
    if weight.shape != expert_idx.shape or (token_idx is not None and token_idx.shape != expert_idx.shape):
        raise ValueError(f"weight {tuple(weight.shape)} and token_idx must have the shape of expert_idx {tuple(expert_idx.shape)}")
    T, D = x_TD.shape
    E, Fh = num_experts, w1.shape[2]
    if w1.shape[0] != E:
        raise ValueError(f"the routes are for {E} experts, the weights hold {w1.shape[0]}")
    if cap is not None and cap < 0:
        raise ValueError(f"cap={cap} must be >= 0")
    K: Optional[int] = None
    if token_idx is None:
        if expert_idx.ndim != 2 or expert_idx.shape[0] != T:
            raise ValueError(f"token-major expert_idx must be ({T}, K), got {tuple(expert_idx.shape)}")
        K = expert_idx.shape[1]
    e_R = expert_idx.reshape(-1)
    if cap is None and x_TD.device.type == "cpu" and dt == torch.float32:
        op = native_moe_ffn()  # one C++ op, one parallel region (sparse_dit/moe/ops/native.py)
        if op is not None:
            t_R = None if token_idx is None else token_idx.reshape(-1)
            return op(x_TD, e_R, weight.reshape(-1).float(), t_R, K or 0, w1, b1, w2, b2, w3)
    R = e_R.numel()
    threads = torch.get_num_threads()
    with bookkeeping_threads(max(R, T) * D, x_TD.device):
        sizes = torch.bincount(e_R, minlength=E + 1).tolist()  # the host sync
        groups = expert_thread_groups(threads, sizes[:E], D, Fh, x_TD.device) if cap is None else []
        # expert groups on their own threads: one GEMM per expert (the one-thread layout)
        xp, tok_pad, row, order, cap, spans = _plan_and_gather(x_TD, e_R, sizes, token_idx, K, E, cap, 1 if groups else threads)
    rows, kept = xp.shape[0], order.numel()
    # 2. the expert GEMMs (biases fused), the activation in place: on every intra-op thread, or
    #    each group of experts on its own thread (expert_thread_groups)
    h = _scratch("inf_h", (rows, Fh), x_TD)
    g = _scratch("inf_g", (rows, Fh), x_TD) if activation == "swiglu" else None
    # rows [0, rows): expert outputs with their output bias; row `rows`: zeros for dropped routes
    y = _scratch("inf_y", (rows + 1, D), x_TD)
    y[rows].zero_()
    if groups:
        parts = [[sp for sp in spans if a <= sp[0] < b] for a, b in groups]  # cap 0: one span per expert with rows
        jobs = [lambda p=p: _expert_ffn(xp, h, g, y, weights, activation, 0, p, p[0][1], p[-1][2]) for p in parts]
        with _one_thread(x_TD.device):
            _expert_threads.run(jobs)
    else:
        _expert_ffn(xp, h, g, y, weights, activation, cap, spans, 0, rows)
    # 3. combine: each token's weighted sum over its routes (as the training op combines)
    with bookkeeping_threads(R * D, x_TD.device):
        return _combine(y, weight, tok_pad, row, order, kept, rows, T, K, R, dt)


def _plan_and_gather(
    x_TD: torch.Tensor, e_R: torch.Tensor, sizes: list[int], token_idx: Optional[torch.Tensor], K: Optional[int], E: int, cap: Optional[int], threads: int
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor, int, list[tuple[int, int, int]]]:
    """1. Sort the routes by expert (stable: one expert's routes keep token order), lay them out as
    the training op does, and gather the tokens into the layout's rows.

    ``sizes``: routes per expert, the dropped ones last ((E + 1,), the caller's bincount: the host
    sync). ``threads``: the caller's intra-op threads, or 1 for expert threads (this runs on one:
    the cap rule wants the real count).
    Returns ``(layout rows x D gathered tokens, token of each layout row, layout row of each sorted
    position or None for the identity, sorted position -> kept route, cap, overflow spans)``."""
    D = x_TD.shape[1]
    dev = x_TD.device
    R = e_R.numel()
    kept = R - sizes[E]
    sizes = sizes[:E]
    if cap is None:
        # One intra-op thread: one GEMM per expert (measured faster than the padded block at the
        # quickstart's 288 tokens); several: the training op's block layout, which hands whole
        # GEMMs to each thread instead of splitting every small GEMM across them.
        cap = 0 if threads == 1 else choose_capacity(sizes, OVERFLOW_COST)
    pieces, spans, rows, identity = _layout(sizes, cap)
    order = torch.argsort(e_R, stable=True)[:kept]  # sorted position -> route
    if K is None:
        tok = token_idx.reshape(-1).index_select(0, order)
    else:
        tok = order if K == 1 else torch.div(order, K, rounding_mode="floor")
    if identity:
        row, tok_pad = None, tok  # sorted position p is layout row p
    else:
        # row of sorted position p: p + (first row - first position) of its piece
        shift = torch.tensor([r - p for p, _, r in pieces], dtype=torch.int64, device=dev)
        counts = torch.tensor([n for _, n, _ in pieces], dtype=torch.int64, device=dev)
        row = torch.arange(kept, device=dev) + torch.repeat_interleave(shift, counts, output_size=kept)
        tok_pad = torch.zeros(rows, dtype=torch.int64, device=dev)  # padding rows read token 0 (weight 0)
        tok_pad.index_copy_(0, row, tok)
    xp = torch.index_select(x_TD.contiguous(), 0, tok_pad, out=_scratch("inf_x", (rows, D), x_TD))
    return xp, tok_pad, row, order, cap, spans


def _combine(y: torch.Tensor, weight: torch.Tensor, tok_pad: torch.Tensor, row: Optional[torch.Tensor], order: torch.Tensor,
             kept: int, rows: int, T: int, K: Optional[int], R: int, dt: torch.dtype) -> torch.Tensor:
    """3. Each token's weighted sum over its routes from the layout rows ``y`` (row ``rows``: zeros)."""
    D = y.shape[1]
    dev = y.device
    if _combine_by_gather(K, dt):
        pos = torch.full((R,), rows, dtype=torch.int64, device=dev) if kept < R else torch.empty(R, dtype=torch.int64, device=dev)
        pos.index_copy_(0, order, torch.arange(kept, device=dev) if row is None else row)  # route -> layout row
        return _gather_sum(y, pos.view(T, K), weight.reshape(T, K).to(dt)).to(dt)
    w_sorted = weight.reshape(-1).index_select(0, order).to(dt)
    w_rows = w_sorted if row is None else y.new_zeros(rows).index_copy_(0, row, w_sorted)  # padding rows: 0
    yw = y[:rows].mul_(w_rows[:, None])
    acc = _acc_dtype(dt)
    out = torch.zeros(T, D, dtype=acc, device=dev)
    out.index_add_(0, tok_pad, yw if acc == dt else yw.to(acc))
    return out.to(dt)


def run_inference(x: torch.Tensor, rows: ExpertRows, activation: str, w: ExpertWeights) -> torch.Tensor:
    """:func:`moe_inference` on the token-space routes of ``rows`` (``rows.routes``)."""
    if rows.routes is None or rows.weight is None:
        raise ValueError("the inference path needs rows.routes (the routes' experts) and rows.weight")
    return moe_inference(x, rows.routes, rows.weight, w.w1.shape[0], activation, w, rows.route_tokens)
