"""The README's example runs as written, and its test command is the one CI runs."""

import os
import re

import torch

from torchrun import torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_python_example_runs():
    code = re.search(r"```python\n(.*?)```", readme(), re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["out"].shape == (64, 10)


def test_fuse_example_runs(capsys):
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme(), re.S) if "dynnet_ext.fuse(" in b]
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    from dynnet_ext.nn import FusedLinearReLU

    fused, model, report = namespace["fused"], namespace["model"], namespace["report"]
    assert [type(m) for m in fused][:4] == [FusedLinearReLU, torch.nn.Identity, FusedLinearReLU, torch.nn.Identity]
    assert len(report.fused) == 2 and report.skipped == []
    assert {id(p) for p in fused.parameters()} == {id(p) for p in model.parameters()}
    printed = capsys.readouterr().out.splitlines()[0]
    assert f"# {printed}" in blocks[0]  # the comment shows what print(report) prints


def test_activations_example_runs():
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme(), re.S) if "FusedLinearGELU(" in b]
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    gelu, silu = namespace["gelu"], namespace["silu"]
    assert (gelu.activation, silu.activation) == ("gelu_tanh", "silu")
    torch.testing.assert_close(namespace["y"], gelu(namespace["x"]))


def test_exactly_two_setup_commands_and_ci_reads_the_test_one():
    text = readme()
    setup = text[text.index("## Set up"):text.index("Notes on the build")]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert len(commands) == 2
    assert commands[0].endswith("python -m dynnet_ext train")
    assert commands[1].endswith("python -m pytest")
    marker = text.index("<!-- test-command -->")
    assert text.index(commands[1]) > marker
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "<!-- test-command -->" in f.read()


# What "Scaling out" advises after destroy_process_group.
EXIT = "import sys\nsys.stdout.flush()\nsys.stderr.flush()\nos._exit(0)\n"


def test_scaling_out_recipes_run_under_torchrun(tmp_path):
    """The FSDP2 and tensor-parallel scripts of "Scaling out" run as written, one after the
    other in the same 2 processes (one torchrun: the process group the first starts, the second
    uses, so the first's last line and the second's init_process_group are left out). After the
    last line each rank says so and leaves without the interpreter's teardown, as the README
    advises (dynnet_ext.cli.run says why)."""
    text = readme()
    section = text[text.index("## Scaling out"):text.index("## How it works")]
    fsdp, tp = re.findall(r"```python\n(.*?)```", section, re.S)
    assert "fully_shard" in fsdp and "parallelize_module" in tp
    end, start = "dist.destroy_process_group()\n", 'dist.init_process_group("gloo")\n'
    assert fsdp.endswith(end) and tp.count(start) == 1
    path = tmp_path / "recipes.py"
    assert tp.endswith(end) and "`os._exit(0)`" in section
    # Each rank marks its finish in a file of its own (both ranks share one stdout).
    rank = f"import os\nopen(os.path.join({str(tmp_path)!r}, 'finished.' + os.environ['RANK']), 'w').close()\n"
    path.write_text(fsdp[:-len(end)] + tp.replace(start, "") + rank + EXIT)
    proc = torchrun(str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("finished.*")) == ["finished.0", "finished.1"]


def test_train_summary_shown_as_train_prints_it(capsys):
    # The summary lines the README shows are the ones `train` prints, numbers aside.
    shown = re.search(r"```\n(done: .*?)```", readme(), re.S).group(1).splitlines()
    from dynnet_ext import cli

    assert cli.main(["train", "--epochs", "2"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines()
               if line.startswith(("done: ", "dynnet kernels run: "))]

    def form(line):
        return re.sub(r"\d+(\.\d+)?", "#", line)

    assert [form(line) for line in shown] == [form(line) for line in printed]
