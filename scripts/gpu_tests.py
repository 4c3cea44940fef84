"""The test cases that need a GPU, run on the lent one within a budget, reporting every test that
finished even when the budget runs out mid-chunk (scripts/gpu_check.sh's test step):

    python scripts/gpu_tests.py --out DIR [--budget SECONDS]

Selects the tests tests/conftest.py marks `cuda` (every test that skips without a GPU: the CPU
cases and the CPU harness's already run on every CI run), then runs them in one chunk per cost
class, the cheapest first: plain op tests, then torch.compile cases, then multi-process ones. Each
chunk is one pytest process (start-up, torch import and collection are paid once per chunk, not
once per file), with a timeout cut to what the budget has left, killed with its whole process
group (torchrun workers too) at that timeout. Inside it a small plugin (Recorder) appends each
test's start and outcome (passed, failed, error, skipped; duration; failure text, truncated) to
a JSON-lines file as it happens, so a chunk killed at its cap still reports every test that
finished before the kill; the test it was running is reported as an error ("did not finish"). A
chunk whose process dies otherwise (a crash, or a sticky CUDA error, after which every later test
in that process would fail: the plugin stops the session) resumes with its remaining tests in a
fresh process.

After each chunk DIR/tests.xml (JUnit XML, one <testsuite> per chunk, built from the records) is
rewritten, and DIR/tests.log gets the chunk's pytest output and, where pytest's own summary is
missing (killed or crashed), the failures' texts; at the end tests.log lists every selected test
that did not run. With no GPU visible nothing is selected and it says so (exit 0). Exit 1 if any
test failed, did not finish or did not run.

--marker and --files choose another selection (the tests rehearse the chunks with CPU tests).
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
COST_CLASSES = {0: "plain", 1: "torch.compile", 2: "multi-process"}
# A failure after which the process's CUDA context is unusable: every later test would fail too.
STICKY_CUDA = re.compile(r"illegal memory access|unspecified launch failure|device-side assert|misaligned address|"
                         r"illegal instruction")
MESSAGE_CHARS = 4000  # a failure's text kept in the records (its end: the assertion)
OUTCOMES = ("passed", "failed", "error", "skipped")

# The child processes run pytest in-process with this module's plugins (cwd ROOT first on
# sys.path, as `python -m pytest` has it).
_CHILD = f"import sys; sys.path.insert(1, {SCRIPTS!r}); import gpu_tests; sys.exit(gpu_tests.child(sys.argv[1:]))"


def item_id(item):
    """A test's id as this script names it: absolute PATH::NAME, whatever pytest's rootdir was."""
    return f"{item.path}::{item.nodeid.split('::', 1)[1]}"


class Selected:
    """Collection: prints each selected test's id."""

    def pytest_collection_finish(self, session):
        for item in session.items:
            print("SELECTED", item_id(item))


def outcome_of(reports):
    """(outcome, duration, message) of one test from its setup/call/teardown reports."""
    outcome, message, duration = "passed", "", 0.0
    for report in reports:
        duration += report.duration
        if report.failed and outcome not in ("failed", "error"):
            outcome, message = ("failed" if report.when == "call" else "error"), report.longreprtext
        elif report.skipped and outcome == "passed":
            outcome = "skipped"
            if hasattr(report, "wasxfail"):
                message = f"xfail: {report.wasxfail}"
            else:
                message = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longreprtext
    return outcome, duration, message[-MESSAGE_CHARS:]


