// y = x · (q · diag(scale))ᵀ for a few fp32 rows x (M, K), int8 weights q (N, K) and one fp32
// scale per output channel (N): weight-only int8 decode (loramux/quantize.py). Below it,
// `quantize_rows`, the w8a8 base's row rounding, and `w8a8_linears`, its few-row product over
// one or more weights that read the same rows (`w8a8_linear` for one).
//
// Decode reads every weight once per token, so int8 reads a quarter of fp32's bytes. The
// kernel converts each 8-wide int8 chunk of a weight row to fp32 once and multiplies it into up
// to 4 rows of x; 8 output channels (one row of x) or 2 (more rows) are carried at once, so that
// 8 independent FMA chains hide the FMA latency. PyTorch's own CPU int8/int4 weight-only kernels
// (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) ran slower than fp32 on the AVX-512 (VNNI)
// AMD EPYC this project is measured on, int4 5x slower at one row (benchmarks/results/
// int8_linear.json). Without AVX2 and FMA a plain loop computes the same sums.
//
// A one-row pass over a weight streams it from memory once, and one core's hardware prefetcher
// alone keeps well under the memory's bandwidth: both kernels ask for the weight two groups of
// rows ahead of the ones they multiply (`prefetch_ahead`; benchmarks/few_row_linears.py measures
// the one-row step's linears against the compiled step's generated reductions).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <tuple>
#include <vector>

// A group of `rows` consecutive weight rows (rows · K contiguous bytes) is multiplied `bytes`
// columns at a time; meanwhile the group `ahead` rows further on is asked for at the same pace
// (rows · bytes of it per step, a cache line at a time), so that it is in cache when its turn
// comes: the weight is read in order, every row once. The address is computed as an integer: past
// the weight's end (its last groups) it names memory that is not ours, which a prefetch never
// faults on and whose pointer we never form.
static inline void prefetch_ahead(const int8_t* group, int64_t K, int64_t ahead, int rows, int64_t k, int bytes) {
#if defined(__GNUC__)
  const uintptr_t p = reinterpret_cast<uintptr_t>(group) + static_cast<uintptr_t>(ahead * K);
  for (int64_t b = (rows * k + 63) & ~int64_t{63}; b < rows * (k + bytes); b += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(p + static_cast<uintptr_t>(b)), 0, 3);
#endif
}

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
#endif

// out[i * N + j] = scale[j] * sum_k x[i * K + k] * w[j * K + k], for i < MB rows and j < NB channels.
template <int NB, int MB>
static inline void block(const float* x, const int8_t* w, int64_t K, int64_t N, float* out, const float* scale) {
  int64_t k = 0;
  float sums[MB][NB] = {};
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[MB][NB];
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) acc[i][j] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    prefetch_ahead(w, K, 2 * NB, NB, k, 8);
    __m256 wf[NB];
    for (int j = 0; j < NB; j++)
      wf[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + j * K + k))));
    for (int i = 0; i < MB; i++) {
      __m256 xv = _mm256_loadu_ps(x + i * K + k);
      for (int j = 0; j < NB; j++) acc[i][j] = _mm256_fmadd_ps(xv, wf[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) sums[i][j] = hsum(acc[i][j]);
#endif
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) {
      float r = sums[i][j];
      for (int64_t kk = k; kk < K; kk++) r += x[i * K + kk] * static_cast<float>(w[j * K + kk]);
      out[i * N + j] = r * scale[j];
    }
}

