// y = x · (q · diag(scale))ᵀ for a few fp32 rows x (M, K), int8 weights q (N, K) and one fp32
// scale per output channel (N): weight-only int8 decode (loramux/quantize.py). Below it,
// `quantize_rows`, the w8a8 base's row rounding for the compiled few-row step.
//
// Decode reads every weight once per token, so int8 reads a quarter of fp32's bytes. The
// kernel converts each 8-wide int8 chunk of a weight row to fp32 once and multiplies it into up
// to 4 rows of x; 8 output channels (one row of x) or 2 (more rows) are carried at once, so that
// 8 independent FMA chains hide the FMA latency. PyTorch's own CPU int8/int4 weight-only kernels
// (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) have no AVX2 path and run slower than fp32
// on AVX2-only CPUs (benchmarks/results/int8_linear.json). Without AVX2 and FMA a plain loop
// computes the same sums.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

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

// Each row of x (M, K) rounded to int8 with its own scale max|row| / 127, exactly as
// quantize.py's `quantize_rows` (the same fp32 division, rounding half to even): (q (M, K) int8,
// scale (M, 1)). An operator so that the compiled decode step computes the rounded rows once:
// written as tensor ops, Inductor recomputes them inside every output channel's sum.
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "quantize_rows: fp32 CPU x (M, K)");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  auto q = at::empty({M, K}, xc.options().dtype(at::kChar));
  auto scale = at::empty({M, 1}, xc.options());
  const float* xp = xc.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  for (int64_t i = 0; i < M; i++) {
    const float* row = xp + i * K;
    float amax = 0.0f;
    for (int64_t k = 0; k < K; k++) {
      const float a = std::fabs(row[k]);
      if (std::isnan(a) || a > amax) amax = a;  // a NaN propagates to the scale, as torch's amax
      if (std::isnan(amax)) break;
    }
    const float s = std::isnan(amax) ? amax : std::max(amax / 127.0f, std::numeric_limits<float>::min());
    sp[i] = s;
    for (int64_t k = 0; k < K; k++) {
      const float r = std::nearbyint(row[k] / s);
      // a NaN row's outputs are NaN through its scale whatever q holds; casting NaN is undefined
      qp[i * K + k] = std::isnan(r) ? 0 : static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
    }
  }
  return {q, scale};
}

TORCH_LIBRARY(loramux, m) {
  m.def("int8_linear(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(loramux, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("quantize_rows", &quantize_rows);
}
