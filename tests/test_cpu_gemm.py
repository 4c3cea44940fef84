"""The CPU GEMM engine under the ops (csrc/cpu/gemm*.cpp): micro-tile and K-block edges, strides,
the epilogue, thread-count independence, and the engine switch (DYNNET_EXT_CPU_GEMM).

Tile sizes: avx512 6 rows x 64 columns (4 vectors of 16), avx2 6 x 16 (2 vectors of 8); float32
K-blocks of 256. The float32 forward's dot form (no packing): tiles of 4 x 6 (avx512) or 3 x 4
(avx2) elements of C, K-blocks of 1024. The direct form (avx512, float32 B with contiguous rows,
the backward's): the packed form's tiles with B read where it lies. The sizes below straddle each
of those edges; the tests that take `cpu_gemm_form` run with each form forced."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import AMX_BF16, CPU_GEMM_ISAS, INTEL_CPU, set_cpu_gemm, tol
from dynnet_ext import reference
from dynnet_ext.functional import fused_linear_act
from dynnet_ext.ops.activations import stock_activation

OPS = torch.ops.dynnet
pytestmark = pytest.mark.skipif(not CPU_GEMM_ISAS, reason="dynnet_ext._C not built")

ROWS = [1, 5, 6, 7, 12, 13, 17]  # around the 6-row tile (the layer backward runs the engine from 2 rows, or 12)
COLS = [1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 100]  # around 8/16-float vectors and 16/64-column panels
DEPTHS = [0, 1, 255, 256, 257, 600, 1025]  # around the 256- and 1024-long K-blocks (0: y = act(bias))


def forward_backward(x, w, b, activation):
    y = OPS.linear_relu(x, w, b, activation)
    gy = torch.randn_like(y)
    grads = OPS.linear_relu_backward(gy, x, w, y if activation == "relu" else None, activation,
                                     [True, True, b is not None])
    return y, gy, grads


def check_against_reference(x, w, b, activation, dtype=torch.float32):
    y, gy, (gx, gw, gb) = forward_backward(x, w, b, activation)
    # The reference in float64 from the same inputs; the fused result only has float32's
    # rounding, so the float32 tolerance applies.
    up = [t.double() if t is not None else None for t in (x, w, b)]
    torch.testing.assert_close(y.double(), reference.linear_act(*up, activation), **tol(dtype))
    rx, rw, rb = reference.linear_act_backward(gy.double(), *up, activation)
    torch.testing.assert_close(gx.double(), rx, **tol(dtype))
    torch.testing.assert_close(gw.double(), rw, **tol(dtype))
    if b is not None:
        torch.testing.assert_close(gb.double(), rb, **tol(dtype))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n", COLS)
def test_tile_edges(m, n, cpu_gemm_isa, cpu_gemm_form):
    k = 37
    x, w, b = torch.randn(m, k), torch.randn(n, k) / k**0.5, torch.randn(n)
    check_against_reference(x, w, b, "relu")


@pytest.mark.parametrize("k", DEPTHS)
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_k_block_edges(k, activation, cpu_gemm_isa, cpu_gemm_form):
    x, w, b = torch.randn(13, k), torch.randn(65, k) / max(k, 1) ** 0.5, torch.randn(65)
    check_against_reference(x, w, b, activation)


@pytest.mark.parametrize("layout", ["x_transposed", "w_transposed", "x_expanded", "x_rows_strided", "x_cols_strided",
                                    "x_3d_sliced"])
def test_strided_operands(layout, cpu_gemm_isa, cpu_gemm_form):
    m, k, n = 14, 70, 33
    x, w, b = torch.randn(m, k), torch.randn(n, k) / k**0.5, torch.randn(n)
    if layout == "x_transposed":
        x = torch.randn(k, m).t()
    elif layout == "w_transposed":
        w = (torch.randn(k, n) / k**0.5).t()
    elif layout == "x_expanded":
        x = torch.randn(1, k).expand(m, k)
    elif layout == "x_rows_strided":
        x = torch.randn(2 * m, k)[::2]
    elif layout == "x_cols_strided":
        x = torch.randn(m, 3 * k)[:, ::3]
    else:
        x = torch.randn(2, 3 * m, k)[:, ::3]
    check_against_reference(x, w, b, "relu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [1, 300, 301])  # odd K: the last bfloat16 k-pair is half padding
def test_half_types_edges(dtype, k, cpu_gemm_isa):
    x = torch.randn(7, k).to(dtype)
    w = (torch.randn(65, k) / k**0.5).to(dtype)
    b = torch.randn(65).to(dtype)
    y = OPS.linear_relu(x, w, b, "relu")
    torch.testing.assert_close(y, reference.linear_act(x.float(), w.float(), b.float(), "relu").to(dtype), **tol(dtype))


SMOOTH_SHAPES = [(1, 1, 1), (7, 37, 17), (13, 257, 65), (5, 1025, 100), (40, 600, 9)]  # (m, k, n): tile and K-block edges


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_smooth_activation_in_the_store(activation, dtype, cpu_gemm_isa, cpu_gemm_form):
    # The engine's store rounds z, writes it (linear_act) and runs the activation over each block
    # of stored tiles: z is the 'none' layer's bits; y is linear_relu's, and each element's
    # activation of z is what the same code gives that value alone (a one-column layer, z x [[1]]),
    # whatever the tile, panel, K-block or thread count it came from; and y is within the dtype of
    # stock's op. With ATen's GEMMs (`aten`) the activation is stock's op itself: its bits.
    one = torch.ones(1, 1, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        for m, k, n in SMOOTH_SHAPES:
            x = torch.randn(m, k).to(dtype)
            w, b = (torch.randn(n, k) / k**0.5).to(dtype), torch.randn(n).to(dtype)
            results = []
            for t in (1, 3):
                torch.set_num_threads(t)
                y, z = OPS.linear_act(x, w, b, activation)
                assert torch.equal(z, OPS.linear_relu(x, w, b, "none")), (m, k, n, t)
                assert torch.equal(y, OPS.linear_relu(x, w, b, activation)), (m, k, n, t)
                results.append(y)
            if cpu_gemm_isa == "aten":  # (whose BLAS gives other bits on other thread counts)
                assert torch.equal(y, stock_activation(z, activation)), (m, k, n)
                continue
            assert torch.equal(results[0], results[1]), (m, k, n)
            alone = OPS.linear_act(z.reshape(-1, 1), one, None, activation)[0].view_as(z)
            assert torch.equal(y, alone), (m, k, n)
            torch.testing.assert_close(y, stock_activation(z.float(), activation).to(dtype), **tol(dtype))
    finally:
        torch.set_num_threads(threads)


def test_epilogue_nan(cpu_gemm_isa, cpu_gemm_form):
    # ReLU keeps NaN (torch.relu does), and the backward mask lets the gradient through where y
    # is NaN (threshold_backward does).
    x = torch.randn(9, 20)
    w = torch.randn(17, 20)
    b = torch.zeros(17)
    x[3, 4] = float("nan")
    y = OPS.linear_relu(x, w, b, "relu")
    ref = torch.relu(torch.nn.functional.linear(x, w, b))
    assert torch.equal(y.isnan(), ref.isnan()) and y[3].isnan().all()
    gy = torch.ones_like(y)
    gx, gw, gb = OPS.linear_relu_backward(gy, x, w, y, "relu", [True, True, True])
    assert (gb == (y.isnan() | (y > 0)).sum(0)).all()
    torch.testing.assert_close(gx[3], w.sum(0), **tol(torch.float32))  # all of row 3 passed the mask
    assert gw[:, 4].isnan().all() and not gw[:, :4].isnan().any()


ENGINES = [i for i in CPU_GEMM_ISAS if i != "aten"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 1000, 100), (5, 0, 7), (3, 5, 1)])
def test_aten_forward_is_stock_linear_bit_for_bit(shape, dtype):
    # On ATen's BLAS (float64 always, float32 at AVX2's large products, or asked for) the bias
    # goes into addmm as stock's F.linear puts it, so y is F.linear's bits (and ReLU's), not
    # within a tolerance of them: mm + a bias pass afterwards would round differently.
    m, k, n = shape
    x, w, b = (torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype))
    set_cpu_gemm("aten")
    for bias in (b, None):
        assert torch.equal(OPS.linear_relu(x, w, bias, "none"), F.linear(x, w, bias))
        assert torch.equal(OPS.linear_relu(x, w, bias, "relu"), F.relu(F.linear(x, w, bias)))
        for act in ("gelu", "gelu_tanh", "silu"):  # stock's activation op after it: stock's bits too
            assert torch.equal(fused_linear_act(x, w, bias, act), stock_activation(F.linear(x, w, bias), act))


@pytest.mark.parametrize("shape", [(1024, 300, 200), (5, 300, 700), (64, 1000, 100), (12, 100, 400)])
@pytest.mark.parametrize("isa", ENGINES)
def test_same_bits_for_any_thread_count(shape, isa, cpu_gemm_form):
    # Work is split over rows or column panels of C, never over K: every element gets the same
    # FMAs in the same order, so 1, 2 and 3 threads give identical bits. The shapes split by
    # rows, by panels (5 rows), the seed's input layer, and one worth 2 tasks only: on 3 threads
    # the OpenMP team then does not match the tasks and the phases run one region each.
    m, k, n = shape
    x, w, b = torch.randn(m, k), torch.randn(n, k) / k**0.5, torch.randn(n)
    # (ATen's BLAS, the `aten` engine, makes no such promise: MKL gives other bits at 5 x 300
    # x 700 on 1 and 2 threads.)
    set_cpu_gemm(isa)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(forward_backward_fixed(x, w, b))
            net = OPS.dynamic_net(x, w, b, torch.randn(n, n, generator=torch.Generator().manual_seed(1)) / n**0.5,
                                  b, torch.randn(10, n, generator=torch.Generator().manual_seed(2)), torch.zeros(10), 2)
            results[-1] += list(net)
    finally:
        torch.set_num_threads(threads)
    for outputs in zip(*results):
        assert all(torch.equal(outputs[0], other) for other in outputs[1:])


def forward_backward_fixed(x, w, b):
    y = OPS.linear_relu(x, w, b, "relu")
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    return [y, *OPS.linear_relu_backward(gy, x, w, y, "relu", [True, True, True])]


# Half-type backward shapes that reach each path of the layer backward: ATen below two row tiles
# (5 rows); the engine with one row block, A packed row-major (grad_x) and column-major
# (grad_weight); a long reduction (K = 3001 for grad_x: packed A blocks shorter than 96 rows) with
# several row blocks (200 rows); panel edges (N = 65, 130); a transformer MLP's widths, smaller.
HALF_BACKWARD_SHAPES = [(5, 40, 30), (13, 64, 65), (200, 130, 3001), (64, 1000, 100), (96, 192, 768), (96, 768, 192)]


@pytest.mark.parametrize("shape", HALF_BACKWARD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_backward_against_float32_stock(shape, dtype, cpu_gemm_isa):
    # The backward in a half type on 1 and 2 threads: the same bits on both, and within the
    # dtype's rounding of float32 stock computed from the same half-type inputs (fp32
    # accumulation, one rounding of each output). On ATen's path (asked for, or the op's rule:
    # bfloat16 on AMX) y, grad_x and grad_W are ATen's GEMMs: stock's bits on each thread count,
    # which ATen itself does not keep across thread counts everywhere (its bfloat16 grad_x GEMM,
    # K = 3001, differs on 1 and 2 threads on an AVX-512 + AMX Xeon).
    from dynnet_ext import _C

    m, k, n = shape
    aten = _C.cpu_gemm_form_for(m, n, k, str(dtype).removeprefix("torch.")) == "aten"
    gen = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    gy = torch.randn(m, n, generator=gen).to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            y = OPS.linear_relu(x, w, b, "relu")
            results.append([y, *OPS.linear_relu_backward(gy, x, w, y, "relu", [True, True, True])])
            if aten:
                g = gy.masked_fill(y <= 0, 0)
                stock = (torch.relu(torch.nn.functional.linear(x, w, b)), g.mm(w), g.t().mm(x))
                assert all(torch.equal(ours, theirs) for ours, theirs in zip(results[-1], stock)), t
    finally:
        torch.set_num_threads(threads)
    for i, (one, two) in enumerate(zip(*results)):
        if not aten or i == 3:  # the engine's GEMMs; grad_b is ours on either path
            assert torch.equal(one, two), i
    y, gx, gw, gb = results[0]
    xr, wr, br = (t.float().requires_grad_() for t in (x, w, b))
    yr = torch.relu(torch.nn.functional.linear(xr, wr, br))
    yr.backward(torch.where(y.float() > 0, gy.float(), 0.0))  # the same mask (y rounded to the dtype)
    atol, rtol = tol(dtype).values()
    for got, want in ((y, yr), (gx, xr.grad), (gw, wr.grad), (gb, br.grad)):
        # Outputs are rounded once to the dtype: a few of its ulps at the output's magnitude.
        scale = want.abs().max().item()
        torch.testing.assert_close(got.float(), want.detach(), atol=atol * max(scale, 1.0), rtol=rtol)


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


def test_kernels_per_dtype(cpu_gemm_isa):
    # float64 always keeps ATen's BLAS; bfloat16 runs on vdpbf16ps where the CPU has AVX512_BF16.
    from dynnet_ext import _C

    names = {d: _C.cpu_gemm_kernels(d) for d in ("float32", "bfloat16", "float16", "float64")}
    assert names["float64"] == "aten"
    assert names["float32"] == names["float16"] == cpu_gemm_isa
    bf16 = "avx512_bf16" if cpu_gemm_isa == "avx512" and "avx512_bf16" in cpu_flags() else cpu_gemm_isa
    assert names["bfloat16"] == bf16


@pytest.mark.parametrize("isa", ENGINES)
def test_forms_are_forced(isa):
    # The dot form sums each element's K products in another grouping than the packed form, so
    # forcing one or the other changes the forward's bits (both within float32's tolerance,
    # checked above): this proves the switch reaches the kernels. The direct form runs the packed
    # form's micro-kernel on B where it lies, the same FMAs in the same order: the backward's
    # bits are the same whichever runs.
    set_cpu_gemm(isa)
    from dynnet_ext import _C

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(64, 1000, generator=g), torch.randn(100, 1000, generator=g) / 1000**0.5, torch.randn(100)
    gy = torch.randn(64, 100, generator=g)
    out = {}
    for form in ("dot", "packed", "direct"):
        _C.set_cpu_gemm_form(form)
        y = OPS.linear_relu(x, w, b, "relu")
        out[form] = (y, OPS.linear_relu_backward(gy, x, w, out["dot"][0] if out else y, "relu", [True, True, True]))
    assert not torch.equal(out["dot"][0], out["packed"][0])
    torch.testing.assert_close(out["dot"][0], out["packed"][0], **tol(torch.float32))
    for form in ("packed", "direct"):
        assert all(torch.equal(a, b) for a, b in zip(out["dot"][1], out[form][1]))


@pytest.mark.parametrize("isa", CPU_GEMM_ISAS)
def test_form_rule(isa):
    # Which form runs a GEMM (gemm.cpp's choose_form), as the ops ask: forward B = W^T
    # (b_rows=False), backward B = W or x (b_rows=True). The direct form is AVX-512's.
    from dynnet_ext import _C

    set_cpu_gemm(isa)
    form_for = _C.cpu_gemm_form_for
    direct = "direct" if isa == "avx512" else "packed"
    if isa == "aten":
        assert {form_for(64, 1000, 100), form_for(64, 100, 1000, "float32", False)} == {"aten"}
        return
    _C.set_cpu_gemm_form("auto")
    assert form_for(64, 1000, 100) == direct  # the seed's grad_x = g @ W
    assert form_for(100, 1000, 64) == direct  # its grad_W = g.T @ x
    # float32 from 2^25 multiply-adds on AVX2, 9 x 2^23 on an Intel CPU's AVX-512 and 2^27 on
    # other AVX-512 CPUs: ATen's BLAS.
    below_2_27 = "aten" if isa == "avx2" or INTEL_CPU else None
    assert form_for(1024, 1000, 100) == (below_2_27 or direct)  # short K: one K-block at any M
    assert form_for(1024, 384, 300) == (below_2_27 or "packed")  # many rows reuse a long B: packed
    assert form_for(1024, 1024, 127) == (below_2_27 or direct)  # just below 2^27
    assert form_for(128, 384, 1536, "float32", False) == ("aten" if isa == "avx2" or INTEL_CPU else "packed")  # 9 x 2^23
    assert form_for(64, 1024, 1024) == ("aten" if isa == "avx2" else direct)  # 2^26: below 9 x 2^23
    assert form_for(1024, 1024, 128) == form_for(1024, 1024, 1024) == "aten"
    # bfloat16 where ATen's GEMM has AMX tiles: ATen's from 2^20 multiply-adds on.
    big_bf16 = "aten" if AMX_BF16 else "packed"
    assert form_for(1024, 1024, 1024, "bfloat16") == big_bf16 and form_for(1024, 1024, 1024, "float16") == "packed"
    assert form_for(64, 100, 100, "bfloat16") == "packed" and form_for(16, 1000, 100, "bfloat16") == big_bf16
    # Just below 2^25 multiply-adds: the engine's forms, on AVX2 too.
    assert form_for(256, 1024, 127) == direct and form_for(254, 1024, 128, "float32", False) == "packed"
    assert form_for(64, 100, 1000, "float32", False) == "dot"  # the seed's input layer forward
    assert form_for(64, 100, 100, "float32", False) == "packed"  # its hidden layer forward
    assert form_for(64, 1000, 100, "bfloat16") == big_bf16 and form_for(64, 1000, 100, "float16") == "packed"
    assert form_for(64, 1000, 100, "float64") == "aten"
    _C.set_cpu_gemm_form("packed")  # a forced form: the engine, whatever the size
    assert {form_for(64, 1000, 100), form_for(64, 100, 1000, "float32", False), form_for(1024, 1024, 1024, "bfloat16")} == {"packed"}
    _C.set_cpu_gemm_form("direct")  # every B with contiguous rows; the forward by the rule
    assert form_for(1024, 1024, 1024) == direct and form_for(64, 100, 1000, "float32", False) == "dot"
    _C.set_cpu_gemm_form("dot")  # every forward; the backward by the rule
    assert form_for(64, 100, 100, "float32", False) == "dot" and form_for(64, 1000, 100) == direct
    with pytest.raises(RuntimeError, match="dtype must be float32, bfloat16, float16 or float64"):
        form_for(1, 1, 1, "int8")


@pytest.mark.parametrize("shape", [(300, 70, 33), (13, 600, 65), (700, 40, 530)])
def test_direct_form_matches_packed(shape):
    # The backward's GEMMs with B read where it lies against B packed: bit for bit, across
    # K-blocks (300 batch rows: grad_W's K; 530 units: grad_x's K) and partial last vectors.
    if "avx512" not in CPU_GEMM_ISAS:
        pytest.skip("the direct form is AVX-512's; this CPU has no AVX-512")
    from dynnet_ext import _C

    set_cpu_gemm("avx512")
    m, k, n = shape
    x, w, b = torch.randn(m, k), torch.randn(n, k) / k**0.5, torch.randn(n)
    y = OPS.linear_relu(x, w, b, "relu")
    gy = torch.randn_like(y)
    grads = {}
    for form in ("packed", "direct"):
        _C.set_cpu_gemm_form(form)
        assert _C.cpu_gemm_form_for(m, k, n) == form and _C.cpu_gemm_form_for(n, k, m) == form
        grads[form] = OPS.linear_relu_backward(gy, x, w, y, "relu", [True, True, True])
    # (The packed form is checked against the float64 reference at these edges above.)
    assert all(torch.equal(a, b) for a, b in zip(grads["packed"], grads["direct"]))


def test_form_switch_and_errors():
    from dynnet_ext import _C

    assert _C.set_cpu_gemm_form("dot") == "auto"
    assert _C.set_cpu_gemm_form("auto") == "dot"
    with pytest.raises(RuntimeError, match="must be auto, dot, packed or direct, got 'fast'"):
        _C.set_cpu_gemm_form("fast")
    done = run_python("import dynnet_ext", DYNNET_EXT_CPU_GEMM_FORM="fast")
    assert done.returncode != 0 and "DYNNET_EXT_CPU_GEMM_FORM must be auto, dot, packed or direct, got 'fast'" in done.stderr
    done = run_python("from dynnet_ext import _C; print(_C.set_cpu_gemm_form('auto'))", DYNNET_EXT_CPU_GEMM_FORM="packed")
    assert done.returncode == 0 and done.stdout.strip() == "packed", done.stderr


def test_engine_switch_and_errors():
    from dynnet_ext import _C

    assert _C.cpu_gemm_isa() in CPU_GEMM_ISAS and "aten" in CPU_GEMM_ISAS
    with pytest.raises(RuntimeError, match="must be auto, avx512, avx2 or aten, got 'sse'"):
        _C.set_cpu_gemm_isa("sse")


GUARDED_OPERANDS = """
import ctypes, mmap, sys
import torch
from dynnet_ext import _C

