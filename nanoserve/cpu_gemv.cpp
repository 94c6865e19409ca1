// A few tokens times a weight matrix on an AVX-512 CPU: y = x @ W.T + b for x of M = 1..8 rows
// (one decode step of up to 8 sequences). Built by cpu_gemv.py (torch.utils.cpp_extension)
// the first time a CPU engine needs it; cpu_gemv.py explains when it runs and why. Three ops,
// one per weight dtype:
//
//   gemv_fp32(x (M, K) f32,      Wp f32,  O, b (O,) f32?)                        -> (M, O) f32
//   gemv_bf16(x (M, K) f32|bf16, Wp bf16, O, b (O,) f32?)                        -> (M, O) x's dtype
//   gemv_int8(x (M, K) f32|bf16, Wp s8,   O, scale (O,) f32, rowsum (O,) s32, b) -> (M, O) x's dtype
//
// Layout. Wp is W (O, K) repacked once, at load, to (O/16, K/G, 16, G) (cpu_gemv.pack): for
// each block of 16 output rows, the G consecutive weights of each row for one group of G
// inputs lie side by side, 64 bytes per group, one AVX-512 vector. G is what one lane of the
// dot-product instruction consumes: 1 float (vfmadd), 2 bf16 (vdpbf16ps), 4 int8 (vpdpbusd).
// So a block is one contiguous stretch of memory read front to back (the hardware prefetcher's
// best case: 1.4-2x the rate of reading 4 rows of plain W side by side, which we tried first),
// each vector load feeds one instruction, and each lane ends holding one output: no horizontal
// sums. O and K are padded with zero weights to multiples of 16 and G.
//
// Blocks are split between threads with at::parallel_for (compiled with -fopenmp, so it uses
// torch's OpenMP threads; without the flag it silently runs on one). Each thread reads two
// blocks at a time, from the two halves of its range: two streams in flight per core read
// 3-15% faster here than one (docs/bench/2026-11-30-cpu-gemv/two_streams.txt). Each block
// keeps two accumulators (even and odd groups), four add chains in all, enough to hide the
// instructions' latency; a leftover block runs alone with four.
//
// bf16: x is rounded to bf16 once per call (llama.cpp does the same); vdpbf16ps multiplies
// bf16 pairs and adds both products to an fp32 lane.
// int8: x is quantized per call, symmetric (scale = max|x| / 127, rounded half up, as
// linear.Int8Linear does), and shifted by +128 to uint8, because vpdpbusd multiplies unsigned
// by signed bytes (adding 4 products to an int32 lane). The shift adds 128 * sum_k q[o, k] to
// output o, which we subtract exactly with the precomputed row sums: |sums| < 255 * 127 * K,
// so int32 is exact for K < 66,000.
//
// O = out features   K = in features   G = inputs per lane per instruction   KG = ceil(K / G)
#include "cpu_gemv.h"

#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// One weight dtype: the lane type of x as the instruction takes it (X: G inputs packed in
// 32 bits, or one float), the accumulator, and one multiply-add of 64 bytes of weights.
struct Fp32 {
  using W = float; using X = float; using Acc = __m512; using Vec = __m512;
  static Acc zero() { return _mm512_setzero_ps(); }
  static Vec load(const W* w) { return _mm512_loadu_ps(w); }
  static Acc fma(Acc a, Vec w, X x) { return _mm512_fmadd_ps(w, _mm512_set1_ps(x), a); }
  static Acc dot(Acc a, const W* w, X x) { return fma(a, load(w), x); }
  static Acc add(Acc a, Acc b) { return _mm512_add_ps(a, b); }
};
struct Bf16 {
  using W = uint16_t; using X = int32_t; using Acc = __m512; using Vec = __m512i;   // X: 2 bf16 of x
  static Acc zero() { return _mm512_setzero_ps(); }
  static Vec load(const W* w) { return _mm512_loadu_si512(w); }
  static Acc fma(Acc a, Vec w, X x) { return _mm512_dpbf16_ps(a, (__m512bh)w, (__m512bh)_mm512_set1_epi32(x)); }
  static Acc dot(Acc a, const W* w, X x) { return fma(a, load(w), x); }
  static Acc add(Acc a, Acc b) { return _mm512_add_ps(a, b); }
};
struct Int8 {
  using W = int8_t; using X = int32_t; using Acc = __m512i; using Vec = __m512i;    // X: 4 uint8 of x
  static Acc zero() { return _mm512_setzero_si512(); }
  static Vec load(const W* w) { return _mm512_loadu_si512(w); }
  static Acc fma(Acc a, Vec w, X x) { return _mm512_dpbusd_epi32(a, _mm512_set1_epi32(x), w); }
  static Acc dot(Acc a, const W* w, X x) { return fma(a, load(w), x); }
  static Acc add(Acc a, Acc b) { return _mm512_add_epi32(a, b); }
};

