"""scripts/gpu_tests.py, the GPU check's test step: it selects exactly the tests that need a GPU,
selects none without one (saying so), and runs its chunks so that a step stopped by its budget
still reports every chunk that finished. Rehearsed here with CPU tests."""

import importlib.util
import os
import textwrap
import xml.etree.ElementTree as ET

import pytest
import torch

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the selection with no GPU visible")
def test_no_gpu_selects_nothing_and_says_so(tmp_path, capsys):
    assert gpu_tests.main(["--out", str(tmp_path), "--files", "tests/test_nn.py"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU visible: 0 tests selected" in out
    assert not os.listdir(tmp_path)


def test_chunks_report_what_finished_when_the_budget_runs_out(tmp_path, capsys):
    tests = tmp_path / "t"
    tests.mkdir()
    bodies = {"test_a.py": "def test_ok():\n    pass\n",
              "test_b.py": "def test_fails():\n    assert 1 == 2\n",
              "test_c.py": "import time\ndef test_slow():\n    time.sleep(300)\n",
              "test_d.py": "def test_never():\n    pass\n"}
    for name, body in bodies.items():
        (tests / name).write_text(textwrap.dedent(body))
    out = tmp_path / "out"
    rc = gpu_tests.main(["--out", str(out), "--marker", "not cuda", "--budget", "90", "--files", str(tests)])
    printed = capsys.readouterr().out
    assert rc == 1
    assert "4 tests selected" in printed
    assert "FAILED chunk" in printed and "test_b.py" in printed
    assert "exit timeout" in printed and "test_c.py" in printed
    assert "NOT RUN (budget spent)" in printed and "test_d.py" in printed
    assert sorted(os.listdir(out)) == ["tests.log", "tests.xml"]
    cases = {c.get("name"): [e.tag for e in c] for c in ET.parse(out / "tests.xml").getroot().iter("testcase")}
    assert cases == {"test_ok": [], "test_fails": ["failure"]}
    log = (out / "tests.log").read_text()
    assert log.count("===== chunk") == 6  # a start and an end line for a, b and c
