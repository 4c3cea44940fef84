"""scripts/gpu_tests.py, the GPU check's test step: it selects exactly the tests that need a GPU
(each once: not once per CPU GEMM engine), selects none without one (saying so), runs them in a
chunk per cost class, cheapest first, and reports every test that finished even in a chunk killed
at its cap; a chunk whose process dies resumes in a fresh one. Rehearsed here with CPU tests."""

import importlib.util
import os
import textwrap
import time
import xml.etree.ElementTree as ET

import pytest
import torch

from conftest import CPU_GEMM_ISAS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("gpu_tests", os.path.join(ROOT, "scripts", "gpu_tests.py"))
gpu_tests = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_tests)


def test_the_cuda_marker_selects_the_tests_that_skip_without_a_gpu():
    files = ["tests/test_nn.py", "tests/test_linear_relu_cuda.py", "tests/test_dynamic_net_ops.py"]
    cuda = gpu_tests.collect("cuda", files)
    rest = gpu_tests.collect("not cuda", files)
    assert cuda and rest and not set(cuda) & set(rest)
    # The device-parametrised cases: the "cuda" ones are selected, the "cpu" and "harness" ones not.
    assert any("[cuda" in n or "-cuda" in n for n in cuda)
    assert not any("[cpu" in n or "harness" in n for n in cuda)
    assert os.path.join(ROOT, "tests/test_nn.py::test_runs_on_the_current_cuda_stream[layer]") in cuda


