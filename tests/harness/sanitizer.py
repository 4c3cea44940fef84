"""The harness tests under AddressSanitizer + UBSan: each run is a child pytest process started
with libasan preloaded (sanitized_env()), loading a sanitize-flavor variant of the harness (sanitize,
or planted: planted.py runs its probe the same way). run_sanitized() is `python
tests/cuda_harness.py sanitize`."""

import concurrent.futures
import os
import subprocess
import sys
import time

from . import ROOT, build

# The sanitizer run: the tests with a harness parametrisation, less what adds time but no memory
# accesses of its own - float16 (bfloat16 has the same 2-byte loads), long serial sums, repeats.
HARNESS_TESTS = ["tests/test_cuda_harness.py", "tests/test_linear_relu_cuda.py", "tests/test_dynamic_net_ops.py",
                 "tests/test_cuda_paths.py"]
SANITIZE_SELECTION = "harness and not torch.float16 and not high_precision and not deterministic and not repeats"


def asan_loaded():
    """Whether this process runs with libasan loaded (a sanitize-flavor variant needs it)."""
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()


def child_pythonpath():
    """PYTHONPATH for a child process that imports the package and the harness."""
    return os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])


def sanitized_env(variant_name="sanitize"):
    """Environment for a child process that loads an ASan + UBSan harness variant."""
    def lib(name):
        return subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()

    env = dict(os.environ)
    env.update({
        build.ENV_VARIANT: variant_name,
        # libstdc++ right after libasan: ASan finds __cxa_throw at start-up only if it is loaded
        # by then (python itself does not link it), else the first C++ exception aborts.
        "LD_PRELOAD": f"{lib('libasan.so')} {lib('libstdc++.so')}",
        # Python and torch are not built with ASan: leak checks would report their allocations;
        # UBSan errors are fatal and print a stack.
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        "PYTHONUNBUFFERED": "1",  # a sanitizer ends the process at once: nothing may wait in a buffer
        "PYTHONPATH": child_pythonpath(),
    })
    return env


def run_pytest(args, env, timeout):
    """Runs pytest on `args` in a child process (in the repository root); returns the finished process."""
    # --capture=sys: a sanitizer's report goes straight to stderr (fd-level capture would swallow
    # it when the sanitizer ends the process).
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--capture=sys", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_sanitized(n_jobs=None):
    """The harness tests under ASan + UBSan, split over `n_jobs` processes (the runs are single-threaded)."""
    n_jobs = n_jobs or build.jobs()
    start = time.time()
    build.build("sanitize", n_jobs, quiet=False)
    built = time.time()
    listed = run_pytest(["--collect-only", "-q", "-k", SANITIZE_SELECTION, *HARNESS_TESTS], dict(os.environ), 300)
    ids = [line for line in listed.stdout.splitlines() if "::" in line]
    if listed.returncode != 0 or not ids:
        print(listed.stdout[-3000:] + listed.stderr[-3000:])
        return 1
    shards = [ids[i::n_jobs] for i in range(n_jobs)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=n_jobs) as pool:
        procs = list(pool.map(lambda shard: run_pytest(["-q", *shard], sanitized_env(), 1800), shards))
    failed = False
    for proc in procs:
        lines = proc.stdout.splitlines()
        print("\n".join(lines[-15:] if proc.returncode else lines[-1:]))
        if proc.returncode:
            print(proc.stderr[-8000:])
            failed = True
    print(f"CUDA harness sanitize: {len(ids)} tests in {n_jobs} processes; build {built - start:.0f} s, "
          f"tests {time.time() - built:.0f} s")
    return 1 if failed else 0
