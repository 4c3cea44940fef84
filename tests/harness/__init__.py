"""The CUDA harness's machinery, one module per job (tests/cuda_harness.py is its command line and
the names the CUDA tests use):

  build      compiles the CUDA kernels and launchers (csrc/cuda/*.cuh) with the host compiler on
             the shim (csrc/cuda/harness/) into a Python module, per variant, in build/cuda-harness/
  fixtures   what the CUDA tests run on: the loaded module, targets, forced paths, schedules
  sanitizer  the harness tests in child processes under AddressSanitizer + UBSan
  planted    the planted bugs: a copy of the kernel sources with each bug behind its own switch,
             and the run that checks every one of them is caught
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
