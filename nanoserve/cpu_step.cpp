// One token through GPT-2 on the CPU, in C++: model.py's forward and compute_logits for a
// decode step of one to eight sequences, as one call from Python. cpu_step.py builds it and
// says when the engine uses it.
//
// Why it exists. At batch 1 a CPU decode step is 49 matrix-vector products (cpu_gemv.cpp;
// for GPT-2 124M in int8, ~4 ms of reading weights) and ~250 small operations between them:
// layer norms, residual adds, GELU, the K/V write, attention over ~100 cached tokens. From
// Python each small operation costs microseconds of dispatch whatever its size; compiled by
// torch.compile (fused.py) they still cost ~1.5 ms a step (Inductor's Python wrapper, one
// OpenMP region per fused kernel, TorchDynamo's guards), a third of the products. Here they are
// plain loops over a few hundred floats between the products, and Python makes one call a
// step: the shape of llama.cpp's and llama2.c's decode loops.
//
// The arithmetic is model.py's, step for step (the comments name its lines), with one
// difference: activations stay float32 whatever the weights' dtype. cpu_gemv rounds (bf16) or
// quantizes (int8) each product's input itself, as llama.cpp does; K and V are stored in the
// cache's dtype, rounded as torch rounds. tests/test_cpu_step.py compares the two.
//
// C = n_embd  H = n_head  D = head_dim  L = n_layer  NB = blocks in pool  BS = tokens per block
// ctx = tokens of context, this one included
#include "cpu_gemv.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/BFloat16.h>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using at::Tensor;
using c10::BFloat16;
using nanoserve_cpu::kMaxRows;
using nanoserve_cpu::lanes;

// One linear layer as cpu_gemv packs it. bias, scale and rowsum are undefined when absent
// (scale and rowsum belong to int8 weights).
struct Linear {
  Tensor wp, bias, scale, rowsum;
  int64_t O = 0;

  Tensor operator()(const Tensor& x) const {                  // (M, K) float32 -> (M, O) float32
    const c10::optional<Tensor> b = bias.defined() ? c10::optional<Tensor>(bias) : c10::nullopt;
    switch (wp.scalar_type()) {
      case at::kChar: return nanoserve_cpu::gemv_int8(x, wp, O, scale, rowsum, b);
      case at::kBFloat16: return nanoserve_cpu::gemv_bf16(x, wp, O, b);
      default: return nanoserve_cpu::gemv_fp32(x, wp, O, b);
    }
  }
};

struct Layer {
  Tensor ln_1_w, ln_1_b, ln_2_w, ln_2_b;                      // (C,) float32 copies
  Linear c_attn, attn_proj, c_fc, mlp_proj;
};

// nn.LayerNorm over C floats: y = (x - mean) / sqrt(var + eps) * w + b (sums in double).
void layer_norm(const float* x, const Tensor& w, const Tensor& b, double eps, int64_t C, float* y) {
  double mean = 0, var = 0;
  for (int64_t c = 0; c < C; ++c) mean += x[c];
  mean /= C;
  for (int64_t c = 0; c < C; ++c) var += (x[c] - mean) * (x[c] - mean);
  const double inv = 1.0 / std::sqrt(var / C + eps);
  const float *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) y[c] = static_cast<float>((x[c] - mean) * inv) * wp[c] + bp[c];
}

