"""What the CUDA tests run on: the harness module of this process's variant (load()), and the
targets - the GPU ("cuda") or the harness, on one forced path - with their fixtures. As a pytest
plugin (`-p harness.fixtures`, what `python tests/cuda_harness.py stats` runs) it reports what the
harness launched in the session.

In tests: `load()` gives the module of the variant this process runs (DYNNET_CUDA_HARNESS,
default plain): its linear_relu / linear_relu_backward / dynamic_net / dynamic_net_backward take
CPU tensors and run the CUDA launchers and kernels; set_schedule, kernel_stats and selftest.*
control and test the shim.
"""

import contextlib
import importlib.machinery
import importlib.util
import os
import re

import pytest
import torch

from . import build, planted, sanitizer

_loaded = {}


def variant():
    """The variant this process runs: DYNNET_CUDA_HARNESS (plain by default)."""
    return os.environ.get(build.ENV_VARIANT, "plain")


def load(name=None):
    """Builds (if needed) and imports the harness module of this process's variant."""
    name = name or variant()
    if name not in _loaded:
        if name != "plain" and not sanitizer.asan_loaded():
            raise RuntimeError(f"CUDA harness: the {name} variant needs libasan preloaded; run it through "
                               "`python tests/cuda_harness.py sanitize` (or with harness.sanitizer.sanitized_env())")
        path = planted.build_planted() if name == "planted" else build.build(name)
        loader = importlib.machinery.ExtensionFileLoader(build.MODULE_NAME, path)
        spec = importlib.util.spec_from_file_location(build.MODULE_NAME, path, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        if name == "planted":
            bug = os.environ.get(planted.ENV_PLANTED, "")
            module.set_planted_bug(planted.bug_id(bug) if bug else 0)
        _loaded[name] = module
    return _loaded[name]


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


def pytest_terminal_summary(terminalreporter):
    """As a pytest plugin: what the harness launched in this session."""
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
