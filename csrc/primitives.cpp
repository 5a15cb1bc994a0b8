// The typed-handle calls declared in csrc/primitives.h.
#include "primitives.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace pyfast::primitives {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

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

Tensor& bn_act_forward_(Tensor& x, const OptTensor& scale, const OptTensor& shift, const OptTensor& residual,
                        const OptTensor& res_scale, const OptTensor& res_shift, bool relu) {
  static const auto handle = op<Tensor&(Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                        const OptTensor&, const OptTensor&, bool)>("pyfast::bn_act_forward_");
  return handle.call(x, scale, shift, residual, res_scale, res_shift, relu);
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

}  // namespace pyfast::primitives
