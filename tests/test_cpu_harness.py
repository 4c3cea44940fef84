"""The CPU engine's AVX-512 kernels - float32, float16, and bfloat16 on vdpbf16ps k-pairs - run
in the CPU harness (tests/cpu_harness.py: the units compiled on SIMDe's portable AVX-512), so
their packing, micro-kernels and tile loops are checked on any CPU, not only on one with
AVX-512 and AVX512_BF16 (where test_cpu_gemm.py and the op tests run them for real).

Each problem is one of the layer's GEMMs with the operands as the ops pass them: the forward
(A = x, B = W^T read from W's rows, bias and ReLU in the store), grad_x (A = grad_y masked by
y, B = W) and grad_weight (A = grad_y^T, column-major, masked; B = x), and any-strided views.
Results against float64 from the same inputs, within the dtype's rounding of the output plus
fp32 accumulation; any split of rows or panels over tasks gives the same bits."""

import pytest
import torch

import cpu_harness
import dynnet_ext

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (kernels, dtype): avx512 converts half types to fp32 while packing; avx512_bf16 multiplies
# bfloat16 k-pairs with vdpbf16ps (and hands float32 and float16 to avx512's kernels).
ENGINES = [("avx512", F32), ("avx512", F16), ("avx512", BF16), ("avx512_bf16", BF16), ("avx512_bf16", F32)]
# Around the 6-row tile, 16-float vectors and 64-column panels, the 256-long float32 K-block, odd
# K (a k-pair with one element), the 96-row A block and the shorter blocks of a long K.
SHAPES = [(1, 1, 1), (5, 17, 3), (6, 64, 2), (7, 65, 257), (13, 130, 256), (97, 16, 513), (12, 1, 1000),
          (200, 70, 33), (100, 20, 3001)]
UNIT = {F32: 2.0**-24, F16: 2.0**-11, BF16: 2.0**-8}  # unit roundoff of the output's rounding


@pytest.fixture(scope="module", autouse=True)
def _built():
    cpu_harness.load()  # compiled once (build/cpu-harness/), ~1 min


def operands(layout, M, N, K, dtype, gen):
    """(a, b, a_mask): A (M, K) and B (K, N) laid out as the op passes them; a_mask is y (the
    layer's output, with zeros, negatives and NaN) for the backward's A."""
    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) / max(shape[-1], 1) ** 0.25).to(dtype)

    if layout == "forward":
        return rnd(M, K), rnd(N, K).t(), None
    y = rnd(M, K)
    y[torch.rand(M, K, generator=gen) < 0.2] = 0
    y.view(-1)[:: 7] = float("nan")  # NaN in y lets the gradient through, as threshold_backward
    if layout == "grad_x":
        return rnd(M, K), rnd(K, N), y
    if layout == "grad_w":
        return rnd(K, M).t(), rnd(K, N), y.t().contiguous().t()
    return rnd(3 * M, 2 * K)[::3, ::2], rnd(2 * N, 3 * K).t()[::3, ::2], None  # "strided"


def reference(a, b, a_mask, bias, relu, mask_y):
    a = a.double()
    if a_mask is not None:
        a = torch.where(a_mask.double() <= 0, 0.0, a)
    c = a @ b.double()
    if bias is not None:
        c = c + bias.double()
    if relu:
        c = torch.where(c < 0, 0.0, c)  # keeps NaN, as torch.relu
    if mask_y is not None:
        c = torch.where(mask_y.double() <= 0, 0.0, c)
    bound = (a.abs() @ b.double().abs()) * (2 * a.shape[1] * 2.0**-24)
    return c, bound


def check(c, want, bound, dtype):
    got = c.double()
    assert torch.equal(got.isnan(), want.isnan())
    err = (got - want).abs().nan_to_num(0)
    limit = UNIT[dtype] * want.abs().nan_to_num(0) * 1.01 + bound * 1.01 + 1e-30
    worst = (err - limit).argmax()
    assert (err <= limit).all(), f"error {err.view(-1)[worst]:.3g} > {limit.view(-1)[worst]:.3g}"


