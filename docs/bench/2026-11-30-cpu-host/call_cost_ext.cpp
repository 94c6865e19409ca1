#include <torch/extension.h>
#include <torch/custom_class.h>
struct A : torch::CustomClassHolder {
  at::Tensor t = at::zeros({1}, at::kLong);
  at::Tensor step(std::vector<int64_t> a, std::vector<int64_t> b, std::vector<int64_t> c, std::vector<int64_t> d,
                  std::vector<std::vector<int64_t>> e, at::Tensor kv, bool g) { return t; }
};
struct B {
  at::Tensor t = at::zeros({1}, at::kLong);
  at::Tensor step(std::vector<int64_t> a, std::vector<int64_t> b, std::vector<int64_t> c, std::vector<int64_t> d,
                  std::vector<std::vector<int64_t>> e, at::Tensor kv, bool g) { return t; }
};
TORCH_LIBRARY(pyb_test, m) { m.class_<A>("A").def(torch::init<>()).def("step", &A::step); }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<B>(m, "B").def(pybind11::init<>()).def("step", &B::step, pybind11::call_guard<pybind11::gil_scoped_release>());
}
