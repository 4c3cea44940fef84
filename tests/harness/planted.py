"""Planted bugs: the harness is only worth what it catches. The planted variant compiles a copy of
the kernel sources (build/cuda-harness/planted/csrc/) in which every bug of PLANTED_BUGS is planted,
each behind its own switch (DYNNET_PLANTED(id) in the generated code; the kernels in csrc/ stay as
they are), float32 only (the probe's dtype), under ASan + UBSan. DYNNET_PLANTED_BUG=<name> turns one
bug on. With none on, the probe (tests/test_cuda_harness.py -k probe) must pass; with each one on,
it must fail in the way the bug names (run_planted(), `python tests/cuda_harness.py planted`).

A bug is anchored on code, never on comments: its text is looked for in the source with every
comment blanked out (code_only()) and with any run of whitespace matching any other, so rewording
or adding a comment leaves every anchor in place; a change to the anchored code itself makes the
planted build stop and name the bug to update (tests/test_cuda_harness.py checks each anchor still
matches exactly one place).
"""

import concurrent.futures
import os
import re
import time

from . import CSRC, build, sanitizer

ENV_PLANTED = "DYNNET_PLANTED_BUG"
PLANTED_FLAGS = ["-DDYNNET_HARNESS_FLOAT32_ONLY"]


class Bug:
    """A bug planted in the copy of the kernel sources that the planted build compiles: in `path`
    (relative to csrc/), inside the code `context` (one place in the file; `old` by default), the
    code `old` (once in `context`) becomes

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
# The barrier that ends a round of the tile GEMM's main loop (after the FMAs, before the next
# round's stores overwrite the tiles).
NEXT_ROUND = "acc[i][j] += a[i] * b[j];\n    }\n    __syncthreads();"

PLANTED_BUGS = [
    # gemm.cuh: the custom path's tile GEMM, grad_bias column sums, and the launcher
    Bug("gemm-no-barrier-before-fma", "cuda/gemm.cuh", "__syncthreads();", "", "stmt", WRONG,
        "the barrier between storing a tile and reading it removed",
        context="store_operand<T::kBN, kBRed, T>(Bs, b_reg, t);\n    __syncthreads();"),
    Bug("gemm-no-barrier-after-fma", "cuda/gemm.cuh", "__syncthreads();", "", "stmt", WRONG,
        "the barrier before the next round overwrites the tiles removed", context=NEXT_ROUND),
    Bug("gemm-divergent-barrier", "cuda/gemm.cuh", "__syncthreads();", "if (tid < 128) __syncthreads();", "stmt",
        BARRIER, "that barrier reached by half of the block only", context=NEXT_ROUND),
    Bug("gemm-load-bound-off-by-one", "cuda/gemm.cuh", "r < rows", "r <= rows", "expr", ASAN,
        "a tile load reads one row past the operand", context="    if (r < rows) {"),
    Bug("gemm-quad-loads-skip-grad", "cuda/gemm.cuh", "pre_activation_grad<scalar_t>(act, v[e], m[e])", "v[e]", "expr",
        WRONG, "grad_y's tiles loaded 4 at a time without the activation's mask or derivative"),
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
    Bug("colsum-skips-grad", "cuda/gemm.cuh", "pre_activation_grad<scalar_t>(act, v, static_cast<op_t>(y[at]))", "v",
        "expr", WRONG, "grad_bias's column sums without the activation's mask or derivative"),
    # activation.cuh and the epilogue: the activations
    Bug("relu-mask-flipped", "cuda/activation.cuh", "s <= acc_t(0)", "s < acc_t(0)", "expr", WRONG,
        "ReLU's backward mask `y <= 0` flipped to `y < 0`"),
    Bug("gelu-derivative-wrong-branch", "cuda/activation.cuh", "act == Activation::GeluTanh",
        "act == Activation::GeluTanh || act == Activation::Gelu", "expr", WRONG,
        "exact GELU's derivative takes the tanh approximation's branch",
        context="if (act == Activation::GeluTanh) {\n    const T z2"),
    Bug("epilogue-z-not-saved-for-one-tile", "cuda/gemm.cuh", "p.z != nullptr",
        "p.z != nullptr && (row >= 16 || col >= 16)", "expr", WRONG, "the pre-activation z not written for the first tile's outputs"),
    Bug("epilogue-no-smooth-activation", "cuda/gemm.cuh", "is_smooth(p.act)", "false", "expr", WRONG,
        "the forward epilogue skips a smooth activation (y = z)"),
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
    Bug("net-no-barrier-after-forward-slice", "cuda/dynamic_net.cuh", "__syncthreads();", "", "stmt", WRONG,
        "the barrier before the next weight slice overwrites the staged one removed",
        context="acc[i] += a * w;\n          }\n        }\n      }\n    }\n    __syncthreads();"),
    Bug("net-no-barrier-after-backward-slice", "cuda/dynamic_net.cuh", "__syncthreads();", "", "stmt", WRONG,
        "the backward's barrier before the next weight slice overwrites the staged one removed",
        context="acc[i] += in_s[(g + i * groups) * ld_in + k0 + kk] * w;\n        }\n      }\n      __syncthreads();"),
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


def bug_id(name):
    """The switch number of a planted bug (1 and up; 0 is no bug)."""
    for i, b in enumerate(PLANTED_BUGS):
        if b.name == name:
            return i + 1
    raise ValueError(f"CUDA harness: no planted bug {name!r}; known: {', '.join(b.name for b in PLANTED_BUGS)}")


# ---- anchoring on code --------------------------------------------------------------------------

def code_only(text):
    """C++ source `text` with every comment blanked out: each of a comment's characters becomes a
    space, its newlines stay, so an offset into the result is the same offset into `text`. String
    and character literals are skipped over (a "//" inside one starts no comment)."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out[i:j] = " " * (j - i)
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out[i:j] = [ch if ch == "\n" else " " for ch in text[i:j]]
            i = j
        else:
            i += 1
    return "".join(out)


