// Argument handling shared by the CPU and CUDA implementations of the BN primitives (csrc/cpu/batch_norm.cpp,
// csrc/cuda/batch_norm.cpp): the checks, with the same messages on both devices, and the tensors each
// primitive works on. Semantics: docs/ARCHITECTURE.md, section 1.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>

namespace pyfast {

using OptTensor = std::optional<at::Tensor>;

inline bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// The accumulation dtype: float64 for float64, float32 for every other floating dtype.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
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
