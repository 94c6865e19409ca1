// One token times a weight matrix on an AVX-512 CPU: y = x @ W.T + b for x of a few rows.
// Built by cpu_gemv.py (torch.utils.cpp_extension) the first time a CPU engine needs it;
// cpu_gemv.py explains when it runs and why. Three ops, one per weight dtype:
//
//   gemv_fp32(x (M, K) f32, W (O, K) f32, b (O,) f32?)                 -> (M, O) f32
//   gemv_bf16(x (M, K) f32|bf16, W (O, K) bf16, b (O,) f32?)           -> (M, O) x's dtype
//   gemv_int8(x (M, K) f32|bf16, q (O, K) s8, scale (O,) f32,
//             rowsum (O,) s32, b (O,) f32?)                            -> (M, O) x's dtype
//
// W stays in its plain row-major (O, K) layout: R consecutive rows are one contiguous stretch
// of memory, so a block of R rows read side by side is still a front-to-back stream that the
// hardware prefetcher follows, and no repacking is needed (the fp32 head can read wte itself).
// Each row keeps its own vector accumulator, and the R rows of a block give R independent add
// chains; at M = 1 one 64-byte load feeds one FMA / dot-product instruction, so memory, not
// arithmetic, is the limit. Rows are split between threads with at::parallel_for.
//
// bf16: x is rounded to bf16 once per call (llama.cpp does the same), then vdpbf16ps
// (_mm512_dpbf16_ps) multiplies 32 bf16 pairs and adds them, in pairs, into 16 fp32 lanes.
// int8: x is quantized per row, symmetric (scale = max|x| / 127, round half up, as
// linear.Int8Linear does) and shifted by +128 to uint8, because vpdpbusd (_mm512_dpbusd_epi32)
// multiplies unsigned by signed bytes and adds groups of 4 into int32 lanes. The shift adds
// 128 * sum_k q[o, k] to every result, which we subtract exactly with the precomputed row sums.
// Products are at most 255 * 127 and K <= 2^16 terms fit int32 easily, so the int32 sum is exact.
//
// K need not be a multiple of the vector width: the last partial vector of each row is read
// with a masked load (zeros beyond K), and x's converted copy is zero-padded to match.
//
// M = rows of x   K = in features   O = out features   R = rows of W per block
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t R = 4;          // rows of W per block: 4 add chains, 4 streams side by side
constexpr int64_t GRAIN = 16;
#ifndef PF_BYTES
#define PF_BYTES 4096
#endif
constexpr int64_t PF = PF_BYTES;  // software prefetch distance in bytes
inline void pf(const void* p) { _mm_prefetch((const char*)p + PF, _MM_HINT_T0); }     // blocks per thread at least (64 rows): smaller splits cost more than they save

// Run body(o0, o1) over row ranges [o0, o1) of W, split between threads in whole blocks.
template <typename F>
void over_rows(int64_t O, const F& body) {
  const int64_t blocks = (O + R - 1) / R;
  at::parallel_for(0, blocks, GRAIN, [&](int64_t b0, int64_t b1) {
    body(b0 * R, std::min(b1 * R, O));
  });
}

// y[o] = sum over the 16 lanes of acc, then the row's scale and bias.
inline float finish(__m512 acc, float scale, const float* bias, int64_t o) {
  float y = _mm512_reduce_add_ps(acc) * scale;
  return bias ? y + bias[o] : y;
}

void check(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "gemv: x (M, K) and W (O, K) must agree on K, got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), "gemv: W must be a contiguous CPU tensor");
  TORCH_CHECK(!b.has_value() || (b->scalar_type() == at::kFloat && b->is_contiguous() && b->numel() == w.size(0)),
              "gemv: bias must be a contiguous float32 (O,) tensor");
}

// ---- fp32 -------------------------------------------------------------------------------
void rows_fp32(const float* x, const float* w, const float* bias, float* y, int64_t K, int64_t o0, int64_t o1) {
  const int64_t Kv = K / 16 * 16;
  const __mmask16 tail = (__mmask16)((1u << (K - Kv)) - 1);
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    const float* w0 = w + o * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < Kv; k += 16) {
      __m512 xv = _mm512_loadu_ps(x + k);
      if (PF) { pf(w0 + k); pf(w0 + K + k); pf(w0 + 2 * K + k); pf(w0 + 3 * K + k); }
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + k), xv, a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + K + k), xv, a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + 2 * K + k), xv, a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + 3 * K + k), xv, a3);
    }
    if (tail) {
      __m512 xv = _mm512_maskz_loadu_ps(tail, x + Kv);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w0 + Kv), xv, a0);
      a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w0 + K + Kv), xv, a1);
      a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w0 + 2 * K + Kv), xv, a2);
      a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w0 + 3 * K + Kv), xv, a3);
    }
    y[o] = finish(a0, 1.f, bias, o); y[o + 1] = finish(a1, 1.f, bias, o + 1);
    y[o + 2] = finish(a2, 1.f, bias, o + 2); y[o + 3] = finish(a3, 1.f, bias, o + 3);
  }
  for (; o < o1; ++o) {                                    // the last O % R rows, one at a time
    const float* wr = w + o * K;
    __m512 a = _mm512_setzero_ps();
    for (int64_t k = 0; k < Kv; k += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(wr + k), _mm512_loadu_ps(x + k), a);
    if (tail) a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, wr + Kv), _mm512_maskz_loadu_ps(tail, x + Kv), a);
    y[o] = finish(a, 1.f, bias, o);
  }
}

