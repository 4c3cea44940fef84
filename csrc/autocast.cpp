// The ops under torch.autocast (CPU and CUDA): their arguments are cast as autocast casts
// nn.Linear's - at::autocast::cached_cast, the rule of stock's lower-precision ops: a floating
// tensor of the autocast device other than float64 goes to the autocast dtype, the rest stay as
// they are, and a leaf parameter's cast is made once per autocast region and reused (the shared
// hidden layer of DynamicNet(fusion="layer") is cast once a forward, as stock's is) - then the op
// runs below autocast. The backward ops are not registered here: autocast leaves a backward alone.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "dispatch.h"

namespace dynnet {
namespace {

template <c10::DeviceType D>
struct Autocast {
  static at::Tensor cast(const at::Tensor& t) {
    return at::autocast::cached_cast(at::autocast::get_autocast_dtype(D), t, D);
  }
  static std::optional<at::Tensor> cast(const std::optional<at::Tensor>& t) {
    return t.has_value() ? std::optional<at::Tensor>(cast(*t)) : std::nullopt;
  }

  static at::Tensor linear_relu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                c10::string_view activation) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(D));
    return call_linear_relu(cast(x), cast(weight), cast(bias), activation);
  }

  static std::tuple<at::Tensor, at::Tensor> linear_act(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       c10::string_view activation) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(D));
    return call_linear_act(cast(x), cast(weight), cast(bias), activation);
  }

  static DynamicNetOutputs dynamic_net(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                                       const std::optional<at::Tensor>& w_h, const std::optional<at::Tensor>& b_h,
                                       const at::Tensor& w_out, const at::Tensor& b_out, int64_t depth) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(D));
    return call_dynamic_net(cast(x), cast(w_in), cast(b_in), cast(w_h), cast(b_h), cast(w_out), cast(b_out), depth);
  }
};

}  // namespace
}  // namespace dynnet

TORCH_LIBRARY_IMPL(dynnet, AutocastCPU, m) {
  using A = dynnet::Autocast<c10::DeviceType::CPU>;
  m.impl("linear_relu", &A::linear_relu);
  m.impl("linear_act", &A::linear_act);
  m.impl("dynamic_net", &A::dynamic_net);
}

TORCH_LIBRARY_IMPL(dynnet, AutocastCUDA, m) {
  using A = dynnet::Autocast<c10::DeviceType::CUDA>;
  m.impl("linear_relu", &A::linear_relu);
  m.impl("linear_act", &A::linear_act);
  m.impl("dynamic_net", &A::dynamic_net);
}
