// The CUDA harness's build of dynamic_net.cuh: the same kernels and launchers nvcc compiles,
// compiled by the host compiler on the shim (runtime.cuh picks it: DYNNET_CUDA_HARNESS).
#include "../dynamic_net.cuh"
