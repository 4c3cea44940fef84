"""The test cases that need a GPU, run on the lent one in chunks that each leave a summary
(scripts/gpu_check.sh's test step):

    python scripts/gpu_tests.py --out DIR [--budget SECONDS]

Selects the tests tests/conftest.py marks `cuda` (every test that skips without a GPU: the CPU
cases and the CPU harness's already run on every CI run), then runs them one test file at a time,
the cheapest first (plain op tests, then torch.compile cases, then multi-process ones), each file
a pytest run of its own with a timeout cut to what the budget has left. After each chunk the
JUnit XMLs so far are merged into DIR/tests.xml and its output appended to DIR/tests.log, so a run
stopped at its cap still reports every chunk that finished (and names the ones that did not).
With no GPU visible nothing is selected and it says so (exit 0). Exit 1 if any chunk failed or
did not finish.

--marker and --files choose another selection (the tests rehearse the chunking with CPU tests).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Collection prints each selected test as PATH::NAME with an absolute PATH, so a chunk can run it
# whatever pytest's rootdir was.
_COLLECT = """
import sys, pytest
class Selected:
    def pytest_collection_finish(self, session):
        for item in session.items:
            print("SELECTED", f"{item.path}::{item.nodeid.split('::', 1)[1]}")
sys.exit(pytest.main(sys.argv[1:], plugins=[Selected()]))
"""


def collect(marker, files):
    """The selected tests, as absolute PATH::NAME ids."""
    cmd = [sys.executable, "-c", _COLLECT, "--collect-only", "-q", "-p", "no:cacheprovider", "-m", marker, *files]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode not in (0, 5):  # 5: nothing collected
        raise SystemExit(f"gpu_tests: collection failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return [line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("SELECTED ")]


def cost(node_id):
    """A test's cost class: 0 plain, 1 torch.compile, 2 a multi-process run (torchrun)."""
    path = node_id.split("::")[0]
    if any(name in path for name in ("test_fsdp", "test_tensor_parallel", "test_ddp")):
        return 2
    return 1 if "compile" in node_id else 0


def chunks(node_ids):
    """(label, node ids) per cost class and file, cheapest first."""
    groups = {}
    for node in node_ids:
        groups.setdefault((cost(node), node.split("::")[0]), []).append(node)
    return [(f"{os.path.relpath(path, ROOT)} (cost class {c}, {len(nodes)} tests)", nodes)
            for (c, path), nodes in sorted(groups.items())]


def merge(xml_paths, out):
    """One JUnit <testsuites> holding every chunk's suites."""
    merged = ET.Element("testsuites")
    for path in xml_paths:
        root = ET.parse(path).getroot()
        merged.extend([root] if root.tag == "testsuite" else list(root))
    ET.ElementTree(merged).write(out, encoding="utf-8", xml_declaration=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for tests.log and tests.xml")
    parser.add_argument("--budget", type=float, default=200.0, help="seconds for every chunk together")
    parser.add_argument("--marker", default="cuda", help="pytest -m expression selecting the tests (default: cuda)")
    parser.add_argument("--files", nargs="*", default=["tests"], help="test files or folders to select from")
    args = parser.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    log_path, xml_path = os.path.join(args.out, "tests.log"), os.path.join(args.out, "tests.xml")
    start = time.monotonic()  # the budget includes the collection
    selected = collect(args.marker, args.files)
    if args.marker == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(f"gpu_tests: no CUDA GPU visible: 0 tests selected ({len(selected)} CUDA cases collected, "
                  "all of which would skip)")
            return 0
    plan = chunks(selected)
    print(f"gpu_tests: {len(selected)} tests selected ({args.marker}) in {len(plan)} chunks, collected in "
          f"{time.monotonic() - start:.0f} s of the budget's {args.budget:.0f} s")
    done, failed, not_run = [], [], []
    scratch = tempfile.mkdtemp(prefix="gpu_tests.")  # not in --out: a killed run leaves only its two files there
    with open(log_path, "w") as log:
        for i, (label, nodes) in enumerate(plan):
            left = args.budget - (time.monotonic() - start)
            if left < 5:
                not_run.append(label)
                continue
            chunk_xml = os.path.join(scratch, f"chunk{i}.xml")
            cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={chunk_xml}", *nodes]
            log.write(f"\n===== chunk {i}: {label}, timeout {left:.0f} s\n")
            log.flush()
            t = time.monotonic()
            try:
                proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=left)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            log.write(f"===== chunk {i}: exit {rc} in {time.monotonic() - t:.0f} s\n")
            log.flush()
            if os.path.exists(chunk_xml):
                done.append(chunk_xml)
                merge(done, xml_path)
            if rc not in (0, 5):
                failed.append(f"{label}: exit {rc}")
            print(f"gpu_tests: chunk {i} {label}: exit {rc} ({time.monotonic() - t:.0f} s)", flush=True)
    for path in done:
        os.remove(path)
    os.rmdir(scratch)
    for label in not_run:
        print(f"gpu_tests: NOT RUN (budget spent): {label}")
    for line in failed:
        print(f"gpu_tests: FAILED chunk {line}")
    return 1 if failed or not_run else 0


if __name__ == "__main__":
    sys.exit(main())
