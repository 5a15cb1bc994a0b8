// The Python module pyfast._C. Importing it runs the TORCH_LIBRARY registrations of this library
// (csrc/ops.cpp and the per-device files), which is what torch.ops.pyfast.* and torch.compile use.
//
// It also binds, as plain functions for the eager path:
// - each primitive, and ATen's convolution backward: a call through torch.ops costs ~10 us of Python-side
//   argument handling per call (measured on these CPUs, for an op that computes nothing), more than the BN
//   kernels take on small inputs. These functions call the same dispatcher entries with C++'s typed handles
//   (csrc/primitives.h), so the device dispatch, the TorchDispatchMode and fake tensor machinery still apply;
//   only Dynamo cannot trace them, so the op layer uses torch.ops under it;
// - each fused op with its C++ autograd (csrc/autograd/), the `cpu` and `cuda` backends' eager path, and lean
//   training's record of the activations they write (csrc/autograd/lean.h).
#include <ATen/ATen.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "autograd/common.h"
#include "autograd/fused_ops.h"
#include "autograd/lean.h"
#include "primitives.h"

namespace pyfast {
namespace {

using at::Tensor;

// ATen's convolution backward has no generated Python binding outside torch.ops. The bias gradient, when
// output_mask asks for it, has the weight's output channels (ConvArgs::backward's rule).
std::tuple<Tensor, Tensor, Tensor> convolution_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                                         std::vector<int64_t> stride, std::vector<int64_t> padding,
                                                         std::vector<int64_t> dilation, int64_t groups,
                                                         std::array<bool, 3> output_mask) {
  const autograd::ConvArgs conv{std::move(stride), std::move(padding), std::move(dilation), groups};
  return conv.backward(grad_out, x, weight, output_mask);
}

// A recorded activation's recipe for pyfast/ops/lean.py, taken from the record (lean::take): (x, scale, shift,
// residual, res_scale, res_shift, relu), absent tensors as None; None where `t` was not recorded.
using RecipeTuple = std::tuple<Tensor, Tensor, Tensor, std::optional<Tensor>, std::optional<Tensor>,
                               std::optional<Tensor>, bool>;

std::optional<RecipeTuple> lean_recipe(const Tensor& t) {
  const auto r = autograd::lean::take(t);
  if (!r) return std::nullopt;
  const auto opt = [](const Tensor& u) { return u.defined() ? std::optional<Tensor>(u) : std::nullopt; };
  return RecipeTuple{r->x, r->scale, r->shift, opt(r->residual), opt(r->res_scale), opt(r->res_shift), r->relu};
}

}  // namespace
}  // namespace pyfast

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfast's kernels; eager-mode entry points of the torch.ops.pyfast primitives";
  m.def("bn_stats", &pyfast::primitives::bn_stats);
  m.def("bn_act_forward", &pyfast::primitives::bn_act_forward);
  m.def("bn_act_forward_", &pyfast::primitives::bn_act_forward_);
  m.def("bn_act_backward_reduce", &pyfast::primitives::bn_act_backward_reduce);
  m.def("bn_act_backward_elemt", &pyfast::primitives::bn_act_backward_elemt);
  m.def("bn_finalize", &pyfast::primitives::bn_finalize);
  m.def("convolution_backward", &pyfast::convolution_backward);
  m.def("conv_bn_relu", &pyfast::autograd::conv_bn_relu);
  m.def("conv_bias_act", &pyfast::autograd::conv_bias_act);
  m.def("bn_relu_conv", &pyfast::autograd::bn_relu_conv);
  m.def("bn_add_relu", &pyfast::autograd::bn_add_relu);
  m.def("add_relu", &pyfast::autograd::add_relu);
  m.def("lean_recording", &pyfast::autograd::lean::set_recording);
  m.def("lean_recipe", &pyfast::lean_recipe);
}