// For every block of 16 rows: acc = the block's 16 dot products, then finish(o, mask, acc)
// writes outputs o .. o+15 (mask: those below O).
// (`h` blocks paired as b0+i and b0+h+i; with an odd count the last block runs alone.)
template <typename T, typename Finish>
void blocks(const typename T::X* x, const typename T::W* w, int64_t KG, int64_t O, const Finish& finish) {
  constexpr int64_t V = 64 / sizeof(typename T::W);          // weights per vector (one group of 16 rows)
  const int64_t nb = (O + 15) / 16;
  auto finish_block = [&](int64_t bl, typename T::Acc acc) {
    const int64_t o = bl * 16;
    const __mmask16 m = nanoserve_cpu::lanes(O - o);
    finish(o, m, acc);
  };
  at::parallel_for(0, nb, 4, [&](int64_t b0, int64_t b1) {
    const int64_t h = (b1 - b0) / 2;
    for (int64_t i = 0; i < h; ++i) {
      const typename T::W* wa = w + (b0 + i) * KG * V;
      const typename T::W* wc = w + (b0 + h + i) * KG * V;
      typename T::Acc a0 = T::zero(), a1 = a0, c0 = a0, c1 = a0;
      int64_t k = 0;
      for (; k + 2 <= KG; k += 2) {
        a0 = T::dot(a0, wa + k * V, x[k]);
        c0 = T::dot(c0, wc + k * V, x[k]);
        a1 = T::dot(a1, wa + (k + 1) * V, x[k + 1]);
        c1 = T::dot(c1, wc + (k + 1) * V, x[k + 1]);
      }
      for (; k < KG; ++k) { a0 = T::dot(a0, wa + k * V, x[k]); c0 = T::dot(c0, wc + k * V, x[k]); }
      finish_block(b0 + i, T::add(a0, a1));
      finish_block(b0 + h + i, T::add(c0, c1));
    }
    for (int64_t bl = b0 + 2 * h; bl < b1; ++bl) {
      const typename T::W* wb = w + bl * KG * V;
      typename T::Acc a0 = T::zero(), a1 = a0, a2 = a0, a3 = a0;
      int64_t k = 0;
      for (; k + 4 <= KG; k += 4) {
        a0 = T::dot(a0, wb + k * V, x[k]);
        a1 = T::dot(a1, wb + (k + 1) * V, x[k + 1]);
        a2 = T::dot(a2, wb + (k + 2) * V, x[k + 2]);
        a3 = T::dot(a3, wb + (k + 3) * V, x[k + 3]);
      }
      for (; k < KG; ++k) a0 = T::dot(a0, wb + k * V, x[k]);
      finish_block(bl, T::add(T::add(a0, a1), T::add(a2, a3)));
    }
  });
}