at::Tensor gemv_fp32(const at::Tensor& x_in, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  check(x_in, w, b);
  TORCH_CHECK(w.scalar_type() == at::kFloat && x_in.scalar_type() == at::kFloat, "gemv_fp32: float32 x and W");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), O = w.size(0);
  at::Tensor y = at::empty({M, O}, x.options());
  const float* bias = b.has_value() ? b->data_ptr<float>() : nullptr;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x.data_ptr<float>() + m * K;
    float* yr = y.data_ptr<float>() + m * O;
    over_rows(O, [&](int64_t o0, int64_t o1) { rows_fp32(xr, w.data_ptr<float>(), bias, yr, K, o0, o1); });
  }
  return y;
}

// ---- bf16 -------------------------------------------------------------------------------
// x (K,) float -> bf16, zero-padded to Kp = K rounded up to 32 (one dpbf16 takes 32 values).
std::vector<uint16_t> to_bf16(const float* x, int64_t K) {
  const int64_t Kp = (K + 31) / 32 * 32;
  std::vector<float> xf(Kp, 0.f);
  std::copy(x, x + K, xf.begin());
  std::vector<uint16_t> xb(Kp);
  for (int64_t k = 0; k < Kp; k += 32) {                  // round to nearest even, as torch's .bfloat16()
    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(&xf[k + 16]), _mm512_loadu_ps(&xf[k]));
    _mm512_storeu_si512(&xb[k], (__m512i)v);
  }
  return xb;
}

void rows_bf16(const uint16_t* x, const uint16_t* w, const float* bias, float* y, int64_t K, int64_t o0, int64_t o1) {
  const int64_t Kv = K / 32 * 32;
  const __mmask32 tail = (__mmask32)((1ull << (K - Kv)) - 1);
  auto ld = [](const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); };
  auto ldt = [tail](const uint16_t* p) { return (__m512bh)_mm512_maskz_loadu_epi16(tail, p); };
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    const uint16_t* w0 = w + o * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < Kv; k += 32) {
      __m512bh xv = ld(x + k);
      if (PF) { pf(w0 + k); pf(w0 + K + k); pf(w0 + 2 * K + k); pf(w0 + 3 * K + k); }
      a0 = _mm512_dpbf16_ps(a0, ld(w0 + k), xv);
      a1 = _mm512_dpbf16_ps(a1, ld(w0 + K + k), xv);
      a2 = _mm512_dpbf16_ps(a2, ld(w0 + 2 * K + k), xv);
      a3 = _mm512_dpbf16_ps(a3, ld(w0 + 3 * K + k), xv);
    }
    if (tail) {
      __m512bh xv = ld(x + Kv);                            // zero-padded past K
      a0 = _mm512_dpbf16_ps(a0, ldt(w0 + Kv), xv);
      a1 = _mm512_dpbf16_ps(a1, ldt(w0 + K + Kv), xv);
      a2 = _mm512_dpbf16_ps(a2, ldt(w0 + 2 * K + Kv), xv);
      a3 = _mm512_dpbf16_ps(a3, ldt(w0 + 3 * K + Kv), xv);
    }
    y[o] = finish(a0, 1.f, bias, o); y[o + 1] = finish(a1, 1.f, bias, o + 1);
    y[o + 2] = finish(a2, 1.f, bias, o + 2); y[o + 3] = finish(a3, 1.f, bias, o + 3);
  }
  for (; o < o1; ++o) {
    const uint16_t* wr = w + o * K;
    __m512 a = _mm512_setzero_ps();
    for (int64_t k = 0; k < Kv; k += 32) a = _mm512_dpbf16_ps(a, ld(wr + k), ld(x + k));
    if (tail) a = _mm512_dpbf16_ps(a, ldt(wr + Kv), ld(x + Kv));
    y[o] = finish(a, 1.f, bias, o);
  }
}

at::Tensor gemv_bf16(const at::Tensor& x_in, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  check(x_in, w, b);
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "gemv_bf16: bfloat16 W");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), O = w.size(0);
  at::Tensor y = at::empty({M, O}, x.options());
  const float* bias = b.has_value() ? b->data_ptr<float>() : nullptr;
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  for (int64_t m = 0; m < M; ++m) {
    std::vector<uint16_t> xb = to_bf16(x.data_ptr<float>() + m * K, K);
    float* yr = y.data_ptr<float>() + m * O;
    over_rows(O, [&](int64_t o0, int64_t o1) { rows_bf16(xb.data(), wp, bias, yr, K, o0, o1); });
  }
  return y.to(x_in.scalar_type());
}

