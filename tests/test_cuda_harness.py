"""The CUDA harness itself (tests/cuda_harness.py, tests/harness/, csrc/cuda/harness/): the shim
runs kernels as CUDA defines them and reports what CUDA would reject; the planted bugs stay
anchored on the kernels' code; and the probe - the quick set of op calls that covers every CUDA
kernel and launcher path, which each planted bug must fail.

The CUDA ops' own test cases run on the harness as the "harness" device of
tests/test_linear_relu_cuda.py and tests/test_dynamic_net_ops.py.
"""

import os
import re

import pytest
import torch

import cuda_harness
import dynnet_ext
from conftest import tol
from dynnet_ext import reference
from dynnet_ext.ops.activations import SMOOTH_ACTIVATIONS
from harness import planted


@pytest.fixture(scope="module")
def H():
    return cuda_harness.load()


@pytest.fixture
def forward_schedule(H):
    yield
    H.set_schedule("forward")


# ---- the shim ---------------------------------------------------------------------------------

@pytest.mark.parametrize("grid,block", [([1, 1, 1], [1, 1, 1]), ([3, 2, 2], [4, 3, 2]), ([2, 1, 1], [1024, 1, 1]),
                                        ([1, 1, 3], [2, 1, 64])])
def test_builtins(H, grid, block):
    out = H.selftest.builtins(grid, block)
    # Thread (x, y, z) of block (x, y, z), threads fastest, x fastest within each.
    b = torch.cartesian_prod(*[torch.arange(n) for n in reversed(grid)]).reshape(-1, 3).flip(1)
    t = torch.cartesian_prod(*[torch.arange(n) for n in reversed(block)]).reshape(-1, 3).flip(1)
    want = torch.cat([t.repeat(len(b), 1), b.repeat_interleave(len(t), 0),
                      torch.tensor(block).expand(len(b) * len(t), 3), torch.tensor(grid).expand(len(b) * len(t), 3)], 1)
    assert torch.equal(out, want)


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("threads,rounds", [(256, 3), (1024, 1), (33, 40)])
def test_barrier_holds_every_thread(H, forward_schedule, order, threads, rounds):
    H.set_schedule(order)
    out = H.selftest.rotate(2, threads, rounds)
    t = torch.arange(threads)
    want = torch.cat([(t + rounds) % threads + 1000 * b for b in range(2)]).float()
    assert torch.equal(out, want)


def test_shared_memory_starts_nan_in_every_block(H):
    for _ in range(2):  # nothing left over from the previous launch either
        out = H.selftest.unwritten_shared(4, 64).reshape(4, 64)
        for b in range(4):
            assert torch.equal(out[b, : 64 - b], torch.full((64 - b,), float(b)))
            assert out[b, 64 - b:].isnan().all()


def test_dynamic_shared_memory_sized_by_launch_and_nan_filled(H):
    out = H.selftest.dynamic_smem(1000, False)
    assert torch.equal(out[:-1], torch.arange(999.0)) and out[-1].isnan()
    with pytest.raises(RuntimeError, match="must opt in"):
        H.selftest.dynamic_smem(48 * 256 + 1, False)  # one float over 48 KiB
    out = H.selftest.dynamic_smem(48 * 256 + 1, True)  # after allow_dynamic_smem
    assert torch.equal(out[:-1], torch.arange(48.0 * 256)) and out[-1].isnan()


def test_divergent_barrier_is_an_error_naming_kernel_and_lines(H):
    assert torch.equal(H.selftest.divergent_barrier(64, 0), torch.ones(64))
    assert torch.equal(H.selftest.divergent_barrier(64, 64), torch.ones(64))
    with pytest.raises(RuntimeError) as err:
        H.selftest.divergent_barrier(64, 20)
    msg = str(err.value)
    with open(os.path.join(cuda_harness.CSRC, "cuda/harness/module.cpp")) as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if "void divergent_barrier_kernel(" in line)
    first, second = [i + 1 for i, line in enumerate(lines) if i > start and "__syncthreads();" in line][:2]
    assert "kernel dynnet::selftest::divergent_barrier_kernel, block (0,0,0)" in msg, msg
    assert f"threads 0-19 at module.cpp:{first}" in msg and f"threads 20-63 at module.cpp:{second}" in msg, msg


