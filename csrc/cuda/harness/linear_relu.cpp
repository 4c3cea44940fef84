// The CUDA harness's build of linear_relu.cuh: the same kernels and launchers nvcc compiles,
// compiled by the host compiler on the shim (runtime.cuh picks it: DYNNET_CUDA_HARNESS).
#include "../linear_relu.cuh"
