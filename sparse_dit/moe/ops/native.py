"""A native CPU op for the MoE FFN of the inference path (``torch.ops.sparse_dit.moe_ffn``).

:func:`sparse_dit.moe.ops.inference.moe_inference` (what every MoE layer runs with gradients off on
one process: the sampler, the pipeline, the evals) hands float32 CPU tensors to this op when it
can be built; otherwise it runs its Python path. The op (``csrc/moe_cpu.cpp``) does in C++ what
the Python path does in a few dozen torch calls: a stable counting sort of the routes by expert,
the gather, the expert GEMMs with their biases and the activation in place, and each token's
weighted sum of its routes, in **one OpenMP parallel region**: the sorted rows are cut into one
chunk of about equal rows per intra-op thread (an expert that straddles a cut runs as two GEMMs),
each thread gathers and runs its chunk, a barrier, then each thread combines a range of tokens.

Why (measured on the 2-core Xeon, BENCHMARKS.md session 8): the Python path's torch calls each
cost a few microseconds of dispatch, and each parallel one wakes the other OpenMP worker (86 us
under ``OMP_WAIT_POLICY=PASSIVE``); its expert threads (session 7) wake one worker per layer but
lose to spinning OpenMP workers, which take the core they need. The op's team *is* the OpenMP
workers, so it works under every wait policy, and wakes them once per layer.

- The GEMMs and the activation are ATen's own (``at::addmm_out``, ``at::gelu_``, ``at::silu_``):
  the kernels the dense FFN runs. Inside the region ATen runs them on the calling thread.
- Each worker runs in the caller's gradient and inference mode (``at::ThreadLocalState``).
- The result equals the Python path's to float rounding; tests/test_moe_native.py checks it
  against a per-route reference written in the test.

**Building.** The first MoE inference call of a process on float32 CPU tensors compiles the op with
``torch.utils.cpp_extension.load`` (about 10 s with g++ on the 2-core Xeon; torch's extension
cache, ``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``, keeps it for later processes and
rebuilds when the source changes). It needs a C++ compiler and ninja (the ``ninja`` wheel, a dependency of the package, is
found even when the venv is not on ``PATH``). When the build fails, one
warning names the reason and the Python path is used for the rest of the process.
``SPARSE_DIT_NATIVE=0`` in the environment turns the op off (the Python path, with its expert
threads).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["native_moe_ffn", "native_enabled", "native_error", "NATIVE_SOURCE"]

NATIVE_SOURCE = Path(__file__).resolve().parent / "csrc" / "moe_cpu.cpp"
_NAME = "sparse_dit_moe_cpu"
_STALE_LOCK_S = 600.0  # a build lock older than this was left by a killed build

_lock = threading.Lock()
_state: dict[str, object] = {}  # "op": the loaded op, or "error": why it could not be built


def native_enabled() -> bool:
    """False when ``SPARSE_DIT_NATIVE=0`` is set in the environment (read on every call)."""
    return os.environ.get("SPARSE_DIT_NATIVE", "1") != "0"


def _find_ninja() -> None:
    """Put the ``ninja`` wheel's binary on ``PATH`` when none is there (a venv run without activation)."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build() -> Callable[..., torch.Tensor]:
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import load

    if not torch.backends.openmp.is_available():
        raise RuntimeError("this torch build has no OpenMP")
    _find_ninja()
    build_dir = getattr(cpp_extension, "_get_build_directory", None)
    if build_dir is not None:
        lock = Path(build_dir(_NAME, verbose=False)) / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink(missing_ok=True)  # torch's build lock waits forever on a killed build's file
    load(name=_NAME, sources=[str(NATIVE_SOURCE)], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
         is_python_module=False, verbose=False)
    return torch.ops.sparse_dit.moe_ffn


def native_moe_ffn() -> Optional[Callable[..., torch.Tensor]]:
    """``torch.ops.sparse_dit.moe_ffn``, built and loaded on the first call of the process; ``None``
    when ``SPARSE_DIT_NATIVE=0`` or when it cannot be built (one warning, once per process).

    The op: ``moe_ffn(x (T, D) f32, expert_idx (R,) i64, weight (R,) f32, token_idx (R,) i64 or
    None, K, w1 (E, D, F), b1 (E, F) or None, w2 (E, F, D), b2 (E, D) or None, w3 (E, D, F) or
    None) -> (T, D)``: route ``r`` belongs to token ``token_idx[r]`` (or ``r // K`` when
    ``token_idx`` is None), goes to expert ``expert_idx[r]`` (``E``: dropped) with combine weight
    ``weight[r]``; ``w3`` given selects SwiGLU (``silu(x w1) * (x w3)``), else tanh-GELU.
    """
    if not native_enabled():
        return None
    op = _state.get("op")
    if op is not None or "error" in _state:
        return op  # type: ignore[return-value]
    with _lock:
        if "op" not in _state and "error" not in _state:
            try:
                _state["op"] = _build()
            except Exception as e:  # noqa: BLE001 - any build failure means the Python path
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                _state["error"] = reason
                warnings.warn(f"sparse-dit: the native CPU MoE op could not be built ({type(e).__name__}: {reason}); MoE "
                              "layers sample with the Python path (set SPARSE_DIT_NATIVE=0 to skip the build)", stacklevel=3)
    return _state.get("op")  # type: ignore[return-value]


def native_error() -> Optional[str]:
    """Why the op could not be built in this process (``None``: built, or not tried yet)."""
    return _state.get("error")  # type: ignore[return-value]
