"""Robustness of the fused layers beyond single calls: several Python threads at once, long
training runs (no memory or tensor leak), and checkpoints (state_dict and whole-model
pickles) between the fused and the stock DynamicNet."""

import contextlib
import copy
import ctypes
import gc
import os
import random
import threading

import pytest
import torch

import dynnet_ext
from conftest import tol
from dynnet_ext import reference
from dynnet_ext.nn import FusedLinearGELU, FusedLinearReLU

# ----------------------------------------------------------------------------------------------
# Concurrency. The CPU kernels are deterministic (fixed reduction order, see
# csrc/cpu/linear_relu.cpp), and each call only reads its inputs and writes fresh outputs, so
# a result computed while other threads run the same ops must be bitwise the single-threaded
# one. Every thread computes the same inputs again and again, so a race (a shared scratch
# buffer, a static, a wrong thread count inside at::parallel_for) shows up as a difference.

THREADS = 4


def run_threads(work, n_threads=THREADS):
    """Runs work(i) in n_threads threads started together; re-raises the first error."""
    barrier = threading.Barrier(n_threads)
    errors = []

    def target(i):
        try:
            barrier.wait()
            work(i)
        except BaseException as e:  # noqa: BLE001 - reported below, with its traceback
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if errors:
        raise errors[0]


def assert_all_equal(got, want, what):
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), f"{what}[{i}]"
        if g is not None:
            assert torch.equal(g, w), f"{what}[{i}]: max |diff| {(g - w).abs().max().item()}"


def layer_step(layer, x, gy):
    """Forward and backward of a shared layer, gradients via autograd.grad (no .grad races)."""
    y = layer(x)
    return (y.detach(), *torch.autograd.grad(y, (x, layer.weight, layer.bias), gy))


# Sizes: the seed's layer (64 x 1000 -> 100) and one whose epilogue and backward mask pass
# split across threads (>= 32768 elements, kGrainElements in the CPU kernel).
@pytest.mark.parametrize("m,k,n", [(64, 1000, 100), (256, 130, 200)], ids=["seed", "parallel-epilogue"])
def test_threads_share_one_fused_layer(m, k, n, ran):
    torch.manual_seed(0)
    layer = FusedLinearReLU(k, n)
    inputs = [(torch.randn(m, k, requires_grad=True), torch.randn(m, n)) for _ in range(THREADS)]
    expected = [layer_step(layer, x, gy) for x, gy in inputs]
    assert all(r[0].gt(0).any() and r[0].eq(0).any() for r in expected)  # the ReLU does something

    def work(i):
        x, gy = inputs[i]
        for it in range(30):
            assert_all_equal(layer_step(layer, x, gy), expected[i], f"thread {i} iteration {it}")

    with ran("linear_relu", "linear_relu_backward"):
        run_threads(work)
    assert layer.weight.grad is None  # autograd.grad never touched .grad


def test_threads_share_one_dynamic_net_at_different_depths(ran):
    torch.manual_seed(0)
    net = dynnet_ext.DynamicNet(100, 64, 10)
    params = tuple(net.parameters())
    inputs = [(torch.randn(32, 100, requires_grad=True), torch.randn(32, 10)) for _ in range(THREADS)]

    def step(i):
        x, g = inputs[i]
        out = net(x, depth=i % 4)  # every thread its own depth: 0, 1, 2, 3
        used = (x, *(p for n, p in net.named_parameters() if i % 4 or not n.startswith("hidden_layer")))
        return (out.detach(), *torch.autograd.grad(out, used, g))

    expected = [step(i) for i in range(THREADS)]

    def work(i):
        for it in range(30):
            assert_all_equal(step(i), expected[i], f"thread {i} iteration {it}")

    with ran("dynamic_net", "dynamic_net_backward"):
        run_threads(work)
    assert all(p.grad is None for p in params)


def test_threads_each_train_their_own_dynamic_net(ran):
    """Own models, own optimizers, .backward() and .grad: 20 Adam steps per thread give,
    bitwise, the losses and final weights of the same 20 steps run alone."""
    torch.manual_seed(0)
    base = dynnet_ext.DynamicNet(50, 40, 5)
    data = [(torch.randn(16, 50), torch.randn(16, 5)) for _ in range(THREADS)]

    def train(i, steps=20):
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        x, target = data[i]
        losses = []
        for s in range(steps):
            loss = (model(x, depth=(i + s) % 4) - target).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return losses, [p.detach().clone() for p in model.parameters()]

    expected = [train(i) for i in range(THREADS)]
    results = [None] * THREADS

    def work(i):
        results[i] = train(i)

    with ran("dynamic_net", "dynamic_net_backward"):
        run_threads(work)
    for i in range(THREADS):
        assert_all_equal(results[i][0], expected[i][0], f"thread {i} losses")
        assert_all_equal(results[i][1], expected[i][1], f"thread {i} weights")
    assert not torch.equal(expected[0][1][0], base.input_layer.weight)  # it did train


# ----------------------------------------------------------------------------------------------
# Thread count. The README promises the same bits for any thread count: work is split across
# threads by output rows or columns only, never along a reduction.

@contextlib.contextmanager
def num_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def fwd_bwd(model, x, g, *args):
    x = x.detach().requires_grad_()
    out = model(x, *args)
    return (out.detach(), *torch.autograd.grad(out, (x, *model.parameters()), g))


# (model, x's shape, depth or None): the seed's network and layer, and sizes big enough that
# every parallel region of the CPU kernels splits (the epilogue, the mask pass, the row and
# unit splits of the network op).
THREAD_CASES = {
    "seed-net": (lambda: dynnet_ext.DynamicNet(1000, 100, 10), (64, 1000), 3),
    "wide-net": (lambda: dynnet_ext.DynamicNet(300, 200, 50), (256, 300), 2),
    "seed-layer": (lambda: FusedLinearReLU(1000, 100), (64, 1000), None),
    "wide-layer": (lambda: FusedLinearReLU(257, 129), (300, 257), None),
    "wide-gelu-layer": (lambda: FusedLinearGELU(257, 129), (300, 257), None),
}


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 CPU threads")
@pytest.mark.parametrize("case", sorted(THREAD_CASES))
def test_same_bits_for_one_and_two_threads(case, ran):
    make, shape, depth = THREAD_CASES[case]
    torch.manual_seed(0)
    model = make()
    x = torch.randn(shape)
    args = () if depth is None else (depth,)
    g = torch.randn_like(model(x, *args))
    ops = ("linear_relu", "linear_relu_backward") if depth is None else ("dynamic_net", "dynamic_net_backward")
    with ran(*ops):
        with num_threads(1):
            one = fwd_bwd(model, x, g, *args)
        with num_threads(2):
            two = fwd_bwd(model, x, g, *args)
    assert_all_equal(two, one, f"{case}: 2 threads vs 1")