def _pattern(snippet):
    """A regex for the code `snippet`: its characters as they are, any run of whitespace in it
    matching any run of whitespace (a blanked comment is whitespace)."""
    return re.compile(r"\s+".join(re.escape(part) for part in re.split(r"\s+", snippet)))


def anchor_matches(bug, text):
    """Where `bug` lands in the source `text`: (every match of its context in the code of text,
    every match of its old code inside the first of those)."""
    code = code_only(text)
    contexts = list(_pattern(bug.context).finditer(code))
    olds = list(_pattern(bug.old).finditer(code, contexts[0].start(), contexts[0].end())) if contexts else []
    return contexts, olds


def plant(text, path):
    """text (csrc/<path>) with every bug of that file planted behind its switch."""
    sites = {}  # (start, end) of the old code -> [(id, bug)]: bugs at one site become one if / else-if chain
    for i, b in enumerate(PLANTED_BUGS):
        if b.path != path:
            continue
        contexts, olds = anchor_matches(b, text)
        if len(contexts) != 1 or len(olds) != 1:
            raise RuntimeError(f"planted bug {b.name}: its code no longer occurs once in csrc/{path} (context found "
                               f"{len(contexts)} times, the code it changes {len(olds)} times in it); update "
                               "PLANTED_BUGS in tests/harness/planted.py to the current kernel")
        sites.setdefault(olds[0].span(), []).append((i + 1, b))
    spans = sorted(sites)
    for first, second in zip(spans, spans[1:]):
        if second[0] < first[1]:
            raise RuntimeError(f"planted bugs {sites[first][0][1].name} and {sites[second][0][1].name}: the code "
                               f"they change overlaps in csrc/{path}")
    code = code_only(text)
    for (start, end), bugs in sorted(sites.items(), reverse=True):  # from the end: earlier offsets stay valid
        old = code[start:end]  # the old code without the comments inside it
        if bugs[0][1].kind == "stmt":
            new = "".join(f"if (DYNNET_PLANTED({i})) {{\n{b.new}\n}} else " for i, b in bugs) + f"{{\n{old}\n}}"
        else:
            new = "".join(f"(DYNNET_PLANTED({i}) ? ({b.new}) : " for i, b in bugs) + f"({old})" + ")" * len(bugs)
        text = text[:start] + new + text[end:]
    return text


def planted_tree(out_dir):
    """Writes a copy of csrc/ with every planted bug behind its switch into out_dir/csrc; returns its root."""
    tree = os.path.join(out_dir, "csrc")
    for folder, _, files in os.walk(CSRC):
        for f in files:
            if f.endswith((".h", ".cuh", ".cpp")):
                src = os.path.join(folder, f)
                rel = os.path.relpath(src, CSRC)
                dst = os.path.join(tree, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with open(src) as fh:
                    text = plant(fh.read(), rel)
                if not os.path.exists(dst) or open(dst).read() != text:
                    with open(dst, "w") as fh:
                        fh.write(text)
    return tree


def build_planted(n_jobs=None, quiet=True):
    """Builds the planted variant (if not up to date); returns its .so path."""
    return build.build("planted", n_jobs, quiet, kernels=lambda out_dir: (planted_tree(out_dir), PLANTED_FLAGS))


# ---- the run: every planted bug caught ----------------------------------------------------------

# The probe: what each planted bug runs (the harness tests that cover every kernel and path quickly).
PROBE = ["tests/test_cuda_harness.py", "-k", "probe"]


def planted_env(bug=""):
    env = sanitizer.sanitized_env("planted")
    env[ENV_PLANTED] = bug
    return env


def run_planted(names=None, n_jobs=None):
    """The probe with no bug on (must pass), then with each bug of `names` (all by default) on
    (each must fail as the bug says); returns the exit code."""
    bugs = [b for b in PLANTED_BUGS if not names or b.name in names]
    start = time.time()
    build_planted(n_jobs)
    built = time.time()
    print(f"CUDA harness planted bugs: {len(PLANTED_BUGS)} planted in one build ({built - start:.0f} s)", flush=True)
    proc = sanitizer.run_pytest(["-q", *PROBE], planted_env(), timeout=600)  # the control: no bug on
    if proc.returncode != 0:
        print(proc.stdout[-5000:] + proc.stderr[-5000:])
        print("CUDA harness planted bugs: the probe fails with no bug on; fix that first")
        return 1
    print(f"  passes  {'(no bug on)':36s} {time.time() - built:5.1f} s", flush=True)

    def probe(b):
        t0 = time.time()
        proc = sanitizer.run_pytest(["-x", "-q", *PROBE], planted_env(b.name), timeout=600)
        return proc, time.time() - t0

    failures = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, n_jobs or build.jobs())) as pool:
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
