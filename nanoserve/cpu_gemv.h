// What cpu_gemv.cpp offers the rest of the C++ (cpu_step.cpp): the products of 1 to kMaxRows
// rows, and the mask both files use for a short last vector. cpu_gemv.cpp says how they work.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>

namespace nanoserve_cpu {

constexpr int64_t kMaxRows = 8;       // rows of x one product takes (cpu_gemv.py's MAX_ROWS)

// y (M, O) = x (M, K) @ W.T + b for M <= kMaxRows, W packed by cpu_gemv.pack; y has x's dtype.
at::Tensor gemv_fp32(const at::Tensor& x, const at::Tensor& wp, int64_t O, const c10::optional<at::Tensor>& b);
at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& wp, int64_t O, const c10::optional<at::Tensor>& b);
at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& wp, int64_t O, const at::Tensor& scale,
                     const at::Tensor& rowsum, const c10::optional<at::Tensor>& b);

// The first min(n, 16) lanes of a 16-lane vector: the mask for the last, short piece of a row.
inline __mmask16 lanes(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

}  // namespace nanoserve_cpu
