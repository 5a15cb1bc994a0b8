// CUDA implementations of the BN primitives (schemas in csrc/ops.cpp, semantics in docs/ARCHITECTURE.md
// section 1): argument checks, layout and allocation, dtype dispatch, and the calls into the ATen-free
// launchers of batch_norm_kernels.cu on the current CUDA stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "../batch_norm_args.h"
#include "batch_norm_kernels.cuh"

namespace pyfast {
namespace {

using at::Tensor;
namespace kern = pyfast::cuda;

// ATen's element types -> the CUDA types the launchers are instantiated for (same bits).
template <typename S>
struct CudaScalar {
  using type = S;
};
template <>
struct CudaScalar<at::Half> {
  using type = __half;
};
template <>
struct CudaScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};

// What one call needs to know about x (N, C, ...): the kernel layout and the sizes. channels_last (channels
// innermost) is kNHWC, everything else is made NCHW-contiguous; HW is the product of the sizes after C.
struct Geometry {
  kern::Layout layout;
  int64_t N, C, HW;
  bool channels_last() const { return layout == kern::Layout::kNHWC; }
};

Geometry geometry_of(const char* op, const Tensor& x) {
  check_input(op, x);
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x.device());
  const bool nhwc = x.dim() > 2 && channels_innermost(x) && !x.is_contiguous();
  return Geometry{nhwc ? kern::Layout::kNHWC : kern::Layout::kNCHW, x.size(0), x.size(1),
                  c10::multiply_integers(x.sizes().slice(2))};
}

template <typename T>
const T* elem_ptr(const Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.const_data_ptr()) : nullptr;
}

template <typename T>
T* mutable_elem_ptr(const Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.mutable_data_ptr()) : nullptr;
}

// The inputs the two backward launchers share (kern::BnActBackwardInputs), from the checked tensors;
// undefined tensors become nullptr.
template <typename T>
void set_backward_inputs(kern::BnActBackwardInputs<T>& a, const Tensor& grad_out, const PreActTensors& in,
                         const NormStats& stats, bool relu) {
  using A = kern::acc_t<T>;
  a.grad_out = elem_ptr<T>(grad_out);
  a.x = elem_ptr<T>(in.x);
  a.scale = ptr_or_null<A>(in.scale);
  a.shift = ptr_or_null<A>(in.shift);
  a.mean = ptr_or_null<A>(stats.mean);
  a.invstd = ptr_or_null<A>(stats.invstd);
  a.residual = elem_ptr<T>(in.residual);
  a.res_scale = ptr_or_null<A>(in.res_scale);
  a.res_shift = ptr_or_null<A>(in.res_shift);
  a.res_mean = ptr_or_null<A>(stats.res_mean);
  a.res_invstd = ptr_or_null<A>(stats.res_invstd);
  a.relu = relu;
}

// x is dense (in_memory_order): empty_like keeps its strides, so outputs keep x's memory format.
Tensor empty_like_x(const Tensor& x) { return at::empty_like(x); }

Tensor empty_channels(const Tensor& x, int64_t length) { return at::empty({length}, x.options().dtype(acc_type(x))); }

Tensor workspace(const Tensor& x, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
}

void* workspace_ptr(const Tensor& ws) { return ws.numel() > 0 ? ws.mutable_data_ptr() : nullptr; }

// ---------------------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> bn_stats_cuda(const Tensor& x_in) {
  constexpr const char* op = "pyfast.bn_stats";
  const Geometry g = geometry_of(op, x_in);
  const Tensor x = in_memory_order(x_in, g.channels_last());
  Tensor mean = empty_channels(x, g.C);
  Tensor var = empty_channels(x, g.C);
  if (g.C == 0) return {mean, var};
  if (g.N * g.HW == 0) {  // statistics of nothing, as torch.var_mean
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyfast.bn_stats", [&] {
    using T = typename CudaScalar<scalar_t>::type;
    using A = kern::acc_t<T>;
    const kern::BnStatsArgs<T> args{elem_ptr<T>(x), mean.mutable_data_ptr<A>(), var.mutable_data_ptr<A>()};
    size_t bytes = 0;
    C10_CUDA_CHECK(kern::bn_stats_workspace_bytes<T>(args, g.N, g.C, g.HW, g.layout, &bytes));
    const Tensor ws = workspace(x, bytes);
    C10_CUDA_CHECK(kern::bn_stats<T>(args, g.N, g.C, g.HW, g.layout, workspace_ptr(ws), bytes, stream));
  });
  return {mean, var};
}

// Writes act(z) into out: a fresh tensor, or x itself for the in-place variant (a pure map).
void act_forward_into(const Geometry& g, const PreActTensors& in, bool relu, const Tensor& out) {
  const Tensor& x = in.x;
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyfast.bn_act_forward", [&] {
    using T = typename CudaScalar<scalar_t>::type;
    using A = kern::acc_t<T>;
    const kern::BnActForwardArgs<T> args{elem_ptr<T>(x),
                                         ptr_or_null<A>(in.scale),
                                         ptr_or_null<A>(in.shift),
                                         elem_ptr<T>(in.residual),
                                         ptr_or_null<A>(in.res_scale),
                                         ptr_or_null<A>(in.res_shift),
                                         relu,
                                         mutable_elem_ptr<T>(out)};
    C10_CUDA_CHECK(kern::bn_act_forward<T>(args, g.N, g.C, g.HW, g.layout, stream));
  });
}