// Every row of x against NB channels starting at w.
template <int NB>
static void channels(const float* x, const int8_t* w, int64_t M, int64_t K, int64_t N, float* out, const float* scale) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) block<NB, 4>(x + m * K, w, K, N, out + m * N, scale);
  switch (M - m) {
    case 3: block<NB, 3>(x + m * K, w, K, N, out + m * N, scale); break;
    case 2: block<NB, 2>(x + m * K, w, K, N, out + m * N, scale); break;
    case 1: block<NB, 1>(x + m * K, w, K, N, out + m * N, scale); break;
    default: break;
  }
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scale.dim() == 1, "int8_linear: x (M, K), q (N, K), scale (N,)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
              "int8_linear: x and scale fp32, q int8");
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scale.device().is_cpu(), "int8_linear: CPU tensors");
  TORCH_CHECK(x.size(1) == q.size(1) && scale.size(0) == q.size(0), "int8_linear: shapes do not match");
  auto xc = x.contiguous();
  auto qc = q.contiguous();
  auto sc = scale.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = qc.size(0);
  auto out = at::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const int8_t* qp = qc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // groups of 8 output channels, split across threads
  at::parallel_for(0, (N + 7) / 8, 4, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; g++) {
      const int64_t n = g * 8;
      if (n + 8 > N) {
        for (int64_t j = n; j < N; j++) channels<1>(xp, qp + j * K, M, K, N, op + j, sp + j);
      } else if (M == 1) {
        block<8, 1>(xp, qp + n * K, K, N, op + n, sp + n);
      } else {
        for (int64_t j = n; j < n + 8; j += 2) channels<2>(xp, qp + j * K, M, K, N, op + j, sp + j);
      }
    }
  });
  return out;
}

// One row rounded to int8 with its own scale max|row| / 127, exactly as quantize.py's
// `quantize_rows` (the same fp32 division, rounding half to even).
static void round_row(const float* row, int64_t K, int8_t* q, float* scale) {
  float amax = 0.0f;
  for (int64_t k = 0; k < K; k++) {
    const float a = std::fabs(row[k]);
    if (std::isnan(a) || a > amax) amax = a;  // a NaN propagates to the scale, as torch's amax
    if (std::isnan(amax)) break;
  }
  const float s = std::isnan(amax) ? amax : std::max(amax / 127.0f, std::numeric_limits<float>::min());
  *scale = s;
  for (int64_t k = 0; k < K; k++) {
    const float r = std::nearbyint(row[k] / s);
    // a NaN row's outputs are NaN through its scale whatever q holds; casting NaN is undefined
    q[k] = std::isnan(r) ? 0 : static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
  }
}

// Each row of x (M, K) rounded by `round_row`: (q (M, K) int8, scale (M, 1)). An operator so that
// the compiled decode step computes the rounded rows once: written as tensor ops, Inductor
// recomputes them inside every output channel's sum.
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "quantize_rows: fp32 CPU x (M, K)");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  auto q = at::empty({M, K}, xc.options().dtype(at::kChar));
  auto scale = at::empty({M, 1}, xc.options());
  for (int64_t i = 0; i < M; i++)
    round_row(xc.data_ptr<float>() + i * K, K, q.data_ptr<int8_t>() + i * K, scale.data_ptr<float>() + i);
  return {q, scale};
}