@pytest.mark.skipif(len(CPU_GEMM_ISAS) < 2, reason="needs two CPU GEMM engines")
def test_engine_parametrised_cases_run_on_each_engine_only_on_the_cpu():
    # tests/conftest.py's cpu_gemm_isa: a "cpu" case runs on each engine, a CUDA or harness case
    # ("cuda", "cuda-split", "harness-vendor", ...) once, on the first engine.
    ids = gpu_tests.collect("cuda or not cuda", ["tests/test_linear_relu.py", "tests/test_dynamic_net_ops.py"])
    copies = {}
    for node in ids:
        name, _, params = node.partition("[")
        tokens = params.rstrip("]").split("-")
        engines = [t for t in tokens if t in CPU_GEMM_ISAS]
        if engines:
            key = (name, tuple(t for t in tokens if t not in CPU_GEMM_ISAS))
            copies.setdefault(key, []).append(engines[0])
    cpu = {k: v for k, v in copies.items() if not {"cuda", "harness"} & set(k[1])}
    other = {k: v for k, v in copies.items() if k not in cpu}
    assert any("cpu" in k[1] for k in cpu) and any("harness" in k[1] for k in other) and any("cuda" in k[1] for k in other)
    assert all(sorted(v) == sorted(CPU_GEMM_ISAS) for v in cpu.values())
    assert all(v == CPU_GEMM_ISAS[:1] for v in other.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the selection with no GPU visible")
def test_no_gpu_selects_nothing_and_says_so(tmp_path, capsys):
    assert gpu_tests.main(["--out", str(tmp_path), "--files", "tests/test_nn.py"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU visible: 0 tests selected" in out
    assert not os.listdir(tmp_path)


def test_one_chunk_per_cost_class_cheapest_first():
    ids = ["/t/test_ddp.py::test_two_ranks", "/t/test_a.py::test_compile[x]", "/t/test_a.py::test_plain",
           "/t/test_b.py::test_plain[1]", "/t/test_fsdp.py::test_shard"]
    plan = gpu_tests.chunks(ids)
    assert [label.split(" (")[0] for label, _ in plan] == ["plain", "torch.compile", "multi-process"]
    assert [nodes for _, nodes in plan] == [["/t/test_a.py::test_plain", "/t/test_b.py::test_plain[1]"],
                                            ["/t/test_a.py::test_compile[x]"],
                                            ["/t/test_ddp.py::test_two_ranks", "/t/test_fsdp.py::test_shard"]]


def write_tests(folder, bodies):
    folder.mkdir()
    for name, body in bodies.items():
        (folder / name).write_text(textwrap.dedent(body))


def junit(path):
    """{test name: [child tags]}, {child tag: message} and the counts gpu_check.sh's summary reads."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    cases = {c.get("name"): [e.tag for e in c] for c in root.iter("testcase")}
    messages = {c.get("name"): e.get("message") for c in root.iter("testcase") for e in c}
    return cases, messages, counts


def test_a_chunk_killed_at_its_cap_reports_the_tests_that_finished(tmp_path, capsys):
    tests = tmp_path / "t"
    write_tests(tests, {
        "test_a.py": """\
            import pytest
            def test_ok():
                pass
            def test_fails():
                assert 1 == 2
            @pytest.mark.skip(reason="not here")
            def test_skips():
                pass
            @pytest.fixture
            def broken():
                raise RuntimeError("setup broke")
            def test_setup_error(broken):
                pass
            """,
        "test_b.py": """\
            import time
            def test_quick():
                pass
            def test_hangs():
                time.sleep(300)
            def test_after_the_hang():
                pass
            """,
        "test_ddp_late.py": "def test_never():\n    pass\n",  # cost class 2: its chunk gets no budget
    })
    out = tmp_path / "out"
    start = time.monotonic()
    rc = gpu_tests.main(["--out", str(out), "--marker", "not cuda", "--budget", "30", "--files", str(tests)])
    assert time.monotonic() - start < 120  # the hanging test was killed, not waited for
    printed = capsys.readouterr().out
    assert rc == 1
    assert "8 tests selected (not cuda) in 2 chunks" in printed
    assert "chunk 0 plain" in printed and "exit timeout" in printed
    assert "6 of 8 selected tests reported" in printed and "NOT RUN" in printed
    assert "FAILED chunk plain" in printed and "FAILED chunk multi-process" in printed
    assert sorted(os.listdir(out)) == ["tests.log", "tests.xml"]
    cases, messages, counts = junit(out / "tests.xml")
    assert cases == {"test_ok": [], "test_fails": ["failure"], "test_skips": ["skipped"], "test_setup_error": ["error"],
                     "test_quick": [], "test_hangs": ["error"]}
    assert counts == {"tests": 6, "failures": 1, "errors": 2, "skipped": 1}
    assert messages["test_fails"] == "assert 1 == 2" and messages["test_setup_error"] == "RuntimeError: setup broke"
    assert messages["test_hangs"].startswith("did not finish: stopped at the chunk's cap")
    log = (out / "tests.log").read_text()
    # pytest's own summary never came: the failures' texts are the records'.
    assert "--- FAILED " in log and "E       assert 1 == 2" in log
    not_run = log[log.index("===== not run"):].splitlines()[1:]
    assert sorted(os.path.basename(n) for n in not_run) == ["test_b.py::test_after_the_hang", "test_ddp_late.py::test_never"]


def test_a_chunk_whose_process_dies_resumes_in_a_fresh_one(tmp_path, capsys):
    # A crash (the process exits mid-test) and a sticky CUDA error (the plugin stops the session:
    # every later test in that process would fail) each cost one test, not the rest of the chunk.
    tests = tmp_path / "t"
    write_tests(tests, {"test_c.py": """\
        import os
        def pid(name):
            with open(os.path.join(os.path.dirname(__file__), "pids"), "a") as f:
                f.write(f"{name} {os.getpid()}\\n")
        def test_first():
            pid("first")
        def test_crashes():
            pid("crashes")
            os._exit(3)
        def test_sticky():
            pid("sticky")
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        def test_last():
            pid("last")
        """})
    out = tmp_path / "out"
    rc = gpu_tests.main(["--out", str(out), "--marker", "not cuda", "--budget", "120", "--files", str(tests)])
    printed = capsys.readouterr().out
    assert rc == 1
    assert "(resumed, run 1)" in printed and "(resumed, run 2)" in printed and "0 not run" in printed
    cases, messages, counts = junit(out / "tests.xml")
    assert cases == {"test_first": [], "test_crashes": ["error"], "test_sticky": ["failure"], "test_last": []}
    assert messages["test_crashes"] == "did not finish: the chunk's process ended (exit 3) while it ran"
    pids = dict(line.split() for line in (tests / "pids").read_text().splitlines())
    assert pids["first"] == pids["crashes"] != pids["sticky"] != pids["last"]
