// What cpu_gemv.cpp offers the rest of the C++ (cpu_step.cpp): the one-row products, and
// torch's float -> bf16 rounding for 16 lanes. cpu_gemv.cpp says how they work.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>

namespace nanoserve_cpu {

// y (1, O) = x (1, K) @ W.T + b, W packed by cpu_gemv.pack; y has x's dtype.
at::Tensor gemv_fp32(const at::Tensor& x, const at::Tensor& wp, int64_t O, const c10::optional<at::Tensor>& b);
at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& wp, int64_t O, const c10::optional<at::Tensor>& b);
at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& wp, int64_t O, const at::Tensor& scale,
                     const at::Tensor& rowsum, const c10::optional<at::Tensor>& b);

// 16 floats rounded to bf16 (to nearest, ties to even), as torch's .bfloat16() rounds them.
__m256i to_bf16(__m512 v);

}  // namespace nanoserve_cpu
