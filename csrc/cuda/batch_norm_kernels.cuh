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
//   nothing launched: the caller fills the outputs of empty inputs itself). They never synchronize with the
//   host, so they can be captured in CUDA graphs.
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

// bn_act_backward_elemt, with mean_dz = sum_dz / count, mean_dz_xhat = sum_dz_xhat / count, ...:
//   grad_x   = scale * (dz - mean_dz - xhat*mean_dz_xhat)      (sum_dz given), scale * dz otherwise;
//   grad_res = res_scale * (dz - mean_dz - rhat*mean_dz_rhat)  (sum_dz and sum_dz_rhat given),
//              res_scale * dz otherwise (res_scale nullptr: the identity shortcut, dz).
// mean/invstd are read only when sum_dz is given, res_mean/res_invstd only when sum_dz_rhat is.
template <typename T>
struct BnActBackwardElemtArgs : BnActBackwardInputs<T> {
  const acc_t<T>* sum_dz;       // [C] or nullptr (eval: running statistics)
  const acc_t<T>* sum_dz_xhat;  // [C], required when sum_dz is given
  const acc_t<T>* sum_dz_rhat;  // [C] or nullptr; needs sum_dz and the residual
  int64_t count;                // values per channel behind the sums (> 0 when sum_dz is given)
  T* grad_x;                    // like x
  T* grad_residual;             // like x, or nullptr when residual is nullptr
};

// The element types a bn_finalize vector may have, each its own (batch statistics in the accumulation type,
// running statistics and BN parameters in whatever dtype the module holds them).
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct AnyVector {  // [C] of `dtype`; data nullptr: absent
  const void* data;
  DType dtype;
};

struct MutableAnyVector {  // [C] of `dtype`, updated in place; data nullptr: absent
  void* data;
  DType dtype;
};

// bn_finalize, in the accumulation type A (float or double):
//   invstd = 1/sqrt(var + eps);  scale = weight*invstd;  shift = bias - mean*scale   (weight 1, bias 0 if absent)
// then, when num_batches_tracked is given, *num_batches_tracked += 1; and when running_mean is given,
//   f = cumulative ? 1 / *num_batches_tracked : momentum
//   running_mean += f*(mean - running_mean);  running_var += f*(var*count/max(count-1, 1) - running_var)
// rounded to the running statistics' own dtype. num_batches_tracked is read on the device: no host sync.
template <typename A>
struct BnFinalizeArgs {
  AnyVector mean, var;                         // [C], biased var
  AnyVector weight, bias;                      // [C] or absent
  MutableAnyVector running_mean, running_var;  // both or neither
  int64_t* num_batches_tracked;                // one int64, or nullptr (not counted)
  A* scale;                                    // [C] out
  A* shift;                                    // [C] out
  A* invstd;                                   // [C] out
  int64_t count;
  bool cumulative;  // needs num_batches_tracked
  double momentum, eps;
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

// One small kernel (one block when it counts num_batches_tracked); nothing is launched when C == 0 and
// nothing is counted.
template <typename A>
cudaError_t bn_finalize(const BnFinalizeArgs<A>& args, int64_t C, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyfast
