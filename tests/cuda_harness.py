"""The CUDA harness: the project's CUDA kernels and launchers (csrc/cuda/*.cuh) compiled by the
host compiler on a small CUDA shim (csrc/cuda/harness/) and run on the CPU. Tests only: built
here on demand into build/cuda-harness/, never part of the wheel. Its parts, one job each, are in
tests/harness/ (build, fixtures, sanitizer, planted); this file is its command line and the names
the CUDA tests use (load, Target, targets, forced, schedule, PATHS, ENV_VARIANT, CSRC).

Variants:
  plain     -O2, what the test suite runs (the "harness" device of the CUDA tests);
  sanitize  AddressSanitizer + UBSan, every error fatal; must run in a process started with
            libasan preloaded (harness.sanitizer.sanitized_env()), e.g. `python tests/cuda_harness.py sanitize`;
  planted   the sanitize build of a copy of the kernel sources with every planted bug
            (harness/planted.py) behind its own switch; with none on it must pass the probe
            tests, with each one on fail them (`... planted`).

Command line (what .ci/run calls; each prints a summary and exits non-zero on failure):
  python tests/cuda_harness.py build [VARIANT]   build (or find up to date) and print the path
  python tests/cuda_harness.py sanitize          the harness tests under ASan + UBSan
  python tests/cuda_harness.py planted [NAME..]  every planted bug is caught
  python tests/cuda_harness.py stats             the harness tests (plain), then what they launched
"""

import os
import sys

from harness import CSRC, build, planted, sanitizer  # noqa: F401
from harness.build import ENV_VARIANT  # noqa: F401
from harness.fixtures import PATHS, Target, forced, load, schedule, targets  # noqa: F401


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "build":
        name = rest[0] if rest else "plain"
        print(planted.build_planted(quiet=False) if name == "planted" else build.build(name, quiet=False))
        return 0
    if cmd == "sanitize":
        return sanitizer.run_sanitized()
    if cmd == "planted":
        return planted.run_planted(rest or None)
    if cmd == "stats":
        build.build("plain", quiet=False)
        env = dict(os.environ, PYTHONPATH=sanitizer.child_pythonpath())
        proc = sanitizer.run_pytest(["-q", "-p", "harness.fixtures", "-k", "harness", *sanitizer.HARNESS_TESTS], env,
                                    timeout=3600)
        print("\n".join(proc.stdout.splitlines()[-14:]))
        return proc.returncode
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
