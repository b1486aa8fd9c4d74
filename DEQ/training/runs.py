"""Run folders and the run's log: the folder name, the refusal of a folder that holds another run, the undo
of a failed start, ``--overwrite``'s deletion, and the ``deq`` log (file, console, held records, silence
on ranks other than 0).
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Optional

from ..checks import check_input_file, check_writable_dir
from ..errors import UserError

RUN_FILES = ("last.pth", "best.pth")


def run_name(cfg_path: Optional[str], noise: float) -> str:
    """The default run folder's name: ``<config file stem>_noise<sigma>`` (``default_noise<sigma>`` without one)."""
    stem = os.path.splitext(os.path.basename(cfg_path or "default"))[0]
    return f"{stem}_noise{noise:g}"


def setup_logging(out_dir: str, quiet: bool = False) -> None:
    """Log to ``out_dir/train.log`` (appended) and, unless quiet, the console.  Called once the run
    can start (data and model built), so a refused or failed start leaves no log behind."""
    os.makedirs(out_dir, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger("deq")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    fh = logging.FileHandler(os.path.join(out_dir, "train.log"))
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if not quiet:
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        root.addHandler(sh)


class HeldLog(logging.Handler):
    """Holds the ``deq`` log records of a block run before the log file may be created; ``replay`` hands
    them to the handlers set up afterwards."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "HeldLog":
        root = logging.getLogger("deq")
        self._saved = root.level, list(root.handlers)
        root.handlers[:] = [self]
        root.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        root = logging.getLogger("deq")
        root.setLevel(self._saved[0])
        root.handlers[:] = self._saved[1]

    def replay(self) -> None:
        root = logging.getLogger("deq")
        for record in self.records:
            root.handle(record)


def silence_logging() -> None:
    """Under torchrun, ranks other than 0 write no log (warnings still reach stderr)."""
    root = logging.getLogger("deq")
    root.handlers.clear()
    root.addHandler(logging.NullHandler())
    root.setLevel(logging.WARNING)


def close_logging() -> None:
    root = logging.getLogger("deq")
    for h in list(root.handlers):
        h.close()
        root.removeHandler(h)


def check_run_folder(out: str, resume: bool, resume_from: Optional[str], overwrite: bool) -> None:
    """Refuse, before any work, a run that would destroy or mix up the checkpoints already in ``out``."""
    if resume and resume_from:
        raise UserError("give --resume (continue the run folder's last.pth) or --resume-from CKPT, not both")
    if overwrite and resume:
        raise UserError("--overwrite deletes the run folder's checkpoints and --resume continues them: "
                        "give one of them")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a run folder; choose another --out")
    check_writable_dir(out, "--out")
    held = [f for f in RUN_FILES if os.path.isfile(os.path.join(out, f))]
    if resume and "last.pth" not in held:
        raise UserError(f"--resume: no checkpoint at {os.path.join(out, 'last.pth')}; start without --resume "
                        f"or pass --resume-from CKPT")
    if resume_from:
        check_input_file(resume_from, "--resume-from checkpoint",
                         "pass a last.pth or best.pth of DEQ/tools/cls_train.py", inside="last.pth")
    if not held or resume or overwrite:
        return
    if resume_from and any(os.path.samefile(resume_from, os.path.join(out, f)) for f in held
                           if os.path.exists(resume_from)):
        return  # continuing this folder's own checkpoint
    raise UserError(f"run folder {out} already holds {' and '.join(held)}: pass --resume to continue it, "
                    f"--overwrite to replace it, or choose another --out")


def snapshot(out: str):
    """(topmost folder this run will create or None, the entries ``out`` holds now)."""
    top, probe = None, os.path.abspath(out)
    while not os.path.exists(probe):
        top, probe = probe, os.path.dirname(probe)
    return top, (set(os.listdir(out)) if os.path.isdir(out) else set())


def undo_failed_start(out: str, top: Optional[str], before: set) -> None:
    """After a failure with no checkpoint written: remove what this run created (log, tb/, the folders)."""
    if not os.path.isdir(out) or any(os.path.isfile(os.path.join(out, f)) for f in RUN_FILES):
        return
    close_logging()
    for name in set(os.listdir(out)) - before:
        full = os.path.join(out, name)
        shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)
    if top is not None:
        folder = os.path.abspath(out)
        while True:
            try:
                os.rmdir(folder)
            except OSError:
                break
            if folder == top:
                break
            folder = os.path.dirname(folder)


def delete_run_files(out: str) -> list:
    """--overwrite: remove the run folder's checkpoints; return the names removed."""
    removed = []
    for name in RUN_FILES:
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
            removed.append(name)
    return removed
