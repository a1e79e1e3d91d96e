// Decoding on x86-64 CPUs with AVX-512: few-row linear products, y (M, N) = x (M, K) @ W (N, K)^T with M small (and
// float32 prompts of a few dozen rows), and the rest of a one-token step as single calls (decode_attention, rms_norm,
// silu_mul; axiom.infer.fast.DecodeBlock).
//
// Decoding reads every weight once per token, so a token costs bytes / bandwidth. Each thread takes a contiguous
// band of W's rows and streams it once, row by row, so both cores read at once; x (M rows of K) stays in L1.
// Built and loaded by axiom/infer/kernels/__init__.py (optional: the callers fall back to torch's own kernels where it
// cannot be built). Accumulation is float32 throughout.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

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
// every dtype streamed slower from DRAM (docs/benchmarks.md, "The kernels, per thread"); 4 accumulators hide the
// FMA latency.
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
                                                                        at::BFloat16* y, int64_t M, int64_t K,
                                                                        int64_t N, int64_t n0, int64_t n1) {
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
// int8 product compute-bound, slower than bf16's (docs/benchmarks.md, "The kernels, per thread"). Each x row is
// rounded to int16 with its own scale (max |x| / 32767): an error below 1/65534 of the row's largest entry, far under
// the bfloat16 rounding the activations already carry. Each int32 lane sums K / 32 products of at most 127 x 32767: no overflow for K <= 16384.
template <typename Y>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void band_int8_vnni(const int16_t* xq, const float* xs,
                                                                           const int8_t* w, const float* scale, Y* y,
                                                                           int64_t M, int64_t K, int64_t N, int64_t n0,
                                                                           int64_t n1) {
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
      y[m * N + n] = static_cast<Y>(static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1))) * xs[m] * scale[n]);
    }
  }
}

// float32 products of more rows than decoding's (a prompt of 17 to 96 rows, axiom.infer.fast.TILE_ROWS) are
// compute-bound: each step of 16 columns loads 6 weight rows and 4 x rows into registers and makes 24 fused
// multiply-adds, one per pair (a 4 x 6 tile of dot products over K, summed across lanes once at the end). oneDNN's
// linear on the plain (N, K) weight copies each block into its own layout first; the tiles read the weight as it lies:
// faster than oneDNN up to 96 rows (docs/benchmarks.md, "Float32 prompts in register tiles"). While a tile's first
// 4 x rows pass over its weight rows, the next tile's rows are prefetched into L2, so that its first rows do not wait
// on memory.
template <int MR, int NR, bool PREFETCH = false>
inline void tile(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t m, int64_t n) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
  const float* xr = x + m * K;
  const float* wr = w + n * K;
  for (int64_t k = 0; k < K; k += 16) {
    __m512 wv[NR];
    for (int j = 0; j < NR; j++) wv[j] = _mm512_loadu_ps(wr + j * K + k);
    if constexpr (PREFETCH)
      for (int j = 0; j < NR; j++) _mm_prefetch(reinterpret_cast<const char*>(wr + (NR + j) * K + k), _MM_HINT_T1);
    for (int i = 0; i < MR; i++) {
      const __m512 xv = _mm512_loadu_ps(xr + i * K + k);
      for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NR; j++) y[(m + i) * N + n + j] = hsum(acc[i][j]);
}

// Columns [n, n + NR) for all M rows: tiles of 4 rows, then the 1-3 rows left.
template <int NR>
void tile_columns(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n) {
  int64_t m = 0;
  if (M >= 4 && n + 2 * NR <= N) {  // the next tile's rows exist: prefetch them
    tile<4, NR, true>(x, w, y, K, N, 0, n);
    m = 4;
  }
  for (; m + 4 <= M; m += 4) tile<4, NR>(x, w, y, K, N, m, n);
  switch (M - m) {
    case 3: tile<3, NR>(x, w, y, K, N, m, n); break;
    case 2: tile<2, NR>(x, w, y, K, N, m, n); break;
    case 1: tile<1, NR>(x, w, y, K, N, m, n); break;
  }
}

at::Tensor tiled(const at::Tensor& x_in, const at::Tensor& w) {
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  constexpr int NR = 6;
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N / NR, 8, [&](int64_t t0, int64_t t1) {  // bands of >= 8 tiles of columns per thread
    for (int64_t t = t0; t < t1; t++) tile_columns<NR>(xp, wp, yp, M, K, N, t * NR);
  });
  for (int64_t n = N / NR * NR; n < N; n++) tile_columns<1>(xp, wp, yp, M, K, N, n);
  return y;
}

