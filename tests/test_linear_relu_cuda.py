"""The CUDA kernels of torch.ops.dynnet.linear_relu / linear_relu_backward (csrc/cuda/linear_relu.cuh).

What tests/test_linear_relu.py checks on every device, plus what is specific to the hand-written
tiled GEMMs: shapes around the 64 x 64 x 32 and 16 x 16 x 32 tiles, grids with more than 65535 tiles, half
types against a float32 reference on the same rounded inputs, bitwise determinism, output_mask
subsets bitwise equal to the full call, CPU vs CUDA, and gradcheck in float64 on the GPU.

Each case runs on two targets (the `target` fixture): "cuda", the GPU (skipped without one),
and "harness", the same launchers and kernels compiled for the CPU (tests/cuda_harness.py),
which runs everywhere; and on each forced path (cuda_harness.PATHS): the custom kernels with
16 x 16 split-reduction tiles ("split") and with 64 x 64 tiles ("wide"), and the vendor path
("vendor": cuBLAS on the GPU; in the harness the same host code with a float64 reference GEMM).
A few cases are GPU-only; each says why.
"""

import itertools
import math

import pytest
import torch

import cuda_harness
from conftest import TOLERANCES, tol
from dynnet_ext import BUILD_INFO, LinearReLUFunction, functional, has_kernels, reference
from dynnet_ext.ops.activations import SMOOTH_ACTIVATIONS

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
HALF = (torch.float16, torch.bfloat16)

# (leading dims of x, in_features K, out_features N). The kernels tile C in 64 x 64 blocks and
# the reduction in slices of 32, so sizes sit on, just below and just above those multiples.
SHAPES = [
    ((1,), 1, 1),
    ((64,), 32, 64),  # exact tiles
    ((63,), 33, 65),
    ((65,), 31, 63),
    ((128,), 64, 128),  # exact tiles, 2 x 2 blocks, 2 slices
    ((129,), 1, 3),  # K = 1
    ((64,), 1000, 100),  # the seed's input layer
    ((64,), 100, 100),  # the seed's hidden layer
    ((64,), 100, 10),  # the seed's output layer
    ((130,), 33, 200),  # several tiles both ways
    ((0,), 8, 4),  # M = 0: nothing to launch
    ((5,), 0, 3),  # K = 0: y = act(bias)
    ((4,), 6, 0),  # N = 0
    ((2, 3), 11, 7),  # 3-D input
    ((3, 5, 7), 19, 23),  # 4-D input
    ((), 9, 4),  # 1-D input
]


@pytest.fixture(params=cuda_harness.targets())
def target(request):
    yield from cuda_harness.forced(request)


def make(lead, k, n, dtype, bias=True, device="cuda"):
    x = torch.randn(*lead, k, dtype=dtype, device=device)
    w = (torch.randn(n, k, dtype=dtype, device=device) / max(k, 1) ** 0.5).to(dtype)
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    return x, w, b


def up(t):
    """float32 copy of a half-type tensor (the same rounded values), else the tensor itself."""
    return t.float() if t is not None and t.dtype in HALF else t


def expected_forward(x, w, b, activation):
    """The stock reference; for half types in float32 on the same rounded inputs."""
    return reference.linear_act(up(x), up(w), up(b), activation)


def expected_backward(gy, x, w, y, activation):
    """(grad_x, grad_w, grad_b) by the formula, masked with the kernel's own y as threshold_backward
    does (so a y that rounds to 0 in a half type masks both sides alike); float32 for half types."""
    g = up(gy)
    if activation == "relu":
        g = g.masked_fill(up(y) <= 0, 0)
    k, n = w.shape[1], w.shape[0]
    m = math.prod(x.shape[:-1])  # not reshape(-1, k): ambiguous when k == 0
    g2, x2 = g.reshape(m, n), up(x).reshape(m, k)
    return (g2 @ up(w)).reshape(x.shape), g2.T @ x2, g2.sum(0)


