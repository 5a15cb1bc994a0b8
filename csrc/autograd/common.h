// What the fused ops' C++ autograd Functions share (the eager path of the `cpu` and `cuda` backends, as
// torchvision writes its ops' autograd): convolution arguments, one BN's state and its affine map, the two
// BN backward passes, and the double-backward guard. The steps are those of pyfast/ops/_bn.py, which the
// Python autograd.Functions (Triton, torch.compile) take; docs/ARCHITECTURE.md, section 6.
#pragma once

#include <torch/autograd.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "../batch_norm_args.h"
#include "../primitives.h"
#include "lean.h"

namespace pyfast::autograd {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

inline Tensor or_undefined(const OptTensor& t) { return given(t) ? *t : Tensor(); }
inline OptTensor maybe(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// Which gradients autograd wants, by tensor argument. A Function gives an autograd edge only to the tensors
// it is passed (an absent optional has none), so needs_input_grad's edge index is not the argument's
// position: the forward records each argument's edge (-1: absent) and the backward asks by position.
class WantedGrads {
 public:
  static void save(AutogradContext* ctx, std::initializer_list<bool> present) {
    std::vector<int64_t> edges;
    int64_t next = 0;
    for (bool p : present) edges.push_back(p ? next++ : -1);
    ctx->saved_data["edges"] = std::move(edges);
  }
  explicit WantedGrads(AutogradContext* ctx) : ctx_(ctx), edges_(ctx->saved_data["edges"].toIntVector()) {}
  bool operator()(size_t arg) const { return edges_[arg] >= 0 && ctx_->needs_input_grad(edges_[arg]); }

 private:
  AutogradContext* ctx_;
  std::vector<int64_t> edges_;
};

// -- convolution ----------------------------------------------------------------------------------------------
struct ConvArgs {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;

  Tensor forward(const Tensor& x, const Tensor& weight, const OptTensor& bias) const {
    return at::convolution(x, weight, bias, stride, padding, dilation, false, {0, 0}, groups);
  }
  // (grad_x, grad_weight, grad_bias), each undefined unless asked for.
  std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                              std::array<bool, 3> mask) const {
    const std::array<int64_t, 1> bias_size{weight.size(0)};
    std::optional<at::IntArrayRef> sizes;
    if (mask[2]) sizes = at::IntArrayRef(bias_size);
    return at::convolution_backward(grad_out, x, weight, sizes, stride, padding, dilation, false, {0, 0}, groups,
                                    mask);
  }
  void save(AutogradContext* ctx) const {
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
  }
  static ConvArgs load(AutogradContext* ctx) {
    return {ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
            ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["groups"].toInt()};
  }
};

// `t` in `ref`'s memory format (pyfast.ops._common.like_layout): incoming gradients can have any layout.
inline Tensor like_layout(const Tensor& t, const Tensor& ref) {
  const bool nhwc = ref.dim() == 4 && ref.is_contiguous(at::MemoryFormat::ChannelsLast) && !ref.is_contiguous();
  return t.contiguous(nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

inline int64_t reduction_count(const Tensor& x) { return x.size(1) ? x.numel() / x.size(1) : 0; }

// -- one BN ----------------------------------------------------------------------------------------------------
struct BatchNorm {
  OptTensor weight, bias, running_mean, running_var, num_batches_tracked;
  std::optional<double> momentum;
  double eps;
};

// bn(x) = x*scale + shift per channel, with the mean and invstd its backward needs (accumulation dtype).
struct Affine {
  Tensor scale, shift, mean, invstd;
};

// Training: from batch statistics, updating the running ones in the same finalize kernel; eval: from the
// running ones (pyfast.ops._bn.affine_of; a call that records a graph computes it each time).
inline Affine affine_of(const Tensor& t, const BatchNorm& bn, bool training) {
  Tensor mean, var;
  if (training) {
    std::tie(mean, var) = primitives::bn_stats(t);
  } else {
    mean = bn.running_mean->to(acc_type(t));
    var = bn.running_var->to(acc_type(t));
  }
  auto [scale, shift, invstd] =
      primitives::bn_finalize(mean, var, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                              training ? reduction_count(t) : 0, bn.momentum, bn.eps, training);
  return {scale, shift, mean, invstd};
}

inline void save_affine(variable_list& saved, const Affine& a) {
  saved.insert(saved.end(), {a.scale, a.shift, a.mean, a.invstd});
}
inline Affine load_affine(const variable_list& saved, size_t at) {
  return {saved[at], saved[at + 1], saved[at + 2], saved[at + 3]};
}

// ctx->save_for_backward(saved), except in a lean forward (lean::recording()): there only the positions
// `activations` pass autograd's saved-tensor hooks, which may turn them into recipes (pyfast/ops/lean.py); the
// others (weights, per-channel maps) go to saved_data with their versions, checked at load as autograd checks
// saved tensors. Each hooked tensor costs a round trip into Python, and these are never rebuilt.
inline void save_tensors(AutogradContext* ctx, const variable_list& saved, std::initializer_list<size_t> activations) {
  if (!lean::recording()) {
    ctx->save_for_backward(saved);
    return;
  }
  variable_list hooked;
  std::vector<int64_t> layout, versions;
  std::vector<Tensor> others;
  for (size_t i : activations) {
    hooked.push_back(saved[i]);
    layout.push_back(static_cast<int64_t>(i));
  }
  for (const auto& t : saved) {
    others.push_back(t);
    versions.push_back(t.defined() ? static_cast<int64_t>(t._version()) : 0);
  }
  for (size_t i : activations) others[i] = Tensor();  // kept by the hooks instead
  ctx->save_for_backward(hooked);
  ctx->saved_data["lean_layout"] = std::move(layout);
  ctx->saved_data["lean_others"] = std::move(others);
  ctx->saved_data["lean_versions"] = std::move(versions);
}

// What save_tensors saved, in its order.
inline variable_list saved_tensors(AutogradContext* ctx) {
  auto hooked = ctx->get_saved_variables();
  if (ctx->saved_data.count("lean_layout") == 0) return hooked;
  auto saved = ctx->saved_data["lean_others"].toTensorVector();
  const auto versions = ctx->saved_data["lean_versions"].toIntVector();
  for (size_t i = 0; i < saved.size(); ++i) {
    TORCH_CHECK(!saved[i].defined() || static_cast<int64_t>(saved[i]._version()) == versions[i],
                "one of the variables needed for gradient computation has been modified by an inplace operation: a ",
                saved[i].sizes(), " ", saved[i].scalar_type(), " tensor is at version ", saved[i]._version(),
                "; expected version ", versions[i], " instead.");
  }
  const auto layout = ctx->saved_data["lean_layout"].toIntVector();
  for (size_t j = 0; j < layout.size(); ++j) saved[layout[j]] = hooked[j];
  return saved;
}

// What the two convolving ops keep for their backward: the convolution's operand and weight, the tensor the BN
// normalizes (conv_bn_relu: the convolution's output; bn_relu_conv: its own input), the BN parameters (whose
// dtypes their gradients take), the BN's affine map, the convolution's arguments and the flags.
struct ConvOpSaved {
  Tensor conv_input, weight, bn_input, bn_weight, bn_bias;
  Affine affine;
  ConvArgs conv;
  bool training, relu;

  void save(AutogradContext* ctx) const {
    variable_list saved{conv_input, weight, bn_input, bn_weight, bn_bias};
    save_affine(saved, affine);
    save_tensors(ctx, saved, {0, 2});
    conv.save(ctx);
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
  }
  static ConvOpSaved load(AutogradContext* ctx) {
    const auto saved = saved_tensors(ctx);
    return {saved[0], saved[1], saved[2], saved[3], saved[4], load_affine(saved, 5), ConvArgs::load(ctx),
            ctx->saved_data["training"].toBool(), ctx->saved_data["relu"].toBool()};
  }
};

// bn_act_backward_reduce: (sum dz, sum dz*xhat, sum dz*rhat), also the BN parameter gradients; zeros for an
// empty batch, as PyTorch's BN gives (the kernels' sums of nothing would meet the NaN invstd of no values).
inline std::tuple<Tensor, Tensor, Tensor> backward_sums(const Tensor& grad_out, const Tensor& x, const Affine& a,
                                                        const Tensor& residual, const Affine& r, bool relu) {
  auto sums = primitives::bn_act_backward_reduce(grad_out, x, maybe(a.scale), maybe(a.shift), a.mean, a.invstd,
                                                 maybe(residual), maybe(r.scale), maybe(r.shift), maybe(r.mean),
                                                 maybe(r.invstd), relu);
  if (x.numel() == 0) {
    return {at::zeros_like(std::get<0>(sums)), at::zeros_like(std::get<1>(sums)), at::zeros_like(std::get<2>(sums))};
  }
  return sums;
}

// The backward of act(bn(x)) without a residual (pyfast.ops._bn.bn_act_backward): (grad_x, sum dz, sum
// dz*xhat). The reduction runs when the batch statistics need it (training) or a BN parameter wants its
// gradient; otherwise grad_x is scale * dz.
inline std::tuple<Tensor, Tensor, Tensor> bn_act_backward(const Tensor& grad_out, const Tensor& x, const Affine& a,
                                                          bool relu, bool training, bool param_grads) {
  Tensor sum_dz, sum_dz_xhat;
  if (training || param_grads) {
    std::tie(sum_dz, sum_dz_xhat, std::ignore) = backward_sums(grad_out, x, a, Tensor(), Affine{}, relu);
  }
  auto grad_x = std::get<0>(primitives::bn_act_backward_elemt(
      grad_out, x, a.scale, a.shift, a.mean, a.invstd, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
      std::nullopt, relu, training ? maybe(sum_dz) : std::nullopt, training ? maybe(sum_dz_xhat) : std::nullopt,
      std::nullopt, reduction_count(x)));
  return {grad_x, sum_dz, sum_dz_xhat};
}

// A BN parameter's gradient: the kernel's per-channel sum, cast to the parameter's dtype where it differs;
// undefined where autograd does not want it.
inline Tensor param_grad(const Tensor& sum, const Tensor& param, bool wanted) {
  if (!wanted || !sum.defined()) return Tensor();
  return param.defined() && param.scalar_type() != sum.scalar_type() ? sum.to(param.scalar_type()) : sum;
}

// -- double backward ---------------------------------------------------------------------------------------------
// The fused backward kernels are not differentiable. Under create_graph=True the backward's results are passed
// through a node whose own backward is this error, attached to the incoming gradients' graph (what a second
// backward reaches them by), so that only a second backward that really reaches them raises
// (pyfast/ops/_autograd.py's double_backward_unsupported, for the Python Functions).
struct DoubleBackwardError : public torch::autograd::Function<DoubleBackwardError> {
  static variable_list forward(AutogradContext* ctx, const std::string& op, at::TensorList results,
                               at::TensorList incoming) {
    ctx->saved_data["op"] = op;
    variable_list copies;
    for (const auto& r : results) copies.push_back(r.clone());
    return copies;
  }
  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, "pyfast.ops.", ctx->saved_data["op"].toStringRef(),
                " does not support double backward (a gradient of its gradient): its backward kernels are not "
                "differentiable. Run it with backend='reference' (plain PyTorch, e.g. inside "
                "`with pyfast.use_backend('reference'):`) where you need higher-order gradients.");
  }
};

inline variable_list guard_double_backward(const char* op, variable_list results, const variable_list& grads) {
  bool second_order = false;
  for (const auto& g : grads) second_order |= g.defined() && g.requires_grad();
  if (!second_order || !at::GradMode::is_enabled()) return results;
  variable_list defined;
  for (const auto& r : results) {
    if (r.defined()) defined.push_back(r);
  }
  // As TensorLists: apply() sees its arguments' own types, and a std::vector is not a tensor argument.
  auto guarded = DoubleBackwardError::apply(std::string(op), at::TensorList(defined), at::TensorList(grads));
  size_t next = 0;
  for (auto& r : results) {
    if (r.defined()) r = guarded[next++];
  }
  return results;
}

}  // namespace pyfast::autograd
