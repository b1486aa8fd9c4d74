"""The one-command GPU check (``scripts/gpu_check.sh``): does this CUDA machine run the toolkit, and how fast?

Steps (:func:`default_steps`) run as subprocesses with their own timeouts within ``BUDGET_SECONDS``; a failed or
timed-out step is recorded and the next one runs; the report is rewritten after each step.  No data set, no
download.  Steps and report: docs/gpu.md.
"""
from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .errors import ArgumentParser, cli_main

BUDGET_SECONDS = 450          # all steps together (a killed step gets 10 s more to stop): within 8 minutes
MIN_STEP_SECONDS = 20         # a step is skipped when less than this is left of the budget
OUTPUT_CHARS = 20000          # the tail of a step's output kept in the report
LARGE = "experiments/cifar/cls_mdeq_LARGE.yaml"
SMALL = "experiments/cifar/cls_mdeq_SMALL.yaml"


@dataclass(frozen=True)
class Step:
    """One check: a title, the command (argv) and its timeout in seconds."""
    title: str
    argv: Tuple[str, ...]
    timeout: int


@dataclass
class Outcome:
    """What a step did.

    Attributes:
        status: 'ok', 'exit N', 'timed out after T s', 'skipped (...)' or 'could not start (...)'.
        seconds: its wall-clock time.
        output: its stdout and stderr together (the last ``OUTPUT_CHARS`` characters).
    """
    step: Step
    status: str
    seconds: float
    output: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def default_steps(python: str = sys.executable) -> List[Step]:
    """The checks of ``scripts/gpu_check.sh`` (see the module docstring), run with ``python``."""
    bench_gpu = ("scripts/bench_gpu.py", "--batch", "400", "--reps", "5", "--compile", "off", "on",
                 "--precision", "fp32", "bf16", "--methods")
    certify = ("scripts/bench_certify.py", "--random-init", LARGE, "--images", "1", "--N0", "100", "--N", "10000",
               "--batch", "400", "--device", "cuda", "--methods", "MDEQ-30A", "SRS-MDEQ-1A")
    return [
        Step("CUDA tests (pytest -m cuda)", (python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                                             "tests"), 150),
        Step("compiled vs eager, random-init MDEQ-SMALL", (python, "scripts/check_compile.py", "--cfg", SMALL,
                                                            "--precision", "fp32", "bf16", "--batch", "200"), 100),
        Step("bench_gpu.py, random-init MDEQ-LARGE", (python, bench_gpu[0], "--cfg", LARGE) + bench_gpu[1:], 150),
        Step("bench_gpu.py, random-init MDEQ-SMALL", (python, bench_gpu[0], "--cfg", SMALL) + bench_gpu[1:], 90),
        Step("bench_certify.py --random-init MDEQ-LARGE, SRS-1A fixed K 400",
             (python,) + certify + ("--fixed_K", "400"), 90),
        Step("bench_certify.py --random-init MDEQ-LARGE, default SRS (adaptive pairing)",
             (python,) + certify + ("--fixed_K", "0"), 90),
    ]


