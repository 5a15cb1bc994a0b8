// bn_add_relu's and add_relu's autograd on the `cpu` and `cuda` backends (pyfast/ops/bn_add_relu.py has the
// design). bn_add_relu: the statistics and finalize of each BN, one elementwise pass; backward: one reduction
// that recomputes the ReLU mask, one elementwise pass writing both input gradients. add_relu saves only its
// output, whose sign is the mask.
#include "common.h"
#include "fused_ops.h"
#include "lean.h"

namespace pyfast::autograd {
namespace {

class BNAddReLU : public torch::autograd::Function<BNAddReLU> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& y, const OptTensor& bn_weight,
                        const OptTensor& bn_bias, const OptTensor& running_mean, const OptTensor& running_var,
                        const OptTensor& num_batches_tracked, const OptTensor& shortcut, const OptTensor& s_weight,
                        const OptTensor& s_bias, const OptTensor& s_running_mean, const OptTensor& s_running_var,
                        const OptTensor& s_num_batches_tracked, bool training, std::optional<double> momentum,
                        double eps, std::optional<double> s_momentum, double s_eps, bool shortcut_bn, bool relu) {
    const BatchNorm bn{bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps};
    const auto affine = affine_of(y, bn, training);
    const auto residual = given(shortcut) ? like_layout(*shortcut, y) : Tensor();
    Affine s_affine;
    if (shortcut_bn) {
      const BatchNorm s_bn{s_weight, s_bias, s_running_mean, s_running_var, s_num_batches_tracked, s_momentum, s_eps};
      s_affine = affine_of(residual, s_bn, training);
    }
    variable_list saved{y, residual, or_undefined(bn_weight), or_undefined(bn_bias), or_undefined(s_weight),
                        or_undefined(s_bias)};
    save_affine(saved, affine);
    save_affine(saved, s_affine);
    save_tensors(ctx, saved, {0, 1});
    WantedGrads::save(ctx, {true, given(bn_weight), given(bn_bias), given(running_mean), given(running_var),
                            given(num_batches_tracked), given(shortcut), given(s_weight), given(s_bias)});
    ctx->saved_data["training"] = training;
    ctx->saved_data["shortcut_bn"] = shortcut_bn;
    ctx->saved_data["relu"] = relu;
    auto out = primitives::bn_act_forward(y, affine.scale, affine.shift, maybe(residual), maybe(s_affine.scale),
                                          maybe(s_affine.shift), relu);
    lean::record(out, {y, affine.scale, affine.shift, residual, s_affine.scale, s_affine.shift, relu});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(19);
    {
      at::NoGradGuard no_grad;
      const auto saved = saved_tensors(ctx);
      const auto &y = saved[0], &residual = saved[1];
      const auto affine = load_affine(saved, 6), s_affine = load_affine(saved, 10);
      const bool training = ctx->saved_data["training"].toBool(), relu = ctx->saved_data["relu"].toBool();
      const auto grad_out = like_layout(grad_outputs[0], y);
      const WantedGrads wants(ctx);
      Tensor sum_dz, sum_dz_xhat, sum_dz_rhat;
      if (training || wants(1) || wants(2) || wants(7) || wants(8)) {
        std::tie(sum_dz, sum_dz_xhat, sum_dz_rhat) = backward_sums(grad_out, y, affine, residual, s_affine, relu);
      }
      const bool batch = training, batch_residual = training && ctx->saved_data["shortcut_bn"].toBool();
      Tensor grad_shortcut;
      std::tie(grads[0], grad_shortcut) = primitives::bn_act_backward_elemt(
          grad_out, y, affine.scale, affine.shift, affine.mean, affine.invstd, maybe(residual),
          maybe(s_affine.scale), maybe(s_affine.shift), maybe(s_affine.mean), maybe(s_affine.invstd), relu,
          batch ? maybe(sum_dz) : std::nullopt, batch ? maybe(sum_dz_xhat) : std::nullopt,
          batch_residual ? maybe(sum_dz_rhat) : std::nullopt, reduction_count(y));
      grads[1] = param_grad(sum_dz_xhat, saved[2], wants(1));
      grads[2] = param_grad(sum_dz, saved[3], wants(2));
      if (wants(6)) grads[6] = grad_shortcut;
      grads[7] = param_grad(sum_dz_rhat, saved[4], wants(7));
      grads[8] = param_grad(sum_dz, saved[5], wants(8));
      // Both BN biases get sum dz: two parameters must not share one .grad tensor.
      if (grads[8].defined() && grads[8].is_same(grads[2])) grads[8] = grads[8].clone();
    }
    return guard_double_backward("bn_add_relu", std::move(grads), grad_outputs);
  }
};

class AddReLU : public torch::autograd::Function<AddReLU> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& a, const Tensor& b) {
    auto out = primitives::bn_act_forward(a, std::nullopt, std::nullopt, b, std::nullopt, std::nullopt, true);
    ctx->save_for_backward({out});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    Tensor grad;
    {
      at::NoGradGuard no_grad;
      const auto out = ctx->get_saved_variables()[0];
      grad = std::get<0>(primitives::bn_act_backward_elemt(
          like_layout(grad_outputs[0], out), out, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
          std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt, true, std::nullopt, std::nullopt,
          std::nullopt, reduction_count(out)));
    }
    return guard_double_backward("add_relu", {grad, grad}, grad_outputs);
  }
};

}  // namespace

Tensor bn_add_relu(const Tensor& y, const OptTensor& bn_weight, const OptTensor& bn_bias,
                   const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& num_batches_tracked,
                   bool training, std::optional<double> momentum, double eps, const OptTensor& shortcut,
                   const OptTensor& s_weight, const OptTensor& s_bias, const OptTensor& s_running_mean,
                   const OptTensor& s_running_var, const OptTensor& s_num_batches_tracked,
                   std::optional<double> s_momentum, double s_eps, bool shortcut_bn, bool relu) {
  return BNAddReLU::apply(y, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, shortcut, s_weight,
                          s_bias, s_running_mean, s_running_var, s_num_batches_tracked, training, momentum, eps,
                          s_momentum, s_eps, shortcut_bn, relu);
}

Tensor add_relu(const Tensor& a, const Tensor& b) {
  // Nothing to record (no_grad, or no input needs a gradient): the kernel alone, without Function::apply's node
  // bookkeeping, which costs more host time than the pass itself on small inputs.
  if (!at::GradMode::is_enabled() || !(a.requires_grad() || b.requires_grad())) {
    return primitives::bn_act_forward(a, std::nullopt, std::nullopt, b, std::nullopt, std::nullopt, true);
  }
  return AddReLU::apply(a, b);
}

}  // namespace pyfast::autograd