// The same for M rows of x at once (a decode step of M sequences): each 64-byte vector of
// weights, loaded once, feeds M instructions, one per row, into M accumulators, so the weights
// are still read once for all M rows. x holds M rows of KG lanes; finish(r, o, mask, acc).
template <typename T, int M, typename Finish>
void blocks_rows(const typename T::X* x, const typename T::W* w, int64_t KG, int64_t O, const Finish& finish) {
  constexpr int64_t V = 64 / sizeof(typename T::W);
  using Acc = typename T::Acc;
  const int64_t nb = (O + 15) / 16;
  auto finish_block = [&](int64_t bl, const Acc* acc) {
    const int64_t o = bl * 16;
    const __mmask16 m = nanoserve_cpu::lanes(O - o);
    for (int r = 0; r < M; ++r) finish(r, o, m, acc[r]);
  };
  at::parallel_for(0, nb, 4, [&](int64_t b0, int64_t b1) {
    const int64_t h = (b1 - b0) / 2;
    for (int64_t i = 0; i < h; ++i) {                          // two streams, as blocks() above
      const typename T::W* wa = w + (b0 + i) * KG * V;
      const typename T::W* wc = w + (b0 + h + i) * KG * V;
      Acc a[M], c[M];
      for (int r = 0; r < M; ++r) a[r] = c[r] = T::zero();
      for (int64_t k = 0; k < KG; ++k) {
        const typename T::Vec va = T::load(wa + k * V), vc = T::load(wc + k * V);
        for (int r = 0; r < M; ++r) {
          a[r] = T::fma(a[r], va, x[r * KG + k]);
          c[r] = T::fma(c[r], vc, x[r * KG + k]);
        }
      }
      finish_block(b0 + i, a);
      finish_block(b0 + h + i, c);
    }
    for (int64_t bl = b0 + 2 * h; bl < b1; ++bl) {
      const typename T::W* wb = w + bl * KG * V;
      Acc a[M];
      for (int r = 0; r < M; ++r) a[r] = T::zero();
      for (int64_t k = 0; k < KG; ++k) {
        const typename T::Vec vb = T::load(wb + k * V);
        for (int r = 0; r < M; ++r) a[r] = T::fma(a[r], vb, x[r * KG + k]);
      }
      finish_block(bl, a);
    }
  });
}

// blocks() for one row, blocks_rows<M> for 2..kMaxRows: M is a template argument so that the
// accumulators live in registers.
using nanoserve_cpu::kMaxRows;
template <typename T, typename Finish>
void products(int64_t M, const typename T::X* x, const typename T::W* w, int64_t KG, int64_t O, const Finish& finish) {
  switch (M) {
    case 1: return blocks<T>(x, w, KG, O, [&](int64_t o, __mmask16 m, typename T::Acc acc) { finish(0, o, m, acc); });
    case 2: return blocks_rows<T, 2>(x, w, KG, O, finish);
    case 3: return blocks_rows<T, 3>(x, w, KG, O, finish);
    case 4: return blocks_rows<T, 4>(x, w, KG, O, finish);
    case 5: return blocks_rows<T, 5>(x, w, KG, O, finish);
    case 6: return blocks_rows<T, 6>(x, w, KG, O, finish);
    case 7: return blocks_rows<T, 7>(x, w, KG, O, finish);
    default: return blocks_rows<T, 8>(x, w, KG, O, finish);
  }
}

void check(const at::Tensor& x, const at::Tensor& wp, int64_t O, int64_t G, at::ScalarType wtype,
           const c10::optional<at::Tensor>& b) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMaxRows, "gemv: x must be 1 to ", kMaxRows,
              " rows (M, K), got ", x.sizes());
  TORCH_CHECK(wp.scalar_type() == wtype && wp.is_contiguous() && wp.dim() == 4 && wp.size(0) == (O + 15) / 16 &&
              wp.size(1) == (x.size(1) + G - 1) / G && wp.size(2) == 16 && wp.size(3) == G,
              "gemv: W must be packed by cpu_gemv.pack for O = ", O, " and K = ", x.size(1), ", got ", wp.sizes());
  TORCH_CHECK(!b.has_value() || (b->scalar_type() == at::kFloat && b->is_contiguous() && b->numel() == O),
              "gemv: bias must be a contiguous float32 (O,) tensor");
}

}  // namespace