template <typename W>
at::Tensor run(const at::Tensor& x, const W* w, const float* scale, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = xf.data_ptr<float>();
  // grain: bands of >= 64 rows, so a small product stays on one thread
  auto bands = [&](auto* yp) {
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { band(xp, w, scale, yp, M, K, N, n0, n1); });
  };
  if (y.scalar_type() == at::kFloat) bands(y.data_ptr<float>());
  else bands(y.data_ptr<at::BFloat16>());
  return y;
}

void check(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "expected x (M, K) and w (N, K)");
  TORCH_CHECK(w.is_contiguous() && x.size(1) % 16 == 0, "w must be contiguous and K a multiple of 16");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "CPU tensors only");
}

// x float32 or bfloat16 (M, K); w of the same dtype (N, K) -> (M, N) in x's dtype. Up to 16 rows (decoding) stream
// the weight; more float32 rows take the register tiles.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w) {
  check(x, w);
  if (w.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && x.size(0) > 16) return tiled(x, w);
  if (w.scalar_type() == at::kFloat) return run(x, w.data_ptr<float>(), nullptr, w.size(0));
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "w must be float32 or bfloat16");
  static const bool dpbf16 = __builtin_cpu_supports("avx512bf16");
  if (dpbf16 && x.scalar_type() == at::kBFloat16 && x.size(1) % 32 == 0) {
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty({M, N}, x.options());
    const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
    const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
    at::BFloat16* yp = y.data_ptr<at::BFloat16>();
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { band_dpbf16(xp, wp, yp, M, K, N, n0, n1); });
    return y;
  }
  return run(x, w.data_ptr<at::BFloat16>(), nullptr, w.size(0));
}

// Each row of x (M, K) rounded to int16 with its own scale xs[m] = max |x[m]| / 32767 (K % 16 == 0).
void round_rows_to_int16(const float* x, int64_t M, int64_t K, int16_t* xq, float* xs) {
  for (int64_t m = 0; m < M; m++) {
    const float* row = x + m * K;
    __m512 amax = _mm512_set1_ps(1e-30f);
    for (int64_t k = 0; k < K; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
    xs[m] = _mm512_reduce_max_ps(amax) / 32767.0f;
    const __m512 inv = _mm512_set1_ps(1.0f / xs[m]);
    for (int64_t k = 0; k < K; k += 16)  // rounded to nearest, saturated to int16
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + m * K + k),
                          _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + k), inv))));
  }
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
  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kShort));
  std::vector<float> xs(M);
  round_rows_to_int16(xf.data_ptr<float>(), M, K, xq.data_ptr<int16_t>(), xs.data());
  const int16_t* xqp = xq.data_ptr<int16_t>();
  at::Tensor y = at::empty({M, N}, x.options());
  const float* sp = xs.data();
  const int8_t* wp = q.data_ptr<int8_t>();
  const float* cp = scale.data_ptr<float>();
  auto bands = [&](auto* yp) {
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { band_int8_vnni(xqp, sp, wp, cp, yp, M, K, N, n0, n1); });
  };
  if (y.scalar_type() == at::kFloat) bands(y.data_ptr<float>());
  else bands(y.data_ptr<at::BFloat16>());
  return y;
}


