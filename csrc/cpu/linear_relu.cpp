// CPU kernels of dynnet::linear_relu, dynnet::linear_act (y and the pre-activation z of a smooth
// activation) and dynnet::linear_relu_backward.
//
// Forward, x2 = x viewed as (M, K), weight (N, K), bias (N):
//   y = act(x2 @ weight.T + bias)
// float32, bfloat16, float16 (on an AVX2 or AVX-512 CPU): one GEMM of the project's engine
// (gemm.h): weight.T packed into panels (or, float32 at shapes where packing does not pay, read
// where it lies by the dot form), x read where it lies, bias + ReLU + rounding to the
// dtype in the micro-kernel's store - no second pass over y, and half types rounded once from
// the fp32 accumulator. The work is split over rows (or column panels) of y across threads.
// float64, float32 and (on AMX CPUs) bfloat16 at large products (gemm::kernels_for), or
// DYNNET_EXT_CPU_GEMM=aten: ATen's addmm into y, the bias inside it as stock's F.linear has it,
// then stock's ReLU in place.
// GELU, GELU-tanh and SiLU (smooth): where the engine runs the GEMM, its store rounds z to the
// dtype (writing it for linear_act, which saves it) and the activation (activation_kernel.h) runs
// over each block of stored tiles while they are in L1 - no pass over memory for it. Where ATen
// runs the GEMM, stock's op after it: over y in place, or from z into y for linear_act.
//
// Backward, g = (y <= 0 ? 0 : grad_y) (g = grad_y for 'none'; g = grad_y * act'(z) for a smooth
// activation, whose saved tensor is z: one pass writes g, then as for 'none'):
//   grad_bias = column sums of g, one pass (accumulated in acc_type: double for float, float
//     for half types; columns split across threads, so the sum order is fixed);
//   grad_x = g @ weight, grad_weight = g.T @ x.
// With the engine (at least two micro-tiles of rows), g is never written: ReLU's mask is
// applied while grad_y is packed as each GEMM's A operand; the two GEMMs (equal FLOPs) run side
// by side, one thread each, each packing its own B (gemm::run). With ATen, one pass writes g
// (and grad_bias), then the two GEMMs run side by side, one thread each. Gradients not asked for
// are neither computed nor allocated.
//
// NaN behaves as in stock PyTorch (see building_blocks.h).

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gemm.h"
#include "building_blocks.h"

