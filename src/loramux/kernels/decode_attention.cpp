// Grouped-query attention of one query token per row over that row's cache, for the compiled
// decode step of a few rows (engine/graph.py). Written as two batched matmuls and a softmax,
// one decode step of the default model makes 60 matmul calls a token of H · D · L = 576 · L
// multiply-adds each (L the positions viewed, 64 to a few hundred): each call's set-up and
// thread start-up cost more than its work (benchmarks/results/step_profile_w8a8_kernel.json:
// aten::bmm). Here a layer is one call.
//
// For row s with query heads q (H, D) and its slot of the cache, keys and values (L, G, D) at
// stride S · G · D (the cache is positions-first, shared by the batch's slots): each head h of
// group g = h / (H / G) takes softmax over the positions l <= positions[s] of q_h · k_l / √D, then
// the weighted sum of those v_l, in fp32 as transformers' eager attention. Positions past a row's
// own are skipped rather than weighted 0, so nothing in them (a freed slot's or a later row's
// values) reaches the row; a position at or past L sees the whole view, as the step's mask
// `index <= position` does. Each row is computed alone, so its output does not depend on the batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

// Eight independent partial sums, which the compiler vectorises.
static inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

// q (S, H, D), keys and values (L, S, G, D), positions (S,): returns (S, H · D).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& positions) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 4 && values.sizes() == keys.sizes() && positions.dim() == 1,
              "decode_attention: q (S, H, D), keys and values (L, S, G, D), positions (S,)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat,
              "decode_attention: fp32 q, keys and values");
  TORCH_CHECK(q.device().is_cpu() && keys.device().is_cpu() && values.device().is_cpu() && positions.device().is_cpu(),
              "decode_attention: CPU tensors");
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2), L = keys.size(0), G = keys.size(2);
  TORCH_CHECK(keys.size(1) == S && keys.size(3) == D && positions.size(0) == S && G > 0 && H % G == 0,
              "decode_attention: shapes do not match");
  auto qc = q.contiguous();
  auto kc = keys.contiguous();  // the cache's first L positions: already contiguous, not copied
  auto vc = values.contiguous();
  auto pc = positions.to(at::kLong).contiguous();
  const int64_t* pp = pc.data_ptr<int64_t>();
  // a plain loop over the S positions: a tensor reduction here was an op dispatch per layer per step
  for (int64_t s = 0; s < S; s++) TORCH_CHECK(pp[s] >= 0, "decode_attention: negative position");
  auto out = at::zeros({S, H * D}, qc.options());
  if (S == 0 || H == 0 || L == 0) return out;
  const int64_t R = H / G;  // query heads per key/value head
  const float root = std::sqrt(static_cast<float>(D));
  const float* qp = qc.data_ptr<float>();
  const float* kp = kc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // one task per (row, key/value head), shared out among threads only where there are enough
  // tasks and work: a row of the default model has 3 tasks, which two threads split 2 to 1, so
  // the step waits for the thread with two while paying both threads' start-up
  // (docs/serving_cpu.md measures one thread against two)
  const int64_t grain = S * G >= 4 && L * R * D * S * G >= (int64_t{1} << 18) ? 1 : S * G;
  at::parallel_for(0, S * G, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t t = begin; t < end; t++) {
      const int64_t s = t / G, g = t % G;
      const int64_t n = std::min(pp[s], L - 1) + 1;  // visible positions
      scores.assign(R * n, 0.0f);
      const float* qh = qp + (s * H + g * R) * D;
      for (int64_t l = 0; l < n; l++) {
        const float* k = kp + ((l * S + s) * G + g) * D;
        for (int64_t r = 0; r < R; r++) scores[r * n + l] = dot(qh + r * D, k, D) / root;
      }
      for (int64_t r = 0; r < R; r++) {
        float* sc = scores.data() + r * n;
        const float top = *std::max_element(sc, sc + n);
        float sum = 0.0f;
        for (int64_t l = 0; l < n; l++) sum += (sc[l] = std::exp(sc[l] - top));
        for (int64_t l = 0; l < n; l++) sc[l] /= sum;
      }
      for (int64_t l = 0; l < n; l++) {
        const float* v = vp + ((l * S + s) * G + g) * D;
        for (int64_t r = 0; r < R; r++) {
          const float p = scores[r * n + l];
          float* o = op + s * H * D + (g * R + r) * D;
          for (int64_t d = 0; d < D; d++) o[d] += p * v[d];
        }
      }
    }
  });
  return out;
}

// The operator's namespace (int8_linear.cpp defines the library; this file adds to it).
#ifndef LORAMUX_NAMESPACE
#define LORAMUX_NAMESPACE loramux
#endif
#define LORAMUX_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define LORAMUX_FRAGMENT_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

LORAMUX_FRAGMENT(LORAMUX_NAMESPACE, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor positions) -> Tensor");
}
LORAMUX_FRAGMENT_IMPL(LORAMUX_NAMESPACE, CPU, m) { m.impl("decode_attention", &decode_attention); }
