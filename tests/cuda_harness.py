"""The CUDA harness: the project's CUDA kernels and launchers (csrc/cuda/*.cuh) compiled by the
host compiler on a small CUDA shim (csrc/cuda/harness/) and run on the CPU. Tests only: built
here on demand into build/cuda-harness/, never part of the wheel.

Variants:
  plain     -O2, what the test suite runs (the "harness" device of the CUDA tests);
  sanitize  AddressSanitizer + UBSan, every error fatal; must run in a process started with
            libasan preloaded (sanitized_env()), e.g. `python tests/cuda_harness.py sanitize`;
  planted   the sanitize build of a copy of the kernel sources in which every bug of
            PLANTED_BUGS is planted, each behind its own switch (DYNNET_PLANTED(id) in the
            generated code; the kernels in csrc/ stay as they are), compiled for float32 only
            (the probe's dtype). DYNNET_PLANTED_BUG=<name> turns one bug on. With none on it
            must pass the probe tests, with each one on fail them (`... planted`).

Command line (what .ci/run calls; each prints a summary and exits non-zero on failure):
  python tests/cuda_harness.py build [VARIANT]   build (or find up to date) and print the path
  python tests/cuda_harness.py sanitize          the harness tests under ASan + UBSan
  python tests/cuda_harness.py planted [NAME..]  every planted bug is caught
  python tests/cuda_harness.py stats             the harness tests (plain), then what they launched

In tests: `load()` gives the module of the variant this process runs (DYNNET_CUDA_HARNESS,
default plain): its linear_relu / linear_relu_backward / dynamic_net / dynamic_net_backward take
CPU tensors and run the CUDA launchers and kernels; set_schedule, kernel_stats and selftest.*
control and test the shim.
"""

import concurrent.futures
import contextlib
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import time

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
BUILD = os.path.join(ROOT, "build", "cuda-harness")
MODULE_NAME = "_dynnet_cuda_harness"
ENV_VARIANT = "DYNNET_CUDA_HARNESS"
ENV_PLANTED = "DYNNET_PLANTED_BUG"

# Translation units: the shim and the module are built once per flavor; the kernel units are what a
# planted bug changes.
SHIM_UNITS = ["cuda/harness/shim.cpp", "cuda/harness/module.cpp"]
KERNEL_UNITS = ["cuda/harness/linear_relu.cpp", "cuda/harness/dynamic_net.cpp"]

