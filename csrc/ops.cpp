// The schemas of pyfast's C++/CUDA primitives, declared once. Implementations register per device:
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cpp (CUDA). The semantics are documented in
// docs/ARCHITECTURE.md, section 1.
#include <torch/library.h>

TORCH_LIBRARY(pyfast, m) {
  m.def("bn_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def(
      "bn_act_forward(Tensor x, Tensor? scale, Tensor? shift, Tensor? residual, Tensor? res_scale, "
      "Tensor? res_shift, bool relu) -> Tensor");
  // In place, for an activation nothing else reads (inference: the fresh output of a convolution).
  m.def(
      "bn_act_forward_(Tensor(a!) x, Tensor? scale, Tensor? shift, Tensor? residual, Tensor? res_scale, "
      "Tensor? res_shift, bool relu) -> Tensor(a!)");
  m.def(
      "bn_act_backward_reduce(Tensor grad_out, Tensor x, Tensor? scale, Tensor? shift, Tensor mean, "
      "Tensor invstd, Tensor? residual, Tensor? res_scale, Tensor? res_shift, Tensor? res_mean, "
      "Tensor? res_invstd, bool relu) -> (Tensor sum_dz, Tensor sum_dz_xhat, Tensor sum_dz_rhat)");
  m.def(
      "bn_act_backward_elemt(Tensor grad_out, Tensor x, Tensor? scale, Tensor? shift, Tensor? mean, "
      "Tensor? invstd, Tensor? residual, Tensor? res_scale, Tensor? res_shift, Tensor? res_mean, "
      "Tensor? res_invstd, bool relu, Tensor? sum_dz, Tensor? sum_dz_xhat, Tensor? sum_dz_rhat, int count) "
      "-> (Tensor grad_x, Tensor grad_residual)");
  m.def(
      "bn_finalize(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, int count, float? momentum, float eps, "
      "bool update) -> (Tensor scale, Tensor shift, Tensor invstd)");
}