Tensor bn_act_forward_cuda(const Tensor& x_in, const OptTensor& scale_in, const OptTensor& shift_in,
                           const OptTensor& residual_in, const OptTensor& res_scale_in,
                           const OptTensor& res_shift_in, bool relu) {
  constexpr const char* op = "pyfast.bn_act_forward";
  const Geometry g = geometry_of(op, x_in);
  const PreActTensors in =
      pre_act_tensors(op, x_in, g.channels_last(), scale_in, shift_in, residual_in, res_scale_in, res_shift_in);
  Tensor out = empty_like_x(in.x);
  act_forward_into(g, in, relu, out);
  return out;
}

Tensor& bn_act_forward_cuda_(Tensor& x, const OptTensor& scale, const OptTensor& shift, const OptTensor& residual,
                             const OptTensor& res_scale, const OptTensor& res_shift, bool relu) {
  constexpr const char* op = "pyfast.bn_act_forward_";
  const Geometry g = geometry_of(op, x);
  const PreActTensors in =
      pre_act_tensors(op, x, g.channels_last(), scale, shift, residual, res_scale, res_shift);
  TORCH_CHECK(in.x.is_same(x), op, ": x must be NCHW-contiguous or channels_last to be updated in place");
  act_forward_into(g, in, relu, x);
  bump_version(x);
  return x;
}

std::tuple<Tensor, Tensor, Tensor> bn_act_backward_reduce_cuda(
    const Tensor& grad_out_in, const Tensor& x_in, const OptTensor& scale_in, const OptTensor& shift_in,
    const Tensor& mean_in, const Tensor& invstd_in, const OptTensor& residual_in, const OptTensor& res_scale_in,
    const OptTensor& res_shift_in, const OptTensor& res_mean_in, const OptTensor& res_invstd_in, bool relu) {
  constexpr const char* op = "pyfast.bn_act_backward_reduce";
  const Geometry g = geometry_of(op, x_in);
  const PreActTensors in =
      pre_act_tensors(op, x_in, g.channels_last(), scale_in, shift_in, residual_in, res_scale_in, res_shift_in);
  const Tensor& x = in.x;
  const Tensor grad_out = like_x(op, "grad_out", grad_out_in, x, g.channels_last());
  const NormStats stats = reduce_stats(op, in, mean_in, invstd_in, res_mean_in, res_invstd_in);
  Tensor sum_dz = empty_channels(x, g.C);
  Tensor sum_dz_xhat = empty_channels(x, g.C);
  Tensor sum_dz_rhat = empty_channels(x, stats.res_mean.defined() ? g.C : 0);
  if (g.C == 0) return {sum_dz, sum_dz_xhat, sum_dz_rhat};
  if (g.N * g.HW == 0) {  // empty sums
    sum_dz.zero_();
    sum_dz_xhat.zero_();
    sum_dz_rhat.zero_();
    return {sum_dz, sum_dz_xhat, sum_dz_rhat};
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyfast.bn_act_backward_reduce", [&] {
    using T = typename CudaScalar<scalar_t>::type;
    using A = kern::acc_t<T>;
    kern::BnActBackwardReduceArgs<T> args{};
    set_backward_inputs<T>(args, grad_out, in, stats, relu);
    args.sum_dz = sum_dz.mutable_data_ptr<A>();
    args.sum_dz_xhat = sum_dz_xhat.mutable_data_ptr<A>();
    args.sum_dz_rhat = stats.res_mean.defined() ? sum_dz_rhat.mutable_data_ptr<A>() : nullptr;
    size_t bytes = 0;
    C10_CUDA_CHECK(kern::bn_act_backward_reduce_workspace_bytes<T>(args, g.N, g.C, g.HW, g.layout, &bytes));
    const Tensor ws = workspace(x, bytes);
    C10_CUDA_CHECK(
        kern::bn_act_backward_reduce<T>(args, g.N, g.C, g.HW, g.layout, workspace_ptr(ws), bytes, stream));
  });
  return {sum_dz, sum_dz_xhat, sum_dz_rhat};
}

