"""Property-based tests (hypothesis): the ops and DynamicNet against the stock reference on
random shapes, dtypes, bias/activation choices and memory layouts, and the ops' input checks
on random invalid inputs.

Reproducible: every test runs with derandomize=True and no example database, so CI draws the
same examples on every run; the tensors' values come from a torch.Generator seeded by a drawn
integer, so a failing example (printed by hypothesis) pins the exact tensors.
"""

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import dynnet_ext
from conftest import CPU_GEMM_ISAS, set_cpu_gemm, tol
from dynnet_ext import reference
from dynnet_ext.ops import ACTIVATIONS

ACTIVATION_ERROR = "activation must be 'relu', 'gelu', 'gelu_tanh', 'silu' or 'none'"

OPS = torch.ops.dynnet
HALF_TYPES = (torch.float16, torch.bfloat16)
# Each example runs on one CPU GEMM engine, drawn (conftest restores the engine after the test).
ISAS = st.sampled_from(CPU_GEMM_ISAS or [None])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def fixed(max_examples):
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        # function_scoped_fixture: the only fixture these tests take is `ran`, whose checks are
        # per `with` block, so sharing it across examples is correct.
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


# Sizes: zero, one, small odd, primes, and the upper end (~70).
SPECIAL_SIZES = [0, 1, 2, 3, 5, 7, 13, 31, 61, 67, 70]


@st.composite
def sizes(draw, max_size=70):
    """A size in 0..max_size: 0 about one draw in ten (not more: an empty tensor checks little
    else), otherwise a special size (1, odd, prime, 70) or any size."""
    if max_size == 0 or draw(st.integers(0, 9)) == 0:
        return 0
    specials = [s for s in SPECIAL_SIZES if 0 < s <= max_size]
    return draw(st.one_of(st.sampled_from(specials), st.integers(1, max_size)))


SIZES = sizes()
MAX_ROWS = 300  # product of x's leading dims, so the whole run stays within a few seconds


@st.composite
def leading_dims(draw, max_dims=3, max_rows=MAX_ROWS):
    """0-3 leading dims whose product stays <= max_rows (sizes include 0, 1, odd, up to 70)."""
    dims, budget = [], max_rows
    for _ in range(draw(st.integers(0, max_dims))):
        size = draw(sizes(min(70, budget)))
        dims.append(size)
        budget = budget // size if size else budget
    return tuple(dims)


LAYOUTS = ("contiguous", "step_last", "step_first", "transposed", "expanded")


