// The autograd formula of dynnet::linear_relu in C++, registered on the Autograd dispatch key,
// for every device. It is the same formula as dynnet_ext.ops.LinearReLUFunction (the Python
// torch.autograd.Function, the documented wrapper), minus the Python: a Python Function costs
// ~20 us a call in interpreter and bookkeeping, more than a small layer's arithmetic, so the
// modules call the op directly and land here.
//
// Saves x, weight and (for 'relu') y; the ReLU mask comes from y. Computes only the gradients
// autograd needs. When the backward itself is being recorded (create_graph=True), the same
// formula runs on stock differentiable ops, so double backward works.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "common.h"

namespace dynnet {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        c10::string_view activation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dynnet::linear_relu", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::string_view)>();
  return op.call(x, weight, bias, activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                             const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& y,
                                                             c10::string_view activation, std::array<bool, 3> mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dynnet::linear_relu_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           c10::string_view, std::array<bool, 3>)>();
  return op.call(grad_y, x, weight, y, activation, mask);
}

class LinearReLU : public torch::autograd::Function<LinearReLU> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, c10::string_view activation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const bool relu = parse_activation(activation) == Activation::Relu;
    at::Tensor y = call_forward(x, weight, bias, activation);
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->save_for_backward({x, weight, relu ? y : at::Tensor()});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &y = saved[2];
    const bool relu = ctx->saved_data["relu"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts tensor inputs only: x, weight, then bias if it was given.
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(2)};
    variable_list grads(4);  // one per forward argument; the activation gets none
    if (!(mask[0] || mask[1] || mask[2])) return grads;
    const at::Tensor& grad_y = grad_outputs[0];
    std::optional<at::Tensor> y_opt = relu ? std::optional<at::Tensor>(y) : std::nullopt;

    at::Tensor gx, gw, gb;
    if (at::GradMode::is_enabled()) {
      // Recorded backward (double backward): stock ops, threshold_backward's mask.
      const int64_t N = weight.size(0), K = weight.size(1), M = leading_rows(x);
      const at::Tensor g = relu ? at::where(y <= 0, at::zeros_like(grad_y), grad_y) : grad_y;
      const at::Tensor g2 = g.reshape({M, N});
      if (mask[0]) gx = at::matmul(g, weight);
      if (mask[1]) gw = at::mm(g2.t(), x.reshape({M, K}));
      if (mask[2]) gb = g2.sum(0);
    } else {
      std::tie(gx, gw, gb) = call_backward(grad_y, x, weight, y_opt, relu ? "relu" : "none", mask);
    }
    grads[0] = mask[0] ? gx : at::Tensor();
    grads[1] = mask[1] ? gw : at::Tensor();
    grads[2] = mask[2] ? gb : at::Tensor();
    return grads;
  }
};

at::Tensor linear_relu_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                c10::string_view activation) {
  return LinearReLU::apply(x, weight, bias, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(dynnet, Autograd, m) {
  m.impl("linear_relu", &linear_relu_autograd);
}

}  // namespace dynnet