def assert_close(got, want, dtype, **kw):
    assert got.dtype == dtype and got.device.type == want.device.type
    torch.testing.assert_close(up(got), want, **tol(dtype), **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_forward(target, shape, dtype, bias, activation):
    x, w, b = make(*shape, dtype, bias, target.device)
    y = target.ops.linear_relu(x, w, b, activation)
    assert y.shape == (*shape[0], shape[2]) and y.is_contiguous()
    assert_close(y, expected_forward(x, w, b, activation), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_backward(target, shape, dtype, bias, activation):
    x, w, b = make(*shape, dtype, bias, target.device)
    y = target.ops.linear_relu(x, w, b, activation)
    gy = torch.randn_like(y)
    saved = y if activation == "relu" else None  # 'none' needs no y
    gx, gw, gb = target.ops.linear_relu_backward(gy, x, w, saved, activation, [True, True, bias])
    ex, ew, eb = expected_backward(gy, x, w, y, activation)
    assert gx.shape == x.shape and gw.shape == w.shape
    assert_close(gx, ex, dtype)
    assert_close(gw, ew, dtype)
    if bias:
        assert_close(gb, eb, dtype)
    else:
        assert gb.shape == (0,)


SMOOTH = SMOOTH_ACTIVATIONS
# Tile edges both ways, several reduction slices, rows that do and do not allow vector loads.
SMOOTH_SHAPES = [((63,), 33, 65), ((130,), 97, 100), ((2, 33), 40, 65), ((64,), 1000, 100), ((5,), 0, 3)]


def stock_activation_grad(gy, z, activation):
    if activation == "silu":
        return torch.ops.aten.silu_backward(gy, z)
    return torch.ops.aten.gelu_backward(gy, z, approximate="tanh" if activation == "gelu_tanh" else "none")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SMOOTH_SHAPES, ids=str)
@pytest.mark.parametrize("activation", SMOOTH)
def test_smooth_activations(target, shape, dtype, activation):
    # linear_act's z is the 'none' layer's bits (the same GEMM and rounding), and y = act(z) is
    # linear_relu's bits, within the dtype's tolerance of stock's op on that z: the custom path
    # computes it in its epilogue in stock's CUDA forms (activation.cuh; in the harness with the
    # host's libm, so ulps apart from torch's CPU kernels), the vendor path is stock's op itself.
    # The backward takes z in y's place: the custom path applies the derivative as grad_y's tiles
    # are loaded, the vendor path in its one pass; the result is the 'none' backward of stock's
    # gradient at z (rounded to the dtype as stock's op returns it) within the dtype's tolerance.
    x, w, b = make(*shape, dtype, True, target.device)
    ops = target.ops
    z_none = ops.linear_relu(x, w, b, "none")
    y, z = ops.linear_act(x, w, b, activation)
    assert torch.equal(z, z_none) and torch.equal(ops.linear_relu(x, w, b, activation), y)
    want = reference.activation(z, activation)
    if target.path == "vendor":
        assert torch.equal(y, want)
    assert_close(y, up(want), dtype)
    gy = torch.randn_like(y)
    got = ops.linear_relu_backward(gy, x, w, z, activation, [True, True, True])
    wanted = ops.linear_relu_backward(stock_activation_grad(gy, z, activation), x, w, None, "none", [True, True, True])
    for name, g, e in zip("xwb", got, wanted, strict=True):
        assert_close(g, up(e), dtype, msg=lambda m, name=name: f"grad_{name}: {m}")


@pytest.mark.parametrize("activation", SMOOTH)
def test_smooth_activations_at_special_values(target, activation):
    # A 1 x 1 identity weight: y = act(x) and grad_x = act'(x) * grad_y, at NaN, +-inf, +-0, the
    # tails and the cancellation zones; NaN and inf where stock's op gives them (its formulas,
    # evaluated in IEEE arithmetic), the values within float32 tolerance of it.
    dev = target.device
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, -1e-30, 0.75, -0.75, 3.0, -3.0,
                      9.0, -9.0, 20.0, -20.0, 1e4, -1e4, 3e38, -3e38], device=dev).reshape(-1, 1)
    w = torch.ones(1, 1, device=dev)
    y, z = target.ops.linear_act(x, w, None, activation)
    want = reference.activation(x, activation)
    torch.testing.assert_close(z, x, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(y.isnan(), want.isnan())
    torch.testing.assert_close(y, want, equal_nan=True, **tol(torch.float32))
    gy = torch.ones_like(y)
    gx, _, _ = target.ops.linear_relu_backward(gy, x, w, z, activation, [True, False, False])
    want_g = stock_activation_grad(gy, x, activation)
    assert torch.equal(gx.isnan(), want_g.isnan()), (gx.flatten(), want_g.flatten())
    torch.testing.assert_close(gx, want_g, equal_nan=True, **tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_backward_matches_stock_autograd(target, dtype):
    x, w, b = make((37, 3), 70, 45, dtype, device=target.device)
    y = target.ops.linear_relu(x, w, b, "relu")
    gy = torch.randn_like(y)
    got = target.ops.linear_relu_backward(gy, x, w, y, "relu", [True, True, True])
    for g, r in zip(got, reference.linear_act_backward(gy, x, w, b, "relu")):
        torch.testing.assert_close(g, r, **tol(dtype))


# GPU only: 65537 blocks of full tile work take about a minute in the harness, whose launch
# checks (a grid's y and z at most 65535) apply to every launch it runs.
@GPU
def test_grid_larger_than_65535_tiles():
    # 65537 row tiles: the grid must not put them on a dimension limited to 65535.
    x, w, b = make((64 * 65536 + 1,), 2, 3, torch.float32)
    y = torch.ops.dynnet.linear_relu(x, w, b, "relu")
    torch.testing.assert_close(y, reference.linear_act(x, w, b), **tol(torch.float32))
    gy = torch.randn_like(y)
    gx, _, _ = torch.ops.dynnet.linear_relu_backward(gy, x, w, y, "relu", [True, False, False])
    torch.testing.assert_close(gx, expected_backward(gy, x, w, y, "relu")[0], **tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_and_broadcast_inputs(target, dtype):
    dev = target.device
    base = torch.randn(150, 3 * 70, dtype=dtype, device=dev)
    x = base[::2, ::3]  # (75, 70), strides (420, 3)
    w = torch.randn(70, 90, dtype=dtype, device=dev).T  # (90, 70), transposed view
    b = torch.randn(180, dtype=dtype, device=dev)[::2]
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    y = target.ops.linear_relu(x, w, b, "relu")
    assert_close(y, expected_forward(x, w, b, "relu"), dtype)
    for gy in (torch.randn(90, 75, dtype=dtype, device=dev).T,  # transposed grad
               torch.ones(1, 1, dtype=dtype, device=dev).expand(75, 90)):  # y.sum()'s grad, stride 0
        got = target.ops.linear_relu_backward(gy, x, w, y, "relu", [True, True, True])
        for g, e in zip(got, expected_backward(gy, x, w, y, "relu")):
            assert_close(g, e, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_cpu_and_cuda_agree(target, dtype, activation):
    # The CPU kernels (torch.ops.dynnet on CPU tensors) and the CUDA kernels on their target.
    dev, cpu_ops = target.device, torch.ops.dynnet
    x, w, b = make((3, 41), 129, 67, dtype, device="cpu")
    y_cpu = cpu_ops.linear_relu(x, w, b, activation)
    y_gpu = target.ops.linear_relu(x.to(dev), w.to(dev), b.to(dev), activation)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, **tol(dtype))
    gy = torch.randn_like(y_cpu)
    # Both backwards use the CPU's y, so both apply the same mask.
    g_cpu = cpu_ops.linear_relu_backward(gy, x, w, y_cpu, activation, [True, True, True])
    g_gpu = target.ops.linear_relu_backward(gy.to(dev), x.to(dev), w.to(dev), y_cpu.to(dev), activation,
                                            [True, True, True])
    for c, g in zip(g_cpu, g_gpu):
        torch.testing.assert_close(g.cpu(), c, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_propagates_like_torch_relu(target, dtype):
    x, w, b = make((70,), 20, 66, dtype, device=target.device)
    x[1, 0] = float("nan")
    b[65] = float("nan")
    y = target.ops.linear_relu(x, w, b, "relu")
    stock = torch.relu(torch.nn.functional.linear(x, w, b))
    assert torch.equal(y.isnan(), stock.isnan())
    assert y[1].isnan().all() and y[:, 65].isnan().all()  # fmaxf(NaN, 0) would give 0 here
    # Backward: threshold_backward zeroes the gradient where y <= 0, which is false for NaN,
    # so the gradient flows through NaN entries; the kernels must do the same.
    gy = torch.randn_like(y)
    got = target.ops.linear_relu_backward(gy, x, w, y, "relu", [True, True, True])
    for g, e in zip(got, expected_backward(gy, x, w, y, "relu")):
        assert torch.equal(up(g).isnan(), e.isnan())
        assert_close(g, e, dtype, equal_nan=True)


def test_gradient_mask_is_threshold_backward(target):
    # y = [NaN, 0, -0, -1, 2, inf]: the gradient passes where threshold_backward passes it.
    dev = target.device
    y = torch.tensor([[float("nan"), 0.0, -0.0, -1.0, 2.0, float("inf")]], device=dev)
    gy = torch.arange(1.0, 7.0, device=dev).reshape(1, 6)
    x = torch.ones(1, 1, device=dev)
    w = torch.ones(6, 1, device=dev)
    want = torch.ops.aten.threshold_backward(gy, y, 0)
    gx, gw, gb = target.ops.linear_relu_backward(gy, x, w, y, "relu", [True, True, True])
    assert torch.equal(gb, want[0])
    assert torch.equal(gw, want.T)
    assert torch.equal(gx, want.sum(1, keepdim=True))


def test_inf_and_signed_zero(target):
    x = torch.tensor([[float("inf")], [float("-inf")], [0.0], [-0.0]], device=target.device)
    w = torch.ones(1, 1, device=target.device)
    y = target.ops.linear_relu(x, w, None, "relu")
    assert y.tolist() == [[float("inf")], [0.0], [0.0], [0.0]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "none", *SMOOTH])
def test_no_input_features_return_the_bias_bits(target, dtype, activation):
    # K = 0 on every path: y = act(bias) with stock's bits - addmm returns its bias term, so a -0
    # bias stays -0 without an activation (an accumulator's +0 added to it would make it +0),
    # and an activation of it is torch's op's (the vendor path's copy of the bias, then torch's op).
    x = torch.zeros(2, 0, dtype=dtype, device=target.device)
    w = torch.ones(3, 0, dtype=dtype, device=target.device)
    b = torch.tensor([-0.0, 0.0, -1.5], dtype=dtype, device=target.device)
    y = target.ops.linear_relu(x, w, b, activation)
    want = reference.linear_act(x, w, b, activation)
    assert torch.equal(y, want) and torch.equal(y.signbit(), want.signbit()), (y, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic(target, dtype):
    # Many blocks in every GEMM (16 x 5 forward tiles, 16 x 13 grad_x, 5 x 13 grad_weight):
    # every run must give the same bits. In the harness the runs alternate the schedule order
    # (threads of a block, blocks of a grid): a race would show as different bits. Its shapes are
    # smaller (3 x 4, 3 x 3 and 4 x 3 tiles, 4 to 5 slices), for time.
    M, K, N = (1000, 777, 300) if target.name == "cuda" else (150, 140, 220)
    x, w, b = make((M,), K, N, dtype, device=target.device)
    gy = torch.randn(M, N, dtype=dtype, device=target.device)
    runs = []
    for order in ("forward", "reverse", "forward"):
        with cuda_harness.schedule(target, order):
            y = target.ops.linear_relu(x, w, b, "relu")
            runs.append((y, *target.ops.linear_relu_backward(gy, x, w, y, "relu", [True, True, True])))
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "none", "gelu"])
@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True],
                                  [True, True, False], [False, True, True], [True, False, True]], ids=str)
