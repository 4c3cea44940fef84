"""The CUDA path controls. The CUDA ops run each call on one of two paths (csrc/cuda/paths.h:
"custom", the project's kernels, or "vendor", cuBLAS/cuBLASLt through ATen; for the whole-network
op "one-launch" or "chain" of layer ops), chosen by one rule from one table of thresholds. These
functions read and change the rule's state; they work on any build (the rule is plain C++), so
the rule can be inspected and tested without a GPU.

DYNNET_EXT_CUDA_TABLE=FILE (a measured table, scripts/gpu_check.sh's thresholds.json, in place of
the source's defaults) is read on first use - the first call of a function here, or the first
CUDA call of a functional form, module or DynamicNet - not at import, and a wrong file fails that
call: silently running on other thresholds would be worse."""

import json
import os

import torch

from .library import _C, require_C

CUDA_PATHS = ("auto", "custom", "vendor")
CUDA_PRECISIONS = ("float64", "float32", "tf32", "float16", "bfloat16")

ENV_TABLE = "DYNNET_EXT_CUDA_TABLE"
env_table_applied = False


def apply_env_table():
    """Loads DYNNET_EXT_CUDA_TABLE into the live table once, the first time a CUDA path is used.
    A wrong file raises here, naming the variable, each time until it is fixed or unset."""
    global env_table_applied
    if env_table_applied:
        return
    path = os.environ.get(ENV_TABLE)
    if path and _C is not None:
        try:
            _load(path)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"dynnet_ext: {ENV_TABLE}={path} could not be loaded: {exc}") from exc
    env_table_applied = True


def _C_for(what):
    lib = require_C(what)
    apply_env_table()
    return lib


def cuda_path():
    """The forced CUDA path: 'auto' (the rule decides), 'custom' or 'vendor'. Set at load from
    DYNNET_EXT_CUDA_PATH, changed by set_cuda_path."""
    return _C_for("cuda_path").cuda_path()


def set_cuda_path(path):
    """Force every CUDA op onto one path ('custom', 'vendor') or let the rule choose ('auto');
    returns the previous setting. For tests and benchmarks: results are equal within the
    dtype's tolerance on every path, not bit for bit."""
    return _C_for("set_cuda_path").set_cuda_path(path)


def cuda_dispatch_table():
    """The live CUDA dispatch table: {entry: {precision: flops} or value} (csrc/cuda/paths.h)."""
    return _C_for("cuda_dispatch_table").cuda_dispatch_table()


def set_cuda_dispatch_table(changes):
    """Change entries of the live table (any subset of cuda_dispatch_table()'s keys and
    precisions); returns the previous table. reset_cuda_dispatch_table() restores the defaults."""
    return _C_for("set_cuda_dispatch_table").set_cuda_dispatch_table(dict(changes))


def reset_cuda_dispatch_table():
    _C_for("reset_cuda_dispatch_table").reset_cuda_dispatch_table()


def cuda_precision(dtype):
    """What the CUDA GEMMs of `dtype` compute in, the dispatch table's column: float32 is 'tf32'
    exactly where stock's cuBLAS GEMMs use TF32 (torch.backends.cuda.matmul.fp32_precision,
    inheriting torch.backends.fp32_precision, or the legacy allow_tf32 /
    torch.set_float32_matmul_precision), else 'float32'. The launchers' own function
    (csrc/cuda/precision.h) answers, so this is what the CUDA ops choose by."""
    names = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    if dtype not in names:
        raise ValueError(f"dynnet_ext: no CUDA kernels for {dtype} (float64, float32, float16, bfloat16)")
    return _C_for("cuda_precision").cuda_gemm_precision(names[dtype])


def cuda_choose_layer(dtype, M, K, N, backward=False):
    """The path ('custom' or 'vendor') a CUDA layer op would take for x (M, K) and weight (N, K)."""
    return _C_for("cuda_choose_layer").cuda_choose_layer(cuda_precision(dtype), M, K, N, backward)


def cuda_choose_net(dtype, M, D_in, H, D_out, depth):
    """The path ('one-launch' or 'chain') a CUDA network op would take."""
    return _C_for("cuda_choose_net").cuda_choose_net(cuda_precision(dtype), M, D_in, H, D_out, depth)


def _load(path):
    with open(path) as f:
        data = json.load(f)
    table = data.get("table", data) if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise ValueError(f"dynnet_ext: {path} holds no dispatch table (a JSON object with a 'table' object)")
    return require_C("load_cuda_dispatch_table").set_cuda_dispatch_table(dict(table))


def load_cuda_dispatch_table(path):
    """Set the live table from a thresholds file (the crossover sweep's thresholds.json, or any
    JSON with a "table" dict shaped like cuda_dispatch_table()); returns the previous table."""
    apply_env_table()
    return _load(path)