namespace dynnet {
namespace {

constexpr int64_t kGrainElements = 32768;  // elements per parallel task: below this, threads cost more than they save

gemm::Act engine_act(Activation act) {
  return act == Activation::Gelu ? gemm::Act::Gelu : act == Activation::GeluTanh ? gemm::Act::GeluTanh : gemm::Act::Silu;
}

// grad_y * act'(z) for a smooth activation, a new contiguous tensor: the engine's kernel when
// the engine ran the layer's GEMMs (`kern`), else stock's op, as ATen's path has stock's GEMMs.
at::Tensor activation_grad(const gemm::Kernels* kern, const at::Tensor& grad_y, const at::Tensor& z, Activation act) {
  if (!kern) return stock_activation_backward(grad_y, z, act).contiguous();
  const at::Tensor gy = grad_y.contiguous(), zc = z.contiguous();
  at::Tensor g = at::empty(zc.sizes(), zc.options());
  const gemm::DType dt = gemm::dtype_of(z.scalar_type());
  const char* gyp = static_cast<const char*>(gy.const_data_ptr());
  const char* zp = static_cast<const char*>(zc.const_data_ptr());
  char* gp = static_cast<char*>(g.data_ptr());
  const int64_t size = z.element_size();
  at::parallel_for(0, zc.numel(), kGrainElements, [&](int64_t i0, int64_t i1) {
    kern->activation_grad(dt, engine_act(act), gyp + i0 * size, zp + i0 * size, gp + i0 * size, i1 - i0);
  });
  return g;
}

// The engine's kernels for a layer's GEMMs (M, K) x (K, N), or nullptr for ATen's path. With no
// input features (K == 0) ATen's addmm returns the bias itself, as stock does; the engine's
// 0 + b would turn a -0 bias into +0.
const gemm::Kernels* layer_kernels(at::ScalarType dtype, int64_t M, int64_t N, int64_t K) {
  return K > 0 ? gemm::kernels_for(dtype, double(M) * double(N) * double(K)) : nullptr;
}

at::Tensor linear_relu_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, c10::string_view activation) {
  check_linear_args(x, weight, bias);
  const Activation act = parse_activation(activation);
  TORCH_CHECK(x.device().is_cpu(), "dynnet: linear_relu's CPU kernel got x on ", x.device());
  count_kernel_call(KernelOp::LinearRelu, c10::DeviceType::CPU);

  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t M = leading_rows(x);
  // Allocated in its final shape and filled through a 2-d view: the op returns a tensor that is
  // nobody's view (autograd forbids in-place changes to views made inside a custom Function).
  at::Tensor y = at::empty(linear_out_shape(x, weight), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M > 0 && N > 0) {
    at::Tensor y2 = y.view({M, N});
    linear_act_2d(y2, as_2d(x, M, K), weight, bias, act);
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor> linear_act_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, c10::string_view activation) {
  check_linear_args(x, weight, bias);
  const Activation act = parse_activation(activation);
  check_smooth(act, activation);
  TORCH_CHECK(x.device().is_cpu(), "dynnet: linear_act's CPU kernel got x on ", x.device());
  count_kernel_call(KernelOp::LinearRelu, c10::DeviceType::CPU);

  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t M = leading_rows(x);
  const auto options = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor z = at::empty(linear_out_shape(x, weight), options);
  at::Tensor y = at::empty(linear_out_shape(x, weight), options);
  if (M > 0 && N > 0) {
    at::Tensor y2 = y.view({M, N});
    linear_act_2d(y2, as_2d(x, M, K), weight, bias, act, z.view({M, N}));
  }
  return {y, z};
}

// Columns per task of a pass that sums columns over `rows` rows.
int64_t col_grain(int64_t rows) { return std::max<int64_t>(16, kGrainElements / std::max<int64_t>(rows, 1)); }

// Writes g = mask(grad_y) (kWriteG) and/or grad_bias = column sums of g (kSum). grad_y and y are
// row-major (rows, cols) with row strides gy_ld and y_ld; g is contiguous. The switches are
// template parameters so the inner loop has no branch and vectorises.
template <typename scalar_t, bool kRelu, bool kWriteG, bool kSum>
void mask_and_bias_grad(const scalar_t* __restrict__ gy, int64_t gy_ld, const scalar_t* __restrict__ y, int64_t y_ld,
                        scalar_t* __restrict__ g, scalar_t* __restrict__ gb, int64_t rows, int64_t cols) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  // Split over columns so each thread owns whole column sums: the reduction order over rows is
  // the same whatever the thread count.
  at::parallel_for(0, cols, col_grain(rows), [&](int64_t c0, int64_t c1) {
    const int64_t width = c1 - c0;
    std::vector<acc_t> acc_buf(kSum ? width : 0, acc_t(0));
    // Without g to write, the masked row goes through a scratch row: two simple loops (select,
    // then widen-and-add) vectorise; one loop doing both did not.
    std::vector<scalar_t> row_buf(kWriteG ? 0 : width);
    acc_t* __restrict__ acc = acc_buf.data();
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t* __restrict__ gyr = gy + i * gy_ld + c0;
      const scalar_t* __restrict__ yr = kRelu ? y + i * y_ld + c0 : nullptr;
      scalar_t* __restrict__ gr = kWriteG ? g + i * cols + c0 : row_buf.data();
      const scalar_t* __restrict__ masked = gyr;
      if constexpr (kRelu) {
        relu_mask(gr, gyr, yr, width);
        masked = gr;
      } else if constexpr (kWriteG) {
        for (int64_t j = 0; j < width; ++j) gr[j] = gyr[j];
      }
      if constexpr (kSum) add_row(acc, masked, width);
    }
    if constexpr (kSum)
      for (int64_t j = 0; j < width; ++j) gb[c0 + j] = static_cast<scalar_t>(acc[j]);
  });
}