def test_output_mask_subsets_equal_full_call(target, mask, activation, dtype):
    # grad_bias alone goes through its own kernel, grad_bias with grad_weight is summed inside
    # the grad_weight GEMM: both add the same values in the same order, so the bits agree.
    x, w, b = make((150,), 90, 70, dtype, device=target.device)
    if activation == "gelu":
        y, saved = target.ops.linear_act(x, w, b, activation)
    else:
        y = target.ops.linear_relu(x, w, b, activation)
        saved = y if activation == "relu" else None
    gy = torch.randn_like(y)
    full = target.ops.linear_relu_backward(gy, x, w, saved, activation, [True, True, True])
    part = target.ops.linear_relu_backward(gy, x, w, saved, activation, mask)
    for wanted, f, p in zip(mask, full, part):
        if wanted:
            assert torch.equal(f, p)
        else:
            assert p.shape == (0,) and p.device.type == target.device


@pytest.mark.parametrize("shape", [((0,), 8, 4), ((5,), 0, 3), ((4,), 6, 0)], ids=str)
@pytest.mark.parametrize("mask", [[True, True, True], [False, False, True]], ids=str)
def test_backward_empty_dims(target, shape, mask):
    # M = 0: zero grad_weight / grad_bias (empty sums); K = 0: grad_bias alone; N = 0: zero grad_x.
    x, w, b = make(*shape, torch.float32, device=target.device)
    y = target.ops.linear_relu(x, w, b, "relu")
    gy = torch.randn_like(y)
    got = target.ops.linear_relu_backward(gy, x, w, y, "relu", mask)
    want = expected_backward(gy, x, w, y, "relu")
    for wanted, g, e in zip(mask, got, want):
        if wanted:
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, **tol(torch.float32))


