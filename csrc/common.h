// Shared host-side helpers for the dynnet ops: input validation (used by every dispatch key,
// so CPU and CUDA reject exactly the same inputs with the same messages), ceil_div, the
// activation enum parsed once from the op's string argument, and the kernel call counter.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <string>

namespace dynnet {

// The activation of the layer ops. ReLU is applied in the kernels' store (its backward mask comes
// from the output y); GELU (exact, erf), GELU's tanh approximation and SiLU are smooth: their
// backward needs the pre-activation z, which linear_act returns beside y.
enum class Activation { None, Relu, Gelu, GeluTanh, Silu };

inline Activation parse_activation(c10::string_view name) {
  if (name == "relu") return Activation::Relu;
  if (name == "none") return Activation::None;
  if (name == "gelu") return Activation::Gelu;
  if (name == "gelu_tanh") return Activation::GeluTanh;
  if (name == "silu") return Activation::Silu;
  TORCH_CHECK(false, "dynnet: activation must be 'relu', 'gelu', 'gelu_tanh', 'silu' or 'none', got '",
              std::string(name), "'");
}

inline const char* activation_name(Activation act) {
  switch (act) {
    case Activation::None: return "none";
    case Activation::Relu: return "relu";
    case Activation::Gelu: return "gelu";
    case Activation::GeluTanh: return "gelu_tanh";
    case Activation::Silu: return "silu";
  }
  return "none";
}

// constexpr: the CUDA kernels call it too (nvcc's --expt-relaxed-constexpr, which torch's builds pass).
constexpr bool is_smooth(Activation act) {
  return act == Activation::Gelu || act == Activation::GeluTanh || act == Activation::Silu;
}

// linear_act computes only the smooth activations (relu and none need no pre-activation).
inline void check_smooth(Activation act, c10::string_view name) {
  TORCH_CHECK(is_smooth(act), "dynnet: linear_act's activation must be 'gelu', 'gelu_tanh' or 'silu', got '",
              std::string(name), "' (linear_relu computes 'relu' and 'none')");
}

// linear_relu_backward's saved tensor y: the output for 'relu', the pre-activation for a smooth one.
inline void check_backward_saved(Activation act, bool has_saved) {
  TORCH_CHECK(act == Activation::None || has_saved,
              "dynnet: linear_relu_backward needs y: the forward output for 'relu', the pre-activation z "
              "(linear_act's second output) for 'gelu', 'gelu_tanh' and 'silu'");
}

// A smooth activation and its backward with stock's ops: the CUDA vendor path's forward (torch's own
// activation after the GEMM: on the H200 cuBLASLt's GELU epilogue was up to 1.7e7 ulps from it), the
// CPU's where ATen runs the GEMMs (large products, float64, a CPU without AVX2), and the recorded
// backward's.
inline void stock_activation_out(at::Tensor& y, const at::Tensor& z, Activation act) {  // y = act(z); y may be z
  if (act == Activation::Silu) {
    at::silu_out(y, z);
  } else {
    at::gelu_out(y, z, act == Activation::GeluTanh ? "tanh" : "none");
  }
}
inline at::Tensor stock_activation_backward(const at::Tensor& grad_y, const at::Tensor& z, Activation act) {
  if (act == Activation::Silu) return at::silu_backward(grad_y, z);
  return at::gelu_backward(grad_y, z, act == Activation::GeluTanh ? "tanh" : "none");
}

// The device kernels of the four ops count their calls (a relaxed atomic increment at entry, a
// few ns), so a test - or a user - can prove that a result came from dynnet's kernels and not
// from a stock fallback: dynnet_ext.ops.kernel_calls(). Defined in ops.cpp.
enum class KernelOp { LinearRelu, LinearReluBackward, DynamicNet, DynamicNetBackward, kCount };
void count_kernel_call(KernelOp op, c10::DeviceType device);
constexpr size_t kNumKernelOps = static_cast<size_t>(KernelOp::kCount);
constexpr std::array<const char*, kNumKernelOps> kKernelOpNames = {"linear_relu", "linear_relu_backward",
                                                                   "dynamic_net", "dynamic_net_backward"};

// The seven gradients of dynamic_net_backward, in its output order (and its output_mask's): the
// forward's tensor arguments x, w_in, b_in, w_h, b_h, w_out, b_out.
enum Grad { kX, kWIn, kBIn, kWH, kBH, kWOut, kBOut, kNumGrads };

template <typename T>
constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

#define DYNNET_CHECK_DTYPE(name, t)                                                          \
  TORCH_CHECK(::dynnet::is_supported_dtype((t).scalar_type()), "dynnet: ", name,             \
              " must be float32, float64, float16 or bfloat16, got ", (t).scalar_type())

#define DYNNET_CHECK_SAME(name, t, ref_name, ref)                                            \
  do {                                                                                       \
    TORCH_CHECK((t).scalar_type() == (ref).scalar_type(), "dynnet: ", name,                  \
                " must have the same dtype as ", ref_name, " (", (ref).scalar_type(),        \
                "), got ", (t).scalar_type());                                               \
    TORCH_CHECK((t).device() == (ref).device(), "dynnet: ", name,                            \
                " must be on the same device as ", ref_name, " (", (ref).device(), "), got ", \
                (t).device());                                                               \
  } while (0)

// Checks the forward arguments: x (*, in), weight (out, in), bias (out) or none.
inline void check_linear_args(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  DYNNET_CHECK_DTYPE("x", x);
  TORCH_CHECK(x.dim() >= 1, "dynnet: x must have at least 1 dimension (*, in_features), got a ",
              x.dim(), "-d tensor");
  TORCH_CHECK(weight.dim() == 2, "dynnet: weight must be 2-d (out_features, in_features), got shape ",
              weight.sizes());
  DYNNET_CHECK_SAME("weight", weight, "x", x);
  TORCH_CHECK(x.size(-1) == weight.size(1), "dynnet: x's last dimension (", x.size(-1),
              ") must equal weight's in_features (weight.shape[1] = ", weight.size(1),
              "); x has shape ", x.sizes(), ", weight has shape ", weight.sizes());
  if (bias.has_value()) {
    DYNNET_CHECK_SAME("bias", *bias, "x", x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "dynnet: bias must have shape (out_features,) = (", weight.size(0), ",), got ",
                bias->sizes());
  }
}

// Checks the backward arguments against the forward's: grad_y and y are (*, out).
inline void check_linear_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                       const at::Tensor& weight, const at::Tensor& y) {
  check_linear_args(x, weight, std::nullopt);
  DYNNET_CHECK_SAME("grad_y", grad_y, "x", x);
  DYNNET_CHECK_SAME("y", y, "x", x);
  auto expected = x.sizes().vec();
  expected.back() = weight.size(0);
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef(expected), "dynnet: grad_y must have shape ",
              at::IntArrayRef(expected), " (x's leading dims, out_features), got ", grad_y.sizes());
  TORCH_CHECK(y.sizes() == at::IntArrayRef(expected), "dynnet: y must have shape ",
              at::IntArrayRef(expected), " (x's leading dims, out_features), got ", y.sizes());
}

