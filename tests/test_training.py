"""The seed's 100-epoch training, fused against stock, and the command line."""

import subprocess
import sys

import pytest

from dynnet_ext import cli


@pytest.mark.parametrize("impl", ["fused", "fused-layer"])
def test_seed_training_same_losses_fused_and_stock(impl):
    fused, _, depths_f = cli.train(epochs=100, impl=impl, seed=0)
    stock, _, depths_s = cli.train(epochs=100, impl="stock", seed=0)
    assert depths_f == depths_s and len(set(depths_f)) == 4
    assert len(fused) == 100
    for epoch, (a, b) in enumerate(zip(fused, stock)):
        assert abs(a - b) <= 1e-4 * abs(b), f"epoch {epoch}: fused {a} vs stock {b}"
    assert fused[-1] < fused[0]  # it trains


def test_different_seeds_differ():
    a, _, _ = cli.train(epochs=2, seed=0)
    b, _, _ = cli.train(epochs=2, seed=1)
    assert a != b


def test_cli_train_prints_losses_and_summary(capsys):
    assert cli.main(["train", "--epochs", "3", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    epochs = [line for line in out.splitlines() if line.startswith("[")]
    assert len(epochs) == 3 and all(" loss " in line for line in epochs)
    assert "impl=fused device=cpu epochs=3" in out and "step time median" in out


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        cli.main(["train", "--impl", "nope"])
    with pytest.raises(SystemExit, match="--epochs must be at least 1"):
        cli.main(["train", "--epochs", "0"])


def test_cli_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CPU kernels: yes" in out and "compiled against torch" in out


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "dynnet_ext", "train", "--epochs", "2", "--impl", "stock"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "done: 2 steps" in proc.stdout