@pytest.mark.parametrize("mask", [[False, False, True], [False, True, True]], ids=["alone", "with_grad_w"])
def test_grad_bias_accumulates_in_high_precision(target, mask):
    # 100k rows of 1.0001: a float32 running sum drifts by ~1e-4 relative; grad_bias accumulates
    # in double for float32 (as on CPU), on both of its paths (own kernel, or inside grad_weight's GEMM).
    M, dev = 100_000, target.device
    x = torch.zeros(M, 1, device=dev)
    w = torch.ones(1, 1, device=dev)
    y = torch.ones(M, 1, device=dev)
    gy = torch.full((M, 1), 1.0001, device=dev)
    _, _, gb = target.ops.linear_relu_backward(gy, x, w, y, "relu", mask)
    exact = M * 1.0001
    assert abs(gb.item() - exact) / exact < 1e-6


# GPU only, like the other tests through the autograd.Function: they test how the CUDA kernels
# plug into autograd (the harness exposes the kernels, not torch.ops.dynnet's CUDA key).
@GPU
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_gradcheck_float64(bias, activation):
    # Through the autograd.Function directly, so the CUDA kernels are what is checked.
    x, w, b = make((2, 9), 13, 7, torch.float64, bias)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]

    def fn(x, w, b=None):
        return LinearReLUFunction.apply(x, w, b, activation)

    assert torch.autograd.gradcheck(fn, leaves)


