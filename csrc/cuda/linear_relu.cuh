// The CUDA entry points of dynnet::linear_relu and dynnet::linear_relu_backward (same semantics,
// outputs and errors as csrc/cpu/linear_relu.cpp). Compiled by nvcc through linear_relu.cu, and
// by the host compiler for the CPU harness (harness/, runtime.cuh); included by exactly one
// translation unit of each build.
//
// Forward, x2 = x viewed as (M, K), weight (N, K), bias (N):   y = act(x2 @ weight.T + bias)
// GELU, GELU-tanh and SiLU (smooth; linear_act returns z beside y): activation.cuh's forms,
// which are stock's CUDA kernels'; the backward takes z in y's place.
// Backward, g = (y <= 0 ? 0 : grad_y) for 'relu', grad_y * act'(z) for a smooth activation
// (grad_y for 'none'):
//   grad_x = g @ weight (M, K),  grad_weight = g.T @ x2 (N, K),  grad_bias = sum_m g[m, :] (N)
//
// Each call takes one of two paths (paths.h: the rule, its table, DYNNET_EXT_CUDA_PATH):
//   custom   gemm.cuh's kernel, ONE launch a call: the forward's tiles with bias and the
//            activation in the epilogue (a smooth one's z written beside y for linear_act); the
//            backward's grad_x tiles, grad_weight tiles and grad_bias column-sum blocks in the
//            same grid (ReLU's mask or the smooth activation's derivative applied as grad_y's
//            tiles are loaded: g is never written). Latency-bound shapes: the seed's layers,
//            small batches.
//   vendor   vendor.cuh: cuBLAS(Lt) GEMMs with the bias (and, where proven NaN-safe, the ReLU)
//            in the epilogue, a smooth activation torch's own op after it; the backward's g
//            (mask or derivative) and grad_bias in one pass of ours, then two cuBLAS GEMMs.
//            FLOP-bound shapes, and half types beyond small sizes (tensor cores).
// Both are deterministic: every output element and bias entry is reduced in a fixed order.
// grad_bias accumulates in at::acc_type<scalar_t, false> (double for float32) on both paths.
//
// NaN as stock on both paths: ReLU keeps NaN, the backward mask lets gradients through where y
// is NaN (threshold_backward). The GPU test tests/test_cuda_paths.py::test_lt_relu_epilogue_keeps_nan
// decides whether cuBLASLt's RELU epilogue may be used (table entry lt_relu_keeps_nan: on the H200, yes).
//
// Performance model per path: gemm.cuh (custom) and vendor.cuh (vendor) headers;
// scripts/gpu_model.py computes the predictions and the default thresholds.

#pragma once

#include <ATen/Dispatch.h>

#include "choose.cuh"
#include "gemm.cuh"
#include "entry_points.h"
#include "runtime.cuh"
#include "vendor.cuh"

namespace dynnet {
namespace {

// The forward into y (allocated in the output's shape), and into z, when defined, a smooth
// activation's pre-activation (the same shape).
void linear_forward_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         Activation act, at::Tensor y, at::Tensor z) {
  const DeviceScope scope(x, "linear_relu");
  count_kernel_call(KernelOp::LinearRelu, c10::DeviceType::CUDA);
  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t M = leading_rows(x);
  if (M == 0 || N == 0) return;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  // K == 0 (no products): the vendor path's copy of the bias, then torch's ReLU - stock's bits
  // (a kernel's +0 accumulator added to a -0 bias would give +0).
  if (K == 0 || layer_path(x.scalar_type(), M, K, N, /*backward=*/false) == paths::Path::Vendor) {
    at::Tensor linear = z.defined() ? z : y;
    vendor_linear_forward(linear.view({M, N}), x.reshape({M, K}), weight, b, act == Activation::Relu);
    if (is_smooth(act)) stock_activation_out(y, linear, act);  // in place on y when there is no z
    return;
  }
  const at::Tensor x2 = x.reshape({M, K}).contiguous();
  const at::Tensor w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_relu_cuda", [&] {
    GemmGroupBuilder<scalar_t> group;
    group.gemm(Role::Forward, x2.const_data_ptr<scalar_t>(), nullptr, w.const_data_ptr<scalar_t>(),
               b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), M, N, K, act,
               z.defined() ? z.data_ptr<scalar_t>() : nullptr);
    group.run();
  });
}

