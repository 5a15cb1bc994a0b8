// Argument handling shared by the CPU and CUDA implementations of the BN primitives (csrc/cpu/batch_norm.cpp,
// csrc/cuda/batch_norm.cpp): the checks, with the same messages on both devices, and the checked tensors each
// primitive works on, grouped as the kernels take them. Semantics: docs/ARCHITECTURE.md, section 1.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>

namespace pyfast {

using OptTensor = std::optional<at::Tensor>;

inline bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// What an in-place update by a kernel must do: a custom op's writes through raw pointers bump no version
// counter by themselves, and caches of values derived from a tensor (pyfast/ops/_cache.py) key on it.
inline void bump_version(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

// The accumulation dtype: float64 for float64, float32 for every other floating dtype.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
inline at::ScalarType acc_type(const at::Tensor& x) { return acc_type(x.scalar_type()); }

inline bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// -------------------------------------------------------------------------------------------------------------
// Activations: x (N, C, ...) and the tensors shaped like it

// t.movedim(1, -1).is_contiguous(), read off the strides: building the view costs more host time than a
// small kernel (every primitive asks this of each of its activations).
inline bool channels_innermost(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  int64_t expected = 1;
  const auto dense = [&](int64_t d) {
    if (sizes[d] != 1 && strides[d] != expected) return false;
    expected *= sizes[d];
    return true;
  };
  if (!dense(1)) return false;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (!dense(d)) return false;
  }
  return dense(0);
}

inline void check_input(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, op, ": x must have shape (N, C, ...) with at least 2 dimensions, got ", x.dim(), "-D");
  TORCH_CHECK(is_float(x.scalar_type()), op, ": x must be float32, float64, bfloat16 or float16, got ",
              x.scalar_type());
}

// t dense in the memory order a kernel walks: channels innermost (channels_last) or NCHW-contiguous. A copy
// only when t's strides differ: non-standard strides, or a grad_out/residual in the other format than x.
inline at::Tensor in_memory_order(const at::Tensor& t, bool channels_last) {
  if (!channels_last) return t.contiguous();
  return channels_innermost(t) ? t : t.movedim(1, -1).contiguous().movedim(-1, 1);
}

// A tensor shaped like x (grad_out, residual): checked, in the memory order of x (already in_memory_order).
inline at::Tensor like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                         bool channels_last) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have the shape of x ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (", x.scalar_type(),
              "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(), "), got ",
              t.device());
  return in_memory_order(t, channels_last);
}

// -------------------------------------------------------------------------------------------------------------
// Per-channel vectors of the activation primitives: 1-D, length C, x's accumulation dtype, on x's device

inline at::Tensor channel_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", name, " must be 1-D of length C = ", x.size(1),
              ", got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc_type(x), op, ": ", name, " must be ", acc_type(x), " for ", x.scalar_type(),
              " input, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(), "), got ",
              t.device());
  return t.contiguous();
}

// None stays an undefined tensor.
inline at::Tensor channel_vector(const char* op, const char* name, const OptTensor& t, const at::Tensor& x) {
  return given(t) ? channel_vector(op, name, *t, x) : at::Tensor();
}

inline at::Tensor required_channel_vector(const char* op, const char* name, const OptTensor& t, const at::Tensor& x,
                                          const char* when) {
  TORCH_CHECK(given(t), op, ": ", name, " is required when ", when);
  return channel_vector(op, name, *t, x);
}

// -------------------------------------------------------------------------------------------------------------
// The argument groups of the primitives, checked; None is an undefined tensor throughout

// What defines the pre-activation z = x*scale + shift [+ residual*res_scale + res_shift]: x and the residual in
// the memory order the kernel walks.
struct PreActTensors {
  at::Tensor x, residual, scale, shift, res_scale, res_shift;
};

