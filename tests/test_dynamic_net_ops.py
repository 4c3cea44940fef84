"""The whole-network ops torch.ops.dynnet.dynamic_net / dynamic_net_backward against the stock
reference (dynnet_ext.reference.dynamic_net differentiated by stock autograd).

Devices: "cpu", "cuda" (skipped without a GPU) and "harness": the CUDA launchers and kernels
compiled for the CPU (tests/cuda_harness.py), their per-layer chain included; the CUDA ones on
each forced path (cuda_harness.PATHS: the one-launch kernels with split or wide weight-gradient
tiles, or the chain of vendor layer ops)."""

import pytest
import torch

import cuda_harness
from conftest import tol
from dynnet_ext import reference

OPS = torch.ops.dynnet
# Every CPU case here runs on each CPU GEMM engine this machine has (conftest.CPU_GEMM_ISAS).
pytestmark = pytest.mark.usefixtures("cpu_gemm_isa")
CUDA = torch.cuda.is_available()
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (leading dims of x, D_in, H, D_out): the seed's shape, odd and prime sizes, 1-row and empty
# batches, 3-D input, and on CUDA a hidden width past the one-launch path's limit (256).
SHAPES = [
    ((64,), 1000, 100, 10),
    ((7,), 13, 5, 3),
    ((1,), 1, 1, 1),
    ((31,), 97, 61, 17),
    ((0,), 8, 4, 2),
    ((2, 3), 11, 7, 5),
    ((9,), 33, 300, 4),
]
NAMES = ("x", "w_in", "b_in", "w_h", "b_h", "w_out", "b_out")


def make(lead, D_in, H, D_out, dtype, device):
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    return [rand(*lead, D_in), rand(H, D_in, scale=max(D_in, 1) ** -0.5), rand(H),
            rand(H, H, scale=max(H, 1) ** -0.5), rand(H), rand(D_out, H, scale=max(H, 1) ** -0.5), rand(D_out)]


def args_at(params, depth):
    """The op's arguments: w_h, b_h None at depth 0 (as DynamicNet passes them)."""
    x, w_in, b_in, w_h, b_h, w_out, b_out = params
    return (x, w_in, b_in, *((w_h, b_h) if depth else (None, None)), w_out, b_out, depth)


def expected(params, depth, grad_out, acts):
    """(stock's forward, the seven gradients' reference, their error bounds or None).

    The forward is stock's in the same dtype (stock rounds each layer's output to the dtype, as
    the kernels do). The gradients come from the op's own activations (reference.dynamic_net_backward
    says why); zeros for the unused hidden layer at depth 0. Half types: stock's in the dtype,
    checked with the dtype's tolerance. float32 / float64: in float64 from the same inputs, each
    gradient within 64 eps of its largest entry (norm-wise, as a GEMM's error is bounded by its
    operands' norms): entry-wise tolerances do not hold at the widest shapes (w_h at 256 wide,
    depth 3: float32 errors of 1.2e-5 - stock's as the kernels' - where entries reach 41)."""
    out = reference.dynamic_net(*params, depth)
    dtype = out.dtype
    if dtype not in (torch.float32, torch.float64):
        return out, reference.dynamic_net_backward(grad_out, *params, acts, depth), None
    grads = reference.dynamic_net_backward(*(t.double() for t in (grad_out, *params, acts)), depth)
    eps = torch.finfo(dtype).eps
    return out, grads, [64 * eps * g.abs().max() if g.numel() else 0.0 for g in grads]


def assert_grads_close(grads, want, bounds, dtype):
    assert len(grads) == len(want) == len(NAMES)
    for i, (name, g, r) in enumerate(zip(NAMES, grads, want)):
        assert g.shape == r.shape and g.dtype == dtype, name
        if bounds is None:
            torch.testing.assert_close(g, r, **tol(dtype), msg=lambda m: f"{name}: {m}")
        else:
            err = (g.double() - r).abs()
            assert (err <= bounds[i]).all(), f"{name}: |error| up to {err.max():.3g}, bound {bounds[i]:.3g}"


def devices(harness=True):
    """cpu, and cuda on each forced path (cuda_harness.PATHS), and (unless the test goes through
    autograd or torch.library) the CUDA harness on each path: "cuda-split", "harness-vendor", ..."""
    if not harness:
        return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA GPU visible"))]
    return ["cpu", *cuda_harness.targets()]