// Number of rows M when (*, features) is viewed as (M, features). Computed, not inferred with
// reshape(-1, ...), which is ambiguous when features == 0.
inline int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

// t viewed as (rows, cols); the common 2-d case skips reshape, which costs microseconds a call.
inline at::Tensor as_2d(const at::Tensor& t, int64_t rows, int64_t cols) {
  return t.dim() == 2 ? t : t.reshape({rows, cols});
}

// Output shape (*, out) for x (*, in).
inline std::vector<int64_t> linear_out_shape(const at::Tensor& x, const at::Tensor& weight) {
  auto shape = x.sizes().vec();
  shape.back() = weight.size(0);
  return shape;
}

// Checks the arguments of dynamic_net: x (*, D_in), w_in (H, D_in), b_in (H), w_h and b_h (H, H)
// and (H) - both given or both None, required when depth > 0 - w_out (D_out, H), b_out (D_out).
inline void check_dynamic_net_args(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                                   const std::optional<at::Tensor>& w_h, const std::optional<at::Tensor>& b_h,
                                   const at::Tensor& w_out, const at::Tensor& b_out, int64_t depth) {
  TORCH_CHECK(depth >= 0, "dynnet: depth must be >= 0, got ", depth);
  check_linear_args(x, w_in, std::nullopt);
  const int64_t H = w_in.size(0);
  DYNNET_CHECK_SAME("b_in", b_in, "x", x);
  TORCH_CHECK(b_in.dim() == 1 && b_in.size(0) == H, "dynnet: b_in must have shape (H,) = (", H, ",), got ",
              b_in.sizes());
  TORCH_CHECK(w_h.has_value() == b_h.has_value(), "dynnet: w_h and b_h must both be given or both be None");
  TORCH_CHECK(w_h.has_value() || depth == 0, "dynnet: depth ", depth,
              " reuses the hidden layer, so w_h and b_h must be given (None is allowed only at depth 0)");
  if (w_h.has_value()) {
    DYNNET_CHECK_SAME("w_h", *w_h, "x", x);
    TORCH_CHECK(w_h->dim() == 2 && w_h->size(0) == H && w_h->size(1) == H,
                "dynnet: w_h must have shape (H, H) = (", H, ", ", H, ") with H = w_in.shape[0], got ", w_h->sizes());
    DYNNET_CHECK_SAME("b_h", *b_h, "x", x);
    TORCH_CHECK(b_h->dim() == 1 && b_h->size(0) == H, "dynnet: b_h must have shape (H,) = (", H, ",), got ",
                b_h->sizes());
  }
  DYNNET_CHECK_SAME("w_out", w_out, "x", x);
  TORCH_CHECK(w_out.dim() == 2 && w_out.size(1) == H, "dynnet: w_out must have shape (D_out, H) with H = ", H,
              " (w_in.shape[0]), got ", w_out.sizes());
  DYNNET_CHECK_SAME("b_out", b_out, "x", x);
  TORCH_CHECK(b_out.dim() == 1 && b_out.size(0) == w_out.size(0), "dynnet: b_out must have shape (D_out,) = (",
              w_out.size(0), ",), got ", b_out.sizes());
}

