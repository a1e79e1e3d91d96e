// Few-row linear products for decoding on x86-64 CPUs with AVX-512: y (M, N) = x (M, K) @ W (N, K)^T, M small.
//
// Decoding reads every weight once per token, so a token costs bytes / bandwidth. Each thread takes a contiguous
// band of W's rows and streams it once, row by row, so both cores read at once; x (M rows of K) stays in L1.
// Built and loaded by axiom/kernels/__init__.py (optional: the callers fall back to torch's own kernels where it
// cannot be built). Accumulation is float32 throughout.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {


inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// 16 weights from row r at column k, as float32
inline __m512 load_w(const float* r, int64_t k) { return _mm512_loadu_ps(r + k); }
inline __m512 load_w(const at::BFloat16* r, int64_t k) {  // bf16 -> fp32: the bf16 bits are the top half
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + k));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load_w(const int8_t* r, int64_t k) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + k))));
}

// One band [n0, n1) of output columns for M input rows (x already float32, contiguous (M, K); K % 16 == 0). Row by
// row, so each thread reads its band as one sequential stream (as ggml's dot products do): with 4 rows interleaved
// the bf16 product streamed 1.6x slower from DRAM (docs/benchmarks.md); 4 accumulators hide the FMA latency.
template <typename W, typename Y>
void band(const float* x, const W* w, const float* scale, Y* y, int64_t M, int64_t K, int64_t N, int64_t n0,
          int64_t n1) {
  for (int64_t n = n0; n < n1; n++) {
    const W* r = w + n * K;
    for (int64_t m = 0; m < M; m++) {
      const float* xm = x + m * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t k = 0;
      for (; k + 64 <= K; k += 64) {
        a0 = _mm512_fmadd_ps(load_w(r, k), _mm512_loadu_ps(xm + k), a0);
        a1 = _mm512_fmadd_ps(load_w(r, k + 16), _mm512_loadu_ps(xm + k + 16), a1);
        a2 = _mm512_fmadd_ps(load_w(r, k + 32), _mm512_loadu_ps(xm + k + 32), a2);
        a3 = _mm512_fmadd_ps(load_w(r, k + 48), _mm512_loadu_ps(xm + k + 48), a3);
      }
      for (; k < K; k += 16) a0 = _mm512_fmadd_ps(load_w(r, k), _mm512_loadu_ps(xm + k), a0);
      float sum = hsum(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
      y[m * N + n] = static_cast<Y>(scale ? sum * scale[n] : sum);
    }
  }
}

// bf16 x bf16 with the AVX512-BF16 dot product (32 products per instruction, float32 sums), where the CPU has it:
// the bf16 model's whole product, with no conversion of the weights. x bf16 (M, K), K % 32 == 0.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void band_dpbf16(const at::BFloat16* x, const at::BFloat16* w,
                                                                        float* y, int64_t M, int64_t K, int64_t N,
                                                                        int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n++) {
    const at::BFloat16* r = w + n * K;
    for (int64_t m = 0; m < M; m++) {
      const at::BFloat16* xm = x + m * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t k = 0;
      for (; k + 128 <= K; k += 128) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + k), (__m512bh)_mm512_loadu_si512(xm + k));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(r + k + 32), (__m512bh)_mm512_loadu_si512(xm + k + 32));
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(r + k + 64), (__m512bh)_mm512_loadu_si512(xm + k + 64));
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(r + k + 96), (__m512bh)_mm512_loadu_si512(xm + k + 96));
      }
      for (; k < K; k += 32)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + k), (__m512bh)_mm512_loadu_si512(xm + k));
      y[m * N + n] = hsum(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
  }
}

