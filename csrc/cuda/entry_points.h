// The host entry points of the CUDA ops: what TORCH_LIBRARY_IMPL(dynnet, CUDA) registers (in
// linear_relu.cu and dynamic_net.cu), what the network op's per-layer fallback calls directly,
// and what the CPU harness (harness/) binds. Defined in linear_relu.cuh and dynamic_net.cuh.
// Schemas and semantics: csrc/ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "../common.h"

namespace dynnet {

at::Tensor linear_relu_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            c10::string_view activation);

std::tuple<at::Tensor, at::Tensor> linear_act_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, c10::string_view activation);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& y,
    c10::string_view activation, std::array<bool, 3> output_mask);

std::tuple<at::Tensor, at::Tensor> dynamic_net_cuda(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                                                    const std::optional<at::Tensor>& w_h,
                                                    const std::optional<at::Tensor>& b_h, const at::Tensor& w_out,
                                                    const at::Tensor& b_out, int64_t depth);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dynamic_net_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_in,
                          const std::optional<at::Tensor>& w_h, const at::Tensor& w_out, const at::Tensor& acts,
                          int64_t depth, std::array<bool, kNumGrads> output_mask);

}  // namespace dynnet