// Exact integer sums for a few rows already rounded to int8 (q8 (M, K), int16-widened), against
// NB consecutive weight rows: acc[i][j] = sum_k q8[i][k] * w[j][k]. Products of int8 values fit
// int16 · int16 pairs summed into int32 (VNNI's vpdpwssd, or AVX2's vpmaddwd then an add), exact
// for any K up to 2^31 / (127 · 128), as the integer GEMM's (w8a8_linear checks it).
template <int NB, int MB>
static inline void int_block(const int16_t* x16, const int8_t* q8, const int8_t* w, int64_t K, int32_t (*acc)[NB]) {
  int64_t k = 0;
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) acc[i][j] = 0;
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
  __m512i a[MB][NB];
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) a[i][j] = _mm512_setzero_si512();
  for (; k + 32 <= K; k += 32) {
    prefetch_ahead(w, K, 2 * NB, NB, k, 32);
    __m512i wv[NB];
    for (int j = 0; j < NB; j++)
      wv[j] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * K + k)));
    for (int i = 0; i < MB; i++) {
      const __m512i xv = _mm512_loadu_si512(x16 + i * K + k);
      for (int j = 0; j < NB; j++) a[i][j] = _mm512_dpwssd_epi32(a[i][j], wv[j], xv);
    }
  }
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) acc[i][j] = _mm512_reduce_add_epi32(a[i][j]);
#elif defined(__AVX2__)
  __m256i a[MB][NB];
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) a[i][j] = _mm256_setzero_si256();
  for (; k + 16 <= K; k += 16) {
    prefetch_ahead(w, K, 2 * NB, NB, k, 16);
    __m256i wv[NB];
    for (int j = 0; j < NB; j++)
      wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * K + k)));
    for (int i = 0; i < MB; i++) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + i * K + k));
      for (int j = 0; j < NB; j++) a[i][j] = _mm256_add_epi32(a[i][j], _mm256_madd_epi16(wv[j], xv));
    }
  }
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) {
      __m128i h = _mm_add_epi32(_mm256_castsi256_si128(a[i][j]), _mm256_extracti128_si256(a[i][j], 1));
      h = _mm_hadd_epi32(h, h);
      h = _mm_hadd_epi32(h, h);
      acc[i][j] = _mm_cvtsi128_si32(h);
    }
#endif
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++)
      for (int64_t kk = k; kk < K; kk++) acc[i][j] += int32_t{q8[i * K + kk]} * int32_t{w[j * K + kk]};
}

template <int MB>
static void w8a8_rows(const int16_t* x16, const int8_t* q8, const float* rs, const int8_t* w, const float* scale,
                      int64_t K, int64_t N, int64_t n, int64_t count, float* out) {
  // 4 channels at a time (one channel at the end), each sum scaled as quantize.py's W8A8Linear:
  // (float(sum) · the row's scale) · the channel's scale
  constexpr int NB = 4;
  int32_t acc[MB][NB];
  int32_t acc1[MB][1];
  int64_t j = n;
  for (; j + NB <= n + count; j += NB) {
    int_block<NB, MB>(x16, q8, w + j * K, K, acc);
    for (int i = 0; i < MB; i++)
      for (int c = 0; c < NB; c++) out[i * N + j + c] = static_cast<float>(acc[i][c]) * rs[i] * scale[j + c];
  }
  for (; j < n + count; j++) {
    int_block<1, MB>(x16, q8, w + j * K, K, acc1);
    for (int i = 0; i < MB; i++) out[i * N + j] = static_cast<float>(acc1[i][0]) * rs[i] * scale[j];
  }
}

