"""The CUDA dispatch rule (csrc/cuda/paths.h) and the vendor path's host code (csrc/cuda/vendor.cuh),
checked without a GPU wherever the same code runs on the CPU:

- the rule itself (plain C++, bound into dynnet_ext._C on every build): thresholds per precision
  and direction, the network's one-launch limits, forced paths (set_cuda_path and
  DYNNET_EXT_CUDA_PATH), the table's checks, DYNNET_EXT_CUDA_TABLE;
- the precision column a float32 call takes: TF32 exactly where stock's cuBLAS GEMMs use TF32,
  under every way torch lets a user say so (csrc/cuda/precision.h);
- the vendor path's host code in the CUDA harness (tests/cuda_harness.py), whose stand-in for
  cuBLAS records what each call would ask of it: layouts, leading dimensions, transposes, the
  epilogue, no operand copies; the masked-gradient pass's row chunks; NaN as stock.

GPU-only cases (cuBLASLt's own epilogue) skip with "no CUDA GPU visible".
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cuda_harness
from conftest import tol
from dynnet_ext import ops, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
PRECISIONS = ops.CUDA_PRECISIONS
SEED_FLOPS = 2.0 * 64 * 1000 * 100


@pytest.fixture
def rule():
    """dynnet_ext._C's rule with its state restored afterwards."""
    path, table = ops.set_cuda_path("auto"), ops.cuda_dispatch_table()
    yield ops._C
    ops.set_cuda_path(path)
    ops.set_cuda_dispatch_table(table)


# ---- the rule -------------------------------------------------------------------------------

def test_reset_gives_the_source_defaults(rule):
    rule.set_cuda_dispatch_table({"wide_tile_min_tiles": 7, "net_one_launch_max_flops": {"float16": 3.0}})
    assert rule.cuda_dispatch_table() != rule.cuda_default_dispatch_table()
    rule.reset_cuda_dispatch_table()
    assert rule.cuda_dispatch_table() == rule.cuda_default_dispatch_table()
    # The vendor forward may put the ReLU in cuBLASLt's epilogue only where a GPU has shown that
    # the epilogue keeps NaN: by default as the H200's sweep found (it did).
    with open(os.path.join(ROOT, "benchmarks", "results", "gpu-h200", "thresholds.json")) as f:
        measured = json.load(f)["table"]["lt_relu_keeps_nan"]
    assert rule.cuda_default_dispatch_table()["lt_relu_keeps_nan"] is measured is True


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backward", [False, True])
def test_layer_rule_compares_flops_with_its_own_entry(rule, precision, backward):
    mine = "layer_backward_custom_max_flops" if backward else "layer_forward_custom_max_flops"
    other = "layer_forward_custom_max_flops" if backward else "layer_backward_custom_max_flops"
    zeros = {p: 0.0 for p in PRECISIONS}
    rule.set_cuda_dispatch_table({mine: {**zeros, precision: SEED_FLOPS}, other: {p: 1e30 for p in PRECISIONS}})
    assert rule.cuda_choose_layer(precision, 64, 1000, 100, backward) == "custom"  # at the threshold
    assert rule.cuda_choose_layer(precision, 64, 1000, 101, backward) == "vendor"  # just above
    assert rule.cuda_choose_layer(precision, 65, 1000, 100, backward) == "vendor"
    others = [p for p in PRECISIONS if p != precision]
    assert all(rule.cuda_choose_layer(p, 1, 1, 1, backward) == "vendor" for p in others)  # their entries are 0
    # No overflow anywhere: 2 M K N as a double.
    assert rule.cuda_choose_layer(precision, 2**40, 2**20, 2**20, backward) == "vendor"


def test_network_rule(rule):
    seed3 = 2.0 * 64 * (1000 * 100 + 3 * 100 * 100 + 100 * 10)
    rule.set_cuda_dispatch_table({"net_one_launch_max_flops": {"float32": seed3, "bfloat16": 0.0}})
    assert rule.cuda_choose_net("float32", 64, 1000, 100, 10, 3) == "one-launch"
    assert rule.cuda_choose_net("float32", 65, 1000, 100, 10, 3) == "chain"
    assert rule.cuda_choose_net("bfloat16", 64, 1000, 100, 10, 3) == "chain"
    # What the one-launch kernels cannot run goes to the chain whatever the table says.
    rule.set_cuda_dispatch_table({"net_one_launch_max_flops": {"float32": 1e30}})
    assert rule.cuda_choose_net("float32", 64, 1000, 256, 256, 3) == "one-launch"
    for shape in [(64, 1000, 257, 10), (64, 1000, 100, 257), (0, 1000, 100, 10), (64, 0, 100, 10)]:
        assert rule.cuda_choose_net("float32", *shape, 1) == "chain", shape