libc, PAGE, keep = ctypes.CDLL(None), mmap.PAGESIZE, []
gen = torch.Generator().manual_seed(0)


def guarded(*shape):
    # A float32 tensor whose last byte is the last byte before a PROT_NONE page: a read past
    # its end faults.
    n = 4 * shape[0] * shape[1]
    size = -(-n // PAGE) * PAGE
    mm = mmap.mmap(-1, size + PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    assert libc.mprotect(ctypes.c_void_p(base + size), PAGE, 0) == 0
    keep.append(mm)
    t = torch.frombuffer(mm, dtype=torch.float32, count=n // 4, offset=size - n).view(shape)
    return t.copy_(torch.randn(shape, generator=gen) / shape[1] ** 0.5)


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


ATOL, RTOL = map(float, sys.argv[1:3])
for isa in sys.argv[3:]:
    _C.set_cpu_gemm_isa(isa)
    for form in ("dot", "packed", "direct"):
        _C.set_cpu_gemm_form(form)
        for m, k, n in [(13, 37, 100), (3, 21, 5), (64, 1000, 100)]:
            x, w, gy = guarded(m, k), guarded(n, k), guarded(m, n)
            b = torch.randn(n, generator=gen)
            y = torch.ops.dynnet.linear_relu(x, w, b, "relu")
            gx, gw, gb = torch.ops.dynnet.linear_relu_backward(gy, x, w, y, "relu", [True, True, True])
            xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
            yr = torch.relu(torch.nn.functional.linear(xr, wr, br))
            yr.backward(gy)
            for got, want in ((y, yr), (gx, xr.grad), (gw, wr.grad), (gb, br.grad)):
                close(got, want)
            w_h, w_out, go = guarded(n, n), guarded(10, n), guarded(m, 10)
            out, acts = torch.ops.dynnet.dynamic_net(x, w, b, w_h, b, w_out, torch.zeros(10), 2)
            torch.ops.dynnet.dynamic_net_backward(go, x, w, w_h, w_out, acts, 2, [True] * 7)
print("ok")
"""


def test_no_read_past_an_operand():
    # Every form reads some operand where it lies (the dot form A and B, the direct form B, the
    # packed form A), with masked loads at the row ends: each operand ends at a page the process
    # may not read, so one unmasked vector past a row's end would crash the run.
    engines = [i for i in CPU_GEMM_ISAS if i != "aten"]
    done = run_python(GUARDED_OPERANDS, *map(str, tol(torch.float32).values()), *engines)
    assert done.returncode >= 0, f"the run died of signal {-done.returncode}: a kernel read past an operand's end"
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def run_python(code, *args, **env):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=environ, cwd=root)


@pytest.mark.parametrize("isa", CPU_GEMM_ISAS)
def test_environment_variable_forces_the_engine(isa):
    done = run_python("from dynnet_ext import _C; print(_C.cpu_gemm_isa())", DYNNET_EXT_CPU_GEMM=isa)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == isa


def test_environment_variable_rejects_unknown_names():
    done = run_python("import dynnet_ext", DYNNET_EXT_CPU_GEMM="avx1024")
    assert done.returncode != 0
    assert "DYNNET_EXT_CPU_GEMM must be auto, avx512, avx2 or aten, got 'avx1024'" in done.stderr