namespace nanoserve_cpu {

// y (M, O) = acc + bias, summed in fp32, for fp32 and bf16 weights; stored as `out` (float32,
// or bfloat16 rounded once here: a separate .to() cost a few us a call, 49 calls a step).
// x: M rows of KG lanes.
namespace {
// 16 floats rounded to bf16 as torch rounds them (to nearest, ties to even; NaN -> 0x7FC0), so
// that a bf16 result is the fp32 one passed through .bfloat16(), bit for bit.
__m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

template <typename T>
at::Tensor float_gemv(int64_t M, const typename T::X* x, const at::Tensor& wp, int64_t O,
                      const c10::optional<at::Tensor>& b, const at::TensorOptions& opts, at::ScalarType out) {
  at::Tensor y = at::empty({M, O}, opts.dtype(out));
  const float* bias = b.has_value() ? b->data_ptr<float>() : nullptr;
  void* yp = y.data_ptr();
  products<T>(M, x, reinterpret_cast<const typename T::W*>(wp.data_ptr()), wp.size(1), O,
              [&](int64_t r, int64_t o, __mmask16 m, __m512 acc) {
    if (bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, bias + o));
    if (out == at::kBFloat16) _mm256_mask_storeu_epi16(static_cast<uint16_t*>(yp) + r * O + o, m, to_bf16(acc));
    else _mm512_mask_storeu_ps(static_cast<float*>(yp) + r * O + o, m, acc);
  });
  return y;
}
}  // namespace

at::Tensor gemv_fp32(const at::Tensor& x_in, const at::Tensor& wp, int64_t O, const c10::optional<at::Tensor>& b) {
  check(x_in, wp, O, 1, at::kFloat, b);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "gemv_fp32: x must be float32");
  const at::Tensor x = x_in.contiguous();
  return float_gemv<Fp32>(x.size(0), x.data_ptr<float>(), wp, O, b, x.options(), at::kFloat);
}

at::Tensor gemv_bf16(const at::Tensor& x_in, const at::Tensor& wp, int64_t O, const c10::optional<at::Tensor>& b) {
  check(x_in, wp, O, 2, at::kBFloat16, b);
  const int64_t M = x_in.size(0), K = x_in.size(1), Kp = K + K % 2;
  // x as bf16, each row zero-padded to an even length; from float32 rounded to nearest even,
  // as torch's .bfloat16() rounds.
  const at::Tensor x = x_in.contiguous();
  std::vector<uint16_t> xb(M * Kp, 0);
  for (int64_t r = 0; r < M; ++r) {
    if (x.scalar_type() == at::kBFloat16) {
      std::memcpy(&xb[r * Kp], static_cast<const uint16_t*>(x.data_ptr()) + r * K, K * sizeof(uint16_t));
      continue;
    }
    TORCH_CHECK(x.scalar_type() == at::kFloat, "gemv_bf16: x must be float32 or bfloat16");
    const float* xf = x.data_ptr<float>() + r * K;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = lanes(K - k);
      _mm256_mask_storeu_epi16(&xb[r * Kp + k], m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, xf + k)));
    }
  }
  return float_gemv<Bf16>(M, reinterpret_cast<const int32_t*>(xb.data()), wp, O, b, x.options(), x_in.scalar_type());
}

