// The CUDA kernels of dynnet::dynamic_net and dynamic_net_backward, registered for the CUDA
// dispatch key. The kernels and launchers live in dynamic_net.cuh (the CPU harness compiles them
// too); this file is their nvcc translation unit.
#include <torch/library.h>

#include "dynamic_net.cuh"

namespace dynnet {

TORCH_LIBRARY_IMPL(dynnet, CUDA, m) {
  m.impl("dynamic_net", &dynamic_net_cuda);
  m.impl("dynamic_net_backward", &dynamic_net_backward_cuda);
}

}  // namespace dynnet