def test_forced_paths(rule):
    assert rule.set_cuda_path("vendor") == "auto"
    assert rule.cuda_path() == "vendor"
    assert rule.cuda_choose_layer("float32", 1, 1, 1, False) == "vendor"
    assert rule.cuda_choose_net("float32", 8, 8, 8, 8, 1) == "chain"
    assert rule.set_cuda_path("custom") == "vendor"
    assert rule.cuda_choose_layer("bfloat16", 4096, 4096, 4096, True) == "custom"
    assert rule.cuda_choose_net("bfloat16", 4096, 4096, 256, 10, 3) == "one-launch"
    assert rule.cuda_choose_net("bfloat16", 64, 100, 300, 10, 3) == "chain"  # does not fit: chain of custom layers
    with pytest.raises(ValueError, match=r"'auto', 'custom' or 'vendor', got 'fast'.*DYNNET_EXT_CUDA_PATH"):
        rule.set_cuda_path("fast")
    assert rule.cuda_path() == "custom"  # unchanged by the refused call
    assert rule.set_cuda_path("auto") == "custom"


@pytest.mark.parametrize("changes, error, match", [
    ({"layer_forward_custom_max_flops": {"float32": -1.0}}, ValueError, ">= 0"),
    ({"layer_forward_custom_max_flops": {"float8": 1.0}}, ValueError, "precision must be one of"),
    ({"layer_forward_custom_max_flops": 5.0}, TypeError, "must be a dict"),
    ({"layer_custom_max_flops": {"float32": 1.0}}, KeyError, "has no entry 'layer_custom_max_flops'"),
    ({"lt_relu_keeps_nan": 1}, TypeError, "must be a bool"),
])
def test_table_changes_are_checked_and_all_or_nothing(rule, changes, error, match):
    before = rule.cuda_dispatch_table()
    with pytest.raises(error, match=match):
        rule.set_cuda_dispatch_table({"wide_tile_min_tiles": 5, **changes})
    assert rule.cuda_dispatch_table() == before