inline PreActTensors pre_act_tensors(const char* op, const at::Tensor& x_in, bool channels_last,
                                     const OptTensor& scale, const OptTensor& shift, const OptTensor& residual,
                                     const OptTensor& res_scale, const OptTensor& res_shift) {
  PreActTensors t;
  t.x = in_memory_order(x_in, channels_last);
  if (given(residual)) t.residual = like_x(op, "residual", *residual, t.x, channels_last);
  t.scale = channel_vector(op, "scale", scale, t.x);
  t.shift = channel_vector(op, "shift", shift, t.x);
  t.res_scale = channel_vector(op, "res_scale", res_scale, t.x);
  t.res_shift = channel_vector(op, "res_shift", res_shift, t.x);
  TORCH_CHECK(t.residual.defined() || (!t.res_scale.defined() && !t.res_shift.defined()), op,
              ": res_scale/res_shift given without residual");
  return t;
}

// The statistics that normalize x and (res_* defined) the residual.
struct NormStats {
  at::Tensor mean, invstd, res_mean, res_invstd;
};

// bn_act_backward_reduce's: mean and invstd required, res_mean optional and res_invstd with it.
inline NormStats reduce_stats(const char* op, const PreActTensors& in, const at::Tensor& mean,
                              const at::Tensor& invstd, const OptTensor& res_mean, const OptTensor& res_invstd) {
  NormStats s{channel_vector(op, "mean", mean, in.x), channel_vector(op, "invstd", invstd, in.x), {}, {}};
  if (given(res_mean)) {
    TORCH_CHECK(in.residual.defined(), op, ": res_mean given without residual");
    s.res_mean = channel_vector(op, "res_mean", *res_mean, in.x);
    s.res_invstd = required_channel_vector(op, "res_invstd", res_invstd, in.x, "res_mean is given");
  }
  return s;
}

// bn_act_backward_elemt's batch statistics: for x when sum_dz is given, for the residual when sum_dz_rhat is too.
// Otherwise mean/invstd/res_mean/res_invstd are not used (eval: running statistics are folded into scale/shift).
struct ElemtStats {
  NormStats norm;
  at::Tensor sum_dz, sum_dz_xhat, sum_dz_rhat;
  int64_t count;
};

inline ElemtStats elemt_stats(const char* op, const PreActTensors& in, const OptTensor& mean,
                              const OptTensor& invstd, const OptTensor& res_mean, const OptTensor& res_invstd,
                              const OptTensor& sum_dz, const OptTensor& sum_dz_xhat, const OptTensor& sum_dz_rhat,
                              int64_t count) {
  TORCH_CHECK(given(sum_dz) || (!given(sum_dz_xhat) && !given(sum_dz_rhat)), op,
              ": sum_dz_xhat/sum_dz_rhat given without sum_dz");
  ElemtStats s{};
  s.count = count;
  if (given(sum_dz)) {
    const char* when = "sum_dz is given";
    TORCH_CHECK(count > 0 || in.x.numel() == 0, op, ": count must be positive when sum_dz is given, got ", count);
    s.sum_dz = channel_vector(op, "sum_dz", *sum_dz, in.x);
    s.norm.mean = required_channel_vector(op, "mean", mean, in.x, when);
    s.norm.invstd = required_channel_vector(op, "invstd", invstd, in.x, when);
    s.sum_dz_xhat = required_channel_vector(op, "sum_dz_xhat", sum_dz_xhat, in.x, when);
  }
  if (given(sum_dz_rhat)) {
    const char* when = "sum_dz_rhat is given";
    TORCH_CHECK(in.residual.defined(), op, ": sum_dz_rhat given without residual");
    s.norm.res_mean = required_channel_vector(op, "res_mean", res_mean, in.x, when);
    s.norm.res_invstd = required_channel_vector(op, "res_invstd", res_invstd, in.x, when);
    s.sum_dz_rhat = channel_vector(op, "sum_dz_rhat", *sum_dz_rhat, in.x);
  }
  return s;
}

// -------------------------------------------------------------------------------------------------------------
// bn_finalize

// A per-channel vector of bn_finalize: 1-D of length C, any floating dtype, on mean's device.
inline void check_finalize_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& mean) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == mean.size(0), op, ": ", name, " must be 1-D of length C = ",
              mean.size(0), ", got shape ", t.sizes());
  TORCH_CHECK(is_float(t.scalar_type()), op, ": ", name, " must be float32, float64, bfloat16 or float16, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == mean.device(), op, ": ", name, " must be on the device of mean (", mean.device(),
              "), got ", t.device());
}