// e^x for x <= 0 (scores less their maximum), 16 at a time: 2^n * e^r with n = round(x / ln 2) and a degree-6
// Taylor polynomial for |r| <= ln(2) / 2 (relative error ~1e-7, as libm's expf).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  // e^-87 ~ 1.6e-38: a zero weight either way
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // x - n ln 2, ln 2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// One decoding step of one layer's attention for B rows, each at its own position: RoPE (rotate-half) on the new
// token's query and key heads, its key and value written into the row's next cache slot positions[b], and its query
// heads attending over the row's positions[b] + 1 filled slots. qkv (B, (H + 2 Hkv) D) as the fused projection gives
// it; keys and values (B, Hkv, L, D) this layer's cache (last dim contiguous); cos and sin (1 or B, D) the rotation at
// each row's position, in qkv's dtype. Returns (B, H D). Each (row, kv head) reads its cached keys and values once
// for the H / Hkv query heads that share them (grouped-query attention); products and softmax in float32. SDPA's
// CPU kernels take 50-900 us per call for one query in bfloat16 (a flash kernel made for many queries).
template <typename T>
void attend(const at::Tensor& qkv, at::Tensor& keys, at::Tensor& values, const int64_t* pos, const at::Tensor& cos,
            const at::Tensor& sin, double scale, at::Tensor& out) {
  const int64_t B = qkv.size(0), Hkv = keys.size(1), D = keys.size(3), H = qkv.size(1) / D - 2 * Hkv, G = H / Hkv;
  const int64_t half = D / 2, kb = keys.stride(0), kh = keys.stride(1), ks = keys.stride(2);
  const int64_t vb = values.stride(0), vh = values.stride(1), vs = values.stride(2);
  const T* in = qkv.data_ptr<T>();
  T* kp = keys.data_ptr<T>();
  T* vp = values.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> q(G * D), scores, acc(G * D);
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / Hkv, h = i % Hkv, n = pos[b] + 1;
      const T* row = in + b * qkv.size(1);
      const T* c = cos.data_ptr<T>() + (cos.size(0) == 1 ? 0 : b * D);
      const T* sn = sin.data_ptr<T>() + (sin.size(0) == 1 ? 0 : b * D);
      auto rope = [&](const T* x, int64_t d) {  // x * cos + rotate_half(x) * sin at dim d
        const float rotated = d < half ? -static_cast<float>(x[d + half]) : static_cast<float>(x[d - half]);
        return static_cast<float>(x[d]) * static_cast<float>(c[d]) + rotated * static_cast<float>(sn[d]);
      };
      for (int64_t g = 0; g < G; g++)
        for (int64_t d = 0; d < D; d++) q[g * D + d] = static_cast<float>(static_cast<T>(rope(row + (h * G + g) * D, d))) * scale;
      T* key_slot = kp + b * kb + h * kh + pos[b] * ks;
      T* value_slot = vp + b * vb + h * vh + pos[b] * vs;
      for (int64_t d = 0; d < D; d++) {
        key_slot[d] = static_cast<T>(rope(row + (H + h) * D, d));
        value_slot[d] = row[(H + Hkv + h) * D + d];
      }
      scores.resize(G * n);
      const T* k_rows = kp + b * kb + h * kh;
      for (int64_t s = 0; s < n; s++) {
        for (int64_t g = 0; g < G; g++) {
          __m512 a = _mm512_setzero_ps();
          for (int64_t d = 0; d < D; d += 16) a = _mm512_fmadd_ps(load_w(k_rows + s * ks, d), _mm512_loadu_ps(&q[g * D + d]), a);
          scores[g * n + s] = hsum(a);
        }
      }
      for (int64_t g = 0; g < G; g++) {  // softmax over the row's n scores
        float* sc = &scores[g * n];
        const float top = *std::max_element(sc, sc + n);
        float total = 0.0f;
        int64_t s = 0;
        for (; s + 16 <= n; s += 16) {
          __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(sc + s), _mm512_set1_ps(top)));
          _mm512_storeu_ps(sc + s, e);
          total += hsum(e);
        }
        for (; s < n; s++) total += (sc[s] = std::exp(sc[s] - top));
        for (s = 0; s < n; s++) sc[s] /= total;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      const T* v_rows = vp + b * vb + h * vh;
      for (int64_t s = 0; s < n; s++) {  // weighted sum of the values
        for (int64_t d = 0; d < D; d += 16) {
          const __m512 v = load_w(v_rows + s * vs, d);
          for (int64_t g = 0; g < G; g++) {
            float* a = &acc[g * D + d];
            _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(scores[g * n + s]), v, _mm512_loadu_ps(a)));
          }
        }
      }
      for (int64_t g = 0; g < G; g++)
        for (int64_t d = 0; d < D; d++) op[b * H * D + (h * G + g) * D + d] = static_cast<T>(acc[g * D + d]);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& qkv_in, at::Tensor keys, at::Tensor values, at::IntArrayRef positions,
                            const at::Tensor& cos, const at::Tensor& sin, double scale) {
  const at::Tensor qkv = qkv_in.contiguous();
  TORCH_CHECK(keys.dim() == 4 && values.sizes() == keys.sizes() && qkv.dim() == 2 && qkv.size(0) == keys.size(0),
              "expected qkv (B, (H + 2 Hkv) D) and keys, values (B, Hkv, L, D)");
  const int64_t B = qkv.size(0), Hkv = keys.size(1), D = keys.size(3);
  TORCH_CHECK(D % 16 == 0 && qkv.size(1) % D == 0 && (qkv.size(1) / D - 2 * Hkv) % Hkv == 0 &&
                  qkv.size(1) / D > 2 * Hkv, "qkv's width must be (H + 2 Hkv) D with H a multiple of Hkv, D of 16");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&keys, &values, &cos, &sin})
    TORCH_CHECK(t->scalar_type() == qkv.scalar_type() && t->device().is_cpu(), "every tensor in qkv's dtype, on the CPU");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && keys.stride(3) == 1 &&
                  values.stride(3) == 1 && cos.size(-1) == D && (cos.numel() == D || cos.numel() == B * D) &&
                  sin.sizes() == cos.sizes(), "cos and sin contiguous, (1 or B, D); caches with contiguous rows");
  TORCH_CHECK(static_cast<int64_t>(positions.size()) == B, "positions must have one entry per row");
  for (int64_t p : positions) TORCH_CHECK(p >= 0 && p < keys.size(2), "positions must lie in 0..L-1");
  at::Tensor out = at::empty({B, qkv.size(1) - 2 * Hkv * D}, qkv.options());
  if (qkv.scalar_type() == at::kFloat) attend<float>(qkv, keys, values, positions.data(), cos, sin, scale, out);
  else attend<at::BFloat16>(qkv, keys, values, positions.data(), cos, sin, scale, out);
  return out;
}

