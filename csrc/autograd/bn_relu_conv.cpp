// bn_relu_conv's autograd on the `cpu` and `cuda` backends (pyfast/ops/bn_relu_conv.py has the design): x's
// statistics, the finalize (running statistics updated), the activation written once (in the convolution's
// dtype, as autocast casts only the convolution's input) and kept for the backward, as eager PyTorch does.
#include "common.h"
#include "fused_ops.h"
#include "lean.h"

namespace pyfast::autograd {
namespace {

class BNReLUConv : public torch::autograd::Function<BNReLUConv> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const OptTensor& bn_weight,
                        const OptTensor& bn_bias, const OptTensor& running_mean, const OptTensor& running_var,
                        const OptTensor& num_batches_tracked, const Tensor& weight, const OptTensor& bias,
                        bool training, std::optional<double> momentum, double eps, const ConvArgs& conv, bool relu) {
    const BatchNorm bn{bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps};
    const auto affine = affine_of(x, bn, training);
    const auto activation = primitives::bn_act_forward(x, affine.scale, affine.shift, std::nullopt, std::nullopt,
                                                       std::nullopt, relu)
                                .to(weight.scalar_type());
    // A lean forward keeps no activation: the backward writes it again with the same pass.
    ConvOpSaved{lean::recording() ? Tensor() : activation, weight, x, or_undefined(bn_weight), or_undefined(bn_bias),
                affine, conv, training, relu}
        .save(ctx);
    WantedGrads::save(ctx, {true, given(bn_weight), given(bn_bias), given(running_mean), given(running_var),
                            given(num_batches_tracked), true, given(bias)});
    return conv.forward(activation, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(13);
    {
      at::NoGradGuard no_grad;
      const auto s = ConvOpSaved::load(ctx);  // conv_input: the activation, bn_input: x
      const WantedGrads wants(ctx);
      const bool wants_weight = wants(1), wants_bias = wants(2);
      const auto& x = s.bn_input;
      const auto activation = s.conv_input.defined()
                                  ? s.conv_input
                                  : primitives::bn_act_forward(x, s.affine.scale, s.affine.shift, std::nullopt,
                                                               std::nullopt, std::nullopt, s.relu)
                                        .to(s.weight.scalar_type());
      Tensor grad_a;
      std::tie(grad_a, grads[6], grads[7]) = s.conv.backward(like_layout(grad_outputs[0], activation), activation,
                                                             s.weight, {true, wants(6), wants(7)});
      Tensor sum_dz, sum_dz_xhat;
      const auto grad_a_like_x = like_layout(grad_a.to(x.scalar_type()), x);
      std::tie(grads[0], sum_dz, sum_dz_xhat) =
          bn_act_backward(grad_a_like_x, x, s.affine, s.relu, s.training, wants_weight || wants_bias);
      grads[1] = param_grad(sum_dz_xhat, s.bn_weight, wants_weight);
      grads[2] = param_grad(sum_dz, s.bn_bias, wants_bias);
    }
    return guard_double_backward("bn_relu_conv", std::move(grads), grad_outputs);
  }
};

}  // namespace

Tensor bn_relu_conv(const Tensor& x, const OptTensor& bn_weight, const OptTensor& bn_bias,
                    const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& num_batches_tracked,
                    bool training, std::optional<double> momentum, double eps, const Tensor& weight,
                    const OptTensor& bias, std::vector<int64_t> stride, std::vector<int64_t> padding,
                    std::vector<int64_t> dilation, int64_t groups, bool relu) {
  return BNReLUConv::apply(x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, weight, bias,
                           training, momentum, eps,
                           ConvArgs{std::move(stride), std::move(padding), std::move(dilation), groups}, relu);
}

}  // namespace pyfast::autograd