FORMS = {"forward": ["packed", "dot"], "grad_x": ["packed", "direct"], "grad_w": ["packed", "direct"],
         "strided": ["packed"]}


@pytest.mark.parametrize("layout", list(FORMS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: f"{e[0]}-{str(e[1])[6:]}")
def test_against_reference(engine, shape, layout):
    kernels, dtype = engine
    M, N, K = shape
    gen = torch.Generator().manual_seed(M * 1000003 + N * 1009 + K)
    a, b, a_mask = operands(layout, M, N, K, dtype, gen)
    bias = (torch.randn(N, generator=gen) * 0.1).to(dtype) if layout == "forward" else None
    relu = layout == "forward"
    mask_y = None
    if layout == "grad_x" and M % 2:  # the network op's chain: ReLU's mask in the store
        mask_y = torch.randn(M, N, generator=gen).to(dtype)
    want, bound = reference(a, b, a_mask, bias, relu, mask_y)
    results = {}
    for form in FORMS[layout]:
        if form != "packed" and dtype != F32:
            continue  # the dot and direct forms are float32's
        c = cpu_harness.gemm(a, b, kernels=kernels, form=form, a_mask=a_mask, bias=bias, relu=relu, mask_y=mask_y)
        check(c, want, bound, dtype)
        results[form] = c
        for by_panels in (False, True):  # three tasks: the same bits as one
            split = cpu_harness.gemm(a, b, kernels=kernels, form=form, a_mask=a_mask, bias=bias, relu=relu,
                                     mask_y=mask_y, tasks=3, by_panels=by_panels)
            assert torch.equal(split.nan_to_num(7), c.nan_to_num(7)), (form, by_panels)
    if "direct" in results:  # B read where it lies: the packed form's sums, bit for bit
        assert torch.equal(results["direct"].nan_to_num(7), results["packed"].nan_to_num(7))


@pytest.mark.parametrize("act", list(cpu_harness.ACTS))
@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: f"{e[0]}-{str(e[1])[6:]}")
def test_smooth_activation_in_the_store(engine, act):
    # A smooth activation in the store (the forward's, and B with contiguous rows for the direct
    # form): z is the plain store's C, bit for bit, and C the activation kernel's act(z) - with z
    # kept or not, on one task and on three (by rows, by panels).
    kernels, dtype = engine
    for M, N, K in [(5, 17, 3), (7, 65, 257), (13, 130, 256), (100, 20, 3001)]:
        gen = torch.Generator().manual_seed(M * 1000003 + N * 1009 + K)
        bias = (torch.randn(N, generator=gen) * 0.1).to(dtype)
        for layout, forms in (("forward", ["packed", "dot"]), ("grad_x", ["direct"])):
            a, b, _ = operands(layout, M, N, K, dtype, gen)
            for form in forms:
                if form != "packed" and dtype != F32:
                    continue  # the dot and direct forms are float32's
                plain = cpu_harness.gemm(a, b, kernels=kernels, form=form, bias=bias)
                want = cpu_harness.activation(plain, act, kernels=kernels)
                z = torch.full_like(plain, float("nan"))
                c = cpu_harness.gemm(a, b, kernels=kernels, form=form, bias=bias, act=act, z=z)
                assert torch.equal(z, plain) and torch.equal(c, want), (M, N, K, form)
                for tasks, by_panels in ((1, False), (3, False), (3, True)):
                    other = cpu_harness.gemm(a, b, kernels=kernels, form=form, bias=bias, act=act, tasks=tasks,
                                             by_panels=by_panels)
                    assert torch.equal(other, want), (M, N, K, form, tasks, by_panels)


def test_relu_keeps_nan_and_refuses_unrunnable_forms():
    a = torch.ones(7, 9, dtype=BF16)
    a[3, 2] = float("nan")
    b = torch.ones(9, 20, dtype=BF16)
    c = cpu_harness.gemm(a, b, relu=True)
    assert c[3].isnan().all() and not c[torch.arange(7) != 3].isnan().any()
    with pytest.raises(ValueError, match="form 'direct' cannot run it"):
        cpu_harness.gemm(a, b, form="direct")