FLAVORS = {
    "plain": {"cflags": ["-O2"], "ldflags": []},
    "sanitize": {
        # -g1: line tables for the reports, at a fraction of -g's compile time.
        "cflags": ["-O1", "-g1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
        "ldflags": ["-fsanitize=address,undefined"],
    },
}
PLANTED_FLAGS = ["-DDYNNET_HARNESS_FLOAT32_ONLY"]


def _compile_flags(flavor):
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    compiler = subprocess.run(["g++", "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
    return (
        ["-std=c++20", "-fPIC", "-fvisibility=hidden", "-fno-gnu-unique", "-Wall", "-Wno-unknown-pragmas",
         "-DDYNNET_CUDA_HARNESS", f"-DDYNNET_HARNESS_FLAVOR=\"{flavor}\"",
         # Not used by the code: they make a new torch or compiler rebuild the harness.
         f"-DDYNNET_HARNESS_TORCH=\"{torch.__version__}\"", f"-DDYNNET_HARNESS_GXX=\"{compiler}\"",
         f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
         "-DTORCH_API_INCLUDE_EXTENSION_H", f"-DTORCH_EXTENSION_NAME={MODULE_NAME}"]
        + [f"-isystem{p}" for p in includes] + FLAVORS[flavor]["cflags"]
    )


def _link_flags(flavor):
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    return ["-shared"] + libs + ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"] + FLAVORS[flavor]["ldflags"]


def _digest(parts, files):
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() + b"\0")
    for f in sorted(files):
        h.update(f.encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def _deps(depfile):
    """The project headers a unit included (g++ -MMD leaves out the -isystem ones)."""
    with open(depfile) as f:
        text = f.read().replace("\\\n", " ")
    return [os.path.normpath(p) for p in shlex.split(text.split(":", 1)[1])]


class _Unit:
    """One object file, rebuilt when its command line or any of its project sources changed."""

    def __init__(self, source, obj, flags):
        self.source, self.obj, self.flags = source, obj, flags
        self.cmd = ["g++", *flags, "-MMD", "-MF", obj + ".d", "-c", source, "-o", obj]
        self.stamp = obj + ".stamp"

    def _key(self):
        files = [self.source] + (_deps(self.obj + ".d") if os.path.exists(self.obj + ".d") else [])
        files = [f for f in files if os.path.exists(f)]
        return _digest([self.cmd[0], *self.flags, self.source], files)

    def up_to_date(self):
        if not (os.path.exists(self.obj) and os.path.exists(self.stamp)):
            return False
        with open(self.stamp) as f:
            return f.read() == self._key()

    def build(self):
        os.makedirs(os.path.dirname(self.obj), exist_ok=True)
        proc = subprocess.run(self.cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"CUDA harness: compiling {self.source} failed:\n{shlex.join(self.cmd)}\n{proc.stderr}")
        with open(self.stamp, "w") as f:
            f.write(self._key())


def _build_units(units, jobs):
    todo = [u for u in units if not u.up_to_date()]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(u.build) for u in todo]:
            future.result()
    return bool(todo)


def _jobs():
    return int(os.environ.get("MAX_JOBS", "2"))


def _units(names, src_root, out_dir, flags):
    return [_Unit(os.path.join(src_root, u), os.path.join(out_dir, "obj", u.replace("/", "_") + ".o"), flags)
            for u in names]


def build(variant="plain", jobs=None, quiet=True):
    """Builds a variant (plain, sanitize, planted) if not up to date; returns its .so path."""
    os.makedirs(BUILD, exist_ok=True)
    with open(os.path.join(BUILD, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time: test processes may start together
        return _build(variant, jobs, quiet)


def _build(variant, jobs, quiet):
    jobs = jobs or _jobs()
    start = time.time()
    if variant not in ("plain", "sanitize", "planted"):
        raise ValueError(f"CUDA harness: unknown variant {variant!r} (plain, sanitize, planted)")
    flavor = "plain" if variant == "plain" else "sanitize"
    flags = _compile_flags(flavor)
    out_dir = os.path.join(BUILD, variant)
    units = _units(SHIM_UNITS, CSRC, os.path.join(BUILD, flavor), flags)
    if variant == "planted":
        units += _units(KERNEL_UNITS, _planted_tree(out_dir), out_dir, flags + PLANTED_FLAGS)
    else:
        units += _units(KERNEL_UNITS, CSRC, out_dir, flags)
    rebuilt = _build_units(units, jobs)
    lib = os.path.join(out_dir, MODULE_NAME + sysconfig.get_config_var("EXT_SUFFIX"))
    if rebuilt or not os.path.exists(lib):
        cmd = ["g++", *[u.obj for u in units], "-o", lib, *_link_flags(flavor)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"CUDA harness: linking {lib} failed:\n{shlex.join(cmd)}\n{proc.stderr}")
        if not quiet:
            print(f"CUDA harness: built {variant} in {time.time() - start:.0f} s: {lib}", flush=True)
    return lib


_loaded = {}


# The forced paths the CUDA tests run every case on (csrc/cuda/paths.h): the custom kernels with
# 16 x 16 split-reduction tiles, with 64 x 64 tiles, and the vendor path (cuBLAS on the GPU, the
# harness's float64 reference for it on the CPU, behind the same host code).
PATHS = ("split", "wide", "vendor")
_PATH_SETTINGS = {
    "split": ("custom", {"wide_tile_min_tiles": 1e30}),
    "wide": ("custom", {"wide_tile_min_tiles": 0}),
    "vendor": ("vendor", {}),
    "auto": ("auto", {}),
}


class Target:
    """Where a CUDA test case runs: on the GPU ("cuda": torch.ops.dynnet on CUDA tensors) or in
    the harness ("harness": the same launchers and kernels on CPU tensors), on one forced path
    (PATHS, or "auto"). An id is "<target>-<path>", e.g. "harness-split"."""

    def __init__(self, name, path="auto"):
        if "-" in name:
            name, path = name.split("-", 1)
        if path not in _PATH_SETTINGS:
            raise ValueError(f"CUDA harness: unknown path {path!r} ({', '.join(_PATH_SETTINGS)})")
        self.name, self.path = name, path
        self.device = "cuda" if name == "cuda" else "cpu"  # where its tensors live

    @property
    def ops(self):
        return torch.ops.dynnet if self.name == "cuda" else load()

    @property
    def controls(self):
        """The module holding this target's dispatch state (set_cuda_path, the table)."""
        if self.name == "cuda":
            import dynnet_ext.ops
            return dynnet_ext.ops._C
        return load()

    @contextlib.contextmanager
    def forced(self):
        """Within the `with` block the CUDA ops of this target take its path."""
        path, table = _PATH_SETTINGS[self.path]
        c = self.controls
        previous_path, previous_table = c.set_cuda_path(path), c.set_cuda_dispatch_table(table)
        try:
            yield self
        finally:
            c.set_cuda_path(previous_path)
            c.set_cuda_dispatch_table(previous_table)

    def __repr__(self):
        return f"{self.name}-{self.path}"


@contextlib.contextmanager
def schedule(target, order):
    """Within the `with` block the harness runs threads and blocks in `order` ('forward' or
    'reverse'); on the GPU nothing changes."""
    if target.name != "harness":
        yield
        return
    module = load()
    module.set_schedule(order)
    try:
        yield
    finally:
        module.set_schedule("forward")


def targets(paths=PATHS):
    """pytest params "<target>-<path>" for the CUDA tests; the GPU ones skip without a GPU."""
    gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
    return [pytest.param(f"cuda-{p}", marks=gpu) for p in paths] + [f"harness-{p}" for p in paths]


def forced(request):
    """The body of a `target` fixture: a Target (request.param: an id of targets()) with its path
    forced while the test runs."""
    with Target(request.param).forced() as t:
        yield t


def variant():
    """The variant this process runs: DYNNET_CUDA_HARNESS (plain by default)."""
    return os.environ.get(ENV_VARIANT, "plain")


def load(name=None):
    """Builds (if needed) and imports the harness module of this process's variant."""
    name = name or variant()
    if name not in _loaded:
        if name != "plain" and not _asan_loaded():
            raise RuntimeError(f"CUDA harness: the {name} variant needs libasan preloaded; run it through "
                               "`python tests/cuda_harness.py sanitize` (or with cuda_harness.sanitized_env())")
        path = build(name)
        loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, path)
        spec = importlib.util.spec_from_file_location(MODULE_NAME, path, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        if name == "planted":
            bug = os.environ.get(ENV_PLANTED, "")
            module.set_planted_bug(_bug_id(bug) if bug else 0)
        _loaded[name] = module
    return _loaded[name]


# ---- sanitizer runs -------------------------------------------------------------------------------

def _asan_loaded():
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()


def sanitized_env(variant_name="sanitize"):
    """Environment for a child process that loads an ASan + UBSan harness variant."""
    def lib(name):
        return subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()

    env = dict(os.environ)
    env.update({
        ENV_VARIANT: variant_name,
        # libstdc++ right after libasan: ASan finds __cxa_throw at start-up only if it is loaded
        # by then (python itself does not link it), else the first C++ exception aborts.
        "LD_PRELOAD": f"{lib('libasan.so')} {lib('libstdc++.so')}",
        # Python and torch are not built with ASan: leak checks would report their allocations;
        # UBSan errors are fatal and print a stack.
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        "PYTHONUNBUFFERED": "1",  # a sanitizer ends the process at once: nothing may wait in a buffer
        "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")]),
    })
    return env


# The sanitizer run: the tests with a harness parametrisation, less what adds time but no memory
# accesses of its own - float16 (bfloat16 has the same 2-byte loads), long serial sums, repeats.
HARNESS_TESTS = ["tests/test_cuda_harness.py", "tests/test_linear_relu_cuda.py", "tests/test_dynamic_net_ops.py",
                 "tests/test_cuda_paths.py"]
SANITIZE_SELECTION = "harness and not torch.float16 and not high_precision and not deterministic and not repeats"


def _pytest(args, env, timeout):
    # --capture=sys: a sanitizer's report goes straight to stderr (fd-level capture would swallow
    # it when the sanitizer ends the process).
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--capture=sys", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_sanitized(jobs=None):
    """The harness tests under ASan + UBSan, split over `jobs` processes (the runs are single-threaded)."""
    jobs = jobs or _jobs()
    start = time.time()
    build("sanitize", jobs, quiet=False)
    built = time.time()
    listed = _pytest(["--collect-only", "-q", "-k", SANITIZE_SELECTION, *HARNESS_TESTS], dict(os.environ), 300)
    ids = [line for line in listed.stdout.splitlines() if "::" in line]
    if listed.returncode != 0 or not ids:
        print(listed.stdout[-3000:] + listed.stderr[-3000:])
        return 1
    shards = [ids[i::jobs] for i in range(jobs)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        procs = list(pool.map(lambda shard: _pytest(["-q", *shard], sanitized_env(), 1800), shards))
    failed = False
    for proc in procs:
        lines = proc.stdout.splitlines()
        print("\n".join(lines[-15:] if proc.returncode else lines[-1:]))
        if proc.returncode:
            print(proc.stderr[-8000:])
            failed = True
    print(f"CUDA harness sanitize: {len(ids)} tests in {jobs} processes; build {built - start:.0f} s, "
          f"tests {time.time() - built:.0f} s")
    return 1 if failed else 0


# ---- planted bugs ---------------------------------------------------------------------------------

class Bug:
    """A bug planted in the copy of the kernel sources that the planted build compiles: in `path`,
    inside `context` (unique in the file; `old` by default), `old` becomes

        kind "stmt":  if (DYNNET_PLANTED(id)) { new } else { old }      (old, new: statements)
        kind "expr":  (DYNNET_PLANTED(id) ? (new) : (old))               (old, new: expressions)

    so that with the switch on the kernel runs `new` where it ran `old`. The probe tests must then
    fail with output matching `caught`."""

    def __init__(self, name, path, old, new, kind, caught, what, context=None):
        self.name, self.path, self.old, self.new, self.kind = name, path, old, new, kind
        self.caught, self.what, self.context = caught, what, context or old


WRONG = r"Mismatched elements: \d+ / \d+"
ASAN = r"AddressSanitizer: [a-z-]+"
UBSAN = r"runtime error: [a-z ]+"
BARRIER = r"threads wait at different __syncthreads\(\)"
NEXT_ROUND = "__syncthreads();  // the next round overwrites the tiles"

PLANTED_BUGS = [
    # gemm.cuh: the custom path's tile GEMM, grad_bias column sums, and the launcher
    Bug("gemm-no-barrier-before-fma", "cuda/gemm.cuh", "__syncthreads();", "", "stmt", WRONG,
        "the barrier between storing a tile and reading it removed",
        context="store_operand<T::kBN, kBRed, T>(Bs, b_reg, t);\n    __syncthreads();"),
    Bug("gemm-no-barrier-after-fma", "cuda/gemm.cuh", NEXT_ROUND, "", "stmt", WRONG,
        "the barrier before the next round overwrites the tiles removed"),
    Bug("gemm-divergent-barrier", "cuda/gemm.cuh", NEXT_ROUND, "if (tid < 128) __syncthreads();", "stmt", BARRIER,
        "that barrier reached by half of the block only"),
    Bug("gemm-load-bound-off-by-one", "cuda/gemm.cuh", "r < rows", "r <= rows", "expr", ASAN,
        "a tile load reads one row past the operand", context="    if (r < rows) {"),
    Bug("gemm-mask-flipped", "cuda/gemm.cuh", "m[e] <= acc_t(0)", "m[e] < acc_t(0)", "expr", WRONG,
        "the ReLU mask `y <= 0` of grad_y's tiles flipped to `y < 0`"),
    Bug("gemm-tile-element-not-stored", "cuda/gemm.cuh", "s[4 * q + e][strided] = reg[i][e];",
        "if (q != 1 || e != 2 || strided != 7) s[4 * q + e][strided] = reg[i][e];", "stmt", WRONG,
        "one element of a shared tile never stored (it reads what the previous slice left)"),
    Bug("gemm-epilogue-bound-off-by-one", "cuda/gemm.cuh", "row >= p.rows", "row > p.rows", "expr", ASAN,
        "the epilogue writes one row past C"),
    Bug("gemm-group-sum-skips-a-warp", "cuda/gemm.cuh", "1", "2", "expr", WRONG,
        "the split tile's reduction leaves out warp 1's partial tile", context="int g = 1; g < T::kGroups; ++g"),
    Bug("gemm-no-barrier-before-group-sum", "cuda/gemm.cuh", "__syncthreads();", "", "stmt", WRONG,
        "the barrier between the warps' partial tiles and their sum removed",
        context="    __syncthreads();\n    acc_t v = partial[tid];"),
    Bug("gemm-grid-too-small", "cuda/gemm.cuh", "ceil_div<int64_t>(p.cols, T::kBN)",
        "(p.cols / T::kBN + (p.cols < T::kBN))", "expr", WRONG,
        "the grid misses the last partial column tile (its outputs stay NaN)"),
    Bug("quad-loads-misaligned", "cuda/gemm.cuh", "row_len % 4 == 0", "true", "expr", UBSAN,
        "vector loads allowed on rows whose length is not a multiple of 4 (misaligned 16-byte loads)",
        context="base != nullptr && row_len % 4 == 0"),
    Bug("colsum-bound-off-by-one", "cuda/gemm.cuh", "col < cols", "col <= cols", "expr", ASAN,
        "the column sums read one column past the matrix", context="  if (col < cols) {"),
    Bug("colsum-no-barrier", "cuda/gemm.cuh", "__syncthreads();", "", "stmt", WRONG,
        "the barrier between the warps' column partials and their sum removed",
        context="  partial[warp * 32 + lane] = sum;\n  __syncthreads();"),
    Bug("colsum-mask-flipped", "cuda/gemm.cuh", "static_cast<op_t>(y[at]) <= op_t(0)",
        "static_cast<op_t>(y[at]) < op_t(0)", "expr", WRONG, "grad_bias's ReLU mask flipped"),
    # vendor.cuh: the vendor path's host logic and its own pass
    Bug("vendor-weight-not-transposed", "cuda/vendor.cuh", "blas_ready(w.t())",
        "blas_ready(w.reshape({w.size(1), w.size(0)}))", "expr", WRONG,
        "the forward hands cuBLAS the weight reshaped instead of transposed"),
    Bug("vendor-no-relu", "cuda/vendor.cuh", "relu && !lt_relu", "relu && lt_relu", "expr", WRONG,
        "the vendor forward never applies the ReLU outside the epilogue"),
    Bug("vendor-chunk-sum-skips-last", "cuda/vendor.cuh", "c < chunks", "c < chunks - 1", "expr", WRONG,
        "grad_bias leaves out the last row chunk's partial sums"),
    # dynamic_net.cuh: the one-launch network kernels
    Bug("net-mask-flipped", "cuda/dynamic_net.cuh", "static_cast<acc_t>(h[r * N + c]) <= acc_t(0)",
        "static_cast<acc_t>(h[r * N + c]) < acc_t(0)", "expr", WRONG, "the network backward's ReLU mask flipped"),
    Bug("net-no-barrier-after-forward-slice", "cuda/dynamic_net.cuh",
        "__syncthreads();  // the next slice overwrites sW and sX", "", "stmt", WRONG,
        "the barrier before the next weight slice overwrites the staged one removed"),
    Bug("net-no-barrier-after-backward-slice", "cuda/dynamic_net.cuh",
        "__syncthreads();  // the next slice overwrites sW\n", "", "stmt", WRONG,
        "the backward's barrier before the next weight slice overwrites the staged one removed"),
    Bug("net-no-barrier-before-backward-fma", "cuda/dynamic_net.cuh", "__syncthreads();", "", "stmt", WRONG,
        "the backward's barrier between staging a weight slice and reading it removed",
        context="sW[kk * kMaxWidth + 4 * q + j] = v[j];\n      }\n      __syncthreads();"),
    Bug("net-row-bound-off-by-one", "cuda/dynamic_net.cuh", "r < rows", "r <= rows", "expr", ASAN,
        "the forward layer writes one batch row past its block's rows",
        context="if (i < per_thread && r < rows) {\n        acc_t v = acc[i] + bias;"),
    Bug("net-backward-slice-bound-off-by-one", "cuda/dynamic_net.cuh", "k0 + kk < K", "k0 + kk <= K", "expr", ASAN,
        "the backward stages one weight row past the matrix"),
    Bug("net-smem-too-small", "cuda/dynamic_net.cuh", "kSlice * (width | 1) + kRows * kSlice",
        "kSlice * (width | 1)", "expr", ASAN, "the forward network kernel's dynamic shared memory sized without the x slice"),
    Bug("net-no-smem-opt-in", "cuda/dynamic_net.cuh", "allow_dynamic_smem<net_forward_kernel<scalar_t>>(smem);", "",
        "stmt", r"must opt in", "the forward network kernel launched above 48 KiB without opting in"),
]


def _bug_id(name):
    for i, b in enumerate(PLANTED_BUGS):
        if b.name == name:
            return i + 1
    raise ValueError(f"CUDA harness: no planted bug {name!r}; known: {', '.join(b.name for b in PLANTED_BUGS)}")


def _plant(text, path):
    """text (csrc/<path>) with every bug of that file planted behind its switch."""
    sites = {}  # (context, old) -> [(id, bug)]: bugs at one site become one if / else-if chain
    for i, b in enumerate(PLANTED_BUGS):
        if b.path == path:
            sites.setdefault((b.context, b.old), []).append((i + 1, b))
    for (context, old), bugs in sites.items():
        if text.count(context) != 1 or context.count(old) != 1:
            raise RuntimeError(f"planted bug {bugs[0][1].name}: its text no longer occurs once in csrc/{path}; "
                               "update PLANTED_BUGS in tests/cuda_harness.py to the current kernel")
        if bugs[0][1].kind == "stmt":
            code = "".join(f"if (DYNNET_PLANTED({i})) {{\n{b.new}\n}} else " for i, b in bugs) + f"{{\n{old}\n}}"
        else:
            code = "".join(f"(DYNNET_PLANTED({i}) ? ({b.new}) : " for i, b in bugs) + f"({old})" + ")" * len(bugs)
        text = text.replace(context, context.replace(old, code))
    return text


def _planted_tree(out_dir):
    """A copy of csrc/ with every planted bug behind its switch; returns its root."""
    tree = os.path.join(out_dir, "csrc")
    for folder, _, files in os.walk(CSRC):
        for f in files:
            if f.endswith((".h", ".cuh", ".cpp")):
                src = os.path.join(folder, f)
                rel = os.path.relpath(src, CSRC)
                dst = os.path.join(tree, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with open(src) as fh:
                    text = _plant(fh.read(), rel)
                if not os.path.exists(dst) or open(dst).read() != text:
                    with open(dst, "w") as fh:
                        fh.write(text)
    return tree


# The probe: what each planted bug runs (the harness tests that cover every kernel and path quickly).
PROBE = ["tests/test_cuda_harness.py", "-k", "probe"]


def planted_env(bug=""):
    env = sanitized_env("planted")
    env[ENV_PLANTED] = bug
    return env


def run_planted(names=None, jobs=None):
    bugs = [b for b in PLANTED_BUGS if not names or b.name in names]
    start = time.time()
    build("planted", jobs)
    built = time.time()
    print(f"CUDA harness planted bugs: {len(PLANTED_BUGS)} planted in one build ({built - start:.0f} s)", flush=True)
    proc = _pytest(["-q", *PROBE], planted_env(), timeout=600)  # the control: no bug on
    if proc.returncode != 0:
        print(proc.stdout[-5000:] + proc.stderr[-5000:])
        print("CUDA harness planted bugs: the probe fails with no bug on; fix that first")
        return 1
    print(f"  passes  {'(no bug on)':36s} {time.time() - built:5.1f} s", flush=True)
    def probe(b):
        t0 = time.time()
        proc = _pytest(["-x", "-q", *PROBE], planted_env(b.name), timeout=600)
        return proc, time.time() - t0

    failures = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs or _jobs())) as pool:
        for b, (proc, seconds) in zip(bugs, pool.map(probe, bugs)):
            out = proc.stdout + proc.stderr
            hit = re.search(b.caught, out)
            ok = proc.returncode != 0 and hit is not None
            print(f"  {'caught' if ok else 'MISSED'}  {b.name:36s} {seconds:5.1f} s  by "
                  f"{hit.group(0) if hit else '-'!r}: {b.what}", flush=True)
            if not ok:
                failures.append(b.name)
                print("\n".join(out.splitlines()[-30:]))
    print(f"CUDA harness planted bugs: {len(bugs) - len(failures)} of {len(bugs)} caught, {time.time() - start:.0f} s "
          "in all")
    return 1 if failures else 0


def pytest_terminal_summary(terminalreporter):
    """As a pytest plugin (`-p cuda_harness`): what the harness launched in this session."""
    module = _loaded.get(variant())
    if module is None:
        return
    per_kernel = {}
    for name, st in module.kernel_stats().items():
        base = re.sub(r"<.*", "", name).split("::")[-1]
        row = per_kernel.setdefault(base, {"instantiations": 0, "launches": 0, "blocks": 0, "threads": 0, "barriers": 0})
        row["instantiations"] += 1
        for key in ("launches", "blocks", "threads", "barriers"):
            row[key] += st[key]
    write = terminalreporter.write_line
    write(f"CUDA harness ({variant()}): kernel, instantiations run, launches, blocks, threads, barriers opened")
    for base, row in sorted(per_kernel.items()):
        write(f"  {base:22s} {row['instantiations']:4d} {row['launches']:8d} {row['blocks']:9d} {row['threads']:11d} "
              f"{row['barriers']:9d}")
    total = {k: sum(r[k] for r in per_kernel.values()) for k in ("instantiations", "launches", "blocks", "threads",
                                                                  "barriers")}
    write(f"  {'all':22s} {total['instantiations']:4d} {total['launches']:8d} {total['blocks']:9d} "
          f"{total['threads']:11d} {total['barriers']:9d}")


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "build":
        print(build(rest[0] if rest else "plain", quiet=False))
        return 0
    if cmd == "sanitize":
        return run_sanitized()
    if cmd == "planted":
        return run_planted(rest or None)
    if cmd == "stats":
        build("plain", quiet=False)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]))
        proc = _pytest(["-q", "-p", "cuda_harness", "-k", "harness", *HARNESS_TESTS], env, timeout=3600)
        print("\n".join(proc.stdout.splitlines()[-14:]))
        return proc.returncode
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