def make_tensor(shape, layout, gen, dtype, scale=1.0):
    """A tensor of `shape` whose values are randn * scale rounded to dtype, in the given memory
    layout: a strided slice (step 2) of a larger tensor along the last or first dim, a fully
    transposed (permuted) tensor, or a stride-0 broadcast along the first dim. Values are drawn
    in float64 and rounded once; the view is taken after the rounding (a .to() afterwards would
    copy into a contiguous tensor)."""
    shape = tuple(shape)
    nd = len(shape)
    if layout == "step_last" and nd >= 1:
        base_shape, view = (*shape[:-1], 2 * shape[-1] + 1), lambda b: b[..., : 2 * shape[-1] : 2]
    elif layout == "step_first" and nd >= 1:
        base_shape, view = (2 * shape[0] + 1, *shape[1:]), lambda b: b[: 2 * shape[0] : 2]
    elif layout == "transposed" and nd >= 2:
        base_shape, view = shape[::-1], lambda b: b.permute(*reversed(range(nd)))
    elif layout == "expanded" and nd >= 1:
        base_shape, view = (1, *shape[1:]), lambda b: b.expand(shape)
    else:
        base_shape, view = shape, lambda b: b
    base = (torch.randn(base_shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    t = view(base)
    assert t.shape == shape
    return t


def strided_copy(t, layout):
    """A copy of t (the op's own output y) in another layout: every other column of a wider buffer."""
    if layout == "contiguous" or t.dim() == 0:
        return t
    buf = torch.full((*t.shape[:-1], 2 * t.shape[-1] + 1), float("nan"), dtype=t.dtype)
    view = buf[..., : 2 * t.shape[-1] : 2]
    view.copy_(t)
    return view


@st.composite
def linear_case(draw, dtypes=DTYPES):
    lead = draw(leading_dims())
    k, n = draw(SIZES), draw(SIZES)
    dtype = draw(st.sampled_from(dtypes))
    bias = draw(st.booleans())
    activation = draw(st.sampled_from(["relu", "none"]))
    layouts = {name: draw(st.sampled_from(LAYOUTS)) for name in ("x", "w", "b", "gy", "y")}
    seed = draw(st.integers(0, 2**31 - 1))
    return lead, k, n, dtype, bias, activation, layouts, seed


def build(lead, k, n, dtype, bias, layouts, seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_tensor((*lead, k), layouts["x"], gen, dtype)
    w = make_tensor((n, k), layouts["w"], gen, dtype, scale=1 / math.sqrt(max(k, 1)))
    b = make_tensor((n,), layouts["b"], gen, dtype) if bias else None
    gy = make_tensor((*lead, n), layouts["gy"], gen, dtype)
    return x, w, b, gy


def up(t):
    return None if t is None else t.float()


@fixed(250)
@given(linear_case(), ISAS)
def test_forward_and_backward_match_reference(case, isa):
    set_cpu_gemm(isa)
    lead, k, n, dtype, bias, activation, layouts, seed = case
    x, w, b, gy = build(lead, k, n, dtype, bias, layouts, seed)
    event(f"dtype={dtype}")
    event(f"x contiguous={x.is_contiguous()}, weight contiguous={w.is_contiguous()}")
    event(f"x.dim()={x.dim()}, empty={x.numel() == 0 or w.numel() == 0}")
    half = dtype in HALF_TYPES
    ref_in = [up(t) for t in (x, w, b)] if half else [x, w, b]

    # Forward. Half types: the float32 reference on the same rounded inputs, rounded once.
    y = OPS.linear_relu(x, w, b, activation)
    assert y.shape == (*lead, n) and y.dtype == dtype and y.is_contiguous()
    want = reference.linear_act(*ref_in, activation)
    torch.testing.assert_close(y, want.to(dtype) if half else want, **tol(dtype))
    if activation == "relu":
        assert not (y < 0).any()

    # Backward. Where the pre-activation is within the dtype's tolerance of 0 (but not exactly
    # 0, e.g. no inputs and no bias), the ReLU decision is a rounding coin flip between the
    # fused and the stock sums; those entries get a zero incoming gradient so both sides agree
    # whatever the flip (they are a vanishing fraction for float32/64, a few % for half types).
    pre = reference.linear_act(*ref_in, "none")
    if activation == "relu":
        ambiguous = (pre.abs() <= tol(dtype)["atol"]) & (pre != 0)
        if ambiguous.any():
            gy = gy.masked_fill(ambiguous, 0)
    y_arg = strided_copy(y, layouts["y"]) if activation == "relu" else None
    gx, gw, gb = OPS.linear_relu_backward(gy, x, w, y_arg, activation, [True, True, bias])
    rx, rw, rb = reference.linear_act_backward(up(gy) if half else gy, *ref_in, activation)
    assert gx.shape == x.shape and gw.shape == w.shape
    for name, got, ref in (("grad_x", gx, rx), ("grad_weight", gw, rw), ("grad_bias", gb, rb)):
        if ref is None:
            assert got.shape == (0,), name
            continue
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.float() if half else got, ref, **tol(dtype), msg=lambda m: f"{name}: {m}")


@fixed(60)
@given(linear_case(dtypes=[torch.float32, torch.float64]), st.lists(st.booleans(), min_size=3, max_size=3), ISAS)
def test_backward_output_mask_subsets_equal_full(case, mask, isa):
    """Any output_mask gives exactly (bitwise) the gradients of the full mask for the entries it
    asks for, and (0,)-shaped placeholders for the rest; 'none' works with y given or None."""
    set_cpu_gemm(isa)
    lead, k, n, dtype, bias, activation, layouts, seed = case
    x, w, b, gy = build(lead, k, n, dtype, bias, layouts, seed)
    y = OPS.linear_relu(x, w, b, activation)
    y_arg = y if activation == "relu" or seed % 2 else None
    full = OPS.linear_relu_backward(gy, x, w, y_arg, activation, [True, True, True])
    part = OPS.linear_relu_backward(gy, x, w, y_arg, activation, mask)
    for wanted, f, p in zip(mask, full, part):
        if wanted:
            assert torch.equal(f, p)
        else:
            assert p.shape == (0,)


# ----------------------------------------------------------------------------------------------
# DynamicNet: fused against the seed's stock model with the same state_dict.

NET_SIZES = st.one_of(st.sampled_from([1, 2, 3, 7, 13, 31, 47]), st.integers(1, 48))


@fixed(60)
@given(
    d_in=st.one_of(st.just(0), NET_SIZES),
    h=NET_SIZES,
    d_out=NET_SIZES,
    lead=leading_dims(max_dims=2, max_rows=64),
    depth=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
    isa=ISAS,
)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_dynamic_net_matches_stock(d_in, h, d_out, lead, depth, seed, isa, ran):
    set_cpu_gemm(isa)
    torch.manual_seed(seed)
    fused = dynnet_ext.DynamicNet(d_in, h, d_out)
    stock = reference.DynamicNet(d_in, h, d_out)
    stock.load_state_dict(fused.state_dict())
    x = torch.randn(*lead, d_in, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(*lead, d_out)

    with ran("dynamic_net", "dynamic_net_backward"):
        out = fused(x, depth)
        out.backward(g)
    out_ref = stock(x_ref, depth)
    out_ref.backward(g)
    assert out.shape == (*lead, d_out)
    torch.testing.assert_close(out, out_ref, **tol(torch.float32))
    torch.testing.assert_close(x.grad, x_ref.grad, **tol(torch.float32))
    for (name, pf), (name_s, ps) in zip(fused.named_parameters(), stock.named_parameters(), strict=True):
        assert name == name_s
        if depth == 0 and name.startswith("hidden_layer"):
            assert pf.grad is None and ps.grad is None, name
        else:
            assert pf.grad is not None, name
            torch.testing.assert_close(pf.grad, ps.grad, **tol(torch.float32), msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------
# Invalid inputs: RuntimeError starting with "dynnet:" and naming the offending argument, from
# the same checks on every path (torch.ops, the eager fast path _C.linear_relu, with and
# without autograd). Messages as written in csrc/common.h and csrc/cpu/linear_relu.cpp.

BAD_DTYPES = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# str(dtype) in ATen's spelling, as the messages print it
ATEN_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
              torch.int8: "Char", torch.uint8: "Byte", torch.int16: "Short", torch.int32: "Int",
              torch.int64: "Long", torch.bool: "Bool", torch.complex64: "ComplexFloat"}
SMALL = st.integers(0, 9)
FORWARD_KINDS = ["x_0d", "weight_rank", "in_features", "bias_shape", "weight_dtype", "bias_dtype",
                 "x_dtype", "weight_not_float", "activation", "x_meta"]
BACKWARD_KINDS = ["grad_y_shape", "y_shape", "grad_y_dtype", "y_dtype", "y_missing", "bw_activation",
                  "bw_in_features", "bw_x_dtype", "bw_x_meta"]


def _ones(shape, dtype=torch.float32, device="cpu"):
    return torch.ones(shape, dtype=dtype, device=device)


@st.composite
def invalid_case(draw, kind):
    """(op, args, regex the message must match) for one kind of invalid input. The regex
    always starts with 'dynnet: ' and the name of the argument at fault."""
    lead = draw(leading_dims(max_dims=2, max_rows=20))
    k, n = draw(SMALL), draw(SMALL)
    dtype = draw(st.sampled_from(FLOATS))
    x, w = _ones((*lead, k), dtype), _ones((n, k), dtype)
    b = _ones((n,), dtype) if draw(st.booleans()) else None
    act = draw(st.sampled_from(["relu", "none"]))
    fwd = lambda x=x, w=w, b=b, act=act: ("forward", (x, w, b, act))  # noqa: E731

    if kind == "x_0d":
        return fwd(x=_ones((), dtype)) + (r"dynnet: x must have at least 1 dimension \(\*, in_features\), got a 0-d tensor",)
    if kind == "weight_rank":
        rank = draw(st.sampled_from([0, 1, 3, 4]))
        shape = draw(st.lists(SMALL, min_size=rank, max_size=rank))
        return fwd(w=_ones(shape, dtype)) + (rf"dynnet: weight must be 2-d \(out_features, in_features\), got shape \[{', '.join(map(str, shape))}\]",)
    if kind == "in_features":
        k2 = draw(st.sampled_from([v for v in range(10) if v != k]))
        return fwd(w=_ones((n, k2), dtype)) + (rf"dynnet: x's last dimension \({k}\) must equal weight's in_features \(weight.shape\[1\] = {k2}\)",)
    if kind == "bias_shape":
        shape = draw(st.one_of(
            st.tuples(st.sampled_from([v for v in range(10) if v != n])),  # wrong length
            st.just(()),  # 0-d
            st.tuples(st.integers(1, 3), st.just(n)),  # 2-d
        ))
        return fwd(b=_ones(shape, dtype)) + (rf"dynnet: bias must have shape \(out_features,\) = \({n},\), got \[{', '.join(map(str, shape))}\]",)
    if kind in ("weight_dtype", "bias_dtype", "weight_not_float"):
        pool = BAD_DTYPES if kind == "weight_not_float" else FLOATS
        other = draw(st.sampled_from([d for d in pool if d != dtype]))
        arg = "bias" if kind == "bias_dtype" else "weight"
        bad = _ones((n,) if arg == "bias" else (n, k), other)
        args = fwd(b=bad) if arg == "bias" else fwd(w=bad)
        return args + (rf"dynnet: {arg} must have the same dtype as x \({ATEN_NAMES[dtype]}\), got {ATEN_NAMES[other]}",)
    if kind == "x_dtype":
        bad = draw(st.sampled_from(BAD_DTYPES))
        w_dtype = draw(st.sampled_from([bad, dtype]))  # same bad dtype, or a float weight
        return fwd(x=_ones((*lead, k), bad), w=_ones((n, k), w_dtype), b=None) + (
            rf"dynnet: x must be float32, float64, float16 or bfloat16, got {ATEN_NAMES[bad]}",)
    if kind == "activation":
        name = draw(st.one_of(
            st.sampled_from(["", "Relu", "RELU", "relu ", " none", "GELU", "gelu ", "sigmoid", "None", "relu6"]),
            st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12),
        ).filter(lambda s: s not in ACTIVATIONS))
        return fwd(act=name) + (re.escape(f"dynnet: {ACTIVATION_ERROR}, got '{name}'"),)
    if kind == "x_meta":
        return fwd(x=_ones((*lead, k), dtype, "meta")) + (r"dynnet: weight must be on the same device as x \(meta\), got cpu",)

    # Backward op: grad_y and y are (*lead, n).
    y, gy = _ones((*lead, n), dtype), _ones((*lead, n), dtype)
    mask = [True, True, draw(st.booleans())]
    bwd = lambda gy=gy, x=x, w=w, y=y, act="relu": ("backward", (gy, x, w, y, act, mask))  # noqa: E731
    expected = f"[{', '.join(map(str, (*lead, n)))}]"
    if kind in ("grad_y_shape", "y_shape"):
        n2 = draw(st.sampled_from([v for v in range(10) if v != n]))
        bad = _ones((*lead, n2), dtype)
        arg = "grad_y" if kind == "grad_y_shape" else "y"
        args = bwd(gy=bad) if arg == "grad_y" else bwd(y=bad)
        return args + (rf"dynnet: {arg} must have shape {re.escape(expected)} \(x's leading dims, out_features\), got",)
    if kind in ("grad_y_dtype", "y_dtype"):
        other = draw(st.sampled_from([d for d in FLOATS if d != dtype]))
        bad = _ones((*lead, n), other)
        arg = "grad_y" if kind == "grad_y_dtype" else "y"
        args = bwd(gy=bad) if arg == "grad_y" else bwd(y=bad)
        return args + (rf"dynnet: {arg} must have the same dtype as x \({ATEN_NAMES[dtype]}\), got {ATEN_NAMES[other]}",)
    if kind == "y_missing":
        act = draw(st.sampled_from(["relu", "gelu", "gelu_tanh", "silu"]))
        return bwd(y=None, act=act) + (r"dynnet: linear_relu_backward needs y: the forward output for 'relu', the "
                                       r"pre-activation z \(linear_act's second output\)",)
    if kind == "bw_activation":
        name = draw(st.sampled_from(["", "GELU", "Relu", "NONE", "tanh"]))
        return bwd(act=name) + (re.escape(f"dynnet: {ACTIVATION_ERROR}, got '{name}'"),)
    if kind == "bw_in_features":
        k2 = draw(st.sampled_from([v for v in range(10) if v != k]))
        return bwd(w=_ones((n, k2), dtype)) + (rf"dynnet: x's last dimension \({k}\) must equal weight's in_features",)
    if kind == "bw_x_dtype":
        bad = draw(st.sampled_from(BAD_DTYPES))
        t = lambda s: _ones(s, bad)  # noqa: E731
        return bwd(gy=t((*lead, n)), x=t((*lead, k)), w=t((n, k)), y=t((*lead, n))) + (
            rf"dynnet: x must be float32, float64, float16 or bfloat16, got {ATEN_NAMES[bad]}",)
    assert kind == "bw_x_meta"
    m = lambda s: _ones(s, dtype, "meta")  # noqa: E731
    return bwd(gy=m((*lead, n)), x=m((*lead, k)), y=m((*lead, n))) + (
        r"dynnet: weight must be on the same device as x \(meta\), got cpu",)


@pytest.mark.parametrize("kind", FORWARD_KINDS + BACKWARD_KINDS)
@fixed(15)
@given(data=st.data(), requires_grad=st.booleans())
def test_invalid_inputs_raise_named_errors(kind, data, requires_grad):
    which, args, message = data.draw(invalid_case(kind))
    calls = []
    if which == "forward":
        x, w, b, act = args
        if requires_grad and x.is_floating_point():  # through the C++ autograd node as well
            x = x.detach().requires_grad_()
        calls = [lambda: OPS.linear_relu(x, w, b, act), lambda: dynnet_ext.ops._C.linear_relu(x, w, b, act)]
    else:
        calls = [lambda: OPS.linear_relu_backward(*args)]
    for call in calls:
        with pytest.raises(RuntimeError) as info:
            call()
        text = str(info.value)
        assert text.startswith("dynnet: "), text
        assert re.match(message, text), f"{text!r} does not match {message!r}"


# A call with any argument on 'meta' (or fake) is dispatched to the fake kernel in
# dynnet_ext/ops/, not to the C++ kernels: it must reject the same inputs with the same
# messages (once found returning uninitialised memory for a meta bias with CPU x/weight).
@pytest.mark.parametrize("bias_len", [5, 7])
def test_bias_on_meta_with_cpu_x_is_rejected(bias_len):
    x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(bias_len, device="meta")
    for call in (lambda: OPS.linear_relu(x, w, b, "relu"), lambda: dynnet_ext.functional.fused_linear_relu(x, w, b)):
        try:
            y = call()
        except RuntimeError as e:
            assert str(e).startswith("dynnet: bias"), str(e)
        else:
            raise AssertionError(f"returned a {y.device} tensor of shape {list(y.shape)} (uninitialised memory)")


# The same invalid inputs on 'meta' (shape inference, torch.compile tracing) are rejected as on
# the CPU, with the same "dynnet:" messages.
META_CASES = {
    "bias_len": (lambda m: (m(3, 4), m(5, 4), m(7)), "dynnet: bias must have shape"),
    "int_dtype": (lambda m: (m(3, 4, dtype=torch.int32), m(5, 4, dtype=torch.int32), None), "dynnet: x must be float32"),
    "x_0d": (lambda m: (m(), m(5, 4), None), "dynnet: x must have at least 1 dimension"),
}


def _meta(*shape, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("case", sorted(META_CASES))
def test_meta_rejects_what_cpu_rejects(case):
    make, message = META_CASES[case]
    cpu_args = [t if t is None else torch.ones(t.shape, dtype=t.dtype) for t in make(_meta)]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        OPS.linear_relu(*cpu_args, "relu")  # the CPU kernel's checks: this part passes today
    try:
        y = OPS.linear_relu(*make(_meta), "relu")
    except RuntimeError as e:
        assert str(e).startswith(message), str(e)
    except Exception as e:  # e.g. an IndexError from a fake kernel that indexes before checking
        raise AssertionError(f"{type(e).__name__}: {e}") from e
    else:
        raise AssertionError(f"returned a meta tensor of shape {list(y.shape)}")


def test_meta_backward_checks_grad_y_shape():
    m = _meta
    with pytest.raises(RuntimeError, match=r"dynnet: grad_y must have shape"):
        OPS.linear_relu_backward(torch.ones(3, 7), torch.ones(3, 4), torch.ones(5, 4), torch.ones(3, 5), "relu", [True] * 3)
    try:
        OPS.linear_relu_backward(m(3, 7), m(3, 4), m(5, 4), m(3, 5), "relu", [True] * 3)
    except RuntimeError as e:
        assert str(e).startswith("dynnet: grad_y"), str(e)
    else:
        raise AssertionError("meta backward accepted grad_y of shape [3, 7] for y of shape [3, 5]")