// grad_bias = column sums of g = mask(grad_y) (y undefined: no mask), g never written. The half
// types' sums run on the engine's vector kernel where there is one (c10::Half's scalar
// conversions keep mask_and_bias_grad's loop from vectorising); the same fp32 sums in the same
// order either way.
void bias_grad(const gemm::Kernels* kern, const at::Tensor& gy2, const at::Tensor& y2, at::Tensor& gb) {
  const int64_t M = gy2.size(0), N = gy2.size(1);
  const bool relu = y2.defined();
  if (kern && gy2.scalar_type() != at::kFloat) {
    const gemm::DType dt = gemm::dtype_of(gy2.scalar_type());
    char* out = static_cast<char*>(gb.data_ptr());
    at::parallel_for(0, N, col_grain(M), [&](int64_t c0, int64_t c1) {
      kern->column_sums(dt, gy2.const_data_ptr(), gy2.stride(0), relu ? y2.const_data_ptr() : nullptr,
                        relu ? y2.stride(0) : 0, M, c0, c1, out + c0 * gb.element_size());
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gy2.scalar_type(), "linear_relu_backward_cpu", [&] {
    const scalar_t* gyp = gy2.const_data_ptr<scalar_t>();
    relu ? mask_and_bias_grad<scalar_t, true, false, true>(gyp, gy2.stride(0), y2.const_data_ptr<scalar_t>(),
                                                           y2.stride(0), nullptr, gb.data_ptr<scalar_t>(), M, N)
         : mask_and_bias_grad<scalar_t, false, false, true>(gyp, gy2.stride(0), nullptr, 0, nullptr,
                                                            gb.data_ptr<scalar_t>(), M, N);
  });
}

// A (rows, cols) tensor whose rows are contiguous, without copying when it already is one.
at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.stride(1) == 1 && t.stride(0) >= t.size(1)) ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& y, c10::string_view activation, std::array<bool, 3> output_mask) {
  Activation act = parse_activation(activation);
  check_backward_saved(act, y.has_value());
  check_linear_backward_args(grad_y, x, weight, y.has_value() ? *y : grad_y);
  TORCH_CHECK(x.device().is_cpu(), "dynnet: linear_relu_backward's CPU kernel got x on ", x.device());
  count_kernel_call(KernelOp::LinearReluBackward, c10::DeviceType::CPU);

  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t M = leading_rows(x);
  at::Tensor gy2 = rows_contiguous(as_2d(grad_y, M, N));
  const gemm::Kernels* kern = gemm::kernels_for(x.scalar_type(), double(M) * double(N) * double(K));
  if (is_smooth(act)) {  // y is z: g = grad_y * act'(z), written once, then as for 'none'
    gy2 = activation_grad(layer_kernels(x.scalar_type(), M, N, K), gy2, as_2d(*y, M, N), act);
    act = Activation::None;
  }
  const auto [need_gx, need_gw, need_gb] = output_mask;
  const auto empty = [&] { return at::empty({0}, x.options()); };

  at::Tensor gb = need_gb ? at::empty({N}, x.options()) : empty();
  const bool relu = act == Activation::Relu;
  // Fewer rows than two micro-tiles: packing the weight for grad_x costs about as much as the
  // product itself, so those take ATen's path - unless the engine reads float32 B where it lies
  // (the direct form, gemm.cpp): then only 1 row does (benchmarks/results/README.md, thresholds:
  // layer-backward-min-rows).
  const bool direct = kern && kern->direct && x.scalar_type() == at::kFloat;
  if (kern && (M >= 2 * kern->mr || (direct && M >= 2)) && (need_gx || need_gw)) {
    // Our GEMMs: the mask is applied while grad_y is packed, so g is never written; the bias
    // gradient is the one pass left.
    const at::Tensor y2 = relu ? rows_contiguous(as_2d(*y, M, N)) : at::Tensor();
    if (need_gb) bias_grad(kern, gy2, y2, gb);
    at::Tensor gx = need_gx ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous)) : empty();
    at::Tensor gw = need_gw ? at::empty({N, K}, x.options()) : empty();
    const at::Tensor x2 = as_2d(x, M, K);  // held: the problems point into it
    const gemm::View no_mask;
    // grad_x = g @ weight, grad_weight = g.T @ x, with g = mask(grad_y) made while packing.
    const gemm::Problem px = gemm::product(M, K, N, x.scalar_type(), gemm::view_of(gy2), gemm::view_of(weight),
                                           gx.data_ptr(), K, relu ? gemm::view_of(y2) : no_mask);
    const gemm::Problem pw = gemm::product(N, K, M, x.scalar_type(), gemm::view_of_t(gy2), gemm::view_of(x2),
                                           gw.data_ptr(), K, relu ? gemm::view_of_t(y2) : no_mask);
    std::vector<const gemm::Problem*> problems;
    if (need_gx && M > 0 && K > 0) problems.push_back(&px);
    if (need_gw && N > 0 && K > 0) problems.push_back(&pw);
    if (!problems.empty()) gemm::run(kern, problems);
    return {gx, gw, gb};
  }

  if (!(need_gx || need_gw)) {  // grad_bias alone
    if (need_gb) bias_grad(kern, gy2, relu ? rows_contiguous(as_2d(*y, M, N)) : at::Tensor(), gb);
    return {empty(), empty(), gb};
  }
  at::Tensor g = gy2;  // the gradient at the pre-activation; grad_y itself for 'none'
  if (relu) {
    g = at::empty({M, N}, x.options());
    const at::Tensor y2 = rows_contiguous(as_2d(*y, M, N));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_relu_backward_cpu", [&] {
      const scalar_t* gyp = gy2.const_data_ptr<scalar_t>();
      const scalar_t* yp = y2.const_data_ptr<scalar_t>();
      need_gb ? mask_and_bias_grad<scalar_t, true, true, true>(gyp, gy2.stride(0), yp, y2.stride(0),
                                                               g.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>(), M, N)
              : mask_and_bias_grad<scalar_t, true, true, false>(gyp, gy2.stride(0), yp, y2.stride(0),
                                                                g.data_ptr<scalar_t>(), nullptr, M, N);
    });
  } else if (need_gb) {  // 'none': the column sums of grad_y
    bias_grad(kern, gy2, at::Tensor(), gb);
  }

  at::Tensor gx = need_gx ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous)) : empty();
  at::Tensor gw = need_gw ? at::empty({N, K}, x.options()) : empty();
  at::Tensor gx2 = need_gx ? gx.view({M, K}) : gx;
  const auto grad_input = [&] { at::cpu::mm_out(gx2, g, weight); };
  const auto grad_weight = [&] { at::cpu::mm_out(gw, g.t(), as_2d(x, M, K)); };
  if (need_gx && need_gw && at::get_num_threads() > 1) {
    // The two GEMMs have the same FLOP count (2 M N K) and are independent: run them side by
    // side, one per thread (the BLAS runs single-threaded inside a parallel region), instead of
    // one after the other each split over the threads (benchmarks/results/README.md, thresholds:
    // layer-backward-side-by-side).
    parallel_tasks(2, [&](int64_t t) { t == 0 ? grad_input() : grad_weight(); });
  } else {
    if (need_gx) grad_input();
    if (need_gw) grad_weight();
  }
  return {gx, gw, gb};
}

}  // namespace