def _python(code, env=None, timeout=120):
    """Runs `code` in a fresh interpreter (this checkout's dynnet_ext, the tests folder importable)."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), **(env or {})}
    for key in ("DYNNET_EXT_CUDA_PATH", "DYNNET_EXT_CUDA_TABLE", cuda_harness.ENV_VARIANT, "LD_PRELOAD"):
        if key not in (env or {}):
            full_env.pop(key, None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_environment_forces_a_path():
    proc = _python("""
        from dynnet_ext import ops
        print(ops.cuda_path(), ops.cuda_choose_layer(__import__("torch").float32, 1, 1, 1))
    """, {"DYNNET_EXT_CUDA_PATH": "vendor"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["vendor", "vendor"]


def test_a_wrong_environment_path_fails_every_cuda_call_saying_why():
    proc = _python("""
        from dynnet_ext import ops
        try:
            ops.cuda_choose_layer(__import__("torch").float32, 1, 1, 1)
        except ValueError as e:
            print("refused:", e)
        ops.set_cuda_path("auto")  # an explicit setting replaces the wrong one
        print(ops.cuda_path())
    """, {"DYNNET_EXT_CUDA_PATH": "sideways"})
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "got 'sideways'" in proc.stdout and "DYNNET_EXT_CUDA_PATH" in proc.stdout
    assert proc.stdout.split()[-1] == "auto"


def test_environment_table_is_read_on_first_use(tmp_path):
    f = tmp_path / "thresholds.json"
    f.write_text(json.dumps({"source": "test", "table": {
        "layer_forward_custom_max_flops": {"bfloat16": 12345.0}, "lt_relu_keeps_nan": True}}))
    proc = _python("""
        import json
        from dynnet_ext import ops
        t, d = ops.cuda_dispatch_table(), ops._C.cuda_default_dispatch_table()
        print(json.dumps([t["layer_forward_custom_max_flops"]["bfloat16"], t["lt_relu_keeps_nan"],
                          t["layer_backward_custom_max_flops"] == d["layer_backward_custom_max_flops"]]))
    """, {"DYNNET_EXT_CUDA_TABLE": str(f)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [12345.0, True, True]


def test_a_wrong_environment_table_fails_its_first_use_not_the_import(tmp_path):
    f = tmp_path / "thresholds.json"
    f.write_text(json.dumps({"table": {"layer_forward_custom_max_flop": {"float32": 1.0}}}))
    proc = _python("""
        import dynnet_ext
        from dynnet_ext import ops
        print("imported", flush=True)
        ops.cuda_dispatch_table()
    """, {"DYNNET_EXT_CUDA_TABLE": str(f)})
    assert proc.stdout.split() == ["imported"]
    assert "DYNNET_EXT_CUDA_TABLE" in proc.stderr
    assert proc.returncode != 0
    assert "has no entry 'layer_forward_custom_max_flop'" in proc.stderr


# ---- the precision column --------------------------------------------------------------------
# Each case sets torch's float32 matmul precision one way in a fresh interpreter (the settings are
# process-wide, and mixing the legacy and the new API leaves states that cannot be undone) and
# checks: the column dynnet_ext reports, stock's own resolution of the setting
# (torch.backends.cuda.matmul.fp32_precision, what ATen's cuBLAS calls read), and that the
# harness's launchers choose by that column (a table sending float32 to custom, tf32 to vendor).

TF32_CASES = {
    "default": ("", "float32"),
    "legacy allow_tf32": ("torch.backends.cuda.matmul.allow_tf32 = True", "tf32"),
    "set_float32_matmul_precision high": ("torch.set_float32_matmul_precision('high')", "tf32"),
    "set_float32_matmul_precision medium": ("torch.set_float32_matmul_precision('medium')", "tf32"),
    "high then highest": ("torch.set_float32_matmul_precision('high'); torch.set_float32_matmul_precision('highest')",
                          "float32"),
    "new api matmul tf32": ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", "tf32"),
    "new api generic tf32": ("torch.backends.fp32_precision = 'tf32'", "tf32"),
    "new api matmul ieee over generic tf32": (
        "torch.backends.fp32_precision = 'tf32'; torch.backends.cuda.matmul.fp32_precision = 'ieee'", "float32"),
}


@pytest.mark.parametrize("case", TF32_CASES)
def test_float32_takes_the_tf32_column_exactly_where_stock_uses_tf32(case):
    setting, want = TF32_CASES[case]
    proc = _python(f"""
        import json, torch
        import cuda_harness
        from dynnet_ext import ops
        {setting}
        calls = None
        if not torch.cuda.is_available():  # the GPU check leaves the harness out (it runs in CI)
            H = cuda_harness.load()
            H.set_cuda_dispatch_table({{"layer_forward_custom_max_flops": {{"float32": 1e30, "tf32": 0.0}}}})
            H.clear_vendor_log()
            x, w = torch.randn(8, 16), torch.randn(4, 16)
            torch.testing.assert_close(H.linear_relu(x, w, None, "none"), x @ w.T)
            calls = len(H.vendor_log())
        print(json.dumps({{
            "dynnet": ops.cuda_precision(torch.float32),
            "stock": "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "float32",
            "harness_vendor_calls": calls,
            "others": [ops.cuda_precision(t) for t in (torch.float64, torch.float16, torch.bfloat16)],
        }}))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["dynnet"] == want
    assert got["stock"] == want
    if not torch.cuda.is_available():
        assert got["harness_vendor_calls"] == (1 if want == "tf32" else 0)
    assert got["others"] == ["float64", "float16", "bfloat16"]


def test_precision_names_a_dtype_without_kernels():
    with pytest.raises(ValueError, match="no CUDA kernels for torch.int32"):
        ops.cuda_precision(torch.int32)


# ---- the vendor path's host code, in the harness ------------------------------------------------

@pytest.fixture
def H():
    module = cuda_harness.load()
    with cuda_harness.Target("harness", "vendor").forced():
        module.clear_vendor_log()
        yield module


def gemm(m, n, k, lda, ldb, trans_a, trans_b, epilogue, lt, dtype="Float"):
    return {"m": m, "n": n, "k": k, "lda": lda, "ldb": ldb, "ldc": n, "trans_a": trans_a, "trans_b": trans_b,
            "epilogue": epilogue, "dtype": dtype, "lt_epilogue": lt}


