// conv_bn_relu's autograd on the `cpu` and `cuda` backends (pyfast/ops/conv_bn_relu.py has the design): the
// forward convolves, takes y's statistics, finalizes the BN (running statistics updated) and applies
// scale/shift + ReLU; the backward recomputes the ReLU mask from the saved y: one reduction, one elementwise
// pass, then the convolution backward.
#include "common.h"
#include "fused_ops.h"
#include "lean.h"

namespace pyfast::autograd {
namespace {

class ConvBNReLU : public torch::autograd::Function<ConvBNReLU> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                        const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
                        const OptTensor& running_var, const OptTensor& num_batches_tracked, bool training,
                        std::optional<double> momentum, double eps, const ConvArgs& conv, bool relu) {
    const BatchNorm bn{bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps};
    const auto y = conv.forward(x, weight, bias);
    const auto affine = affine_of(y, bn, training);
    ConvOpSaved{x, weight, y, or_undefined(bn_weight), or_undefined(bn_bias), affine, conv, training, relu}.save(ctx);
    WantedGrads::save(ctx, {true, true, given(bias), given(bn_weight), given(bn_bias)});
    auto out = primitives::bn_act_forward(y, affine.scale, affine.shift, std::nullopt, std::nullopt, std::nullopt,
                                          relu);
    lean::record(out, {y, affine.scale, affine.shift, Tensor(), Tensor(), Tensor(), relu});  // all saved above
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(13);
    {
      at::NoGradGuard no_grad;
      const auto s = ConvOpSaved::load(ctx);  // conv_input: x, bn_input: y
      const WantedGrads wants(ctx);
      const bool wants_weight = wants(3), wants_bias = wants(4);
      auto [grad_y, sum_dz, sum_dz_xhat] = bn_act_backward(like_layout(grad_outputs[0], s.bn_input), s.bn_input,
                                                           s.affine, s.relu, s.training, wants_weight || wants_bias);
      std::tie(grads[0], grads[1], grads[2]) =
          s.conv.backward(grad_y, s.conv_input, s.weight, {wants(0), wants(1), wants(2)});
      grads[3] = param_grad(sum_dz_xhat, s.bn_weight, wants_weight);
      grads[4] = param_grad(sum_dz, s.bn_bias, wants_bias);
    }
    return guard_double_backward("conv_bn_relu", std::move(grads), grad_outputs);
  }
};

}  // namespace

Tensor conv_bn_relu(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& bn_weight,
                    const OptTensor& bn_bias, const OptTensor& running_mean, const OptTensor& running_var,
                    const OptTensor& num_batches_tracked, bool training, std::optional<double> momentum, double eps,
                    std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                    int64_t groups, bool relu) {
  return ConvBNReLU::apply(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                           training, momentum, eps,
                           ConvArgs{std::move(stride), std::move(padding), std::move(dilation), groups}, relu);
}

Tensor conv_bias_act(const Tensor& x, const Tensor& weight, const OptTensor& bias, std::vector<int64_t> stride,
                     std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, bool relu) {
  const ConvArgs conv{std::move(stride), std::move(padding), std::move(dilation), groups};
  // cuDNN's own fused convolution + bias + ReLU: one kernel instead of a convolution and an extra pass.
  if (relu && x.is_cuda() && x.scalar_type() != at::kDouble) {
    return at::cudnn_convolution_relu(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups);
  }
  if (x.is_cpu() && given(bias)) {
    // ATen's CPU convolution for grouped and small layers (thnn's slow path) writes the bias with a pass of its
    // own before the GEMM: the activation pass adds it instead, in place on the fresh output, so bias + ReLU
    // cost one in-place pass, as eager's ReLU alone does. (oneDNN's fused convolution,
    // mkldnn::_convolution_pointwise, was no faster than this at batch 8, and ~100 us slower per call on tiny
    // inputs: measured, not used.)
    auto y = conv.forward(x, weight, std::nullopt);
    return primitives::bn_act_forward_(y, std::nullopt, bias->to(acc_type(y)), std::nullopt, std::nullopt,
                                       std::nullopt, relu);
  }
  auto y = conv.forward(x, weight, bias);
  return relu ? y.relu_() : y;
}

}  // namespace pyfast::autograd