// int8 weights x 16-bit activations with the AVX512-VNNI word dot product (vpdpwssd: 32 products per instruction,
// int32 sums), where the CPU has it: converting int8 weights to float costs 3 instructions per 16 weights and made the
// int8 product compute-bound (11.7 GB/s per thread vs bf16's 20). Each x row is rounded to int16 with its own scale
// (max |x| / 32767): an error below 1/65534 of the row's largest entry, far under the bfloat16 rounding the
// activations already carry. Each int32 lane sums K / 32 products of at most 127 x 32767: no overflow for K <= 16384.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void band_int8_vnni(const int16_t* xq, const float* xs,
                                                                           const int8_t* w, const float* scale,
                                                                           float* y, int64_t M, int64_t K, int64_t N,
                                                                           int64_t n0, int64_t n1) {
  auto ldw = [](const int8_t* p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); };
  for (int64_t n = n0; n < n1; n++) {
    const int8_t* r = w + n * K;
    for (int64_t m = 0; m < M; m++) {
      const int16_t* xm = xq + m * K;
      __m512i a0 = _mm512_setzero_si512(), a1 = a0;
      int64_t k = 0;
      for (; k + 64 <= K; k += 64) {
        a0 = _mm512_dpwssd_epi32(a0, ldw(r + k), _mm512_loadu_si512(xm + k));
        a1 = _mm512_dpwssd_epi32(a1, ldw(r + k + 32), _mm512_loadu_si512(xm + k + 32));
      }
      if (k < K) a0 = _mm512_dpwssd_epi32(a0, ldw(r + k), _mm512_loadu_si512(xm + k));
      y[m * N + n] = static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1))) * xs[m] * scale[n];
    }
  }
}

template <typename W>
at::Tensor run(const at::Tensor& x, const W* w, const float* scale, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor yf = x.scalar_type() == at::kFloat ? y : at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  float* yp = yf.data_ptr<float>();
  // grain: bands of >= 64 rows, so a small product stays on one thread
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { band(xp, w, scale, yp, M, K, N, n0, n1); });
  if (!yf.is_same(y)) y.copy_(yf);
  return y;
}

void check(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "expected x (M, K) and w (N, K)");
  TORCH_CHECK(w.is_contiguous() && x.size(1) % 16 == 0, "w must be contiguous and K a multiple of 16");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "CPU tensors only");
}

// x float32 or bfloat16 (M, K); w of the same dtype (N, K) -> (M, N) in x's dtype
at::Tensor linear(const at::Tensor& x, const at::Tensor& w) {
  check(x, w);
  if (w.scalar_type() == at::kFloat) return run(x, w.data_ptr<float>(), nullptr, w.size(0));
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "w must be float32 or bfloat16");
  static const bool dpbf16 = __builtin_cpu_supports("avx512bf16");
  if (dpbf16 && x.scalar_type() == at::kBFloat16 && x.size(1) % 32 == 0) {
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    at::Tensor xc = x.contiguous();
    at::Tensor yf = at::empty({M, N}, x.options().dtype(at::kFloat));
    const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
    const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
    float* yp = yf.data_ptr<float>();
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { band_dpbf16(xp, wp, yp, M, K, N, n0, n1); });
    return yf.to(at::kBFloat16);
  }
  return run(x, w.data_ptr<at::BFloat16>(), nullptr, w.size(0));
}

// x float32 or bfloat16 (M, K); q int8 (N, K); scale float32 (N,) -> (x @ q^T) * scale, (M, N) in x's dtype
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  check(x, q);
  TORCH_CHECK(q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.numel() == q.size(0),
              "expected q int8 (N, K) and scale float32 (N,)");
  static const bool vnni = __builtin_cpu_supports("avx512vnni");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  if (!vnni || K % 32 != 0 || K > 16384) return run(x, q.data_ptr<int8_t>(), scale.data_ptr<float>(), N);
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor xs = xf.abs().amax(1).clamp_min(1e-30).div_(32767.0f);  // (M,) per-row scale
  at::Tensor xq = xf.div(xs.unsqueeze(1)).round_().to(at::kShort).contiguous();
  at::Tensor yf = at::empty({M, N}, x.options().dtype(at::kFloat));
  const int16_t* xp = xq.data_ptr<int16_t>();
  const float* sp = xs.data_ptr<float>();
  const int8_t* wp = q.data_ptr<int8_t>();
  const float* cp = scale.data_ptr<float>();
  float* yp = yf.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { band_int8_vnni(xp, sp, wp, cp, yp, M, K, N, n0, n1); });
  return x.scalar_type() == at::kFloat ? yf : yf.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(axiom_decode, m) {
  m.def("linear(Tensor x, Tensor w) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor q, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(axiom_decode, CPU, m) {
  m.impl("linear", &linear);
  m.impl("linear_int8", &linear_int8);
}