def on(device):
    """(the ops, the device of their tensors) for a device of devices()."""
    if device.startswith("harness"):
        return cuda_harness.load(), "cpu"
    return OPS, device.split("-")[0]


@pytest.fixture(autouse=True)
def _forced_cuda_path(request):
    """A CUDA device or target id "<target>-<path>" runs its test on that forced path."""
    callspec = getattr(request.node, "callspec", None)
    name = str(callspec.params.get("device", callspec.params.get("target", ""))) if callspec else ""
    if "-" not in name:
        yield
        return
    with cuda_harness.Target(name).forced():
        yield


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_forward_and_backward_match_reference(shape, dtype, depth, device):
    ops, device = on(device)
    params = make(*shape, dtype, device)
    out, acts = ops.dynamic_net(*args_at(params, depth))
    lead, D_in, H, D_out = shape
    M = torch.Size(lead).numel()
    assert out.shape == (*lead, D_out) and out.dtype == dtype and out.device.type == device
    assert acts.shape == ((depth + 1) * M, H)
    grad_out = torch.randn(*lead, D_out, dtype=torch.float64).to(dtype=dtype, device=device)
    ref_out, ref_grads, bounds = expected(params, depth, grad_out, acts)
    torch.testing.assert_close(out, ref_out, **tol(dtype))

    w_h = params[3] if depth else None
    grads = ops.dynamic_net_backward(grad_out, params[0], params[1], w_h, params[5], acts, depth, [True] * 7)
    assert_grads_close(grads, ref_grads, bounds, dtype)


@pytest.mark.parametrize("device", devices())
def test_output_mask_and_depth_zero_hidden(device):
    ops, device = on(device)
    params = make((6,), 9, 5, 3, torch.float64, device)
    out, acts = ops.dynamic_net(*args_at(params, 2))
    g = torch.randn_like(out)
    full = ops.dynamic_net_backward(g, params[0], params[1], params[3], params[5], acts, 2, [True] * 7)
    for i in range(7):
        mask = [j == i for j in range(7)]
        part = ops.dynamic_net_backward(g, params[0], params[1], params[3], params[5], acts, 2, mask)
        for j, t in enumerate(part):
            if j == i:
                assert torch.equal(t, full[i]), NAMES[i]  # the same bits alone as with the rest
            else:
                assert t.shape == (0,), NAMES[j]
    # Hidden weights given at depth 0: the layer is unused, its gradients are zero.
    out0, acts0 = ops.dynamic_net(*params, 0)
    grads = ops.dynamic_net_backward(torch.ones_like(out0), params[0], params[1], params[3], params[5], acts0, 0,
                                     [True] * 7)
    assert not grads[3].any() and not grads[4].any()


@pytest.mark.parametrize("device", devices(harness=False))
@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_gradcheck_and_gradgradcheck(depth, device):
    params = [p.requires_grad_() for p in make((4,), 5, 3, 2, torch.float64, device)]

    def f(*ps):
        return OPS.dynamic_net(*args_at(ps, depth))[0]

    used = params if depth else params[:3] + params[5:]

    def g(*us):
        ps = list(us[:3]) + ([us[3], us[4]] if depth else [None, None]) + list(us[-2:])
        return f(*ps)

    assert torch.autograd.gradcheck(g, tuple(used))
    assert torch.autograd.gradgradcheck(g, tuple(used))


@pytest.mark.parametrize("depth", [0, 2])
def test_opcheck(depth):
    params = [p.requires_grad_(i > 0) for i, p in enumerate(make((5,), 6, 4, 3, torch.float32, "cpu"))]
    torch.library.opcheck(OPS.dynamic_net.default, args_at(params, depth))
    detached = [p.detach() for p in params]
    out, acts = OPS.dynamic_net(*args_at(detached, depth))
    torch.library.opcheck(OPS.dynamic_net_backward.default,
                          (torch.randn_like(out), detached[0], detached[1], detached[3] if depth else None,
                           detached[5], acts, depth, [True] * 7))