def _w(n, k):
    return torch.randn(n, k) / k**0.5


# x as the op gets it -> what cuBLAS must be asked for y = x2 @ w.T (+ bias): w.T is w's
# column-major view (trans_b, ldb = K), never a copy; x2 is handed over as it lies when BLAS
# can read it (row- or column-major), else copied.
FORWARD_CASES = {
    "row-major x": (lambda: torch.randn(5, 7), True, gemm(5, 3, 7, 7, 7, False, True, "bias", True)),
    "no bias": (lambda: torch.randn(5, 7), False, gemm(5, 3, 7, 7, 7, False, True, "none", False)),
    "column-major x": (lambda: torch.randn(7, 5).t(), True, gemm(5, 3, 7, 5, 7, True, True, "bias", True)),
    "padded rows": (lambda: torch.randn(5, 9)[:, :7], True, gemm(5, 3, 7, 9, 7, False, True, "bias", True)),
    "strided columns: copied": (lambda: torch.randn(5, 14)[:, ::2], True, gemm(5, 3, 7, 7, 7, False, True, "bias", True)),
    "3-d x": (lambda: torch.randn(2, 3, 7), True, gemm(6, 3, 7, 7, 7, False, True, "bias", True)),
    # ATen's cuBLASLt epilogue needs every dimension above 1; else a plain GEMM over a bias copy.
    "one row": (lambda: torch.randn(1, 7), True, gemm(1, 3, 7, 7, 7, False, True, "bias", False)),
}


@pytest.mark.parametrize("case", FORWARD_CASES)
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_harness_vendor_forward_asks_cublas_for_the_views_as_they_lie(H, case, activation):
    make_x, bias, want = FORWARD_CASES[case]
    x, w = make_x(), _w(3, 7)
    b = torch.randn(3) if bias else None
    H.set_cuda_dispatch_table({"lt_relu_keeps_nan": False})  # restored by the fixture
    y = H.linear_relu(x, w, b, activation)
    torch.testing.assert_close(y, reference.linear_act(x, w, b, activation), **tol(torch.float32))
    # The ReLU never in cuBLASLt's epilogue while the table says it is unproven: "bias" and
    # torch's own ReLU after it.
    assert H.vendor_log() == [want]


def test_harness_vendor_forward_uses_the_relu_epilogue_only_where_the_table_allows(H):
    x, w, b = torch.randn(5, 7), _w(3, 7), torch.randn(3)
    H.set_cuda_dispatch_table({"lt_relu_keeps_nan": True})
    H.linear_relu(x, w, b, "relu")
    H.linear_relu(x, w, b, "none")
    H.linear_relu(x, w, None, "relu")  # no bias: no epilogue to put it in
    assert [g["epilogue"] for g in H.vendor_log()] == ["bias_relu", "bias", "none"]


def test_harness_vendor_forward_with_empty_reduction_never_calls_cublas(H):
    x, w, b = torch.randn(5, 0), torch.randn(3, 0), torch.tensor([-1.0, 0.5, float("nan")])
    y = H.linear_relu(x, w, b, "relu")
    torch.testing.assert_close(y, torch.relu(b).expand(5, 3), equal_nan=True)
    assert H.vendor_log() == []


@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, True), (False, False, True)])
def test_harness_vendor_backward_runs_only_the_gemms_asked_for(H, mask):
    M, K, N = 6, 7, 5
    x, w, b = torch.randn(M, K), _w(N, K), torch.randn(N)
    y = H.linear_relu(x, w, b, "relu")
    gy = torch.randn_like(y)
    H.clear_vendor_log()
    got = H.linear_relu_backward(gy, x, w, y, "relu", list(mask))
    want = reference.linear_act_backward(gy, x, w, b, "relu")
    for need, g, r in zip(mask, got, want):
        if need:
            torch.testing.assert_close(g, r, **tol(torch.float32))
    # grad_x = g @ w: both row-major as they lie. grad_w = g.T @ x2: g's column-major view.
    expect = []
    if mask[0]:
        expect.append(gemm(M, K, N, N, K, False, False, "none", False))
    if mask[1]:
        expect.append(gemm(N, K, M, N, K, True, False, "none", False))
    assert H.vendor_log() == expect