at::Tensor gemv_int8(const at::Tensor& x_in, const at::Tensor& wp, int64_t O, const at::Tensor& scale,
                     const at::Tensor& rowsum, const c10::optional<at::Tensor>& b) {
  check(x_in, wp, O, 4, at::kChar, b);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == O && rowsum.scalar_type() == at::kInt &&
              rowsum.numel() == O, "gemv_int8: scale must be float32 (O,) and rowsum int32 (O,)");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), Kp = (K + 3) / 4 * 4;
  // Each row quantized with its own scale, xs[r] = max|x[r]| / 127: 128.5 + x * 127 / amax
  // lies in [1.5, 255.5], so truncating rounds half up. Padding: 128 (= 0).
  std::vector<uint8_t> xq(M * Kp, 128);
  std::vector<float> xs(M);
  for (int64_t r = 0; r < M; ++r) {
    const float* xf = x.data_ptr<float>() + r * K;
    float amax = 1e-12f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xf[k]));
    const float inv = 127.f / amax;
    xs[r] = amax / 127.f;
    for (int64_t k = 0; k < K; ++k) xq[r * Kp + k] = (uint8_t)(int)(128.5f + xf[k] * inv);
  }

  at::Tensor y = at::empty({M, O}, x.options());
  const float* bias = b.has_value() ? b->data_ptr<float>() : nullptr;
  const float* sc = scale.data_ptr<float>();
  const int32_t* rs = rowsum.data_ptr<int32_t>();
  float* yp = y.data_ptr<float>();
  products<Int8>(M, reinterpret_cast<const int32_t*>(xq.data()), wp.data_ptr<int8_t>(), wp.size(1), O,
                 [&](int64_t r, int64_t o, __mmask16 m, __m512i acc) {
    acc = _mm512_sub_epi32(acc, _mm512_slli_epi32(_mm512_maskz_loadu_epi32(m, rs + o), 7));   // - 128 * rowsum
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sc + o), _mm512_set1_ps(xs[r])));
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + o));
    _mm512_mask_storeu_ps(yp + r * O + o, m, v);
  });
  return y.to(x_in.scalar_type());
}

// One token's K and V, (1, H, D) each, into its slot of the (NB, BS, H, D) caches (any strides
// but the last): what attention.write_kv does for one token, as H row copies. The compiled
// one-token step (fused.py) calls it once per layer; through Python it cost ~40 us a call.
void write_kv_one(const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache,
                  const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.dim() == 3 && k.size(0) == 1 && v.sizes() == k.sizes() && v.strides() == k.strides() &&
              k.stride(2) == 1 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
              k_cache.strides() == v_cache.strides() && k_cache.stride(3) == 1 && k_cache.size(2) == k.size(1) &&
              k_cache.size(3) == k.size(2) && k.scalar_type() == k_cache.scalar_type() &&
              v.scalar_type() == k.scalar_type() && v_cache.scalar_type() == k.scalar_type(),
              "write_kv_one: k, v (1, H, D) and caches (NB, BS, H, D) of one dtype, last dims contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() >= 1, "write_kv_one: int64 slots");
  const int64_t slot = slot_mapping.data_ptr<int64_t>()[0];
  if (slot < 0) return;                                   // a padding token: nothing to write
  const int64_t BS = k_cache.size(1), H = k.size(1), es = k.element_size(), row = k.size(2) * es;
  TORCH_CHECK(slot < k_cache.size(0) * BS, "write_kv_one: slot ", slot, " is outside the pool");
  const int64_t base = (slot / BS) * k_cache.stride(0) + (slot % BS) * k_cache.stride(1);
  for (int64_t h = 0; h < H; ++h) {
    std::memcpy(static_cast<char*>(k_cache.data_ptr()) + (base + h * k_cache.stride(2)) * es,
                static_cast<const char*>(k.data_ptr()) + h * k.stride(1) * es, row);
    std::memcpy(static_cast<char*>(v_cache.data_ptr()) + (base + h * v_cache.stride(2)) * es,
                static_cast<const char*>(v.data_ptr()) + h * v.stride(1) * es, row);
  }
}

}  // namespace nanoserve_cpu

// Registered as torch ops (torch.ops.nanoserve_cpu.*) so that torch.compile keeps them as
// opaque calls; cpu_gemv.py gives them their shape functions ("fake" kernels).
TORCH_LIBRARY(nanoserve_cpu, m) {
  m.def("gemv_fp32(Tensor x, Tensor w, int O, Tensor? b) -> Tensor");
  m.def("gemv_bf16(Tensor x, Tensor w, int O, Tensor? b) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor w, int O, Tensor scale, Tensor rowsum, Tensor? b) -> Tensor");
  m.def("write_kv_one(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(nanoserve_cpu, CPU, m) {
  m.impl("gemv_fp32", nanoserve_cpu::gemv_fp32);
  m.impl("gemv_bf16", nanoserve_cpu::gemv_bf16);
  m.impl("gemv_int8", nanoserve_cpu::gemv_int8);
  m.impl("write_kv_one", nanoserve_cpu::write_kv_one);
}
