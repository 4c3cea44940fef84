// Typed dispatcher handles for calling the dynnet ops from C++: the Autograd-key nodes
// (autograd.cpp) call the device kernels below them through these, and ops.cpp binds
// call_linear_relu and call_dynamic_net as the `_C` eager entry points. A call goes through the
// dispatcher, so it reaches the kernel of the arguments' device, below autograd when the caller
// is. (The CUDA network op's per-layer path calls the CUDA entry points directly:
// cuda/entry_points.h.)
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <tuple>

#include "common.h"

namespace dynnet {

inline at::Tensor call_linear_relu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                   c10::string_view activation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dynnet::linear_relu", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::string_view)>();
  return op.call(x, weight, bias, activation);
}

inline std::tuple<at::Tensor, at::Tensor> call_linear_act(const at::Tensor& x, const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         c10::string_view activation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dynnet::linear_act", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const std::optional<at::Tensor>&, c10::string_view)>();
  return op.call(x, weight, bias, activation);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> call_linear_relu_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& y,
    c10::string_view activation, std::array<bool, 3> mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dynnet::linear_relu_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           c10::string_view, std::array<bool, 3>)>();
  return op.call(grad_y, x, weight, y, activation, mask);
}

using DynamicNetOutputs = std::tuple<at::Tensor, at::Tensor>;
using DynamicNetGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline DynamicNetOutputs call_dynamic_net(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                                          const std::optional<at::Tensor>& w_h, const std::optional<at::Tensor>& b_h,
                                          const at::Tensor& w_out, const at::Tensor& b_out, int64_t depth) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dynnet::dynamic_net", "")
                       .typed<DynamicNetOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                                const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(x, w_in, b_in, w_h, b_h, w_out, b_out, depth);
}

inline DynamicNetGrads call_dynamic_net_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                 const at::Tensor& w_in, const std::optional<at::Tensor>& w_h,
                                                 const at::Tensor& w_out, const at::Tensor& acts, int64_t depth,
                                                 std::array<bool, kNumGrads> mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dynnet::dynamic_net_backward", "")
                       .typed<DynamicNetGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                              int64_t, std::array<bool, kNumGrads>)>();
  return op.call(grad_out, x, w_in, w_h, w_out, acts, depth, mask);
}

}  // namespace dynnet