def _stats(H, name):
    return {k: v for k, v in H.kernel_stats().items() if name in k}


@pytest.mark.parametrize("M, N", [(100, 20), (600, 20), (20000, 40), (300, 300)])
def test_harness_vendor_grad_bias_row_chunks(H, M, N):
    """grad_bias of the vendor backward: one pass over grad_y and y; where the columns alone give
    too few blocks for 132 SMs, rows split into chunks of >= 256 whose partial sums a second kernel
    adds in chunk order. Same bits on every call."""
    x, w = torch.randn(M, 3), _w(N, 3)
    b = torch.randn(N)
    y = H.linear_relu(x, w, b, "relu")
    gy = torch.randn_like(y)
    H.reset_kernel_stats()
    _, _, gb = H.linear_relu_backward(gy, x, w, y, "relu", [False, False, True])
    col_blocks = math.ceil(N / 32)
    chunks = max(1, min(math.ceil(2 * 132 / col_blocks), math.ceil(M / 256)))
    rows_per_chunk = math.ceil(M / chunks)
    used = math.ceil(M / rows_per_chunk)
    masked = _stats(H, "masked_grad_kernel")
    assert sum(s["blocks"] for s in masked.values()) == col_blocks * used
    partial_sums = _stats(H, "sum_partials_kernel")
    assert sum(s["launches"] for s in partial_sums.values()) == (1 if used > 1 else 0)
    want = gy.double().masked_fill(y <= 0, 0).sum(0)
    torch.testing.assert_close(gb.double(), want, **tol(torch.float32))
    again = H.linear_relu_backward(gy, x, w, y, "relu", [False, False, True])[2]
    assert torch.equal(gb, again)


def test_harness_vendor_path_keeps_nan_as_stock(H):
    x, w, b = torch.randn(6, 7), _w(5, 7), torch.randn(5)
    x[1, 2] = float("nan")
    x[3, 0] = float("inf")
    y = H.linear_relu(x, w, b, "relu")
    want = torch.relu(torch.nn.functional.linear(x, w, b))
    assert torch.equal(y.isnan(), want.isnan()) and y.isnan().any()
    torch.testing.assert_close(y, want, equal_nan=True, **tol(torch.float32))
    # The backward's mask lets the gradient through where y is NaN (threshold_backward: y <= 0 masks).
    gy = torch.randn_like(y)
    gb = H.linear_relu_backward(gy, x, w, y, "relu", [False, False, True])[2]
    torch.testing.assert_close(gb.double(), torch.where(y <= 0, 0.0, gy.double()).sum(0), **tol(torch.float32))


# ---- GPU only --------------------------------------------------------------------------------

@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lt_relu_epilogue_keeps_nan(dtype):
    """Whether cuBLASLt's RELU_BIAS epilogue (ATen's _addmm_activation) keeps NaN as torch.relu does.
    The vendor forward trusts it only where the table says so (lt_relu_keeps_nan, false by default):
    a table that says so on a GPU where it drops NaN fails here."""
    a = torch.randn(64, 128, device="cuda", dtype=dtype)
    a[3, 5] = float("nan")
    bmat = torch.randn(128, 96, device="cuda", dtype=dtype)
    bias = torch.randn(96, device="cuda", dtype=dtype)
    got = torch._addmm_activation(bias, a, bmat)
    want = torch.relu(torch.addmm(bias, a, bmat))
    keeps = bool(torch.equal(got.isnan(), want.isnan()))
    print(f"cuBLASLt RELU_BIAS epilogue keeps NaN for {dtype}: {keeps}")
    assert keeps or not ops.cuda_dispatch_table()["lt_relu_keeps_nan"]


@GPU
@pytest.mark.parametrize("path", ["custom", "vendor"])
def test_cuda_forward_keeps_nan_as_stock(rule, path):
    rule.set_cuda_path(path)
    x = torch.randn(64, 128, device="cuda")
    x[3, 5] = float("nan")
    w, b = torch.randn(96, 128, device="cuda") / 128**0.5, torch.randn(96, device="cuda")
    y = torch.ops.dynnet.linear_relu(x, w, b, "relu")
    want = torch.relu(torch.nn.functional.linear(x, w, b))
    assert torch.equal(y.isnan(), want.isnan()) and y.isnan().any()
