// The autograd formulas of dynnet::linear_relu and dynnet::dynamic_net in C++, registered on the
// Autograd dispatch key, for every device. linear_relu's is the same formula as
// dynnet_ext.ops.LinearReLUFunction (the Python torch.autograd.Function, the documented wrapper),
// minus the Python: a Python Function's interpreter and bookkeeping cost more than a small
// layer's arithmetic (benchmarks/results/README.md, thresholds: python-function-call), so the
// modules call the op directly and land here.
//
// Saves x, weight and, for 'relu', y (the ReLU mask comes from y); for a smooth activation
// ('gelu', 'gelu_tanh', 'silu') the forward runs linear_act, which returns the pre-activation z
// beside y, and saves z in y's place (the memory stock's nn.Linear + activation keeps: x and W
// for the linear, z for the activation). Computes only the gradients autograd needs. When the
// backward itself is being recorded (create_graph=True), the same formula runs on stock
// differentiable ops, so double backward works.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"
#include "dispatch.h"

namespace dynnet {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LinearReLU : public torch::autograd::Function<LinearReLU> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, c10::string_view activation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Activation act = parse_activation(activation);
    const bool has_bias = bias.has_value() && bias->defined();
    at::Tensor y, saved;  // saved: y for 'relu', z for a smooth activation
    if (is_smooth(act)) {
      std::tie(y, saved) = call_linear_act(x, weight, bias, activation);
    } else {
      y = call_linear_relu(x, weight, bias, activation);
      if (act == Activation::Relu) saved = y;
    }
    ctx->saved_data["activation"] = static_cast<int64_t>(act);
    ctx->saved_data["has_bias"] = has_bias;
    // The bias only for a smooth activation's recorded backward, which recomputes z from it.
    ctx->save_for_backward({x, weight, saved, is_smooth(act) && has_bias ? *bias : at::Tensor()});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &y = saved[2];
    const auto act = static_cast<Activation>(ctx->saved_data["activation"].toInt());
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts tensor inputs only: x, weight, then bias if it was given.
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(2)};
    variable_list grads(4);  // one per forward argument; the activation gets none
    if (!(mask[0] || mask[1] || mask[2])) return grads;
    const at::Tensor& grad_y = grad_outputs[0];

    at::Tensor gx, gw, gb;
    if (at::GradMode::is_enabled()) {
      // Recorded backward (double backward): stock ops - threshold_backward's mask, or the smooth
      // activation's backward op at z recomputed from x, weight and bias, so that the second
      // derivatives through z are recorded too.
      const int64_t N = weight.size(0), K = weight.size(1), M = leading_rows(x);
      at::Tensor g = grad_y;
      if (act == Activation::Relu) {
        g = at::where(y <= 0, at::zeros_like(grad_y), grad_y);
      } else if (is_smooth(act)) {
        const at::Tensor z = at::linear(x, weight, has_bias ? std::optional<at::Tensor>(saved[3]) : std::nullopt);
        if (act == Activation::Silu) {  // silu_backward has no derivative of its own: its formula
          const at::Tensor s = at::sigmoid(z);
          g = grad_y * s * (1 + z * (1 - s));
        } else {
          g = stock_activation_backward(grad_y, z, act);  // gelu_backward's derivative is stock's
        }
      }
      const at::Tensor g2 = g.reshape({M, N});
      if (mask[0]) gx = at::matmul(g, weight);
      if (mask[1]) gw = at::mm(g2.t(), x.reshape({M, K}));
      if (mask[2]) gb = g2.sum(0);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // skips the autograd fallback's boxed checks
      const std::optional<at::Tensor> y_opt = y.defined() ? std::optional<at::Tensor>(y) : std::nullopt;
      std::tie(gx, gw, gb) = call_linear_relu_backward(grad_y, x, weight, y_opt, activation_name(act), mask);
    }
    grads[0] = mask[0] ? gx : at::Tensor();
    grads[1] = mask[1] ? gw : at::Tensor();
    grads[2] = mask[2] ? gb : at::Tensor();
    return grads;
  }
};

