// The eager entry points of the fused ops on the `cpu` and `cuda` backends (bound in csrc/module.cpp and
// called by pyfast/ops/<op>.py once its Python layer has checked the arguments and chosen the backend): one
// C++ autograd Function each, over the BN primitives and ATen's convolution.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace pyfast::autograd {

using OptTensor = std::optional<at::Tensor>;

at::Tensor conv_bn_relu(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                        const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
                        const OptTensor& running_var, const OptTensor& num_batches_tracked, bool training,
                        std::optional<double> momentum, double eps, std::vector<int64_t> stride,
                        std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, bool relu);

// Inference conv_bn_relu with the BN folded into weight and bias: act(conv(x) + bias), the bias and ReLU in the
// convolution's epilogue (cuDNN) or one in-place pass (CPU). No autograd: for calls that record no graph.
at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                         std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                         int64_t groups, bool relu);

at::Tensor bn_relu_conv(const at::Tensor& x, const OptTensor& bn_weight, const OptTensor& bn_bias,
                        const OptTensor& running_mean, const OptTensor& running_var,
                        const OptTensor& num_batches_tracked, bool training, std::optional<double> momentum,
                        double eps, const at::Tensor& weight, const OptTensor& bias, std::vector<int64_t> stride,
                        std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, bool relu);

at::Tensor bn_add_relu(const at::Tensor& y, const OptTensor& bn_weight, const OptTensor& bn_bias,
                       const OptTensor& running_mean, const OptTensor& running_var,
                       const OptTensor& num_batches_tracked, bool training, std::optional<double> momentum, double eps,
                       const OptTensor& shortcut, const OptTensor& s_weight, const OptTensor& s_bias,
                       const OptTensor& s_running_mean, const OptTensor& s_running_var,
                       const OptTensor& s_num_batches_tracked, std::optional<double> s_momentum, double s_eps,
                       bool shortcut_bn, bool relu);

at::Tensor add_relu(const at::Tensor& a, const at::Tensor& b);

}  // namespace pyfast::autograd