// bn_finalize's tensors, checked: inputs contiguous (undefined for None), outputs allocated.
struct FinalizeArgs {
  at::Tensor mean, var, weight, bias;
  at::Tensor running_mean, running_var;  // defined when this call updates them (update, given, count > 0)
  at::Tensor num_batches_tracked;        // defined when this call increments it (update, given)
  at::Tensor scale, shift, invstd;       // outputs, [C] of the accumulation dtype of mean
  int64_t count;
  std::optional<double> momentum;  // None: the cumulative average, weight 1 / num_batches_tracked
  double eps;
};

inline FinalizeArgs finalize_args(const char* op, const at::Tensor& mean, const at::Tensor& var,
                                  const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                                  const OptTensor& running_var, const OptTensor& num_batches_tracked, int64_t count,
                                  std::optional<double> momentum, double eps, bool update) {
  TORCH_CHECK(mean.dim() == 1, op, ": mean must be 1-D (C,), got shape ", mean.sizes());
  TORCH_CHECK(is_float(mean.scalar_type()), op, ": mean must be float32, float64, bfloat16 or float16, got ",
              mean.scalar_type());
  check_finalize_vector(op, "var", var, mean);
  TORCH_CHECK(var.scalar_type() == mean.scalar_type(), op, ": var must have the dtype of mean (",
              mean.scalar_type(), "), got ", var.scalar_type());
  TORCH_CHECK(count >= 0, op, ": count must be >= 0, got ", count);
  FinalizeArgs a;
  a.mean = mean.contiguous();
  a.var = var.contiguous();
  if (given(weight)) {
    check_finalize_vector(op, "weight", *weight, mean);
    a.weight = weight->contiguous();
  }
  if (given(bias)) {
    check_finalize_vector(op, "bias", *bias, mean);
    a.bias = bias->contiguous();
  }
  TORCH_CHECK(given(running_mean) == given(running_var), op, ": running_mean and running_var must be given together");
  for (const auto& [name, t] : {std::pair{"running_mean", &running_mean}, std::pair{"running_var", &running_var}}) {
    if (!given(*t)) continue;
    check_finalize_vector(op, name, **t, mean);
    TORCH_CHECK((*t)->is_contiguous(), op, ": ", name, " must be contiguous (it is updated in place)");
  }
  if (given(num_batches_tracked)) {
    const at::Tensor& n = *num_batches_tracked;
    TORCH_CHECK(n.numel() == 1 && n.scalar_type() == at::kLong, op,
                ": num_batches_tracked must be a one-element int64 tensor, got ", n.scalar_type(), " of shape ",
                n.sizes());
    TORCH_CHECK(n.device() == mean.device(), op, ": num_batches_tracked must be on the device of mean (",
                mean.device(), "), got ", n.device());
  }
  if (update && given(running_mean)) {
    TORCH_CHECK(momentum.has_value() || given(num_batches_tracked), op,
                ": momentum=None (cumulative average) needs num_batches_tracked");
    if (count > 0) {
      a.running_mean = *running_mean;
      a.running_var = *running_var;
    }
  }
  if (update && given(num_batches_tracked)) a.num_batches_tracked = *num_batches_tracked;
  // The kernels write these through raw pointers; a custom op's in-place update bumps no version counter
  // by itself, and the op layer's inference caches (pyfast/ops/_cache.py) key on them.
  for (const at::Tensor* t : {&a.running_mean, &a.running_var, &a.num_batches_tracked}) bump_version(*t);
  const auto acc = mean.options().dtype(acc_type(mean.scalar_type()));
  a.scale = at::empty({mean.size(0)}, acc);
  a.shift = at::empty({mean.size(0)}, acc);
  a.invstd = at::empty({mean.size(0)}, acc);
  a.count = count;
  a.momentum = momentum;
  a.eps = eps;
  return a;
}

}  // namespace pyfast