@GPU
def test_cuda_kernels_were_built():
    # Otherwise functional.* would silently take the stock path on this GPU.
    assert has_kernels("cuda"), f"dynnet_ext was built without CUDA kernels: {BUILD_INFO}"


@GPU
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_autograd_matches_reference(dtype):
    x, w, b = make((4, 17), 100, 100, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref_leaves = [up(t).clone().requires_grad_() for t in (x, w, b)]
    y = functional.fused_linear_relu(*leaves)
    y_ref = reference.linear_act(*ref_leaves, "relu")
    assert_close(y, y_ref.detach(), dtype)
    gy = torch.randn_like(y)
    y.backward(gy)
    # The reference masks with its own y; where a half-type y rounds to 0 the masks can differ,
    # so compare against the formula with the kernel's y for half types.
    if dtype in HALF:
        want = expected_backward(gy, x, w, y.detach(), "relu")
    else:
        y_ref.backward(gy)
        want = [t.grad for t in ref_leaves]
    for leaf, e in zip(leaves, want):
        assert_close(leaf.grad, e, dtype)


def test_mixed_devices_rejected(target):
    x, w, b = make((3,), 4, 5, torch.float32, device=target.device)
    other = "cpu" if target.device == "cuda" else "meta"
    with pytest.raises(RuntimeError, match="weight must be on the same device as x"):
        target.ops.linear_relu(x, w.to(other), b, "relu")
    with pytest.raises(RuntimeError, match="bias must be on the same device as x"):
        target.ops.linear_relu(x, w, b.to(other), "relu")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    x, w, b = make((33,), 20, 70, torch.float32, device="cuda:1")
    y = torch.ops.dynnet.linear_relu(x, w, b, "relu")
    assert y.device == x.device
    torch.testing.assert_close(y, reference.linear_act(x, w, b), **tol(torch.float32))


def test_tolerance_table_covers_dtypes():
    assert set(DTYPES) == set(TOLERANCES)


# Every tile edge (1, 7, 31, 32, 33, 63, 64, 65, 100, 130) in every dimension: M, K and N each
# take each value once in each of two rotations, so both sides of every tile and slice boundary
# meet partial tiles in the other dimensions.
EDGES = [1, 7, 31, 32, 33, 63, 64, 65, 100, 130]
EDGE_SHAPES = sorted({(EDGES[i], EDGES[(i + a) % 10], EDGES[(i + b) % 10]) for i in range(10) for a, b in ((3, 7), (6, 1))})
MASKS = [list(m) for m in itertools.product([False, True], repeat=3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=str)
def test_tile_edges_every_output_mask(target, shape, activation, bias, dtype):
    M, K, N = shape
    x, w, b = make((M,), K, N, dtype, bias, target.device)
    y = target.ops.linear_relu(x, w, b, activation)
    assert_close(y, expected_forward(x, w, b, activation), dtype)
    gy = torch.randn_like(y)
    saved = y if activation == "relu" else None
    want = expected_backward(gy, x, w, y, activation)
    full = target.ops.linear_relu_backward(gy, x, w, saved, activation, [True, True, True])
    for g, e in zip(full, want):
        assert_close(g, e, dtype)
    for mask in MASKS:  # every subset: the same bits as the full call, empty where not asked for
        part = target.ops.linear_relu_backward(gy, x, w, saved, activation, mask)
        for wanted, f, p in zip(mask, full, part):
            assert torch.equal(p, f) if wanted else p.shape == (0,)
