// The Python module pyfast._C. Importing it runs the TORCH_LIBRARY registrations of this library
// (csrc/ops.cpp and the per-device files), which is what torch.ops.pyfast.* and torch.compile use.
//
// It also binds each primitive, and ATen's convolution backward, as a plain function for the eager path:
// a call through torch.ops costs ~10 us of Python-side argument handling per call (measured on these CPUs,
// for an op that computes nothing), more than the BN kernels take on small inputs. These functions call the
// same dispatcher entries with C++'s typed handles, so the device dispatch, the TorchDispatchMode and fake
// tensor machinery still apply; only Dynamo cannot trace them, so the op layer uses torch.ops under it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <array>
#include <vector>

#include <optional>
#include <tuple>

namespace pyfast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

std::tuple<Tensor, Tensor> bn_stats(const Tensor& x) {
  static const auto handle = op<std::tuple<Tensor, Tensor>(const Tensor&)>("pyfast::bn_stats");
  return handle.call(x);
}

Tensor bn_act_forward(const Tensor& x, const OptTensor& scale, const OptTensor& shift, const OptTensor& residual,
                      const OptTensor& res_scale, const OptTensor& res_shift, bool relu) {
  static const auto handle = op<Tensor(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                       const OptTensor&, const OptTensor&, bool)>("pyfast::bn_act_forward");
  return handle.call(x, scale, shift, residual, res_scale, res_shift, relu);
}

Tensor& bn_act_forward_(Tensor& x, const OptTensor& scale, const OptTensor& shift, bool relu) {
  static const auto handle =
      op<Tensor&(Tensor&, const OptTensor&, const OptTensor&, bool)>("pyfast::bn_act_forward_");
  return handle.call(x, scale, shift, relu);
}

std::tuple<Tensor, Tensor, Tensor> bn_act_backward_reduce(
    const Tensor& grad_out, const Tensor& x, const OptTensor& scale, const OptTensor& shift, const Tensor& mean,
    const Tensor& invstd, const OptTensor& residual, const OptTensor& res_scale, const OptTensor& res_shift,
    const OptTensor& res_mean, const OptTensor& res_invstd, bool relu) {
  static const auto handle =
      op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                            const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                            const OptTensor&, const OptTensor&, const OptTensor&, bool)>(
          "pyfast::bn_act_backward_reduce");
  return handle.call(grad_out, x, scale, shift, mean, invstd, residual, res_scale, res_shift, res_mean, res_invstd,
                     relu);
}

std::tuple<Tensor, Tensor> bn_act_backward_elemt(
    const Tensor& grad_out, const Tensor& x, const OptTensor& scale, const OptTensor& shift, const OptTensor& mean,
    const OptTensor& invstd, const OptTensor& residual, const OptTensor& res_scale, const OptTensor& res_shift,
    const OptTensor& res_mean, const OptTensor& res_invstd, bool relu, const OptTensor& sum_dz,
    const OptTensor& sum_dz_xhat, const OptTensor& sum_dz_rhat, int64_t count) {
  static const auto handle =
      op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                    const OptTensor&, const OptTensor&, const OptTensor&, bool, const OptTensor&,
                                    const OptTensor&, const OptTensor&, int64_t)>("pyfast::bn_act_backward_elemt");
  return handle.call(grad_out, x, scale, shift, mean, invstd, residual, res_scale, res_shift, res_mean, res_invstd,
                     relu, sum_dz, sum_dz_xhat, sum_dz_rhat, count);
}

std::tuple<Tensor, Tensor, Tensor> bn_finalize(const Tensor& mean, const Tensor& var, const OptTensor& weight,
                                               const OptTensor& bias, const OptTensor& running_mean,
                                               const OptTensor& running_var, const OptTensor& num_batches_tracked,
                                               int64_t count, std::optional<double> momentum, double eps,
                                               bool update) {
  static const auto handle =
      op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                            const OptTensor&, const OptTensor&, const OptTensor&, int64_t,
                                            std::optional<double>, double, bool)>("pyfast::bn_finalize");
  return handle.call(mean, var, weight, bias, running_mean, running_var, num_batches_tracked, count, momentum, eps,
                     update);
}

// ATen's convolution backward has no generated Python binding outside torch.ops.
std::tuple<Tensor, Tensor, Tensor> convolution_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                                         std::optional<std::vector<int64_t>> bias_sizes,
                                                         std::vector<int64_t> stride, std::vector<int64_t> padding,
                                                         std::vector<int64_t> dilation, int64_t groups,
                                                         std::array<bool, 3> output_mask) {
  std::optional<at::IntArrayRef> sizes;
  if (bias_sizes) sizes = at::IntArrayRef(*bias_sizes);
  return at::convolution_backward(grad_out, x, weight, sizes, stride, padding, dilation, false, {0, 0}, groups,
                                  output_mask);
}

}  // namespace
}  // namespace pyfast

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfast's kernels; eager-mode entry points of the torch.ops.pyfast primitives";
  m.def("bn_stats", &pyfast::bn_stats);
  m.def("bn_act_forward", &pyfast::bn_act_forward);
  m.def("bn_act_forward_", &pyfast::bn_act_forward_);
  m.def("bn_act_backward_reduce", &pyfast::bn_act_backward_reduce);
  m.def("bn_act_backward_elemt", &pyfast::bn_act_backward_elemt);
  m.def("bn_finalize", &pyfast::bn_finalize);
  m.def("convolution_backward", &pyfast::convolution_backward);
}
