// bn_relu_conv's autograd on the `cpu` and `cuda` backends (pyfast/ops/bn_relu_conv.py has the design): x's
// statistics, the finalize (running statistics updated), the activation written once (in the convolution's
// dtype, as autocast casts only the convolution's input) and kept for the backward, as eager PyTorch does.
#include "common.h"
#include "fused_ops.h"

namespace pyfast::autograd {
namespace {

class BNReLUConv : public torch::autograd::Function<BNReLUConv> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const OptTensor& bn_weight,
                        const OptTensor& bn_bias, const OptTensor& running_mean, const OptTensor& running_var,
                        const OptTensor& num_batches_tracked, const Tensor& weight, const OptTensor& bias, bool training, std::optional<double> momentum,
                        double eps, const ConvArgs& conv, bool relu) {
    const BatchNorm bn{bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps};
    const auto affine = affine_of(x, bn, training);
    const auto activation = primitives::bn_act_forward(x, affine.scale, affine.shift, std::nullopt, std::nullopt,
                                                       std::nullopt, relu)
                                .to(weight.scalar_type());
    variable_list saved{x, weight, activation, or_undefined(bn_weight), or_undefined(bn_bias)};
    save_affine(saved, affine);
    ctx->save_for_backward(saved);
    WantedGrads::save(ctx, {true, given(bn_weight), given(bn_bias), given(running_mean), given(running_var),
                            given(num_batches_tracked), true, given(bias)});
    conv.save(ctx);
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
    return conv.forward(activation, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(13);
    {
      at::NoGradGuard no_grad;
      const auto saved = ctx->get_saved_variables();
      const auto &x = saved[0], &weight = saved[1], &activation = saved[2];
      const auto affine = load_affine(saved, 5);
      const auto conv = ConvArgs::load(ctx);
      const WantedGrads wants(ctx);
      const bool wants_weight = wants(1), wants_bias = wants(2);
      Tensor grad_a;
      std::tie(grad_a, grads[6], grads[7]) = conv.backward(like_layout(grad_outputs[0], activation), activation,
                                                           weight,
                                                           {true, wants(6), wants(7)});
      Tensor sum_dz, sum_dz_xhat;
      std::tie(grads[0], sum_dz, sum_dz_xhat) =
          bn_act_backward(like_layout(grad_a.to(x.scalar_type()), x), x, affine, ctx->saved_data["relu"].toBool(),
                          ctx->saved_data["training"].toBool(), wants_weight || wants_bias);
      grads[1] = param_grad(sum_dz_xhat, saved[3], wants_weight);
      grads[2] = param_grad(sum_dz, saved[4], wants_bias);
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