// 16 cached values (fewer under mask m) as floats: float32 as they are, bf16 widened.
__m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
__m512 load16(const BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// Where token t of the context lies in one layer's K (or V) cache, in elements: the paged
// layout (attention.py), block table -> block -> row of the block -> head.
struct CacheView {
  int64_t s_block, s_token, s_head, BS;
  const std::vector<int64_t>& blocks;                          // this sequence's block table
  int64_t at(int64_t t, int64_t h) const { return blocks[t / BS] * s_block + (t % BS) * s_token + h * s_head; }
};

// attention.paged_attention for one query and one head: out = softmax(q . K^T * scale) V over
// the ctx cached tokens of head h (this step's K/V already written).
template <typename E>
void attend(const float* q, const E* k, const E* v, const CacheView& cv, int64_t ctx, int64_t h, int64_t D,
            float scale, float* out) {
  std::vector<float> p(ctx);                                   // scores, then probabilities
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < ctx; ++t) {                          // scores: q . k_t
    const E* kt = k + cv.at(t, h);
    __m512 s = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16)
      s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes(D - d), q + d), load16(kt + d, lanes(D - d)), s);
    p[t] = _mm512_reduce_add_ps(s) * scale;
    top = std::max(top, p[t]);
  }
  float sum = 0;                                               // softmax, less its max for range
  for (int64_t t = 0; t < ctx; ++t) sum += (p[t] = std::exp(p[t] - top));
  std::vector<__m512> acc((D + 15) / 16, _mm512_setzero_ps());
  for (int64_t t = 0; t < ctx; ++t) {                          // weighted sum of the values
    const E* vt = v + cv.at(t, h);
    const __m512 pt = _mm512_set1_ps(p[t]);
    for (int64_t d = 0, j = 0; d < D; d += 16, ++j) acc[j] = _mm512_fmadd_ps(pt, load16(vt + d, lanes(D - d)), acc[j]);
  }
  for (int64_t d = 0, j = 0; d < D; d += 16, ++j)
    _mm512_mask_storeu_ps(out + d, lanes(D - d), _mm512_mul_ps(acc[j], _mm512_set1_ps(1.f / sum)));
}

// The first of the largest values of x[0..n), as torch.argmax picks it (a NaN counts as larger
// than any number): one pass for the maximum, 16 lanes at a time, one to find where it is.
int64_t argmax(const float* x, int64_t n) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(lanes(n - i), x + i);
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q))                 // a NaN: the first one wins
      for (int64_t j = i;; ++j)
        if (std::isnan(x[j])) return j;
    top = _mm512_mask_max_ps(top, lanes(n - i), top, v);
  }
  const float m = _mm512_reduce_max_ps(top);
  int64_t i = 0;
  while (x[i] != m) ++i;
  return i;
}

float value(const Tensor& t, int64_t i) {                     // element i of a float32 / bf16 tensor
  return t.scalar_type() == at::kBFloat16 ? static_cast<float>(t.data_ptr<BFloat16>()[i]) : t.data_ptr<float>()[i];
}

class Decoder {
 public:
  // tensors: wte, wpe, ln_f.weight, ln_f.bias, the head's (wp, bias, scale, rowsum), then per
  // layer ln_1.weight, ln_1.bias, ln_2.weight, ln_2.bias and the (wp, bias, scale, rowsum) of
  // c_attn, attn.c_proj, c_fc, mlp.c_proj; an absent tensor is an empty one. out_features: the
  // head's, then each layer's four. cpu_step.py assembles both from a GPT2.
  Decoder(std::vector<Tensor> tensors, std::vector<int64_t> out_features, int64_t n_head, double eps,
          bool tanh_gelu, double attn_scale)
      : H_(n_head), eps_(eps), gelu_(tanh_gelu ? "tanh" : "none"), scale_(static_cast<float>(attn_scale)) {
    const int64_t L = (static_cast<int64_t>(tensors.size()) - 8) / 20;
    TORCH_CHECK(L >= 1 && static_cast<int64_t>(tensors.size()) == 8 + 20 * L &&
                static_cast<int64_t>(out_features.size()) == 1 + 4 * L,
                "cpu_step.Decoder: expected 8 + 20 L tensors and 1 + 4 L out_features, got ", tensors.size(),
                " and ", out_features.size());
    size_t i = 0, o = 0;
    auto next = [&]() { return tensors[i++].contiguous(); };
    auto norm = [&]() { return next().to(at::kFloat); };
    auto linear = [&]() {
      Linear lin;
      lin.wp = next();
      for (Tensor* t : {&lin.bias, &lin.scale, &lin.rowsum}) {
        Tensor x = next();
        if (x.numel() > 0) *t = x;
      }
      lin.O = out_features[o++];
      return lin;
    };
    wte_ = next(), wpe_ = next(), ln_f_w_ = norm(), ln_f_b_ = norm();
    head_ = linear();
    for (int64_t l = 0; l < L; ++l) {
      Layer y;
      y.ln_1_w = norm(), y.ln_1_b = norm(), y.ln_2_w = norm(), y.ln_2_b = norm();
      y.c_attn = linear(), y.attn_proj = linear(), y.c_fc = linear(), y.mlp_proj = linear();
      layers_.push_back(std::move(y));
    }
    C_ = wte_.size(1);
    TORCH_CHECK(C_ % H_ == 0 && layers_[0].c_attn.O == 3 * C_, "cpu_step.Decoder: n_embd ", C_, " and n_head ", H_,
                " do not fit c_attn's ", layers_[0].c_attn.O, " outputs");
  }

