// The dispatch rule of paths.h applied to the ops' tensors (the precision column from
// precision.h), and the rule's errors (a wrong DYNNET_EXT_CUDA_PATH) as torch errors. Shared by
// linear_relu.cuh and dynamic_net.cuh (both builds: nvcc and the CPU harness).
#pragma once

#include <c10/util/Exception.h>

#include <stdexcept>

#include "paths.h"
#include "precision.h"

namespace dynnet {

template <typename F>
auto choose(F&& rule) -> decltype(rule()) {
  try {
    return rule();
  } catch (const std::invalid_argument& e) {
    C10_THROW_ERROR(ValueError, e.what());
  }
}

inline paths::Path layer_path(at::ScalarType t, int64_t M, int64_t K, int64_t N, bool backward) {
  return choose([&] { return paths::choose_layer(gemm_precision(t), M, K, N, backward); });
}

inline paths::NetPath net_path(at::ScalarType t, int64_t M, int64_t D_in, int64_t H, int64_t D_out, int64_t depth) {
  return choose([&] { return paths::choose_net(gemm_precision(t), M, D_in, H, D_out, depth); });
}

}  // namespace dynnet
