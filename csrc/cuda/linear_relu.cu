// The CUDA kernels of dynnet::linear_relu, linear_act and linear_relu_backward, registered for the CUDA
// dispatch key. The kernels and launchers live in linear_relu.cuh (the CPU harness compiles
// them too); this file is their nvcc translation unit.
#include <torch/library.h>

#include "linear_relu.cuh"

namespace dynnet {

TORCH_LIBRARY_IMPL(dynnet, CUDA, m) {
  m.impl("linear_relu", &linear_relu_cuda);
  m.impl("linear_act", &linear_act_cuda);
  m.impl("linear_relu_backward", &linear_relu_backward_cuda);
}

}  // namespace dynnet