  // One decode step of M = 1..8 sequences, one token each, as the runner has it on the host:
  // token ids, positions, cache slots and context lengths (M,), each sequence's block table
  // (at least its first ceil(ctx / BS) blocks), and kv_cache (L, 2, NB, BS, H, D) -> (M, V)
  // float32 logits, or with greedy the (M,) int64 argmax of each row. Writes the step's K/V
  // into their slots before attending, as model.py does. (cpu_step.py checks the same limits
  // first, in Python.)
  Tensor step(std::vector<int64_t> tokens, std::vector<int64_t> pos, std::vector<int64_t> slots,
              std::vector<int64_t> ctx, std::vector<std::vector<int64_t>> tables, Tensor kv_cache, bool greedy) {
    c10::InferenceMode no_autograd;        // the runner calls without torch.inference_mode (cheaper here)
    const int64_t L = static_cast<int64_t>(layers_.size()), D = C_ / H_, M = static_cast<int64_t>(tokens.size());
    TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.size(0) == L && kv_cache.size(1) == 2 && kv_cache.size(4) == H_ &&
                kv_cache.size(5) == D && kv_cache.stride(5) == 1 &&
                (kv_cache.scalar_type() == at::kFloat || kv_cache.scalar_type() == at::kBFloat16),
                "cpu_step: kv_cache must be (L=", L, ", 2, NB, BS, H=", H_, ", D=", D,
                ") float32 or bfloat16 with contiguous rows, got ", kv_cache.sizes(), " ", kv_cache.scalar_type());
    TORCH_CHECK(1 <= M && M <= kMaxRows && pos.size() == tokens.size() && ctx.size() == tokens.size() &&
                slots.size() == tokens.size() && tables.size() == tokens.size(),
                "cpu_step: 1 to ", kMaxRows, " sequences, one token, position, slot, context length and block table each, got ",
                M, " token ids and ", tables.size(), " block tables");
    const int64_t NB = kv_cache.size(2), BS = kv_cache.size(3);
    std::vector<std::vector<int64_t>> blocks(M);
    for (int64_t r = 0; r < M; ++r) {
      TORCH_CHECK(0 <= tokens[r] && tokens[r] < wte_.size(0), "cpu_step: token id ", tokens[r], " is outside [0, ",
                  wte_.size(0), ")");
      TORCH_CHECK(0 <= pos[r] && pos[r] < wpe_.size(0), "cpu_step: position ", pos[r], " is outside [0, n_ctx=",
                  wpe_.size(0), ")");
      const int64_t have = static_cast<int64_t>(tables[r].size());
      TORCH_CHECK(1 <= ctx[r] && ctx[r] <= have * BS, "cpu_step: context of ", ctx[r],
                  " tokens does not fit a block table of ", have, " blocks of ", BS);
      TORCH_CHECK(0 <= slots[r] && slots[r] < NB * BS, "cpu_step: slot ", slots[r], " is outside the pool's ", NB * BS);
      blocks[r].assign(tables[r].begin(), tables[r].begin() + (ctx[r] + BS - 1) / BS);
      for (int64_t b : blocks[r]) TORCH_CHECK(0 <= b && b < NB, "cpu_step: block ", b, " is outside the pool's ", NB);
    }
    std::vector<CacheView> views;
    for (int64_t r = 0; r < M; ++r) views.push_back({kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4), BS, blocks[r]});

    // x: the residual stream, h: a layer norm's output, a: attention's output; (M, C) each
    const Tensor x_t = at::empty({M, C_}, at::kFloat), h_t = at::empty({M, C_}, at::kFloat),
                 a_t = at::empty({M, C_}, at::kFloat);
    float *x = x_t.data_ptr<float>(), *h = h_t.data_ptr<float>(), *a = a_t.data_ptr<float>();
    for (int64_t r = 0; r < M; ++r)                                                      // wte + wpe
      for (int64_t c = 0; c < C_; ++c) x[r * C_ + c] = value(wte_, tokens[r] * C_ + c) + value(wpe_, pos[r] * C_ + c);
    auto norm_rows = [&](const Tensor& w, const Tensor& b) {
      for (int64_t r = 0; r < M; ++r) layer_norm(x + r * C_, w, b, eps_, C_, h + r * C_);
    };
    auto add_rows = [&](const Tensor& y) {                                               // x += y, (M, C)
      const float* yp = y.data_ptr<float>();
      for (int64_t i = 0; i < M * C_; ++i) x[i] += yp[i];
    };
    for (int64_t l = 0; l < L; ++l) {
      const Layer& y = layers_[l];
      // x = x + attn(ln_1(x)): q, k, v from one product; k, v into the cache; attention; c_proj
      norm_rows(y.ln_1_w, y.ln_1_b);
      const Tensor qkv = y.c_attn(h_t);                                                  // (M, 3C)
      if (kv_cache.scalar_type() == at::kBFloat16)
        layer_step<BFloat16>(qkv.data_ptr<float>(), kv_cache[l], views, slots, ctx, a);
      else
        layer_step<float>(qkv.data_ptr<float>(), kv_cache[l], views, slots, ctx, a);
      add_rows(y.attn_proj(a_t));
      // x = x + mlp(ln_2(x))
      norm_rows(y.ln_2_w, y.ln_2_b);
      Tensor f = y.c_fc(h_t);                                                            // (M, 4C)
      at::gelu_(f, gelu_);
      add_rows(y.mlp_proj(f));
    }
    norm_rows(ln_f_w_, ln_f_b_);
    const Tensor logits = head_(h_t);                                                    // (M, V)
    if (!greedy) return logits;
    // Plain greedy decoding: the argmax here, while the logits are in cache, saves Python a
    // few tensor operations, each ~20 us right after the weights' stream has flushed the caches.
    Tensor ids = at::empty({M}, at::kLong);
    for (int64_t r = 0; r < M; ++r)
      ids.data_ptr<int64_t>()[r] = argmax(logits.data_ptr<float>() + r * logits.size(1), logits.size(1));
    return ids;
  }

 private:
  // Store each row's k, v (row r of qkv: q, k, v of C each) at its slot of layer l's cache (kv:
  // (2, NB, BS, H, D)), then attend from each row's q to its sequence's ctx cached tokens, one
  // (row, head) pair per task, into out (M, C).
  template <typename E>
  void layer_step(const float* qkv, const Tensor& kv, const std::vector<CacheView>& views,
                  const std::vector<int64_t>& slots, const std::vector<int64_t>& ctx, float* out) {
    E* k = static_cast<E*>(kv[0].data_ptr());
    E* v = static_cast<E*>(kv[1].data_ptr());
    const int64_t M = static_cast<int64_t>(views.size()), D = C_ / H_, C3 = 3 * C_;
    for (int64_t r = 0; r < M; ++r) {
      const CacheView& cv = views[r];
      const int64_t where = (slots[r] / cv.BS) * cv.s_block + (slots[r] % cv.BS) * cv.s_token;
      for (int64_t hd = 0; hd < H_; ++hd)
        for (int64_t d = 0; d < D; ++d) {
          k[where + hd * cv.s_head + d] = static_cast<E>(qkv[r * C3 + C_ + hd * D + d]);
          v[where + hd * cv.s_head + d] = static_cast<E>(qkv[r * C3 + 2 * C_ + hd * D + d]);
        }
    }
    at::parallel_for(0, M * H_, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = i / H_, hd = i % H_;
        attend<E>(qkv + r * C3 + hd * D, k, v, views[r], ctx[r], hd, D, scale_, out + r * C_ + hd * D);
      }
    });
  }

  int64_t H_, C_ = 0;
  double eps_;
  std::string gelu_;
  float scale_;
  Tensor wte_, wpe_, ln_f_w_, ln_f_b_;
  Linear head_;
  std::vector<Layer> layers_;
};

}  // namespace

// A Python class of the built module (cpu_gemv.extension().Decoder). step releases the GIL while it
// runs, so another Python thread (the server's, async_engine.py) can work during a step.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Decoder>(m, "Decoder")
      .def(pybind11::init<std::vector<Tensor>, std::vector<int64_t>, int64_t, double, bool, double>())
      .def("step", &Decoder::step, pybind11::call_guard<pybind11::gil_scoped_release>());
}