void linear_act_2d(at::Tensor& y2, const at::Tensor& x2, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, Activation act, const at::Tensor& z2) {
  const int64_t M = y2.size(0), N = y2.size(1);
  if (M == 0 || N == 0) return;
  if (const gemm::Kernels* kern = layer_kernels(x2.scalar_type(), M, N, x2.size(1))) {
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    gemm::Problem p = gemm::product(M, N, x2.size(1), x2.scalar_type(), gemm::view_of(x2), gemm::view_of_t(weight),
                                    y2.data_ptr(), y2.stride(0));
    p.epi.bias = b.defined() ? b.const_data_ptr() : nullptr;
    p.epi.relu = act == Activation::Relu;
    if (is_smooth(act)) {
      p.epi.smooth = true;
      p.epi.act = engine_act(act);
      if (z2.defined()) p.epi.z = gemm::view_of(z2);
    }
    gemm::run(kern, {&p});
    return;
  }
  // The bias goes into the GEMM (addmm: y filled with the bias, then accumulated into), as
  // stock's F.linear does - so y is stock's, bit for bit (half types: rounded once from the fp32
  // accumulator; float32: one pass over y fewer than adding it afterwards, 2-3% of a
  // transformer-width layer, benchmarks/results/README.md, thresholds: avx2-float32-aten). With no
  // input features (K == 0) addmm returns the bias itself, as stock does. ReLU is stock's own
  // after it, in place: clamp_min(y, 0), which torch.relu is (vectorised in every dtype; a
  // scalar loop over bfloat16 took longer than the AMX GEMM before it).
  // A smooth activation is stock's op, from z2 when it is kept (else in place).
  at::Tensor lin = z2.defined() ? z2 : y2;
  if (bias.has_value()) {
    at::cpu::addmm_out(lin, *bias, x2, weight.t());
  } else {
    at::cpu::mm_out(lin, x2, weight.t());  // K == 0 gives zeros, as nn.Linear does
  }
  if (act == Activation::Relu) at::cpu::clamp_min_(y2, 0);
  if (is_smooth(act)) stock_activation_out(y2, lin, act);
}

TORCH_LIBRARY_IMPL(dynnet, CPU, m) {
  m.impl("linear_relu", &linear_relu_cpu);
  m.impl("linear_act", &linear_act_cpu);
  m.impl("linear_relu_backward", &linear_relu_backward_cpu);
}

}  // namespace dynnet