@pytest.mark.parametrize("live", [1, 5, 64])
def test_returned_threads_leave_the_barrier(H, live):
    out = H.selftest.early_return(64, live)
    t = torch.arange(live)
    assert torch.equal(out[:live], ((t + 1) % live).float())
    assert out[live:].isnan().all()  # those threads returned before writing


@pytest.mark.parametrize("threads", [32, 80])  # 80: a last warp of 16 lanes, its mask 0xFFFF
def test_warp_operations(H, threads):
    want = []
    for t in range(threads):
        base, lane = t // 32 * 32, t % 32
        have = min(32, threads - base)
        seg = lane // 8 * 8
        want.append([
            sum(range(base + 1, base + 33)) if have == 32 else -1,  # xor butterfly sum
            base + 3 % have + 1,  # __shfl_sync from lane 3
            t + 1 if lane == 0 else t,  # __shfl_up_sync by 1: lane 0 keeps its own
            base + (lane + 2 if lane + 2 < seg + 8 else lane) + 1,  # __shfl_down_sync by 2, width 8
            sum(1 << j for j in range(have) if j % 3 == 0),  # __ballot_sync
            (1 if have > 5 else 0) + 2,  # __any_sync(lane == 5) + 2 * __all_sync(true)
        ])
    assert torch.equal(H.selftest.warp(threads), torch.tensor(want))


@pytest.mark.parametrize("mode,error", [(0, "waits for lane 16, which has returned"),
                                        (1, "waits for lane 16, which waits at __syncthreads()"),
                                        (2, "read lane 20, which is not in the mask")])
def test_warp_misuse_is_an_error(H, mode, error):
    with pytest.raises(RuntimeError, match=re.escape(error)) as err:
        H.selftest.warp_misuse(mode)
    assert "warp_misuse_kernel" in str(err.value) and "module.cpp:" in str(err.value)