// The forward's output, allocated in its final shape: the op returns a tensor that is nobody's
// view (autograd forbids in-place changes to views made inside a custom Function).
at::Tensor new_linear_output(const at::Tensor& x, const at::Tensor& weight) {
  return new_output(linear_out_shape(x, weight), x.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace

at::Tensor linear_relu_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            c10::string_view activation) {
  check_linear_args(x, weight, bias);
  const Activation act = parse_activation(activation);
  at::Tensor y = new_linear_output(x, weight);
  linear_forward_cuda(x, weight, bias, act, y, at::Tensor());
  return y;
}

std::tuple<at::Tensor, at::Tensor> linear_act_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, c10::string_view activation) {
  check_linear_args(x, weight, bias);
  const Activation act = parse_activation(activation);
  check_smooth(act, activation);
  at::Tensor y = new_linear_output(x, weight), z = new_linear_output(x, weight);
  linear_forward_cuda(x, weight, bias, act, y, z);
  return {y, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& y,
    c10::string_view activation, std::array<bool, 3> output_mask) {
  const Activation act = parse_activation(activation);
  check_backward_saved(act, y.has_value());
  check_linear_backward_args(grad_y, x, weight, y.has_value() ? *y : grad_y);
  const DeviceScope scope(x, "linear_relu_backward");
  count_kernel_call(KernelOp::LinearReluBackward, c10::DeviceType::CUDA);

  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t M = leading_rows(x);
  const auto [need_gx, need_gw, need_gb] = output_mask;
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = need_gx ? new_output(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous)) : empty();
  at::Tensor gw = need_gw ? new_output({N, K}, x.options()) : empty();
  at::Tensor gb = need_gb ? new_output({N}, x.options()) : empty();
  // Every output with elements gets written, zeros where its reduction is empty.
  const bool any = (need_gx && gx.numel() > 0) || (need_gw && gw.numel() > 0) || (need_gb && N > 0);
  if (!any) return {gx, gw, gb};

  const at::Tensor gy2 = grad_y.reshape({M, N}).contiguous();
  // The activation's saved tensor: ReLU's y, a smooth activation's z; none for 'none'.
  const at::Tensor s2 = act != Activation::None ? y->reshape({M, N}).contiguous() : at::Tensor();
  const bool vendor = layer_path(x.scalar_type(), M, K, N, /*backward=*/true) == paths::Path::Vendor;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_relu_backward_cuda", [&] {
    if (vendor) {
      vendor_linear_backward<scalar_t>(gy2, s2, act, x.reshape({M, K}), weight,
                                       need_gx ? gx.view({M, K}) : at::Tensor(), need_gw ? gw : at::Tensor(),
                                       need_gb ? gb : at::Tensor());
      return;
    }
    const at::Tensor w = need_gx ? weight.contiguous() : at::Tensor();
    const at::Tensor x2 = need_gw ? x.reshape({M, K}).contiguous() : at::Tensor();
    const scalar_t* gyp = gy2.const_data_ptr<scalar_t>();
    const scalar_t* sp = s2.defined() ? s2.const_data_ptr<scalar_t>() : nullptr;
    GemmGroupBuilder<scalar_t> group;
    if (need_gx)
      group.gemm(Role::GradInput, gyp, sp, w.const_data_ptr<scalar_t>(), nullptr, gx.data_ptr<scalar_t>(), M, K, N, act);
    if (need_gw)
      group.gemm(Role::GradWeight, gyp, sp, x2.const_data_ptr<scalar_t>(), nullptr, gw.data_ptr<scalar_t>(), N, K, M,
                 act);
    if (need_gb) group.colsum(gyp, sp, gb.data_ptr<scalar_t>(), M, N, act);
    group.run();
  });
  return {gx, gw, gb};
}

}  // namespace dynnet