def test_deterministic_and_nan_like_stock():
    params = make((64,), 1000, 100, 10, torch.float32, "cpu")
    a = OPS.dynamic_net(*args_at(params, 3))
    b = OPS.dynamic_net(*args_at(params, 3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    g = torch.randn_like(a[0])
    ga = OPS.dynamic_net_backward(g, params[0], params[1], params[3], params[5], a[1], 3, [True] * 7)
    gb = OPS.dynamic_net_backward(g, params[0], params[1], params[3], params[5], a[1], 3, [True] * 7)
    assert len(ga) == len(gb) == 7 and all(torch.equal(u, v) for u, v in zip(ga, gb))
    # NaN in the input propagates as in stock (ReLU keeps NaN).
    params[0][0, 0] = float("nan")
    out, _ = OPS.dynamic_net(*args_at(params, 1))
    ref = reference.dynamic_net(*params, 1)
    assert torch.equal(out.isnan(), ref.isnan()) and out[0].isnan().all()


@pytest.mark.parametrize("case,match", [
    (lambda p: (p[0], p[1], p[2], None, None, p[5], p[6], 2), "w_h and b_h must be given"),
    (lambda p: (p[0], p[1], p[2], p[3], None, p[5], p[6], 1), "both be given or both be None"),
    (lambda p: (p[0], p[1], p[2], p[3], p[4], p[5], p[6], -1), "depth must be >= 0"),
    (lambda p: (p[0][:, :-1], p[1], p[2], p[3], p[4], p[5], p[6], 1), "last dimension"),
    (lambda p: (p[0], p[1], p[2], p[3][:, :-1], p[4], p[5], p[6], 1), "w_h must have shape"),
    (lambda p: (p[0], p[1], p[2], p[3], p[4], p[5][:, :-1], p[6], 1), "w_out must have shape"),
    (lambda p: (p[0], p[1], p[2][:-1], p[3], p[4], p[5], p[6], 1), "b_in must have shape"),
    (lambda p: (p[0], p[1], p[2], p[3], p[4], p[5], p[6].double(), 1), "b_out must have the same dtype"),
])
@pytest.mark.parametrize("fake", [False, True], ids=["cpu", "meta"])
def test_bad_arguments_raise(case, match, fake):
    params = make((3,), 4, 5, 2, torch.float32, "meta" if fake else "cpu")
    with pytest.raises(RuntimeError, match=match):
        OPS.dynamic_net(*case(params))


def test_bad_backward_arguments_raise():
    params = make((3,), 4, 5, 2, torch.float32, "cpu")
    out, acts = OPS.dynamic_net(*params, 2)
    with pytest.raises(RuntimeError, match="acts must have shape"):
        OPS.dynamic_net_backward(out, params[0], params[1], params[3], params[5], acts[:-1], 2, [True] * 7)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        OPS.dynamic_net_backward(out[:, :1], params[0], params[1], params[3], params[5], acts, 2, [True] * 7)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("depth", [0, 2])
def test_non_contiguous_inputs_match_stock(depth, device):
    # Every tensor argument in another layout - transposed matrices (acts included: the backward
    # once read it through a raw pointer as if contiguous, 5 of 7 gradients wrong), strided
    # biases, a transposed grad_out - gives stock's results.
    ops, device = on(device)
    params = make((6,), 9, 5, 3, torch.float64, device)
    strided = [p.t().contiguous().t() if p.dim() == 2 else torch.stack([p, p], 1)[:, 0] for p in params]
    assert not any(p.is_contiguous() for p in strided)
    out, acts = ops.dynamic_net(*args_at(strided, depth))
    grad_out = torch.randn_like(out)
    ref_out, ref_grads, bounds = expected(params, depth, grad_out, acts)
    torch.testing.assert_close(out, ref_out, **tol(torch.float64))
    acts_t = acts.t().contiguous().t()
    assert not acts_t.is_contiguous() and torch.equal(acts_t, acts)
    w_h = strided[3] if depth else None
    got = ops.dynamic_net_backward(grad_out.t().contiguous().t(), strided[0], strided[1], w_h, strided[5], acts_t,
                                   depth, [True] * 7)
    assert_grads_close(got, ref_grads, bounds, torch.float64)


# The CUDA network kernels' paths (csrc/cuda/dynamic_net.cuh), on every device. One launch up to
# H, D_out <= 256, per-layer ops beyond (257) and for empty dimensions; dynamic shared memory above
# the default 48 KiB - opted in - from max(H, D_out) = 123 in float64 and 251 in float32; a layer
# of more than 128 columns spreads the block's 256 threads over 256 columns, one row group.
WIDTHS = [
    ((64,), 1000, 100, 10, torch.float32),  # the seed
    ((37,), 45, 122, 2, torch.float64),  # just under the opt-in
    ((37,), 45, 123, 2, torch.float64),  # just over it
    ((9,), 20, 3, 256, torch.float64),  # D_out at the one-launch limit, opted in
    ((17,), 31, 250, 9, torch.float32),
    ((17,), 31, 251, 9, torch.float32),
    ((3, 5), 7, 255, 129, torch.float32),  # 3-D input, 256-column layout for both widths
    ((10,), 64, 256, 256, torch.float32),
    ((10,), 5, 257, 3, torch.float32),  # H past the limit: per-layer ops
    ((10,), 5, 8, 257, torch.float64),  # D_out past it
    ((8,), 33, 128, 64, torch.float16),
    ((15,), 65, 129, 33, torch.bfloat16),
    ((7,), 0, 5, 3, torch.float32),  # D_in = 0
    ((7,), 4, 0, 3, torch.float32),  # H = 0
    ((7,), 4, 5, 0, torch.float32),  # D_out = 0
    ((0,), 4, 5, 3, torch.float64),  # no rows
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("depth", [0, 1, 2, 3])
@pytest.mark.parametrize("case", WIDTHS, ids=str)
def test_network_kernel_paths(case, depth, device):
    *shape, dtype = case
    test_forward_and_backward_match_reference(tuple(shape), dtype, depth, device)


@pytest.mark.parametrize("target", cuda_harness.targets())
@pytest.mark.parametrize("case", [((100,), 70, 130, 20, 3), ((20,), 9, 257, 4, 2)], ids=["one-launch", "per-layer"])
def test_network_repeats_bitwise(case, target):
    # On the GPU: runs repeat bit for bit (no atomics). In the harness the repeat reverses the
    # order threads and blocks run in, so a race between them would change the bits.
    target = cuda_harness.Target(target)
    *shape, depth = case
    params = make(*shape, torch.float32, target.device)
    g = torch.randn(shape[0][0], shape[3]).to(target.device)
    runs = []
    for order in ("forward", "reverse"):
        with cuda_harness.schedule(target, order):
            out, acts = target.ops.dynamic_net(*params, depth)
            grads = target.ops.dynamic_net_backward(g, params[0], params[1], params[3], params[5], acts, depth,
                                                    [True] * 7)
            runs.append((out, acts, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [((6,), 9, 5, 3), ((5,), 4, 3, 257)], ids=["one-launch", "per-layer"])
def test_every_output_mask_subset(shape, device):
    # Each of the 128 subsets gives the bits of the full call where asked, (0,) elsewhere. The
    # per-layer path passes the mask on to linear_relu_backward, so subsets change what it runs.
    ops, device = on(device)
    params = make(*shape, torch.float64, device)
    out, acts = ops.dynamic_net(*args_at(params, 2))
    g = torch.randn_like(out)
    args = (g, params[0], params[1], params[3], params[5], acts, 2)
    full = ops.dynamic_net_backward(*args, [True] * 7)
    for bits in range(128):
        mask = [bool(bits >> i & 1) for i in range(7)]
        for name, wanted, f, p in zip(NAMES, mask, full, ops.dynamic_net_backward(*args, mask)):
            assert torch.equal(p, f) if wanted else p.shape == (0,), (name, mask)


@pytest.mark.parametrize("target", cuda_harness.targets())
@pytest.mark.parametrize("case", [((33,), 40, 130, 9, 2), ((7,), 5, 300, 3, 1)], ids=["one-launch", "per-layer"])
def test_network_cpu_and_cuda_agree(case, target):
    # The CPU kernels and the CUDA kernels on their target, on the same inputs.
    target = cuda_harness.Target(target)
    *shape, depth = case
    params = make(*shape, torch.float64, "cpu")
    moved = [p.to(target.device) for p in params]
    out, acts = OPS.dynamic_net(*params, depth)
    out_t, acts_t = target.ops.dynamic_net(*moved, depth)
    torch.testing.assert_close(out_t.cpu(), out, **tol(torch.float64))
    torch.testing.assert_close(acts_t.cpu(), acts, **tol(torch.float64))
    g = torch.randn_like(out)
    want = OPS.dynamic_net_backward(g, params[0], params[1], params[3], params[5], acts, depth, [True] * 7)
    got = target.ops.dynamic_net_backward(g.to(target.device), moved[0], moved[1], moved[3], moved[5],
                                          acts.to(target.device), depth, [True] * 7)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a.cpu(), b, **tol(torch.float64), msg=lambda m: f"{name}: {m}")
