// The CUDA BN primitives of docs/ARCHITECTURE.md section 1, as host launchers over raw device pointers.
//
// ATen-free on purpose: this header and batch_norm_kernels.cu need only the CUDA runtime and the C++
// standard library, so nvcc compiles them alone (tests/csrc/test_cuda_compile.py does, on CPU machines).
// csrc/cuda/batch_norm.cpp is the ATen glue that checks tensors, allocates and calls these.
//
// Conventions shared by every launcher:
// - x, residual, grad_out and every T output are (N, C, H, W) tensors, dense in the same `layout`:
//   kNCHW = NCHW-contiguous, kNHWC = channels_last. Only HW = H * W matters, not H and W apart (so any
//   (N, C, *) tensor fits, with HW the product of the trailing sizes).
// - Per-channel vectors are contiguous, length C, of the accumulation type acc_t<T> (double for double,
//   float otherwise). A nullptr optional per-channel vector means its neutral value (scale 1, shift 0).
// - All index arithmetic is int64_t; tensors beyond 2^31 elements are fine.
// - Launchers queue work on `stream` and return the first CUDA error (cudaSuccess when N*HW*C == 0, with
//   nothing launched: the caller fills the outputs of empty inputs itself).
// - The two reductions need a device workspace; ask its size with the *_workspace_bytes function for the
//   very same arguments (the plan depends on the device, the sizes and the pointers' alignment).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace pyfast {
namespace cuda {

enum class Layout : int { kNCHW = 0, kNHWC = 1 };

template <typename T>
struct AccumulateType {
  using type = float;
};
template <>
struct AccumulateType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccumulateType<T>::type;

// bn_stats: per-channel mean and biased variance over N*H*W (Welford per thread, Chan across threads).
template <typename T>
struct BnStatsArgs {
  const T* x;
  acc_t<T>* mean;  // [C] out
  acc_t<T>* var;   // [C] out, biased
};

// bn_act_forward: out = act(x*scale + shift [+ residual*res_scale + res_shift]).
template <typename T>
struct BnActForwardArgs {
  const T* x;
  const acc_t<T>* scale;      // [C] or nullptr (1)
  const acc_t<T>* shift;      // [C] or nullptr (0)
  const T* residual;          // like x, or nullptr (no residual)
  const acc_t<T>* res_scale;  // [C] or nullptr (1)
  const acc_t<T>* res_shift;  // [C] or nullptr (0)
  bool relu;
  T* out;  // like x
};

// The inputs the two backward primitives share: grad_out; what defines the forward's pre-activation
// z = x*scale + shift [+ residual*res_scale + res_shift] and whether a ReLU followed (dz is grad_out masked
// by z > 0 when relu); and the statistics that normalize x and the residual (each primitive says which of
// these it requires).
template <typename T>
struct BnActBackwardInputs {
  const T* grad_out;
  const T* x;
  const acc_t<T>* scale;       // [C] or nullptr (1)
  const acc_t<T>* shift;       // [C] or nullptr (0)
  const acc_t<T>* mean;        // [C]
  const acc_t<T>* invstd;      // [C]
  const T* residual;           // like x, or nullptr
  const acc_t<T>* res_scale;   // [C] or nullptr (1)
  const acc_t<T>* res_shift;   // [C] or nullptr (0)
  const acc_t<T>* res_mean;    // [C]
  const acc_t<T>* res_invstd;  // [C]
  bool relu;
};

// bn_act_backward_reduce: with dz = grad_out masked by the recomputed ReLU (when relu),
// sum_dz = sum dz, sum_dz_xhat = sum dz*(x-mean)*invstd, sum_dz_rhat = sum dz*(r-res_mean)*res_invstd.
// scale/shift/res_scale/res_shift serve only the ReLU mask; mean and invstd are required; res_mean is
// optional (nullptr: no sum_dz_rhat) and res_invstd is given exactly when res_mean is.
template <typename T>
struct BnActBackwardReduceArgs : BnActBackwardInputs<T> {
  acc_t<T>* sum_dz;       // [C] out
  acc_t<T>* sum_dz_xhat;  // [C] out
  acc_t<T>* sum_dz_rhat;  // [C] out, nullptr when res_mean is nullptr
};

// bn_act_backward_elemt:
//   grad_x   = scale * (dz - mean_dz - xhat*mean_dz_xhat)      (mean_dz given), scale * dz otherwise;
//   grad_res = res_scale * (dz - mean_dz - rhat*mean_dz_rhat)  (mean_dz and mean_dz_rhat given),
//              res_scale * dz otherwise (res_scale nullptr: the identity shortcut, dz).
// mean/invstd are read only when mean_dz is given, res_mean/res_invstd only when mean_dz_rhat is.
template <typename T>
struct BnActBackwardElemtArgs : BnActBackwardInputs<T> {
  const acc_t<T>* mean_dz;       // [C] or nullptr (eval: running statistics)
  const acc_t<T>* mean_dz_xhat;  // [C], required when mean_dz is given
  const acc_t<T>* mean_dz_rhat;  // [C] or nullptr; needs mean_dz and the residual
  T* grad_x;                     // like x
  T* grad_residual;              // like x, or nullptr when residual is nullptr
};

template <typename T>
cudaError_t bn_stats_workspace_bytes(const BnStatsArgs<T>& args, int64_t N, int64_t C, int64_t HW,
                                     Layout layout, size_t* bytes);
template <typename T>
cudaError_t bn_stats(const BnStatsArgs<T>& args, int64_t N, int64_t C, int64_t HW, Layout layout,
                     void* workspace, size_t workspace_bytes, cudaStream_t stream);

template <typename T>
cudaError_t bn_act_forward(const BnActForwardArgs<T>& args, int64_t N, int64_t C, int64_t HW, Layout layout,
                           cudaStream_t stream);

template <typename T>
cudaError_t bn_act_backward_reduce_workspace_bytes(const BnActBackwardReduceArgs<T>& args, int64_t N,
                                                   int64_t C, int64_t HW, Layout layout, size_t* bytes);
template <typename T>
cudaError_t bn_act_backward_reduce(const BnActBackwardReduceArgs<T>& args, int64_t N, int64_t C, int64_t HW,
                                   Layout layout, void* workspace, size_t workspace_bytes,
                                   cudaStream_t stream);

template <typename T>
cudaError_t bn_act_backward_elemt(const BnActBackwardElemtArgs<T>& args, int64_t N, int64_t C, int64_t HW,
                                  Layout layout, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyfast
