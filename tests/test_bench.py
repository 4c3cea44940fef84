"""Smoke tests of the benchmarks: `python -m dynnet_ext bench --quick` runs end to end and writes
results.json in the documented schema, the Markdown table and the plot. No timing assertions:
speed is what the benchmarks report, not what the tests check."""

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dynnet_ext
from conftest import CPU_GEMM_ISAS
from dynnet_ext import bench
from dynnet_ext.cli import main

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"subject", "phase", "shape", "dims", "depth", "dtype", "activation", "impl", "median_ms", "p20_ms", "p80_ms",
            "ratio_vs_stock", "ratio_vs_seed", "reps", "iters_per_rep", "samples_ms", "memory_bytes", "gemm_flops",
            "gflops",
            "peak_fraction"}
MACHINE_KEYS = {"date", "cpu_model", "cpu_count", "torch_threads", "torch_version", "cuda_version", "gpu",
                "build_info", "fused_kernels", "git_commit"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `bench --quick` run (CPU, seed shape, every subject), shared by the checks below.
    Per-sample gradients without compile: compiling vmap(grad) once per depth takes a minute
    here (test_persample_quick_rows runs the other implementations)."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    assert main(["bench", "--quick", "--out", str(out), "--subjects", "layer,net,step,memory"]) == 0
    assert torch.get_num_threads() == threads, "bench must restore the thread count"
    return out, json.loads((out / "results.json").read_text())


def test_quick_schema(quick):
    _, res = quick
    assert set(res) == {"schema", "machine", "config", "calibration", "rows", "errors"}
    assert res["schema"] == bench.SCHEMA
    assert res["errors"] == []
    assert MACHINE_KEYS <= set(res["machine"])
    config = res["config"]
    assert config["device"] == "cpu" and config["quick"] is True
    assert config["shapes"] == [bench.SEED_SHAPE]
    assert config["threads"] == res["machine"]["torch_threads"] >= 1
    for row in res["rows"]:
        assert set(row) == ROW_KEYS
    cal = res["calibration"]
    assert cal["shape"] == "x".join(map(str, bench.CALIBRATION_SHAPE))
    assert {"torch.mm", "onednn"} <= set(cal["gflops"])
    assert {f"dynnet-{isa}" for isa in CPU_GEMM_ISAS if isa != "aten"} <= set(cal["gflops"])
    assert cal["peak_gflops"] == max(cal["gflops"].values()) == cal["gflops"][cal["best_engine"]] > 0
    bf16_loop = {"avx512_bf16"} if dynnet_ext.ops._C.cpu_gemm_kernels("bfloat16") == "avx512_bf16" else set()
    assert set(cal["fma_loop_gflops"]) == {isa for isa in CPU_GEMM_ISAS if isa != "aten"} | bf16_loop
    assert all(rate > 0 for rate in cal["fma_loop_gflops"].values())
    # Each dtype's ceiling: float32 the GEMM peak, bfloat16 vdpbf16ps's loop where the engine runs
    # it (else the FMA loop's, as float16's).
    peaks = cal["dtype_peak_gflops"]
    fma = cal["fma_loop_gflops"][dynnet_ext.ops._C.cpu_gemm_isa()]
    assert peaks == {"float32": cal["peak_gflops"], "bfloat16": cal["fma_loop_gflops"].get("avx512_bf16", fma),
                     "float16": fma}


def test_quick_gflops(quick):
    _, res = quick
    peak = res["calibration"]["peak_gflops"]
    for row in res["rows"]:
        if row["subject"] == "memory":
            assert row["gemm_flops"] is row["gflops"] is row["peak_fraction"] is None
            continue
        assert row["gemm_flops"] == bench.gemm_flops(row["subject"], row["phase"], row["shape"], row["depth"]) > 0
        assert row["gflops"] == pytest.approx(row["gemm_flops"] / row["median_ms"] / 1e6)
        assert row["peak_fraction"] == pytest.approx(row["gflops"] / peak)


def test_gemm_flops_counts():
    # The seed's layer: 64 x 1000 -> 100 is 12.8 MFLOP per GEMM; forward+backward 3 GEMMs.
    assert bench.gemm_flops("layer", "forward", "64x1000x100", None) == 2 * 64 * 1000 * 100
    assert bench.gemm_flops("layer", "forward+backward", "64x1000x100", None) == 3 * 2 * 64 * 1000 * 100
    # Network N=2, D_in=3, H=5, D_out=10, depth 1: forward 2*2*(15+25+50), backward chain
    # 2*2*(50+25), weight gradients 2*2*(15+25+50).
    assert bench.gemm_flops("net", "forward+backward", "2x3x5", 1) == 4 * (90 + 75 + 90)
    assert bench.gemm_flops("memory", "saved-tensors", "2x3x5", 3) is None


def test_quick_rows_present(quick):
    _, res = quick
    rows = res["rows"]
    keys = {(r["subject"], r["phase"], r["depth"], r["impl"]) for r in rows}
    for impl in ("fused", "stock", "compile"):
        for phase in bench.LAYER_PHASES:
            assert ("layer", phase, None, impl) in keys
        for depth in bench.DEPTHS:
            assert ("net", "forward+backward", depth, impl) in keys
        assert ("step", "train-step", bench.STEP_DEPTHS, impl) in keys
        assert ("memory", "saved-tensors", bench.MEMORY_DEPTH, impl) in keys
    # The per-layer fused network has net/step/memory rows, no layer rows.
    assert {k[0] for k in keys if k[3] == "fused-layer"} == {"net", "step", "memory"}
    assert len(keys) == len(rows), "one row per subject/phase/depth/impl at one shape"
    assert {r["activation"] for r in rows} == {bench.SEED_ACTIVATION}  # the seed's model: ReLU


def test_step_rows_with_both_optimizers(quick):
    # Each implementation's step with Adam as the seed builds it and with Adam(fused=True), timed
    # in the same reps; ratio_vs_stock against stock with the same optimizer, ratio_vs_seed
    # against the seed's step.
    _, res = quick
    assert res["config"]["optimizers"] == ["adam", "adam-fused"]
    step = {(r["phase"], r["impl"]): r for r in res["rows"] if r["subject"] == "step"}
    impls = ("fused", "fused-layer", "stock", "compile")
    assert set(step) == {(phase, impl) for phase in ("train-step", "train-step-adam-fused") for impl in impls}
    seed = step[("train-step", "stock")]["median_ms"]
    for (phase, impl), row in step.items():
        assert row["ratio_vs_seed"] == pytest.approx(seed / row["median_ms"])
        assert row["ratio_vs_stock"] == pytest.approx(step[(phase, "stock")]["median_ms"] / row["median_ms"])
        assert row["iters_per_rep"] == step[("train-step", "stock")]["iters_per_rep"]  # one measurement
    assert step[("train-step", "stock")]["ratio_vs_seed"] == 1.0
    assert all(r["ratio_vs_seed"] is None for r in res["rows"] if r["subject"] != "step")


def test_step_optimizers_option(tmp_path, capsys):
    parser = bench.add_arguments(argparse.ArgumentParser())
    assert parser.parse_args(["--optimizers", "adam-fused"]).optimizers == ["adam-fused"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--optimizers", "sgd"])
    # The seed's Adam alone: train-step rows only (the baseline is always run).
    out = tmp_path / "step"
    assert main(["bench", "--quick", "--subjects", "step", "--impls", "fused", "--optimizers", "adam", "--reps", "2",
                 "--out", str(out), "--no-plot"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert {(r["phase"], r["impl"]) for r in res["rows"]} == {("train-step", "fused"), ("train-step", "stock")}
    assert re.search(r"; step optimizers adam$", capsys.readouterr().err, re.M)


def test_persample_quick_rows(tmp_path):
    # Per-sample gradients (vmap(grad)) at the seed shape, one row per depth and implementation.
    out = tmp_path / "ps"
    assert main(["bench", "--quick", "--subjects", "persample", "--impls", "fused,fused-layer", "--reps", "2",
                 "--out", str(out), "--no-plot"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["errors"] == []
    keys = {(r["subject"], r["phase"], r["depth"], r["impl"]) for r in res["rows"]}
    assert keys == {("persample", "vmap-grad", d, impl) for d in bench.DEPTHS for impl in ("fused", "fused-layer", "stock")}
    for row in res["rows"]:
        assert set(row) == ROW_KEYS and row["ratio_vs_stock"] > 0 and 0 < row["p20_ms"] <= row["p80_ms"]


def test_plan_dtypes_and_transformer_shapes():
    # The dtype dimension covers layer, net, step and mlp; memory and persample stay float32; the
    # transformer widths are the layer's only (the mlp has its own shapes).
    plan = bench._plan(list(bench.SUBJECTS), [bench.SEED_SHAPE], list(bench.DTYPES), ["512x768x3072"], ["8x16x32"])
    by = {}
    for shape, subject, phase, depth, dtype, _ in plan:
        by.setdefault((shape, subject), set()).add(dtype)
    for subject in bench.DTYPE_SUBJECTS:
        assert by["8x16x32" if subject == "mlp" else bench.SEED_SHAPE, subject] == set(bench.DTYPES)
    assert by[(bench.SEED_SHAPE, "memory")] == by[(bench.SEED_SHAPE, "persample")] == {"float32"}
    assert {s for s, _ in by if s == "512x768x3072"} and {sub for s, sub in by if s == "512x768x3072"} == {"layer"}
    assert len(plan) == len(set(plan))


def test_plan_mlp():
    # The transformer MLP at its own shapes only, in every dtype and activation asked for; not
    # part of a run unless named.
    plan = bench._plan(["layer", "mlp"], [bench.SEED_SHAPE], ["float32", "bfloat16"], [], ["8x16x32", "4x8x16"],
                       ["gelu", "relu"])
    mlp = {(shape, dtype, act) for shape, subject, phase, depth, dtype, act in plan if subject == "mlp"}
    assert mlp == {(s, d, a) for s in ("8x16x32", "4x8x16") for d in ("float32", "bfloat16") for a in ("gelu", "relu")}
    assert {(phase, depth) for _, subject, phase, depth, _, _ in plan if subject == "mlp"} == {("forward+backward", None)}
    assert {shape for shape, subject, *_ in plan if subject == "layer"} == {bench.SEED_SHAPE}
    assert not bench._plan(["layer"], [bench.SEED_SHAPE], ["float32"], [], ["8x16x32"], ["gelu"])[-1][1] == "mlp"
    assert "mlp" not in bench.add_arguments(argparse.ArgumentParser()).parse_args([]).subjects
    # Its GEMMs: two layers of tokens x d_model x hidden, each 1 forward and 2 backward GEMMs.
    assert bench.gemm_flops("mlp", "forward+backward", "8x16x32", None) == 2 * 3 * 2 * 8 * 16 * 32


@pytest.mark.parametrize("activation", list(bench.MLP_ACTIVATIONS))
@pytest.mark.parametrize("dtype", bench.DTYPES)
def test_mlp_cases(dtype, activation):
    # fuse() of the stock MLP: the first Linear and the activation one fused layer, the same
    # results as stock within the dtype's rounding, in the dtype (or under autocast).
    from dynnet_ext.nn import FusedLinear

    param = torch.float32 if dtype.startswith("autocast") else getattr(torch, dtype)
    case = bench.MlpCase((16, 24, 40), ["fused", "stock", "fused-layer", "addmm-activation", "fused-all",
                                        "stock-gemms"], "cpu", dtype, activation)
    assert set(case.models) == {"fused", "stock", "fused-all"}
    fused = case.models["fused"]
    assert isinstance(fused[0], FusedLinear) and fused[0].activation == activation
    assert [type(m) for m in fused[1:]] == [torch.nn.Identity, torch.nn.Linear]
    every = case.models["fused-all"]  # fuse(linear=True): the second Linear ours too
    assert every[0].activation == activation and every[2].activation == "none"
    assert [type(m) for m in every[1:]] == [torch.nn.Identity, FusedLinear]
    assert [type(m) for m in case.models["stock"]] == [torch.nn.Linear, type(bench.MLP_ACTIVATIONS[activation]()),
                                                       torch.nn.Linear]
    outs = {}
    for impl, model in case.models.items():
        assert all(p.dtype == param for p in model.parameters()) and case.x.dtype == param
        outs[impl] = case.runners("forward")[impl].fn()
        assert outs[impl].dtype == getattr(torch, bench.compute_dtype(dtype))
        runner = case.runners("forward+backward")[impl]
        runner.setup()
        runner.fn()
        assert all(p.grad.dtype == param for p in model.parameters())
    for impl in ("fused", "fused-all"):
        torch.testing.assert_close(outs[impl], outs["stock"], atol=0.1, rtol=0.05)
    # stock-gemms: no model, the six GEMMs of stock's autograd in the compute dtype - the shapes of
    # the two layers' outputs and of grad_x, grad_weight of each.
    (z, y), (g_h, g_w2, g_x, g_w1) = case.runners("forward+backward")["stock-gemms"].fn()
    products = [z, y, g_h, g_w2, g_x, g_w1]
    assert [tuple(t.shape) for t in products] == [(16, 40), (16, 24), (16, 40), (24, 40), (16, 24), (40, 24)]
    assert {t.dtype for t in products} == {getattr(torch, bench.compute_dtype(dtype))}


def test_mlp_quick_rows(tmp_path):
    # `bench --quick --subjects mlp`: a row per implementation at the quick shape, with its
    # activation, dims and GEMM FLOPs, and the fused kernels ran.
    out = tmp_path / "mlp"
    before = {op: dynnet_ext.kernel_calls()["cpu"][op] for op in ("linear_relu", "linear_relu_backward")}
    assert main(["bench", "--quick", "--subjects", "mlp", "--reps", "2", "--out", str(out), "--no-plot"]) == 0
    assert all(dynnet_ext.kernel_calls()["cpu"][op] > n for op, n in before.items())
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == bench.SCHEMA and res["errors"] == []
    config = res["config"]
    assert config["subjects"] == ["mlp"] and config["mlp_shapes"] == list(bench.MLP_QUICK_SHAPES)
    assert config["mlp_activations"] == list(bench.DEFAULT_MLP_ACTIVATIONS) == ["gelu"]
    rows = {(r["subject"], r["phase"], r["shape"], r["dtype"], r["activation"], r["impl"]): r for r in res["rows"]}
    shape = bench.MLP_QUICK_SHAPES[0]
    assert set(rows) == {("mlp", "forward+backward", shape, "float32", "gelu", impl)
                         for impl in ("fused", "stock", "compile", "fused-all", "stock-gemms")}
    tokens, d_model, hidden = bench.parse_shape(shape)
    for row in rows.values():
        assert set(row) == ROW_KEYS and row["depth"] is None
        assert row["dims"] == {"tokens": tokens, "d_model": d_model, "hidden": hidden}
        assert row["gemm_flops"] == 12 * tokens * d_model * hidden
        assert row["ratio_vs_stock"] > 0 and 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
    assert "| mlp (gelu) | forward+backward |" in (out / "results.md").read_text()


@pytest.mark.parametrize("dtype", bench.DTYPES[1:])
def test_dtype_cases_run_in_their_dtype(dtype):
    # Parameters and input in the dtype, or float32 parameters with a bfloat16 forward under
    # autocast; the fused model's results match stock's within the dtype's rounding.
    param = torch.float32 if dtype.startswith("autocast") else getattr(torch, dtype)
    out_dtype = getattr(torch, bench.compute_dtype(dtype))
    layer = bench.LayerCase((16, 40, 24), ["fused", "stock"], "cpu", dtype)
    outs = {}
    for impl, model in layer.models.items():
        assert all(p.dtype == param for p in model.parameters()) and layer.x.dtype == param
        outs[impl] = layer.runners("forward")[impl].fn()
        assert outs[impl].dtype == out_dtype
        runner = layer.runners("forward+backward")[impl]
        runner.setup()
        runner.fn()
        assert all(p.grad.dtype == param for p in model.parameters())
    torch.testing.assert_close(outs["fused"], outs["stock"], atol=0.1, rtol=0.05)
    net = bench.NetCase((8, 30, 20), ["fused", "stock"], "cpu", dtype)
    for impl in net.models:
        net.step(impl, 2)
        assert all(p.dtype == param and p.grad.dtype == param for p in net.models[impl].parameters())


def test_dtype_rows_quick(tmp_path):
    # A quick run of the dtype rows: every row carries its dtype and its share of that dtype's
    # ceiling, and the fused kernels ran.
    out = tmp_path / "dt"
    before = dynnet_ext.kernel_calls()["cpu"]["linear_relu_backward"]
    assert main(["bench", "--quick", "--subjects", "layer,step", "--dtypes", "bfloat16,autocast-bfloat16,float16",
                 "--impls", "fused", "--reps", "2", "--out", str(out), "--no-plot"]) == 0
    assert dynnet_ext.kernel_calls()["cpu"]["linear_relu_backward"] > before
    res = json.loads((out / "results.json").read_text())
    assert res["errors"] == [] and res["config"]["dtypes"] == ["bfloat16", "autocast-bfloat16", "float16"]
    peaks = res["calibration"]["dtype_peak_gflops"]
    keys = {(r["subject"], r["phase"], r["dtype"], r["impl"]) for r in res["rows"]}
    # fused and stock; three dtypes; the layer's three phases and a step phase per optimizer
    assert len(keys) == len(res["rows"]) == 2 * 3 * (len(bench.LAYER_PHASES) + len(res["config"]["optimizers"]))
    for row in res["rows"]:
        assert set(row) == ROW_KEYS
        assert row["peak_fraction"] == pytest.approx(row["gflops"] / peaks[bench.compute_dtype(row["dtype"])])
    assert "autocast-bfloat16" in (out / "results.md").read_text()


def test_persample_skips_shapes_too_big():
    # N copies of the parameters: the default sweep's two largest shapes are left out.
    plan = bench._plan(["persample"], list(bench.FULL_SHAPES))
    measured = {shape for shape, *_ in plan}
    assert measured == {s for s in bench.FULL_SHAPES if bench.persample_bytes(s) <= bench.PERSAMPLE_MAX_BYTES}
    assert bench.SEED_SHAPE in measured and "1024x1000x100" not in measured and "64x1024x1024" not in measured
    assert bench.persample_bytes(bench.SEED_SHAPE) == 4 * 64 * (1001 * 100 + 101 * 100 + 101 * 10)


def test_quick_numbers_sane(quick):
    _, res = quick
    for row in res["rows"]:
        ratio = row["ratio_vs_stock"]
        assert isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0, row
        if row["impl"] == "stock":
            assert ratio == 1.0
        if row["subject"] == "memory":
            assert row["memory_bytes"] > 0 and row["median_ms"] is None
        else:
            assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
            assert len(row["samples_ms"]) == row["reps"] == res["config"]["reps"]
            if row["subject"] == "step":
                assert row["iters_per_rep"] % len(bench.DEPTHS) == 0, "every rep covers each depth equally"
    # Both fused networks save what stock autograd saves (the activations h_0..h_depth): the
    # whole-network op keeps them stacked in one tensor, the same bytes.
    saved = {r["impl"]: r["memory_bytes"] for r in res["rows"] if r["phase"] == "saved-tensors"}
    assert saved["fused"] == saved["fused-layer"] == saved["stock"]


def test_quick_files(quick):
    out, res = quick
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("Machine peak:") and table[1] == ""
    assert table[2].startswith("| subject") and len(table) == 4 + len(res["rows"])


def test_table_has_ratio_column(quick):
    _, res = quick
    text = bench.format_table(res["rows"])
    header = text.splitlines()[0].split()
    assert header.index("vs") == header.index("impl") + 1
    assert "1.00x" in text


@pytest.mark.parametrize("text", ["64x1000", "64x0x10", "ax1x2", ""])
def test_bad_shapes_rejected(text):
    with pytest.raises(argparse.ArgumentTypeError):
        bench._shapes(text)


def test_options_parse():
    parser = bench.add_arguments(argparse.ArgumentParser())
    assert parser.parse_args([]).dtypes == ["float32"]
    args = parser.parse_args(["--shapes", "64x1000x100, 8x4x2", "--subjects", "step,layer", "--impls", "compile,fused",
                              "--dtypes", "float16,float32"])
    assert args.dtypes == ["float32", "float16"]  # canonical order
    assert args.layer_shapes is None and parser.parse_args(["--layer-shapes", "8x4x2"]).layer_shapes == ["8x4x2"]
    assert args.shapes == ["64x1000x100", "8x4x2"]
    assert args.subjects == ["layer", "step"]  # canonical order
    assert args.impls == ["fused", "compile"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--impls", "fast"])


@pytest.mark.parametrize("script,has_subjects", [("linear_relu.py", False), ("dynamic_net.py", False),
                                                 ("train_step.py", True), ("per_sample_grads.py", False),
                                                 ("transformer_mlp.py", False)])
def test_scripts_help(script, has_subjects):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--quick" in res.stdout
    assert ("--subjects" in res.stdout) == has_subjects
