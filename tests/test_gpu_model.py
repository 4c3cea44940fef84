"""The performance model of the CUDA paths (scripts/gpu_model.py) and the way its thresholds
reach the source (scripts/apply_cuda_thresholds.py): the model runs, the H200 sweep's measured
thresholds are the compiled defaults of csrc/cuda/paths.h, the kernel headers carry its current tables, and its
predictions have the shape the design rests on. All predictions; nothing here runs a GPU."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from dynnet_ext import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("gpu_model", os.path.join(ROOT, "scripts", "gpu_model.py"))
gpu_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_model)
APPLY = os.path.join(ROOT, "scripts", "apply_cuda_thresholds.py")
PATHS_H = os.path.join(ROOT, "csrc", "cuda", "paths.h")
MEASURED = os.path.join(ROOT, "benchmarks", "results", "gpu-h200", "thresholds.json")


def _apply_module():
    spec = importlib.util.spec_from_file_location("apply_cuda_thresholds", APPLY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_runs_and_labels_predictions(capsys):
    assert gpu_model.main([]) == 0
    out = capsys.readouterr().out
    assert "Predicted (not measured)" in out and "not run on a GPU" in out
    for kernel in ("custom path (gemm.cuh)", "vendor path (vendor.cuh)", "network (dynamic_net.cuh)"):
        assert kernel in out


def test_measured_thresholds_are_the_source_defaults():
    # The H200's crossover sweep (benchmarks/results/gpu-h200/thresholds.json) made the defaults;
    # entries it does not measure (float64, the wide-tile rule) keep the model's.
    proc = subprocess.run([sys.executable, APPLY, "--check", MEASURED], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ... and what the built library holds (a stale build would differ).
    compiled = ops._C.cuda_default_dispatch_table()
    with open(MEASURED) as f:
        for key, value in json.load(f)["table"].items():
            got = compiled[key]
            if isinstance(value, dict):  # the precisions the sweep measured
                got = {p: got[p] for p in value}
            assert got == value, key


def test_kernel_headers_carry_the_current_model():
    assert gpu_model.check() == []


def test_check_sees_a_stale_header(tmp_path):
    for rel in gpu_model.HEADERS:
        dst = tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(open(os.path.join(ROOT, rel)).read())
    stale = tmp_path / "csrc/cuda/gemm.cuh"
    text = stale.read_text()
    assert "//   64x1000->100 float32 forward " in text
    stale.write_text(text.replace("//   64x1000->100 float32 forward ", "//   64x1000->100 float32 forwrd  ", 1))
    assert [p.split(":")[0] for p in gpu_model.check(str(tmp_path))] == ["csrc/cuda/gemm.cuh"]


def test_predictions_route_the_issue_shapes_as_designed():
    table = gpu_model.thresholds()["table"]
    seed_layers = [(64, 1000, 100), (64, 100, 100), (64, 100, 10)]
    for p in gpu_model.PRECISIONS:
        for bwd in (False, True):
            for m, k, n in seed_layers:  # latency-bound: the custom kernels
                assert gpu_model.custom_forward(m, k, n, p).observed < gpu_model.vendor_forward(m, k, n, p).observed
                key = "layer_backward_custom_max_flops" if bwd else "layer_forward_custom_max_flops"
                assert 2.0 * m * k * n <= table[key][p], (p, bwd, (m, k, n))
            # 4096 x 1024 -> 1024: FLOP-bound, the vendor GEMMs.
            assert 2.0 * 4096 * 1024 * 1024 > table["layer_forward_custom_max_flops"][p]
    bf16 = [gpu_model.layer(*gpu_model.BIG, "bfloat16", path) for path in ("custom", "vendor")]
    assert bf16[1].observed * 5 < bf16[0].observed  # tensor cores
    assert gpu_model.net_path((64, 1000, 100, 10, 3), "float32", table) == "one-launch"
    assert gpu_model.net_path((4096, 1024, 1024, 1024, 1), "float32", table) == "chain"  # H > 256


def test_predicted_ratios_are_stock_over_fused():
    rows = gpu_model.ratios()
    assert rows and all(abs(r - s / f) < 1e-9 and s > 0 and f > 0 for _, s, f, r in rows)


@pytest.mark.parametrize("rows, want", [
    ([(1.0, 1.0, 2.0), (10.0, 1.0, 2.0), (100.0, 3.0, 2.0), (1000.0, 9.0, 2.0)], 10.0),  # one crossover
    ([(1.0, 2.0, 1.0), (10.0, 2.0, 1.0)], 0.0),  # the other path always wins
    ([(1.0, 1.0, 2.0), (12345.0, 1.0, 2.0)], 13000.0),  # rounded up to 2 significant digits
    ([(12345.0, 1.0, 2.0), (12400.0, 3.0, 2.0)], 12345.0),  # .. unless that would take in the next row
    ([], None),  # nothing measured
])
def test_fit(rows, want):
    assert gpu_model.fit(rows) == want


def test_apply_writes_and_checks_the_defaults_block(tmp_path):
    header = tmp_path / "paths.h"
    header.write_text(open(PATHS_H).read())
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"source": "test sweep", "table": {
        "layer_forward_custom_max_flops": {"bfloat16": 123456789.0, "float32": None},
        "lt_relu_keeps_nan": True}}))
    run = lambda *a: subprocess.run([sys.executable, APPLY, *a, "--header", str(header)], capture_output=True, text=True)
    assert run("--check", str(f)).returncode == 1
    assert run(str(f)).returncode == 0
    assert run("--check", str(f)).returncode == 0
    apply = _apply_module()
    before, after = apply.parse_block(open(PATHS_H).read()), apply.parse_block(header.read_text())
    assert after["layer_forward_custom_max_flops"]["bfloat16"] == 123456789.0
    assert after["layer_forward_custom_max_flops"]["float32"] == before["layer_forward_custom_max_flops"]["float32"]
    assert after["lt_relu_keeps_nan"] is True
    assert "source: test sweep" in header.read_text()


@pytest.mark.parametrize("table, message", [
    ({"layer_forward_custom_max_flops": {"float8": 1.0}}, "unknown precision"),
    ({"net_one_launch_max_flops": {"float32": -1.0}}, "must be >= 0"),
    ({"lt_relu_keeps_nan": "yes"}, "true or false"),
    ({"layer_custom_max_flops": {}}, "unknown table entry"),
])
def test_apply_refuses_a_wrong_file(tmp_path, table, message):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"table": table}))
    proc = subprocess.run([sys.executable, APPLY, "--check", str(f)], capture_output=True, text=True)
    assert proc.returncode != 0 and message in proc.stderr


@pytest.mark.parametrize("value", [0.0, 1.0, 132.0, 1.3e8, 123456789.0, 2.0 / 3.0, 1e-300])
def test_apply_numbers_read_back_exactly(value):
    assert float(_apply_module()._number(value)) == value


def test_sweep_dry_run_writes_what_apply_reads(tmp_path):
    """scripts/cuda_sweep.py without a GPU (--dry-run: the model's predictions as timings) goes
    through the sweep's own loops, fitting and writer: its thresholds are then the model's, and
    the file is one apply_cuda_thresholds.py takes."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "cuda_sweep.py"), "--out", str(tmp_path),
                           "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "thresholds.json").read_text())
    model = gpu_model.thresholds()["table"]
    for key, per_precision in data["table"].items():
        assert set(per_precision) == {"float32", "tf32", "bfloat16", "float16"}
        for p, v in per_precision.items():
            assert v == model[key][p], (key, p)
    kinds = {(r["kind"], r["path"]) for r in data["rows"]}
    assert kinds == {("layer", "custom"), ("layer", "vendor"), ("network", "one-launch"), ("network", "chain")}
    assert "not measured" in data["source"]
    header = tmp_path / "paths.h"
    header.write_text(open(PATHS_H).read())
    assert subprocess.run([sys.executable, APPLY, str(tmp_path / "thresholds.json"), "--header", str(header)],
                          capture_output=True).returncode == 0


def test_sweep_refuses_to_time_without_a_gpu(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible: the sweep would run")  # the refusal exists only without one
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "cuda_sweep.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "no CUDA GPU visible" in proc.stderr


def test_sanitizer_probe_rehearses_on_the_cpu():
    """scripts/cuda_sanitize_probe.py (what gpu_check.sh runs under compute-sanitizer) makes the
    same calls and reference checks on the CPU ops with --rehearse: its own logic works before a
    GPU window depends on it."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "cuda_sanitize_probe.py"), "--rehearse"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "every CPU result matches the reference" in proc.stdout


def test_lt_gelu_probe_rehearsed_on_cpu():
    # scripts/cuda_sweep.py's probe of cuBLASLt's GELU epilogue, run on ATen's CPU
    # _addmm_activation (addmm, then the exact gelu): it must report 0 against stock's exact GELU
    # and tell the tanh approximation apart, in every dtype; NaN and inf as stock's exact GELU
    # has them, and as stock's tanh GELU where the two agree there (not on every CPU: stock's
    # AVX-512 float32 exact GELU gives NaN for +inf, its tanh GELU +inf).
    import torch
    import torch.nn.functional as F

    spec = importlib.util.spec_from_file_location("cuda_sweep", os.path.join(ROOT, "scripts", "cuda_sweep.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    report = sweep.lt_gelu_agreement(device="cpu")
    assert set(report) == {"float32", "bfloat16", "float16"}
    for dtype, forms in report.items():
        assert forms["gelu"] == {"max_ulp": 0.0, "max_abs": 0.0, "nan_inf_as_stock": True}, dtype
        specials = torch.tensor([float("nan"), float("inf"), float("-inf")] * 8, dtype=getattr(torch, dtype))
        exact, tanh = F.gelu(specials), F.gelu(specials, approximate="tanh")
        agree = torch.equal(exact.isnan(), tanh.isnan()) and torch.equal(exact.nan_to_num(0.5), tanh.nan_to_num(0.5))
        assert forms["gelu_tanh"]["max_abs"] > 0 and forms["gelu_tanh"]["nan_inf_as_stock"] == agree, dtype
