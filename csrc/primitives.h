// The BN primitives (schemas in csrc/ops.cpp), called from C++ through the dispatcher's typed handles: the
// device dispatch, TorchDispatchMode and fake tensors still apply, without torch.ops' per-call Python
// argument handling. Used by pyfast._C's direct bindings (csrc/module.cpp) and the fused ops' C++ autograd
// (csrc/autograd/).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace pyfast::primitives {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor> bn_stats(const Tensor& x);

Tensor bn_act_forward(const Tensor& x, const OptTensor& scale, const OptTensor& shift, const OptTensor& residual,
                      const OptTensor& res_scale, const OptTensor& res_shift, bool relu);

Tensor& bn_act_forward_(Tensor& x, const OptTensor& scale, const OptTensor& shift, const OptTensor& residual,
                        const OptTensor& res_scale, const OptTensor& res_shift, bool relu);

std::tuple<Tensor, Tensor, Tensor> bn_act_backward_reduce(
    const Tensor& grad_out, const Tensor& x, const OptTensor& scale, const OptTensor& shift, const Tensor& mean,
    const Tensor& invstd, const OptTensor& residual, const OptTensor& res_scale, const OptTensor& res_shift,
    const OptTensor& res_mean, const OptTensor& res_invstd, bool relu);

std::tuple<Tensor, Tensor> bn_act_backward_elemt(
    const Tensor& grad_out, const Tensor& x, const OptTensor& scale, const OptTensor& shift, const OptTensor& mean,
    const OptTensor& invstd, const OptTensor& residual, const OptTensor& res_scale, const OptTensor& res_shift,
    const OptTensor& res_mean, const OptTensor& res_invstd, bool relu, const OptTensor& sum_dz,
    const OptTensor& sum_dz_xhat, const OptTensor& sum_dz_rhat, int64_t count);

std::tuple<Tensor, Tensor, Tensor> bn_finalize(const Tensor& mean, const Tensor& var, const OptTensor& weight,
                                               const OptTensor& bias, const OptTensor& running_mean,
                                               const OptTensor& running_var, const OptTensor& num_batches_tracked,
                                               int64_t count, std::optional<double> momentum, double eps,
                                               bool update);

}  // namespace pyfast::primitives