// ---- int8 -------------------------------------------------------------------------------
// x (K,) float -> uint8 (x / scale rounded, + 128), zero-padded to a multiple of 64; returns
// the row's scale (max|x| / 127).
float quantize_row(const float* x, int64_t K, std::vector<uint8_t>& xq) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  amax = std::max(amax, 1e-12f);
  const float inv = 127.f / amax;
  xq.assign((K + 63) / 64 * 64, 128);
  // 128.5 + x * 127 / amax lies in [1.5, 255.5]: truncating rounds half up.
  for (int64_t k = 0; k < K; ++k) xq[k] = (uint8_t)(int)(128.5f + x[k] * inv);
  return amax / 127.f;
}

void rows_int8(const uint8_t* x, const int8_t* q, const float* scale, const int32_t* rowsum, float xs,
               const float* bias, float* y, int64_t K, int64_t o0, int64_t o1) {
  const int64_t Kv = K / 64 * 64;
  const __mmask64 tail = K - Kv ? (__mmask64)((~0ull) >> (64 - (K - Kv))) : 0;
  auto ld = [](const void* p) { return _mm512_loadu_si512(p); };
  auto ldt = [tail](const int8_t* p) { return _mm512_maskz_loadu_epi8(tail, p); };
  // Row o: (int32 sum - 128 * rowsum[o]) * scale[o] * xs (+ bias).
  auto done = [&](__m512i acc, int64_t o) {
    float v = (float)(_mm512_reduce_add_epi32(acc) - 128 * rowsum[o]) * (scale[o] * xs);
    y[o] = bias ? v + bias[o] : v;
  };
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    const int8_t* w0 = q + o * K;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < Kv; k += 64) {
      __m512i xv = ld(x + k);
      if (PF) { pf(w0 + k); pf(w0 + K + k); pf(w0 + 2 * K + k); pf(w0 + 3 * K + k); }
      a0 = _mm512_dpbusd_epi32(a0, xv, ld(w0 + k));
      a1 = _mm512_dpbusd_epi32(a1, xv, ld(w0 + K + k));
      a2 = _mm512_dpbusd_epi32(a2, xv, ld(w0 + 2 * K + k));
      a3 = _mm512_dpbusd_epi32(a3, xv, ld(w0 + 3 * K + k));
    }
    if (tail) {                                            // masked weights are 0: x's padding adds nothing
      __m512i xv = ld(x + Kv);
      a0 = _mm512_dpbusd_epi32(a0, xv, ldt(w0 + Kv));
      a1 = _mm512_dpbusd_epi32(a1, xv, ldt(w0 + K + Kv));
      a2 = _mm512_dpbusd_epi32(a2, xv, ldt(w0 + 2 * K + Kv));
      a3 = _mm512_dpbusd_epi32(a3, xv, ldt(w0 + 3 * K + Kv));
    }
    done(a0, o); done(a1, o + 1); done(a2, o + 2); done(a3, o + 3);
  }
  for (; o < o1; ++o) {
    const int8_t* wr = q + o * K;
    __m512i a = _mm512_setzero_si512();
    for (int64_t k = 0; k < Kv; k += 64) a = _mm512_dpbusd_epi32(a, ld(x + k), ld(wr + k));
    if (tail) a = _mm512_dpbusd_epi32(a, ld(x + Kv), ldt(wr + Kv));
    done(a, o);
  }
}

at::Tensor gemv_int8(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& rowsum,
                     const c10::optional<at::Tensor>& b) {
  check(x_in, q, b);
  TORCH_CHECK(q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat && rowsum.scalar_type() == at::kInt,
              "gemv_int8: int8 q, float32 scale, int32 rowsum");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), O = q.size(0);
  at::Tensor y = at::empty({M, O}, x.options());
  const float* bias = b.has_value() ? b->data_ptr<float>() : nullptr;
  std::vector<uint8_t> xq;
  for (int64_t m = 0; m < M; ++m) {
    const float xs = quantize_row(x.data_ptr<float>() + m * K, K, xq);
    float* yr = y.data_ptr<float>() + m * O;
    over_rows(O, [&](int64_t o0, int64_t o1) {
      rows_int8(xq.data(), q.data_ptr<int8_t>(), scale.data_ptr<float>(), rowsum.data_ptr<int32_t>(), xs, bias, yr,
                K, o0, o1);
    });
  }
  return y.to(x_in.scalar_type());
}

}  // namespace

// Registered as torch ops (torch.ops.nanoserve_cpu.*) so that torch.compile can keep them as
// opaque calls; cpu_gemv.py gives them their shape functions ("fake" kernels).
TORCH_LIBRARY(nanoserve_cpu, m) {
  m.def("gemv_fp32(Tensor x, Tensor w, Tensor? b) -> Tensor");
  m.def("gemv_bf16(Tensor x, Tensor w, Tensor? b) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor q, Tensor scale, Tensor rowsum, Tensor? b) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanoserve_cpu, CPU, m) {
  m.impl("gemv_fp32", gemv_fp32);
  m.impl("gemv_bf16", gemv_bf16);
  m.impl("gemv_int8", gemv_int8);
}
