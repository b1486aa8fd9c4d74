"""The one-command GPU check (``scripts/gpu_check.sh``, ``DEQ.gpu_check``), tested without a GPU.

Its steps' machinery runs on stand-in commands (a step that passes, one that fails, one that hangs, one the
budget cannot hold); its real steps are checked to name scripts, configs and flags that exist and tests
that ``-m cuda`` selects; on this machine (no CUDA) the script itself must refuse in one line.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from DEQ import gpu_check
from DEQ.gpu_check import Step, default_steps, device_slug, run_checks

PY = sys.executable


def test_device_slug():
    assert device_slug("NVIDIA H200") == "nvidia-h200"
    assert device_slug("NVIDIA GeForce RTX 4090 (laptop)") == "nvidia-geforce-rtx-4090-laptop"
    assert device_slug("!!") == "cuda-device"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run the check")
def test_without_cuda_the_script_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "VENV": os.path.dirname(os.path.dirname(PY))}
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--out-dir", str(tmp_path / "gpu")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no CUDA GPU here") and not res.stdout.strip()
    assert not (tmp_path / "gpu").exists()


def test_a_failing_or_hanging_step_is_recorded_and_the_next_runs(tmp_path):
    steps = [Step("passes", (PY, "-c", "print('all good')"), 30),
             Step("fails", (PY, "-c", "import sys; print('broken'); sys.exit(3)"), 30),
             Step("hangs", (PY, "-c", "import time; print('waiting', flush=True); time.sleep(60)"), 2),
             Step("passes again", (PY, "-c", "print('still here')"), 30)]
    report = tmp_path / "gpu" / "dev.md"
    lines = []
    outcomes = run_checks(steps, str(report), ["# GPU check: test device"], str(tmp_path), budget=120,
                          log=lines.append)
    assert [o.status for o in outcomes] == ["ok", "exit 3", "timed out after 2 s", "ok"]
    assert outcomes[2].seconds < 30 and "waiting" in outcomes[2].output
    text = report.read_text()
    assert text.startswith("# GPU check: test device\n")
    for i, (title, status, output) in enumerate((("passes", "ok", "all good"), ("fails", "exit 3", "broken"),
                                                 ("hangs", "timed out after 2 s", "waiting"),
                                                 ("passes again", "ok", "still here")), 1):
        assert f"| {i}. {title} | {status} |" in text and f"## {i}. {title}" in text and output in text
    assert len(lines) == 8


def test_steps_the_budget_cannot_hold_are_skipped(tmp_path, monkeypatch):
    """A step runs for at most what is left of the budget; once too little is left, the rest are skipped."""
    monkeypatch.setattr(gpu_check, "MIN_STEP_SECONDS", 1)
    steps = [Step("slow", (PY, "-c", "import time; time.sleep(60)"), 60),
             Step("never", (PY, "-c", "print('x')"), 60)]
    outcomes = run_checks(steps, str(tmp_path / "r.md"), ["# t"], str(tmp_path), budget=2, log=lambda line: None)
    assert outcomes[0].status.startswith("timed out") and outcomes[1].status.startswith("skipped")
    assert "| 2. never | skipped" in (tmp_path / "r.md").read_text()


def test_the_whole_check_stays_within_eight_minutes():
    """The budget, plus the 10 s a killed step gets to stop, fits 8 minutes; no step may take longer alone."""
    assert gpu_check.BUDGET_SECONDS + 10 <= 8 * 60
    assert all(s.timeout <= gpu_check.BUDGET_SECONDS for s in default_steps())


def _help_text(script, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(f"gpucheck_{os.path.basename(script)[:-3]}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exc:
        module.main()
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_the_real_steps_name_scripts_configs_and_flags_that_exist(monkeypatch, capsys):
    for step in default_steps(PY)[1:]:
        script = os.path.join(ROOT, step.argv[1])
        assert os.path.isfile(script), step
        help_text = _help_text(script, monkeypatch, capsys)
        for token in step.argv[2:]:
            if token.startswith("--"):
                assert token in help_text, (step.title, token)
            elif token.endswith(".yaml"):
                assert os.path.isfile(os.path.join(ROOT, token)), token
    from SRS.benchmark import RANDOM_INIT_METHODS
    for step in default_steps(PY)[4:]:
        methods = step.argv[step.argv.index("--methods") + 1:step.argv.index("--fixed_K")]
        assert set(methods) <= set(RANDOM_INIT_METHODS) and "MDEQ-30A" in methods


def test_cuda_marker_selects_the_tests_that_need_cuda():
    """pytest -m cuda (the first step) collects exactly the tests that skip without CUDA."""
    argv = list(default_steps(PY)[0].argv) + ["--collect-only"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stdout[-2000:]
    collected = {line.strip() for line in res.stdout.splitlines() if "::" in line}
    assert collected == {"tests/test_compile.py::test_eager_and_compiled_certificates_agree_cuda",
                         "tests/test_compile.py::test_compiled_training_step_agrees_cuda",
                         "tests/test_compile_fallback.py::test_auto_keeps_a_real_compile_on_cuda",
                         "tests/test_attacks.py::test_attacks_on_cuda_match_cpu_with_a_cpu_generator"}, collected
