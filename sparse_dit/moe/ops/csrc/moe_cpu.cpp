// sparse_dit::moe_ffn: the MoE FFN of the inference path as one CPU op (float32).
//
// Sort the routes by expert, gather the tokens, run each expert's GEMMs and activation on its
// rows, and sum every token's weighted routes, in one OpenMP parallel region: the sorted rows are
// cut into one chunk of about equal rows per thread (an expert whose rows straddle a cut runs as
// two GEMMs), a barrier, then each thread combines a range of tokens. Built and loaded by
// sparse_dit/moe/ops/native.py on first use; the reasons and the measurements are in its
// docstring and in docs/moe.md ("A native CPU op").
//
// The expert GEMMs and the activation are ATen's own (at::addmm_out, at::gelu_, at::silu_): the
// same kernels the dense FFN runs. Inside the parallel region ATen runs them on the calling thread
// (omp_in_parallel), so each chunk is one thread's work.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <optional>
#include <vector>

namespace {

// Chunks of fewer sorted rows than this go to fewer threads (a GEMM of a few rows is all overhead).
constexpr int64_t kMinChunkRows = 16;

// Row bounds of n chunks of the sorted rows: k / n of the rows, moved to an expert boundary when one
// lies within 1/32 of a chunk (a straddling expert costs one more GEMM call).
std::vector<int64_t> chunk_bounds(const std::vector<int64_t>& cum, int64_t n) {
  const int64_t E = static_cast<int64_t>(cum.size()) - 1, rows = cum[E];
  const int64_t snap = rows / (32 * n);
  std::vector<int64_t> bounds{0};
  for (int64_t k = 1; k < n; ++k) {
    const int64_t target = rows * k / n;
    const int64_t j = std::lower_bound(cum.begin(), cum.end(), target) - cum.begin();  // cum[j] >= target
    int64_t best = target, dist = snap + 1;  // the nearest boundary within `snap` rows, else the target
    if (j <= E && cum[j] - target < dist) best = cum[j], dist = cum[j] - target;
    if (j > 0 && target - cum[j - 1] < dist) best = cum[j - 1];
    bounds.push_back(std::max(best, bounds.back()));
  }
  bounds.push_back(rows);
  return bounds;
}

at::Tensor moe_ffn(const at::Tensor& x, const at::Tensor& expert_idx, const at::Tensor& weight,
                   const std::optional<at::Tensor>& token_idx, int64_t K, const at::Tensor& w1,
                   const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                   const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& w3) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2, "moe_ffn: x must be a (T, D) float32 CPU tensor");
  TORCH_CHECK(expert_idx.scalar_type() == at::kLong && weight.scalar_type() == at::kFloat, "moe_ffn: expert_idx must be int64 and weight float32");
  TORCH_CHECK(expert_idx.numel() == weight.numel(), "moe_ffn: expert_idx and weight must have one entry per route");
  const int64_t T = x.size(0), D = x.size(1), E = w1.size(0), Fh = w1.size(2);
  TORCH_CHECK(w1.dim() == 3 && w1.size(1) == D && w2.dim() == 3 && w2.size(0) == E && w2.size(1) == Fh && w2.size(2) == D,
              "moe_ffn: w1 must be (E, D, F) and w2 (E, F, D)");
  TORCH_CHECK(w1.scalar_type() == at::kFloat && w2.scalar_type() == at::kFloat, "moe_ffn: weights must be float32");
  const int64_t R = expert_idx.numel();
  const bool general = token_idx.has_value();
  TORCH_CHECK(general ? token_idx->numel() == R : (K > 0 && R == T * K), "moe_ffn: the routes do not match the tokens");
  const at::Tensor xc = x.contiguous(), ec = expert_idx.contiguous(), wc = weight.contiguous();
  const at::Tensor tc = general ? token_idx->contiguous().to(at::kLong) : at::Tensor();
  const int64_t* e_ptr = ec.data_ptr<int64_t>();
  const float* w_ptr = wc.data_ptr<float>();
  const int64_t* t_ptr = general ? tc.data_ptr<int64_t>() : nullptr;

  // 1. Stable counting sort of the routes by expert (expert E: a dropped route); per token, the
  //    sorted rows of its kept routes in route order (a CSR list) for the combine.
  std::vector<int64_t> cum(E + 1, 0), tcount(T + 1, 0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t e = e_ptr[r];
    TORCH_CHECK(e >= 0 && e <= E, "moe_ffn: expert index ", e, " out of [0, ", E, "]");
    const int64_t t = general ? t_ptr[r] : r / K;
    TORCH_CHECK(t >= 0 && t < T, "moe_ffn: token index ", t, " out of [0, ", T, ")");
    if (e < E) {
      ++cum[e + 1];
      ++tcount[t + 1];
    }
  }
  for (int64_t e = 0; e < E; ++e) cum[e + 1] += cum[e];
  for (int64_t t = 0; t < T; ++t) tcount[t + 1] += tcount[t];
  const int64_t kept = cum[E];
  std::vector<int64_t> next(cum.begin(), cum.end() - 1), tnext(tcount.begin(), tcount.end() - 1);
  std::vector<int64_t> tok(kept), trow(kept);  // sorted row -> token; CSR: token's routes -> sorted row
  std::vector<float> tw(kept);                  // CSR: the routes' weights
  for (int64_t r = 0; r < R; ++r) {
    const int64_t e = e_ptr[r];
    if (e == E) continue;
    const int64_t t = general ? t_ptr[r] : r / K;
    const int64_t p = next[e]++, q = tnext[t]++;
    tok[p] = t;
    trow[q] = p;
    tw[q] = w_ptr[r];
  }

  const auto opts = x.options();
  at::Tensor xp = at::empty({kept, D}, opts), h = at::empty({kept, Fh}, opts), y = at::empty({kept, D}, opts);
  at::Tensor g = w3.has_value() ? at::empty({kept, Fh}, opts) : at::Tensor();
  at::Tensor out = at::empty({T, D}, opts);
  const float* x_ptr = xc.data_ptr<float>();
  float* xp_ptr = xp.data_ptr<float>();
  const float* y_ptr = y.data_ptr<float>();
  float* o_ptr = out.data_ptr<float>();

  auto experts = [&](int64_t lo, int64_t hi) {  // gather rows [lo, hi), run their experts' FFNs
    for (int64_t p = lo; p < hi; ++p) std::memcpy(xp_ptr + p * D, x_ptr + tok[p] * D, D * sizeof(float));
    for (int64_t e = std::upper_bound(cum.begin(), cum.end(), lo) - cum.begin() - 1; e < E && cum[e] < hi; ++e) {
      const int64_t r0 = std::max(cum[e], lo), m = std::min(cum[e + 1], hi) - r0;
      if (m <= 0) continue;
      at::Tensor xe = xp.narrow(0, r0, m), he = h.narrow(0, r0, m), ye = y.narrow(0, r0, m);
      if (b1.has_value()) at::addmm_out(he, (*b1)[e], xe, w1[e]); else at::mm_out(he, xe, w1[e]);
      if (w3.has_value()) {
        at::Tensor ge = g.narrow(0, r0, m);
        at::mm_out(ge, xe, (*w3)[e]);
        at::silu_(he).mul_(ge);
      } else {
        at::gelu_(he, "tanh");
      }
      if (b2.has_value()) at::addmm_out(ye, (*b2)[e], he, w2[e]); else at::mm_out(ye, he, w2[e]);
    }
  };
  auto combine = [&](int64_t t0, int64_t t1) {  // out[t] = sum of t's routes' weight * y[row]
    for (int64_t t = t0; t < t1; ++t) {
      float* o = o_ptr + t * D;
      std::fill(o, o + D, 0.0f);
      for (int64_t q = tcount[t]; q < tcount[t + 1]; ++q) {
        const float wq = tw[q];
        const float* yr = y_ptr + trow[q] * D;
        for (int64_t d = 0; d < D; ++d) o[d] += wq * yr[d];
      }
    }
  };

  // 2. One parallel region (one wake of sleeping workers): each thread its chunk of rows, a barrier,
  //    each thread its range of tokens. One chunk (one thread, few rows, or inside another
  //    parallel region): inline.
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, kept / kMinChunkRows));
  const std::vector<int64_t> bounds = chunk_bounds(cum, n);
  if (n == 1) {
    experts(0, kept);
    combine(0, T);
    return out;
  }
  const at::ThreadLocalState state;  // the caller's gradient / inference mode, for the workers
  std::exception_ptr error;
#pragma omp parallel
  {
    // the team is the caller's intra-op threads (no num_threads clause: libgomp's pool, pytorch#32008)
    const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
    try {
      at::ThreadLocalStateGuard guard(state);
      for (int64_t c = tid; c < n; c += nt) experts(bounds[c], bounds[c + 1]);
    } catch (...) {
#pragma omp critical
      if (!error) error = std::current_exception();
    }
#pragma omp barrier
    if (!error) {
      const int64_t per = (T + nt - 1) / nt;
      combine(std::min(T, tid * per), std::min(T, (tid + 1) * per));
    }
  }
  if (error) std::rethrow_exception(error);
  return out;
}

}  // namespace

TORCH_LIBRARY(sparse_dit, m) {
  m.def("moe_ffn(Tensor x, Tensor expert_idx, Tensor weight, Tensor? token_idx, int K, Tensor w1, Tensor? b1, "
        "Tensor w2, Tensor? b2, Tensor? w3) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparse_dit, CPU, m) { m.impl("moe_ffn", &moe_ffn); }