# ----------------------------------------------------------------------------------------------
# No leak over a long training run.

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def heap_in_use():
    """Bytes malloc has handed out and not got back (glibc mallinfo2: arena + mmapped chunks),
    or None where unavailable. Unlike RSS it does not move with page reuse or fragmentation;
    torch's CPU allocator gets its memory from malloc (posix_memalign)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    fn.restype = MallInfo2
    info = fn()
    return info.uordblks + info.hblkhd


def live_tensors():
    # type(o), not isinstance: isinstance reads o.__class__, which some lazily deprecated
    # module attributes answer with a warning.
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def test_training_does_not_leak_memory_or_tensors():
    # Sizes chosen so that every per-step tensor is big enough to show if leaked: x 64x128
    # float32 = 32 KiB, hidden activations 64x64 = 16 KiB, the smallest per-step tensor the
    # ops allocate (grad_bias of the output layer) 32 B, the output 2 KiB.
    torch.manual_seed(0)
    rng = random.Random(0)
    model = dynnet_ext.DynamicNet(128, 64, 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, target = torch.randn(64, 128), torch.randn(64, 8)

    def steps(n):
        for _ in range(n):
            loss = (model(x, depth=rng.randint(0, 3)) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()

    steps(100)  # warm-up: Adam's state, allocator caches, oneDNN/MKL primitive caches
    gc.collect()
    rss0, heap0, tensors0 = rss_bytes(), heap_in_use(), live_tensors()
    last = steps(1000)
    gc.collect()
    rss1, heap1, tensors1 = rss_bytes(), heap_in_use(), live_tensors()

    assert last == last  # not NaN: the run really trained
    # Live Python tensors: the same set (model's 6 parameters, their grads, Adam's 2 states and
    # step per parameter, x, target) before and after; a tensor kept per step would add 1000.
    assert tensors1 <= tensors0, f"live tensors grew from {tensors0} to {tensors1}"
    # Heap in use, where glibc tells it: exact bytes, so a tight bound. A steady loop moves it by
    # a few KiB (measured: 7 KiB); 512 KiB over 1000 steps catches a leak of 512 B or more per
    # step - any tensor the step allocates (a leaked 0-d loss tensor with its TensorImpl and
    # storage is ~380 B and already shows as 375 KiB; the output is 2 KiB).
    if heap0 is not None:
        assert heap1 - heap0 < 512 * 2**10, f"malloc'd bytes in use grew by {(heap1 - heap0) / 2**10:.0f} KiB over 1000 steps"
    # RSS, which also sees memory outside malloc: losing even one 16 KiB activation or weight-grad
    # per step would be 16 MiB over 1000 steps. A steady loop moves it by under 2 MiB alone, but
    # by up to 8 MiB late in the whole suite (pages of other tests' threads and caches touched
    # again): 12 MiB sits between the two.
    assert rss1 - rss0 < 12 * 2**20, f"RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB over 1000 steps"


# ----------------------------------------------------------------------------------------------
# Checkpoints. tests/test_dynamic_net.py loads a STOCK state_dict into the fused model; here
# the other direction starts from a trained FUSED model, at every depth, and whole-model pickles.


def trained_fused(steps=5):
    torch.manual_seed(0)
    model = dynnet_ext.DynamicNet(12, 8, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, target = torch.randn(16, 12), torch.randn(16, 3)
    for s in range(steps):
        loss = (model(x, depth=s % 4) - target).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_fused_state_dict_loads_into_stock_and_back(tmp_path):
    fused = trained_fused()
    path = tmp_path / "fused.pt"
    torch.save(fused.state_dict(), path)

    stock = reference.DynamicNet(12, 8, 3)
    stock.load_state_dict(torch.load(path, weights_only=True))  # strict: same names and shapes
    for (name, a), (name_s, b) in zip(fused.state_dict().items(), stock.state_dict().items()):
        assert name == name_s and torch.equal(a, b), name

    torch.save(stock.state_dict(), path)
    back = dynnet_ext.DynamicNet(12, 8, 3)
    back.load_state_dict(torch.load(path, weights_only=True))

    x = torch.randn(5, 12)
    for depth in range(4):
        out = fused(x, depth)
        torch.testing.assert_close(stock(x, depth), out, **tol(torch.float32), msg=f"stock, depth {depth}")
        assert torch.equal(back(x, depth), out), f"fused -> stock -> fused, depth {depth}"


def test_whole_fused_model_pickles(tmp_path, ran):
    fused = trained_fused()
    path = tmp_path / "model.pt"
    torch.save(fused, path)
    loaded = torch.load(path, weights_only=False)

    assert type(loaded) is dynnet_ext.DynamicNet
    assert [type(m) for m in loaded.children()] == [type(m) for m in fused.children()]
    assert type(loaded.input_layer) is FusedLinearReLU and loaded.output_layer.activation == "none"
    x = torch.randn(7, 12)
    for depth in range(4):
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        with ran("dynamic_net"):
            out1, out2 = fused(x1, depth), loaded(x2, depth)
        assert torch.equal(out1, out2), f"depth {depth}"
        # the loaded model still runs on the fused network op (one C++ autograd node in all)
        assert "DynamicNet" in out2.grad_fn.name(), out2.grad_fn.name()
        g = torch.randn_like(out1)
        g1 = torch.autograd.grad(out1, (x1, *fused.parameters()), g, allow_unused=True)
        g2 = torch.autograd.grad(out2, (x2, *loaded.parameters()), g, allow_unused=True)
        assert_all_equal(g2, g1, f"grads at depth {depth}")


def test_whole_model_pickle_is_refused_by_weights_only_load(tmp_path):
    # The safe loader takes state_dicts only: a pickled module must be refused, not executed.
    path = tmp_path / "model.pt"
    torch.save(trained_fused(steps=1), path)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)