def test_reversed_schedule_changes_a_racy_result(H, forward_schedule):
    # What makes the bitwise repeat tests a race detector: order-dependent results differ.
    first = H.selftest.racy(3, 32)
    H.set_schedule("reverse")
    second = H.selftest.racy(3, 32)
    assert torch.equal(first, torch.tensor([31.0, 31.0, 31.0, 2.0]))
    assert torch.equal(second, torch.tensor([0.0, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("grid,block,smem,opt_in,error", [
    ([1, 1, 1], [1024, 1, 1], 0, 0, None),
    ([1, 1, 1], [1025, 1, 1], 0, 0, "a block has 1 to 1024 threads"),
    ([1, 1, 1], [32, 32, 2], 0, 0, "a block has 1 to 1024 threads"),
    ([1, 1, 1], [1, 1, 65], 0, 0, "z at most 64"),
    ([1, 1, 1], [0, 1, 1], 0, 0, "a block has 1 to 1024"),
    ([0, 1, 1], [1, 1, 1], 0, 0, "a grid has x from 1"),
    ([2**31, 1, 1], [1, 1, 1], 0, 0, "a grid has x from 1 to 2\\^31 - 1"),
    ([1, 65536, 1], [1, 1, 1], 0, 0, "y and z from 1 to 65535"),
    ([1, 1, 65536], [1, 1, 1], 0, 0, "y and z from 1 to 65535"),
    ([1, 1, 1], [1, 1, 1], 48 * 1024, 0, None),
    ([1, 1, 1], [1, 1, 1], 48 * 1024 + 1, 0, "must opt in"),
    ([1, 1, 1], [1, 1, 1], 100_000, 100_000, None),
    ([1, 1, 1], [1, 1, 1], 100_001, 100_000, "the kernel allows 100000"),
    ([1, 1, 1], [1, 1, 1], 227 * 1024, 227 * 1024, None),
    ([1, 1, 1], [1, 1, 1], 0, 227 * 1024 + 1, "more than the 232448 a block can have"),
], ids=str)
def test_launch_limits_of_sm90(H, grid, block, smem, opt_in, error):
    if error is None:
        H.selftest.empty_launch(grid, block, smem, opt_in)
    else:
        with pytest.raises(RuntimeError, match=error):
            H.selftest.empty_launch(grid, block, smem, opt_in)


@pytest.mark.parametrize("H_width,linear_calls", [(5, 0), (257, 4)], ids=["one-launch", "per-layer"])
def test_network_fallback_runs_the_harness_kernels(H, H_width, linear_calls):
    # Past the one-launch limit the CUDA network op runs the CUDA layer ops (here: the harness's
    # own, on the shim), never the CPU kernels that the same CPU tensors would reach through the
    # dispatcher. The counters are the ones the ops' host entry points bump. The custom path
    # forced: the measured defaults never choose the one-launch kernels by themselves.
    params = _net_params((5,), 4, H_width, 3, torch.float32)
    cpu_before, before = dynnet_ext.kernel_calls()["cpu"], H.kernel_calls()
    with cuda_harness.Target("harness", "split").forced():
        out, acts = H.dynamic_net(*params, 2)
        H.dynamic_net_backward(torch.ones_like(out), params[0], params[1], params[3], params[5], acts, 2, [True] * 7)
    calls = {op: n - before[op] for op, n in H.kernel_calls().items()}
    assert calls == {"dynamic_net": 1, "dynamic_net_backward": 1, "linear_relu": linear_calls,
                     "linear_relu_backward": linear_calls}
    assert dynnet_ext.kernel_calls()["cpu"] == cpu_before


def test_ops_take_cpu_tensors_only(H):
    x = torch.randn(3, 4, device="meta")
    with pytest.raises(RuntimeError, match="runs on CPU tensors"):
        H.linear_relu(x, torch.randn(2, 4, device="meta"), None, "relu")


# ---- the planted bugs' anchors ------------------------------------------------------------------

def _source(path):
    with open(os.path.join(cuda_harness.CSRC, path)) as f:
        return f.read()


@pytest.mark.parametrize("bug", planted.PLANTED_BUGS, ids=lambda b: b.name)
def test_planted_bug_anchor_matches_one_place(bug):
    contexts, olds = planted.anchor_matches(bug, _source(bug.path))
    assert len(contexts) == 1, f"{bug.name}: its context is found {len(contexts)} times in csrc/{bug.path}"
    assert len(olds) == 1, f"{bug.name}: the code it changes is found {len(olds)} times in its context"


def _reword_comments(text):
    """text with every comment's words changed and a comment line before each barrier."""
    code = planted.code_only(text)

    def reword(m):
        if code[m.start()] != " ":  # inside a string literal
            return m.group(0)
        return "// reworded" if m.group(0).startswith("//") else "/* reworded */"

    text = re.sub(r"//[^\n]*|/\*.*?\*/", reword, text, flags=re.S)
    return re.sub(r"^( *)(.*__syncthreads\(\);)", r"\1// a new comment line\n\1\2", text, flags=re.M)


def _tokens(text):
    return planted.code_only(text).split()


@pytest.mark.parametrize("path", sorted({b.path for b in planted.PLANTED_BUGS}))
def test_planted_bugs_ignore_comments(path):
    text = _source(path)
    reworded = _reword_comments(text)
    assert reworded != text and _tokens(reworded) == _tokens(text)
    assert _tokens(planted.plant(reworded, path)) == _tokens(planted.plant(text, path))
    assert planted.plant(text, path) != text


def test_planted_bug_whose_code_changed_stops_the_build():
    text = _source("cuda/activation.cuh").replace("s <= acc_t(0)", "s <= acc_t(0.0)")
    with pytest.raises(RuntimeError, match="planted bug relu-mask-flipped: its code no longer occurs once"):
        planted.plant(text, "cuda/activation.cuh")


def test_code_only_blanks_comments_and_keeps_offsets():
    text = 'a = "// kept"; // gone\n/* gone\n too */ b = \'/\'; /* gone */ c;\n'
    code = planted.code_only(text)
    assert len(code) == len(text) and code.count("\n") == text.count("\n")
    assert code.split() == ["a", "=", '"//', 'kept";', "b", "=", "'/';", "c;"]


# ---- the probe --------------------------------------------------------------------------------
# A few op calls that reach every kernel and launcher path: tile edges in every dimension, more
# than one reduction slice, rows that do and do not allow vector loads, the ReLU mask with exact
# zeros in y, grad_bias alone and with the GEMMs, on each forced path (the custom kernels with
# split and wide tiles, the vendor path's host code, its grad_bias split into row chunks); the
# network's one-launch path with the shared-memory opt-in and the 256-column layout, a last block
# of fewer than 8 rows, and the chain of layer ops. Each planted bug (harness/planted.py)
# must fail it; `python tests/cuda_harness.py planted` checks. float32 only: the planted-bug
# builds compile nothing else.

PROBE_LINEAR = [((130,), 97, 100), ((2, 33), 40, 65)]
PROBE_VENDOR_CHUNKS = ((600,), 9, 20)  # grad_bias over 3 row chunks (vendor.cuh's column_sum_chunks)
PROBE_NET = [((37,), 45, 251, 7, 2), ((9,), 13, 5, 3, 3), ((11,), 6, 257, 3, 1)]


def _linear_params(lead, k, n, dtype):
    x = torch.randn(*lead, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) / k**0.5
    return x, w, torch.randn(n, dtype=dtype)


def probe_linear(ops, lead, k, n, dtype):
    """linear_relu forward and backward (all grads; grad_bias alone) against the reference."""
    x, w, b = _linear_params(lead, k, n, dtype)
    y = ops.linear_relu(x, w, b, "relu")
    torch.testing.assert_close(y, reference.linear_act(x, w, b), **tol(dtype))
    assert (y == 0).any()  # the mask meets exact zeros
    gy = torch.randn_like(y)
    want = reference.linear_act_backward(gy, x, w, b, "relu")
    for mask in ([True, True, True], [False, False, True]):
        got = ops.linear_relu_backward(gy, x, w, y, "relu", mask)
        for need, g, r in zip(mask, got, want):
            if need:
                torch.testing.assert_close(g, r, **tol(dtype))
    return y


def probe_linear_act(ops, lead, k, n, dtype, activation):
    """linear_act forward (y and the pre-activation z) and backward from z against the reference."""
    x, w, b = _linear_params(lead, k, n, dtype)
    y, z = ops.linear_act(x, w, b, activation)
    torch.testing.assert_close(z, reference.linear_act(x, w, b, "none"), **tol(dtype), msg=lambda m: f"z: {m}")
    torch.testing.assert_close(y, reference.linear_act(x, w, b, activation), **tol(dtype), msg=lambda m: f"y: {m}")
    gy = torch.randn_like(y)
    want = reference.linear_act_backward(gy, x, w, b, activation)
    for name, g, r in zip("xwb", ops.linear_relu_backward(gy, x, w, z, activation, [True, True, True]), want):
        torch.testing.assert_close(g, r, **tol(dtype), msg=lambda m, name=name: f"grad_{name}: {m}")
    gb = ops.linear_relu_backward(gy, x, w, z, activation, [False, False, True])[2]
    torch.testing.assert_close(gb, want[2], **tol(dtype), msg=lambda m: f"grad_b alone: {m}")


def _net_params(lead, D_in, H, D_out, dtype):
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)

    return [rand(*lead, D_in), rand(H, D_in, scale=D_in**-0.5), rand(H), rand(H, H, scale=H**-0.5), rand(H),
            rand(D_out, H, scale=H**-0.5), rand(D_out)]


def probe_net(ops, lead, D_in, H, D_out, depth, dtype=torch.float32):
    """dynamic_net forward and backward (all seven grads) against stock autograd."""
    params = _net_params(lead, D_in, H, D_out, dtype)
    out, acts = ops.dynamic_net(*params, depth)
    leaves = [p.clone().requires_grad_() for p in params]
    ref = reference.dynamic_net(*leaves, depth)
    torch.testing.assert_close(out, ref.detach(), **tol(dtype))
    g = torch.randn_like(out)
    want = torch.autograd.grad(ref, leaves, g)
    got = ops.dynamic_net_backward(g, params[0], params[1], params[3], params[5], acts, depth, [True] * 7)
    for name, a, r in zip(("x", "w_in", "b_in", "w_h", "b_h", "w_out", "b_out"), got, want):
        torch.testing.assert_close(a, r, **tol(dtype), msg=lambda m: f"{name}: {m}")
    return out


@pytest.fixture(params=cuda_harness.PATHS)
def probe_path(request, H):
    with cuda_harness.Target("harness", request.param).forced():
        yield request.param


@pytest.mark.parametrize("shape", PROBE_LINEAR, ids=str)
def test_probe_linear_relu(H, probe_path, shape):
    probe_linear(H, *shape, torch.float32)


@pytest.mark.parametrize("activation", SMOOTH_ACTIVATIONS)
@pytest.mark.parametrize("shape", PROBE_LINEAR, ids=str)
def test_probe_linear_act(H, probe_path, shape, activation):
    probe_linear_act(H, *shape, torch.float32, activation)


def test_probe_vendor_grad_bias_chunks(H):
    with cuda_harness.Target("harness", "vendor").forced():
        probe_linear(H, *PROBE_VENDOR_CHUNKS, torch.float32)


def test_probe_vendor_relu_after_the_gemm(H):
    # The table's other setting (a GPU whose cuBLASLt ReLU epilogue would not keep NaN; the H200's
    # does, so the default puts the ReLU there): torch's own ReLU after the GEMM.
    with cuda_harness.Target("harness", "vendor").forced():  # restores the table too
        H.set_cuda_dispatch_table({"lt_relu_keeps_nan": False})
        probe_linear(H, *PROBE_LINEAR[0], torch.float32)


@pytest.mark.parametrize("case", PROBE_NET, ids=str)
def test_probe_dynamic_net(H, probe_path, case):
    probe_net(H, *case)


def test_probe_reversed_schedule_gives_the_same_bits(H, forward_schedule, probe_path):
    torch.manual_seed(1)
    a = probe_linear(H, (130,), 97, 100, torch.float32)
    n = probe_net(H, *PROBE_NET[0])
    H.set_schedule("reverse")
    torch.manual_seed(1)
    assert torch.equal(probe_linear(H, (130,), 97, 100, torch.float32), a)
    assert torch.equal(probe_net(H, *PROBE_NET[0]), n)


def kernels_in_source():
    """The names of every __global__ function in csrc/cuda/*.cuh."""
    names = set()
    folder = os.path.join(cuda_harness.CSRC, "cuda")
    for f in os.listdir(folder):
        if f.endswith(".cuh"):
            text = open(os.path.join(folder, f)).read()
            names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", text))
    return names


def test_probe_launches_every_kernel(H):
    H.reset_kernel_stats()
    for path in cuda_harness.PATHS:
        with cuda_harness.Target("harness", path).forced():
            for shape in PROBE_LINEAR:
                probe_linear(H, *shape, torch.float32)
            for case in PROBE_NET:
                probe_net(H, *case)
    with cuda_harness.Target("harness", "vendor").forced():
        probe_linear(H, *PROBE_VENDOR_CHUNKS, torch.float32)
    stats = H.kernel_stats()
    launched = {re.sub(r"<.*", "", name).split("::")[-1] for name in stats}
    assert kernels_in_source() == {"gemm_group_kernel", "masked_grad_kernel", "sum_partials_kernel",
                                   "net_forward_kernel", "net_backward_kernel"}
    assert launched == kernels_in_source()
    tiles = {re.search(r"(Wide|Split)Tile", name).group(1) for name in stats if "gemm_group_kernel" in name}
    assert tiles == {"Wide", "Split"}