// RMSNorm of x (M, d) with gain w (d,), as axiom.model.transformer.RMSNorm rounds it: normalised in float32, cast to
// x's dtype, then scaled by the gain. One call instead of the module's eight.
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w, double eps) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1) && x.device().is_cpu() &&
                  w.scalar_type() == x.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "expected x (M, d) and w (d,), both float32 or both bfloat16, on the CPU");
  at::Tensor out = at::empty_like(x);
  const int64_t M = x.size(0), d = x.size(1);
  auto norm = [&](auto* xp, auto* wp, auto* yp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    for (int64_t m = 0; m < M; m++) {
      float sum = 0.0f;
      for (int64_t i = 0; i < d; i++) sum += static_cast<float>(xp[m * d + i]) * static_cast<float>(xp[m * d + i]);
      const float r = 1.0f / std::sqrt(sum / d + static_cast<float>(eps));
      for (int64_t i = 0; i < d; i++)
        yp[m * d + i] = static_cast<T>(static_cast<float>(static_cast<T>(static_cast<float>(xp[m * d + i]) * r)) *
                                       static_cast<float>(wp[i]));
    }
  };
  if (x.scalar_type() == at::kFloat) norm(x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>());
  else norm(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
  return out;
}

// SwiGLU's gate: gu (M, 2F) = [gate | up] -> silu(gate) * up (M, F), as F.silu(gate) * up rounds it; one call, not three.
at::Tensor silu_mul(const at::Tensor& gu_in) {
  const at::Tensor gu = gu_in.contiguous();
  TORCH_CHECK(gu.dim() == 2 && gu.size(1) % 2 == 0 && gu.device().is_cpu() &&
                  (gu.scalar_type() == at::kFloat || gu.scalar_type() == at::kBFloat16),
              "expected gu (M, 2F), float32 or bfloat16, on the CPU");
  const int64_t M = gu.size(0), F = gu.size(1) / 2;
  at::Tensor out = at::empty({M, F}, gu.options());
  auto run = [&](auto* in, auto* y) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(in)>>;
    std::vector<float> gate(F);
    for (int64_t m = 0; m < M; m++) {
      const T* g = in + m * 2 * F;
      int64_t f = 0;
      for (; f + 16 <= F; f += 16) {  // silu(x) = x * sigmoid(x), from e^-|x| so nothing overflows
        const __m512 x = load_w(g, f);
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
        const __m512 one = _mm512_set1_ps(1.0f);
        const __m512 sig = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ),
                                                _mm512_div_ps(e, _mm512_add_ps(one, e)), _mm512_div_ps(one, _mm512_add_ps(one, e)));
        _mm512_storeu_ps(&gate[f], _mm512_mul_ps(x, sig));
      }
      for (; f < F; f++) gate[f] = static_cast<float>(g[f]) / (1.0f + std::exp(-static_cast<float>(g[f])));
      for (f = 0; f < F; f++)
        y[m * F + f] = static_cast<T>(static_cast<float>(static_cast<T>(gate[f])) * static_cast<float>(g[F + f]));
    }
  };
  if (gu.scalar_type() == at::kFloat) run(gu.data_ptr<float>(), out.data_ptr<float>());
  else run(gu.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
  return out;
}

}  // namespace

TORCH_LIBRARY(axiom_decode, m) {
  m.def("linear(Tensor x, Tensor w) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("decode_attention(Tensor qkv, Tensor(a!) keys, Tensor(b!) values, int[] positions, Tensor cos, Tensor sin, "
        "float scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("silu_mul(Tensor gu) -> Tensor");
}

TORCH_LIBRARY_IMPL(axiom_decode, CPU, m) {
  m.impl("linear", &linear);
  m.impl("linear_int8", &linear_int8);
  m.impl("decode_attention", &decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
}