std::tuple<Tensor, Tensor> bn_act_backward_elemt_cuda(
    const Tensor& grad_out_in, const Tensor& x_in, const OptTensor& scale_in, const OptTensor& shift_in,
    const OptTensor& mean_in, const OptTensor& invstd_in, const OptTensor& residual_in,
    const OptTensor& res_scale_in, const OptTensor& res_shift_in, const OptTensor& res_mean_in,
    const OptTensor& res_invstd_in, bool relu, const OptTensor& sum_dz_in, const OptTensor& sum_dz_xhat_in,
    const OptTensor& sum_dz_rhat_in, int64_t count) {
  constexpr const char* op = "pyfast.bn_act_backward_elemt";
  const Geometry g = geometry_of(op, x_in);
  const PreActTensors in =
      pre_act_tensors(op, x_in, g.channels_last(), scale_in, shift_in, residual_in, res_scale_in, res_shift_in);
  const Tensor& x = in.x;
  const Tensor grad_out = like_x(op, "grad_out", grad_out_in, x, g.channels_last());
  const ElemtStats stats = elemt_stats(op, in, mean_in, invstd_in, res_mean_in, res_invstd_in, sum_dz_in,
                                       sum_dz_xhat_in, sum_dz_rhat_in, count);
  Tensor grad_x = empty_like_x(x);
  Tensor grad_residual = in.residual.defined() ? empty_like_x(x) : at::empty({0}, x.options());
  if (grad_x.numel() == 0) return {grad_x, grad_residual};
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyfast.bn_act_backward_elemt", [&] {
    using T = typename CudaScalar<scalar_t>::type;
    using A = kern::acc_t<T>;
    kern::BnActBackwardElemtArgs<T> args{};
    set_backward_inputs<T>(args, grad_out, in, stats.norm, relu);
    args.sum_dz = ptr_or_null<A>(stats.sum_dz);
    args.sum_dz_xhat = ptr_or_null<A>(stats.sum_dz_xhat);
    args.sum_dz_rhat = ptr_or_null<A>(stats.sum_dz_rhat);
    args.count = stats.count;
    args.grad_x = mutable_elem_ptr<T>(grad_x);
    args.grad_residual = in.residual.defined() ? mutable_elem_ptr<T>(grad_residual) : nullptr;
    C10_CUDA_CHECK(kern::bn_act_backward_elemt<T>(args, g.N, g.C, g.HW, g.layout, stream));
  });
  return {grad_x, grad_residual};
}

kern::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return kern::DType::kFloat64;
    case at::kHalf:
      return kern::DType::kFloat16;
    case at::kBFloat16:
      return kern::DType::kBFloat16;
    default:
      return kern::DType::kFloat32;  // finalize_args admits only these four
  }
}

kern::AnyVector any_vector(const Tensor& t) {
  return t.defined() ? kern::AnyVector{t.const_data_ptr(), kernel_dtype(t.scalar_type())}
                     : kern::AnyVector{nullptr, kern::DType::kFloat32};
}

kern::MutableAnyVector mutable_any_vector(const Tensor& t) {
  return t.defined() ? kern::MutableAnyVector{t.mutable_data_ptr(), kernel_dtype(t.scalar_type())}
                     : kern::MutableAnyVector{nullptr, kern::DType::kFloat32};
}

std::tuple<Tensor, Tensor, Tensor> bn_finalize_cuda(const Tensor& mean, const Tensor& var, const OptTensor& weight,
                                                    const OptTensor& bias, const OptTensor& running_mean,
                                                    const OptTensor& running_var,
                                                    const OptTensor& num_batches_tracked, int64_t count,
                                                    std::optional<double> momentum, double eps, bool update) {
  constexpr const char* op = "pyfast.bn_finalize";
  TORCH_CHECK(mean.is_cuda(), op, ": mean must be a CUDA tensor, got one on ", mean.device());
  const FinalizeArgs a = finalize_args(op, mean, var, weight, bias, running_mean, running_var, num_batches_tracked,
                                       count, momentum, eps, update);
  const c10::cuda::CUDAGuard guard(mean.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(mean.get_device());
  AT_DISPATCH_FLOATING_TYPES(a.scale.scalar_type(), "pyfast.bn_finalize", [&] {
    kern::BnFinalizeArgs<scalar_t> args{};
    args.mean = any_vector(a.mean);
    args.var = any_vector(a.var);
    args.weight = any_vector(a.weight);
    args.bias = any_vector(a.bias);
    args.running_mean = mutable_any_vector(a.running_mean);
    args.running_var = mutable_any_vector(a.running_var);
    args.num_batches_tracked =
        a.num_batches_tracked.defined() ? a.num_batches_tracked.mutable_data_ptr<int64_t>() : nullptr;
    args.scale = a.scale.mutable_data_ptr<scalar_t>();
    args.shift = a.shift.mutable_data_ptr<scalar_t>();
    args.invstd = a.invstd.mutable_data_ptr<scalar_t>();
    args.count = a.count;
    args.cumulative = !a.momentum.has_value();
    args.momentum = a.momentum.value_or(0.0);
    args.eps = a.eps;
    C10_CUDA_CHECK(kern::bn_finalize<scalar_t>(args, mean.size(0), stream));
  });
  return {a.scale, a.shift, a.invstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfast, CUDA, m) {
  m.impl("bn_stats", TORCH_FN(bn_stats_cuda));
  m.impl("bn_act_forward", TORCH_FN(bn_act_forward_cuda));
  m.impl("bn_act_forward_", TORCH_FN(bn_act_forward_cuda_));
  m.impl("bn_act_backward_reduce", TORCH_FN(bn_act_backward_reduce_cuda));
  m.impl("bn_act_backward_elemt", TORCH_FN(bn_act_backward_elemt_cuda));
  m.impl("bn_finalize", TORCH_FN(bn_finalize_cuda));
}

}  // namespace pyfast