// Checks the arguments of dynamic_net_backward against the forward's: grad_out (*, D_out) and
// acts ((depth + 1) * M, H), M = x's leading rows.
inline void check_dynamic_net_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_in,
                                            const std::optional<at::Tensor>& w_h, const at::Tensor& w_out,
                                            const at::Tensor& acts, int64_t depth) {
  TORCH_CHECK(depth >= 0, "dynnet: depth must be >= 0, got ", depth);
  check_linear_args(x, w_in, std::nullopt);
  const int64_t H = w_in.size(0);
  TORCH_CHECK(w_h.has_value() || depth == 0, "dynnet: depth ", depth, " needs w_h");
  if (w_h.has_value()) {
    DYNNET_CHECK_SAME("w_h", *w_h, "x", x);
    TORCH_CHECK(w_h->dim() == 2 && w_h->size(0) == H && w_h->size(1) == H, "dynnet: w_h must have shape (H, H) = (",
                H, ", ", H, "), got ", w_h->sizes());
  }
  DYNNET_CHECK_SAME("w_out", w_out, "x", x);
  TORCH_CHECK(w_out.dim() == 2 && w_out.size(1) == H, "dynnet: w_out must have shape (D_out, H) with H = ", H,
              ", got ", w_out.sizes());
  DYNNET_CHECK_SAME("grad_out", grad_out, "x", x);
  auto expected = x.sizes().vec();
  expected.back() = w_out.size(0);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(expected), "dynnet: grad_out must have shape ",
              at::IntArrayRef(expected), " (x's leading dims, D_out), got ", grad_out.sizes());
  DYNNET_CHECK_SAME("acts", acts, "x", x);
  const int64_t rows = leading_rows(x);
  TORCH_CHECK(acts.dim() == 2 && acts.size(0) == (depth + 1) * rows && acts.size(1) == H,
              "dynnet: acts must have shape ((depth + 1) * M, H) = (", (depth + 1) * rows, ", ", H,
              ") as dynamic_net returned it, got ", acts.sizes());
}

}  // namespace dynnet