def test_ceiling_loops_count_their_flops():
    # 24 accumulators of 16 lanes a round: an FMA is 2 FLOPs a lane, vdpbf16ps 4 (two
    # multiply-adds), so bfloat16's ceiling counts twice the FMA loop's work per instruction.
    assert cpu_harness.fma_loop_flops("avx512", 1000) == 2 * 16 * 24 * 1000
    assert cpu_harness.fma_loop_flops("avx512_bf16", 1000) == 4 * 16 * 24 * 1000


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("kernels,dtype", ENGINES, ids=str)
def test_activation_kernels_are_the_extensions(act, kernels, dtype):
    # activation_kernel.h compiled on SIMDe: act(z) and grad_y * act'(z) over a sweep with the
    # extremes, in each dtype (half types through float32, rounded once) - within float32 of the
    # exact value (accuracy itself: tests/test_activations.py), and, where the extension runs
    # the engine on this CPU, its bits: the code is plain IEEE arithmetic (explicit fma, no
    # contraction a compiler could choose differently), so emulated and native units agree.
    import math

    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e30, -1e30, 1e4, -1e4])
    z = torch.cat([torch.linspace(-20, 20, 20001), specials]).to(dtype)
    gy = torch.randn(z.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    y = cpu_harness.activation(z, act, kernels=kernels)
    g = cpu_harness.activation(z, act, grad_y=gy, kernels=kernels)
    z64 = z.double().requires_grad_()
    if act == "gelu":
        f = z64 * 0.5 * torch.special.erfc(-z64 / math.sqrt(2))
    elif act == "gelu_tanh":
        f = z64 * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (z64 + 0.044715 * z64 ** 3))
    else:
        f = z64 * torch.sigmoid(z64)
    (d1,) = torch.autograd.grad(f, z64, torch.ones_like(z64))
    f, df = f.detach(), d1 * gy.double()
    finite = z.abs() <= 20
    # The dtype's rounding of the output, 64 times over, plus what rounding an intermediate
    # argument costs any float32 evaluation (cond = |z f' / f|: gelu_tanh's left tail); absolute
    # floors at the dtype's smallest normal and, for the derivative, at its cancellation near zeros.
    cond = (z64.detach() * d1 / f).abs().nan_to_num(0.0)
    floor = max(2.0**-100, torch.finfo(dtype).tiny)
    bad = finite & ((y.double() - f).abs() > floor + (64 + 2 * cond) * UNIT[dtype] * f.abs())
    assert not bad.any(), (z[bad][:5], y[bad][:5], f[bad][:5])
    bad = finite & ((g.double() - df).abs() > 8 * UNIT[dtype] + (64 + 2 * cond) * UNIT[dtype] * df.abs())
    assert not bad.any(), (z[bad][:5], g[bad][:5], df[bad][:5])
    if dynnet_ext.ops._C is not None and dynnet_ext.ops._C.cpu_gemm_kernels(str(dtype)[6:]) != "aten":
        ops = torch.ops.dynnet
        one = torch.ones(1, 1, dtype=dtype)
        want_y = ops.linear_act(z[:, None], one, None, act)[0][:, 0]
        want_g = ops.linear_relu_backward(gy[:, None], z[:, None], one, z[:, None], act, [True, False, False])[0][:, 0]
        assert torch.equal(y.nan_to_num(7), want_y.nan_to_num(7))
        # grad_x = g @ [[1]] is g, through the backward's GEMM: 0 + g * 1 makes -0 +0, and
        # vdpbf16ps flushes subnormal inputs (bfloat16 on AVX512_BF16) - both undone here.
        flush = lambda t: torch.where(t.abs() < torch.finfo(dtype).tiny, 0, t).nan_to_num(7)  # noqa: E731
        assert torch.equal(flush(g), flush(want_g))