def device_slug(name: str) -> str:
    """A file name for a device name: lower case, runs of other characters as one '-' ('NVIDIA H200' ->
    'nvidia-h200')."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda-device"


def run_step(step: Step, cwd: str, timeout: Optional[float] = None) -> Outcome:
    """Run ``step`` in ``cwd`` (its own process group, killed whole on timeout) and record what it did.

    Args:
        timeout: seconds it may take (default ``step.timeout``).
    """
    limit = step.timeout if timeout is None else timeout
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (cwd, os.environ.get("PYTHONPATH", "")) if p)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(step.argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
    except OSError as exc:
        return Outcome(step, f"could not start ({exc.strerror or exc})", 0.0, "")
    try:
        out, _ = proc.communicate(timeout=limit)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        status = f"timed out after {limit:.0f} s"
    return Outcome(step, status, time.perf_counter() - t0, (out or "")[-OUTPUT_CHARS:])


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the step's process group, SIGKILL it 10 s later if it is still there."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def run_checks(steps: Sequence[Step], report_path: str, header: Sequence[str], cwd: str,
               budget: float = BUDGET_SECONDS, log=lambda line: print(line, flush=True)) -> List[Outcome]:
    """Run ``steps`` in order within ``budget`` seconds, rewriting the report after each one.

    Each step runs for at most its own timeout and what is left of the budget; once less than
    ``MIN_STEP_SECONDS`` is left, the remaining steps are recorded as skipped.

    Returns:
        the outcomes, one per step.
    """
    start, outcomes = time.perf_counter(), []
    os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
    for i, step in enumerate(steps, 1):
        left = budget - (time.perf_counter() - start)
        if left < MIN_STEP_SECONDS:
            outcome = Outcome(step, f"skipped (the {budget:.0f} s budget is spent)", 0.0, "")
        else:
            log(f"[gpu_check] {i}/{len(steps)} {step.title} (timeout {min(step.timeout, left):.0f} s)")
            outcome = run_step(step, cwd, min(step.timeout, left))
        outcomes.append(outcome)
        log(f"[gpu_check] {i}/{len(steps)} {step.title}: {outcome.status} ({outcome.seconds:.0f} s)")
        with open(report_path, "w") as fh:
            fh.write(report_markdown(header, outcomes, steps))
    return outcomes


def report_markdown(header: Sequence[str], outcomes: Sequence[Outcome], steps: Sequence[Step]) -> str:
    """The report: the header lines, the status table (steps not run yet marked so), then every step's
    command, status and output."""
    lines = list(header) + ["", "| step | status | seconds |", "|---|---|---:|"]
    for i, step in enumerate(steps):
        o = outcomes[i] if i < len(outcomes) else None
        lines.append(f"| {i + 1}. {step.title} | {o.status if o else 'not run yet'} | "
                     f"{f'{o.seconds:.0f}' if o else '-'} |")
    for i, o in enumerate(outcomes, 1):
        command = " ".join(o.step.argv[1:] if o.step.argv and o.step.argv[0] == sys.executable else o.step.argv)
        lines += ["", f"## {i}. {o.step.title}", "", f"`python {command}`" if command else "", "",
                  f"status: **{o.status}** ({o.seconds:.1f} s; timeout {o.step.timeout} s)"]
        if o.output.strip():
            lines += ["", "```text", o.output.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def report_header(device_name: str, budget: float) -> List[str]:
    """Title and provenance lines: device, torch and CUDA versions, python, date, commit, the check's budget."""
    import torch
    props = torch.cuda.get_device_properties(0)
    commit = _git_commit()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [f"# GPU check: {device_name}", "",
            f"- device: {device_name} (cuda:0 of {torch.cuda.device_count()}, {props.total_memory / 2 ** 30:.1f} GiB, "
            f"compute capability {props.major}.{props.minor})",
            f"- torch {torch.__version__}, CUDA {torch.version.cuda}, python {sys.version.split()[0]}",
            f"- date: {when}",
            f"- commit: {commit or 'unknown (not a git checkout)'}",
            f"- command: `bash scripts/gpu_check.sh` (all steps within {budget:.0f} s, each with its own timeout; "
            f"random-init weights and synthetic images, no data set)"]


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@cli_main
def main(argv=None) -> int:
    """Run the check (``scripts/gpu_check.sh``).  Returns 0 when every step passed, 1 when any failed, and 2
    (one ``error:`` line, nothing run) on a machine without a CUDA GPU."""
    p = ArgumentParser(prog="gpu_check.sh", description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", dest="out_dir", default="reports/gpu", help="folder of the report")
    p.add_argument("--budget", type=float, default=BUDGET_SECONDS, help="seconds for all the steps together")
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print(f"error: no CUDA GPU here (torch {torch.__version__} sees none): run scripts/gpu_check.sh on a machine "
              f"with one", file=sys.stderr)
        return 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    name = torch.cuda.get_device_name(0)
    path = os.path.join(args.out_dir, device_slug(name) + ".md")
    outcomes = run_checks(default_steps(sys.executable), path, report_header(name, args.budget), root, args.budget)
    failed = [o for o in outcomes if not o.ok]
    print(f"[gpu_check] {len(outcomes) - len(failed)} of {len(outcomes)} steps ok; report: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