// The whole network as one autograd node. Saves the inputs (no copies: they are the caller's
// tensors) and acts, the stacked activations, which is returned too but is not differentiable.
// The backward computes every gradient in one op; the shared hidden layer's are summed inside it.
// When the backward is recorded (double backward), the network is recomputed with stock ops and
// differentiated with create_graph, which gives the same first derivatives and correct second ones.
class DynamicNet : public torch::autograd::Function<DynamicNet> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_in,
                               const at::Tensor& b_in, const std::optional<at::Tensor>& w_h,
                               const std::optional<at::Tensor>& b_h, const at::Tensor& w_out, const at::Tensor& b_out,
                               int64_t depth) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, acts] = call_dynamic_net(x, w_in, b_in, w_h, b_h, w_out, b_out, depth);
    const bool has_hidden = w_h.has_value();
    ctx->saved_data["depth"] = depth;
    ctx->saved_data["has_hidden"] = has_hidden;
    ctx->save_for_backward(
        {x, w_in, b_in, has_hidden ? *w_h : at::Tensor(), has_hidden ? *b_h : at::Tensor(), w_out, b_out, acts});
    ctx->mark_non_differentiable({acts});
    ctx->set_materialize_grads(false);  // acts never gets a gradient: no zeros tensor for it
    return {out, acts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const int64_t depth = ctx->saved_data["depth"].toInt();
    const bool has_hidden = ctx->saved_data["has_hidden"].toBool();
    // needs_input_grad counts the tensor inputs that were given: w_h and b_h only if not None.
    const size_t o = has_hidden ? 5 : 3;
    const std::array<bool, kNumGrads> mask = {ctx->needs_input_grad(0),
                                              ctx->needs_input_grad(1),
                                              ctx->needs_input_grad(2),
                                              has_hidden && ctx->needs_input_grad(3),
                                              has_hidden && ctx->needs_input_grad(4),
                                              ctx->needs_input_grad(o),
                                              ctx->needs_input_grad(o + 1)};
    variable_list grads(8);  // one per forward argument; depth gets none
    if (std::none_of(mask.begin(), mask.end(), [](bool b) { return b; })) return grads;
    const at::Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined()) return grads;  // out was not used: all gradients are zero
    if (at::GradMode::is_enabled()) {
      // Recompute with stock ops and differentiate (saved[i] is forward argument i for i < 7).
      at::Tensor h = at::relu(at::linear(saved[0], saved[1], saved[2]));
      for (int64_t k = 0; k < depth; ++k) h = at::relu(at::linear(h, saved[3], saved[4]));
      const at::Tensor out = at::linear(h, saved[5], saved[6]);
      variable_list inputs;
      std::vector<int> slots;
      for (int i = 0; i < kNumGrads; ++i) {
        if (mask[i]) inputs.push_back(saved[i]), slots.push_back(i);
      }
      const variable_list g = torch::autograd::grad({out}, inputs, {grad_out}, /*retain_graph=*/true,
                                                    /*create_graph=*/true, /*allow_unused=*/true);
      for (size_t j = 0; j < slots.size(); ++j) grads[slots[j]] = g[j];
      return grads;
    }
    const std::optional<at::Tensor> w_h = has_hidden ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // skips the autograd fallback's boxed checks
    auto result = call_dynamic_net_backward(grad_out, saved[0], saved[1], w_h, saved[5], saved[7], depth, mask);
    const std::array<at::Tensor, kNumGrads> g = {std::get<0>(result), std::get<1>(result), std::get<2>(result),
                                                 std::get<3>(result), std::get<4>(result), std::get<5>(result),
                                                 std::get<6>(result)};
    for (size_t i = 0; i < kNumGrads; ++i) grads[i] = mask[i] ? g[i] : at::Tensor();
    return grads;
  }
};

DynamicNetOutputs dynamic_net_autograd(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                                       const std::optional<at::Tensor>& w_h, const std::optional<at::Tensor>& b_h,
                                       const at::Tensor& w_out, const at::Tensor& b_out, int64_t depth) {
  auto outputs = DynamicNet::apply(x, w_in, b_in, w_h, b_h, w_out, b_out, depth);
  return {outputs[0], outputs[1]};
}

at::Tensor linear_relu_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                c10::string_view activation) {
  return LinearReLU::apply(x, weight, bias, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(dynnet, Autograd, m) {
  m.impl("linear_relu", &linear_relu_autograd);
  m.impl("dynamic_net", &dynamic_net_autograd);
}

}  // namespace dynnet