class Recorder:
    """A chunk's plugin: runs only the listed tests, in the list's order, and appends each one's
    start and outcome to the JSON-lines file `path` as it happens (each line flushed at once)."""

    def __init__(self, ids, path):
        self.order = {node: i for i, node in enumerate(ids)}
        self.file = open(path, "a")
        self.ids, self.reports, self.session = {}, {}, None

    def write(self, nodeid, outcome, **fields):
        self.file.write(json.dumps({"id": self.ids.get(nodeid, nodeid), "outcome": outcome, **fields}) + "\n")
        self.file.flush()

    def pytest_sessionstart(self, session):
        self.session = session

    def pytest_collection_modifyitems(self, config, items):
        keep = sorted((item for item in items if item_id(item) in self.order),
                      key=lambda item: self.order[item_id(item)])
        dropped = [item for item in items if item_id(item) not in self.order]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep
        self.ids = {item.nodeid: item_id(item) for item in keep}

    def pytest_runtest_logstart(self, nodeid):
        self.write(nodeid, "started")

    def pytest_runtest_logreport(self, report):
        self.reports.setdefault(report.nodeid, []).append(report)

    def pytest_runtest_logfinish(self, nodeid):
        outcome, duration, message = outcome_of(self.reports.pop(nodeid, []))
        self.write(nodeid, outcome, duration=round(duration, 4), message=message)
        if outcome in ("failed", "error") and STICKY_CUDA.search(message):
            self.session.shouldstop = f"a sticky CUDA error in {nodeid}: the rest runs in a fresh process"


def child(argv):
    """The child processes' entry: `collect MARKER FILE...` or `run IDS_FILE RECORD_FILE FILE...`."""
    import pytest

    if argv[0] == "collect":
        return pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-m", argv[1], *argv[2:]],
                           plugins=[Selected()])
    with open(argv[1]) as f:
        ids = f.read().splitlines()
    return pytest.main(["-q", "-rfEs", "-p", "no:cacheprovider", *argv[3:]], plugins=[Recorder(ids, argv[2])])


def collect(marker, files):
    """The selected tests, as absolute PATH::NAME ids."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, "collect", marker, *files], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode not in (0, 5):  # 5: nothing collected
        raise SystemExit(f"gpu_tests: collection failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return [line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("SELECTED ")]


def cost(node_id):
    """A test's cost class: 0 plain, 1 torch.compile, 2 a multi-process run (torchrun)."""
    path = node_id.split("::")[0]
    if any(name in path for name in ("test_fsdp", "test_tensor_parallel", "test_ddp")):
        return 2
    return 1 if "compile" in node_id else 0


def chunks(node_ids):
    """(label, node ids) per cost class, cheapest first, each in collection order."""
    groups = {}
    for node in node_ids:
        groups.setdefault(cost(node), []).append(node)
    return [(f"{COST_CLASSES[c]} (cost class {c}, {len(nodes)} tests)", nodes) for c, nodes in sorted(groups.items())]


def run_group(cmd, timeout, **kwargs):
    """Runs cmd in a process group of its own; returns its exit code, or "timeout" after killing
    the whole group at `timeout` seconds. Whatever the group left running is killed too."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def read_records(path):
    """{id: record} of the finished tests, and the ids started (the last one may not have finished)."""
    finished, started = {}, []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut by the kill
                    continue
                if record["outcome"] == "started":
                    started.append(record["id"])
                else:
                    finished[record["id"]] = record
    return finished, started


def run_chunk(nodes, timeout, stem, log):
    """Runs `nodes` in one pytest process (killed with its group at `timeout` s), its output
    appended to `log`; returns its exit code ("timeout" if killed) and {id: record} of the tests
    it started: the one it was running when killed or when its process ended is an error."""
    ids_path, record_path = f"{stem}.ids", f"{stem}.jsonl"
    with open(ids_path, "w") as f:
        f.write("\n".join(nodes) + "\n")
    files = list(dict.fromkeys(node.split("::")[0] for node in nodes))
    rc = run_group([sys.executable, "-c", _CHILD, "run", ids_path, record_path, *files], timeout, cwd=ROOT,
                   env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=log, stderr=subprocess.STDOUT)
    finished, started = read_records(record_path)
    why = (f"stopped at the chunk's cap of {timeout:.0f} s (budget spent, or this test hangs)" if rc == "timeout"
           else f"the chunk's process ended (exit {rc}) while it ran")
    unfinished = {node: {"id": node, "outcome": "error", "duration": 0.0, "message": f"did not finish: {why}"}
                  for node in started if node not in finished}
    return rc, {**finished, **unfinished}


def headline(message):
    """A failure text's line to show: its first `E   ` line (the exception), else its last line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    return (errors or lines[-1:] or [""])[0][:300]