// ys[w] = (q_x · q[w]ᵀ) · s_x · scale[w] for a few fp32 rows x (M <= 4, K) and one or more int8
// weights q[w] (N_w, K) that read the same input (a block's q, k and v; its gate and up): the
// w8a8 base's decode product. Each row is rounded to int8 by `round_row` once, then exact integer
// sums over every weight in one pass that reads each once for all rows, the weights' channel
// groups shared out among threads together (one call where one per weight paid its call and its
// thread start-up each). Equal, bit for bit, to quantize.py's W8A8Linear on each weight (rounding,
// then torch._int_mm's exact sums, then the same two fp32 multiplies).
std::vector<at::Tensor> w8a8_linears(const at::Tensor& x, at::TensorList q, at::TensorList scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "w8a8_linears: fp32 CPU x (M, K)");
  TORCH_CHECK(!q.empty() && q.size() == scale.size(), "w8a8_linears: as many scales as weights, at least one");
  // 4: quantize.py's W8A8_KERNEL_ROWS
  TORCH_CHECK(x.size(0) <= 4, "w8a8_linears: at most 4 rows (more rows take the integer GEMM)");
  // int32 sums of K products of at most 127 · 128 in magnitude are exact below this
  TORCH_CHECK(x.size(1) <= (int64_t{1} << 31) / (127 * 128), "w8a8_linears: K too large for exact int32 sums");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  const size_t W = q.size();
  std::vector<at::Tensor> qs, ss, outs;
  // groups of 32 output channels (a group is 32 · K bytes of a weight); first[w]: weight w's first
  constexpr int64_t G = 32;
  std::vector<int64_t> first{0};
  for (size_t w = 0; w < W; w++) {
    TORCH_CHECK(q[w].dim() == 2 && scale[w].dim() == 1 && q[w].scalar_type() == at::kChar &&
                    scale[w].scalar_type() == at::kFloat && q[w].device().is_cpu() && scale[w].device().is_cpu(),
                "w8a8_linears: int8 CPU weights q (N, K), fp32 CPU scales (N,)");
    TORCH_CHECK(q[w].size(1) == K && scale[w].size(0) == q[w].size(0), "w8a8_linears: shapes do not match");
    qs.push_back(q[w].contiguous());
    ss.push_back(scale[w].contiguous());
    outs.push_back(at::empty({M, q[w].size(0)}, xc.options()));
    first.push_back(first.back() + (q[w].size(0) + G - 1) / G);
  }
  if (M == 0 || first.back() == 0) return outs;
  // the rows rounded, and widened to int16 for the multiplies (a few rows: small buffers)
  std::vector<int8_t> q8v(M * K);
  std::vector<int16_t> x16v(M * K);
  float rs[4];
  for (int64_t i = 0; i < M; i++) round_row(xc.data_ptr<float>() + i * K, K, q8v.data() + i * K, rs + i);
  for (int64_t j = 0; j < M * K; j++) x16v[j] = q8v[j];
  const int16_t* x16 = x16v.data();
  const int8_t* q8 = q8v.data();
  at::parallel_for(0, first.back(), 1, [&](int64_t begin, int64_t end) {
    // a thread's range of groups, cut where it crosses from one weight into the next
    for (size_t w = 0; w < W; w++) {
      const int64_t lo = std::max(begin, first[w]), hi = std::min(end, first[w + 1]);
      if (lo >= hi) continue;
      const int64_t N = qs[w].size(0), n = (lo - first[w]) * G, count = std::min((hi - first[w]) * G, N) - n;
      const int8_t* wp = qs[w].data_ptr<int8_t>();
      const float* sp = ss[w].data_ptr<float>();
      float* op = outs[w].data_ptr<float>();
      switch (M) {
        case 1: w8a8_rows<1>(x16, q8, rs, wp, sp, K, N, n, count, op); break;
        case 2: w8a8_rows<2>(x16, q8, rs, wp, sp, K, N, n, count, op); break;
        case 3: w8a8_rows<3>(x16, q8, rs, wp, sp, K, N, n, count, op); break;
        default: w8a8_rows<4>(x16, q8, rs, wp, sp, K, N, n, count, op); break;
      }
    }
  });
  return outs;
}

// The one-weight form (quantize.py's eager W8A8Linear).
at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  return w8a8_linears(x, {q}, {scale})[0];
}

// The operators' namespace: `loramux`; the tests build the same source for fewer instruction sets
// under other names (-DLORAMUX_NAMESPACE=...), to check the AVX2 and plain-loop paths on a CPU
// that has more. The indirection lets the name be a macro (TORCH_LIBRARY pastes its argument).
#ifndef LORAMUX_NAMESPACE
#define LORAMUX_NAMESPACE loramux
#endif
#define LORAMUX_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define LORAMUX_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

LORAMUX_LIBRARY(LORAMUX_NAMESPACE, m) {
  m.def("int8_linear(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)");
  m.def("w8a8_linear(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("w8a8_linears(Tensor x, Tensor[] q, Tensor[] scale) -> Tensor[]");
}
LORAMUX_LIBRARY_IMPL(LORAMUX_NAMESPACE, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("quantize_rows", &quantize_rows);
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("w8a8_linears", &w8a8_linears);
}