def write_xml(plan, results, out):
    """JUnit XML: a <testsuite> per chunk holding its tests that have a result."""
    suites = ET.Element("testsuites")
    for label, nodes in plan:
        cases = [results[node] for node in nodes if node in results]
        counts = {kind: sum(r["outcome"] == kind for r in cases) for kind in ("failed", "error", "skipped")}
        suite = ET.SubElement(suites, "testsuite", name=label, tests=str(len(cases)), failures=str(counts["failed"]),
                              errors=str(counts["error"]), skipped=str(counts["skipped"]),
                              time=f"{sum(r.get('duration', 0) for r in cases):.3f}")
        for r in cases:
            path, name = r["id"].split("::", 1)
            module = os.path.splitext(
                os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else os.path.basename(path))[0]
            *cls, name = name.split("::")
            case = ET.SubElement(suite, "testcase", classname=".".join([module.replace(os.sep, "."), *cls]), name=name,
                                 time=f"{r.get('duration', 0):.3f}")
            tag = {"failed": "failure", "error": "error", "skipped": "skipped"}.get(r["outcome"])
            if tag:
                ET.SubElement(case, tag, message=headline(r["message"]) or r["outcome"]).text = r["message"]
    ET.ElementTree(suites).write(out, encoding="utf-8", xml_declaration=True)


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
          f"{time.monotonic() - start:.0f} s of the budget's {args.budget:.0f} s", flush=True)
    results, failed, not_run = {}, [], []
    # The chunks' id lists and records go to a scratch folder: only tests.log and tests.xml go to --out.
    with tempfile.TemporaryDirectory(prefix="gpu_tests.") as scratch, open(log_path, "w") as log:
        for i, (label, nodes) in enumerate(plan):
            remaining, run = nodes, 0
            while remaining:
                left = args.budget - (time.monotonic() - start)
                if left < 5:
                    break
                name = f"chunk {i}{f' (resumed, run {run})' if run else ''}"
                log.write(f"\n===== {name}: {label}, {len(remaining)} tests, timeout {left:.0f} s\n")
                log.flush()
                t = time.monotonic()
                rc, ran = run_chunk(remaining, left, os.path.join(scratch, f"chunk{i}.{run}"), log)
                results.update(ran)
                remaining = [node for node in remaining if node not in ran]
                counts = {kind: sum(r["outcome"] == kind for r in ran.values()) for kind in OUTCOMES}
                summary = (f"exit {rc} in {time.monotonic() - t:.0f} s: {counts['passed']} passed, {counts['failed']} "
                           f"failed, {counts['error']} errors, {counts['skipped']} skipped"
                           f"{f', {len(remaining)} left' if remaining else ''}")
                log.write(f"\n===== chunk {i}: {summary}\n")
                if rc not in (0, 1, 5):  # no pytest summary of the failures: the records' texts instead
                    log.writelines(f"--- {r['outcome'].upper()} {node}\n{r['message']}\n" for node, r in ran.items()
                                   if r["outcome"] in ("failed", "error"))
                log.flush()
                write_xml(plan, results, xml_path)
                print(f"gpu_tests: {name} {label}: {summary}", flush=True)
                run += 1
                if rc in (0, 1, 5, "timeout") or not ran:  # only a process that died after some progress resumes
                    break
            bad = sum(node in results and results[node]["outcome"] in ("failed", "error") for node in nodes)
            if bad or remaining:
                failed.append(f"{label}: {bad} failed or errors, {len(remaining)} not run")
            not_run += remaining
        if not_run:
            log.write(f"\n===== not run (budget spent, or their chunk stopped): {len(not_run)} tests\n")
            log.writelines(f"{node}\n" for node in not_run)
    print(f"gpu_tests: {len(results)} of {len(selected)} selected tests reported in {xml_path}; "
          f"{len(not_run)} not run")
    if not_run:
        shown = ", ".join(os.path.relpath(node, ROOT) if node.startswith(ROOT + os.sep) else node
                          for node in not_run[:5])
        print(f"gpu_tests: NOT RUN (budget spent, or their chunk stopped): {len(not_run)} tests, e.g. {shown} "
              "(all listed in tests.log)")
    for line in failed:
        print(f"gpu_tests: FAILED chunk {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    # A SIGTERM (gpu_check.sh's timeout) ends the run through run_group's `finally`, which kills the chunk's group.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
