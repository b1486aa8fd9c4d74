"""Certify or predict every chosen test image and write one TSV row per image.

The file starts with ``#`` comment lines (command, versions, seed, checkpoint
hash, settings), then the field's six columns (idx, label, predict, radius,
correct, time) and our diagnostics.  Rows are flushed and fsynced one by one, so
an interrupted run loses at most the image in progress; ``--resume`` drops a
torn last line, checks that the settings match, and continues with the next
image.  Noise is seeded per image from (seed, idx), so a resumed run writes the
same rows an uninterrupted run would.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from tqdm import tqdm

from DEQ.errors import UserError
from DEQ.utils import is_out_of_memory

# Header entries that do not change a row: everything else in the '# key: value' header (sigma, N, tol,
# solvers, certificate, data set path, QCRS search settings, ... and any key added later) must match on
# --resume, and a key present on only one side is refused too.  checkpoint is the path: the file itself
# is checked through checkpoint_sha256.
RESUME_IGNORED_KEYS = frozenset({"command", "versions", "date", "max", "device", "checkpoint", "quiet", "threads",
                                 "guarantee"})


@dataclass
class ResultsFile:
    """Append-only TSV with a metadata header; safe to resume."""
    path: str
    columns: Sequence[str]
    meta: Dict[str, object]
    done: set = field(default_factory=set)
    rows: List[Dict[str, str]] = field(default_factory=list)  # every row in the file, as written (strings)

    def open(self, resume: bool, overwrite: bool) -> "ResultsFile":
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the output folder {folder}: {exc.strerror}; choose a writable OUTFILE") from None
        if os.path.isdir(self.path):
            raise UserError(f"OUTFILE {self.path} is a directory, not a file: pass a file path, e.g. {self.path}/results.tsv")
        exists = os.path.isfile(self.path) and os.path.getsize(self.path) > 0
        if exists and resume:
            self._load_existing()
            mode = "a"
        elif exists and not overwrite:
            raise UserError(f"{self.path} already holds results: pass --resume to continue it, --overwrite to replace it, "
                            f"or choose another OUTFILE")
        else:
            mode = "w"
        try:
            self._fh = open(self.path, mode, buffering=1)
        except OSError as exc:
            raise UserError(f"cannot write {self.path}: {exc.strerror}; choose a writable OUTFILE") from None
        if mode == "w":
            for key, value in self.meta.items():
                self._fh.write(f"# {key}: {_header_value(value)}\n")
            self._fh.write("\t".join(self.columns) + "\n")
            self._sync()
        return self

    def _load_existing(self):
        """Read the file to continue: check its header against this run, keep its rows, cut a torn last row.
        Every refusal leaves the file untouched (the cut comes last)."""
        with open(self.path, "rb") as fh:
            raw = fh.read()
        # torn last row from a crash: drop it, it will be recomputed.  The file itself is only cut
        # below, after the columns and settings checks pass: a refused --resume leaves it untouched.
        cut = len(raw) if raw.endswith(b"\n") else raw.rfind(b"\n") + 1
        torn = cut < len(raw)
        raw, raw_tail = raw[:cut], raw[cut:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or "\x00" in text:
            raise UserError(f"--resume: {self.path} is a binary file, not a results file; choose another OUTFILE "
                            f"(or --overwrite to replace it)")
        old_meta, header, rows = {}, None, []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if header is None and line.startswith("# "):
                key, _, value = line[2:].partition(": ")
                old_meta[key] = value
            elif header is None:
                header = line.split("\t")
            elif line:
                rows.append((lineno, line.split("\t")))
        if header is None and (old_meta or raw_tail.startswith(b"#")):
            raise UserError(f"--resume: the header of {self.path} is incomplete (the run was stopped while writing it, "
                            f"before any row); start it again with --overwrite")
        if not old_meta:
            raise UserError(f"--resume: {self.path} is not a results file of this tool (no '# key: value' header); "
                            f"choose another OUTFILE (or --overwrite to replace it)")
        if header != list(self.columns):
            raise UserError(f"--resume: {self.path} has other columns (another mode or version); use a new OUTFILE")
        self._check_settings(old_meta)
        done, kept = set(), []
        for lineno, fields in rows:
            if len(fields) != len(self.columns) or not fields[0].lstrip("-").isdigit():
                raise UserError(f"--resume: {self.path} line {lineno} is not a row of {len(self.columns)} fields; "
                                f"fix or delete that line, or start again with --overwrite")
            done.add(int(fields[0]))
            kept.append(dict(zip(self.columns, fields)))
        if torn:
            with open(self.path, "r+b") as fh:
                fh.truncate(cut)
        self.done, self.rows = done, kept

    def _check_settings(self, old_meta: Dict[str, str]) -> None:
        """Every header entry outside RESUME_IGNORED_KEYS must be the same, in one line naming the key."""
        new_meta = {k: _header_value(v) for k, v in self.meta.items()}
        for key in list(new_meta) + [k for k in old_meta if k not in new_meta]:
            if key in RESUME_IGNORED_KEYS:
                continue
            if key not in old_meta:
                raise UserError(f"--resume: {self.path} has no '{key}' line in its header (made by an older version?) "
                                f"and this run has {key}={new_meta[key]}; rerun with the same settings or use a new OUTFILE")
            if key not in new_meta:
                raise UserError(f"--resume: {self.path} was made with {key}={old_meta[key]}, a setting this run does "
                                f"not have; rerun with the same settings or use a new OUTFILE")
            if old_meta[key] != new_meta[key]:
                raise UserError(f"--resume: {self.path} was made with {key}={old_meta[key]} but this run has "
                                f"{key}={new_meta[key]}; rerun with the same settings or use a new OUTFILE")

    def write(self, row: Dict[str, object]):
        line = [_fmt(row[c]) for c in self.columns]
        self._fh.write("\t".join(line) + "\n")
        self._sync()
        self.rows.append(dict(zip(self.columns, line)))

    def _sync(self):
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self):
        if getattr(self, "_fh", None):
            self._fh.close()


def _header_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.6g}"
    return str(v)


def run_metadata(args_namespace, extra: Dict[str, object]) -> Dict[str, object]:
    import DEQ
    meta = {
        "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv),
        "versions": f"deq-certify {DEQ.__version__}, torch {torch.__version__}, python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    meta.update(extra)
    return meta


def select_indices(n_items: int, skip: int, max_count: int) -> List[int]:
    """Every skip-th image (idx % skip == 0); stop after max_count of them (max < 0: all), as the reference code."""
    idx = list(range(0, n_items, skip))
    return idx if max_count is None or max_count < 0 else idx[:max_count]


def image_generator(seed: int, idx: int, device) -> torch.Generator:
    """Per-image noise stream: a resumed run redraws exactly the same noise."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + idx)


def _mean(rows: List[Dict[str, str]], column: str) -> float:
    values = [float(r[column]) for r in rows]
    return sum(values) / len(values) if values else float("nan")


def run_over_images(dataset, indices: Iterable[int], results: ResultsFile, work: Callable, device,
                    progress_label: str = "certify", show_progress: bool = True,
                    memory_hint: str = "lower --batch") -> Dict[str, float]:
    """Call ``work(x, label, idx) -> row dict`` for every index not yet in the file; write rows as they come.

    The summary covers the whole file (after --resume too): ``rows``, ``accuracy`` and
    ``seconds_per_image`` over all its rows; ``images`` is the number computed now and
    ``skipped_done`` the number that were already there.  Running out of memory is a one-line
    error saying what to lower (``memory_hint``); the rows written so far stay."""
    todo = [i for i in indices if i not in results.done]
    new_correct = new = 0
    new_time = 0.0
    bar = tqdm(todo, desc=progress_label, unit="img", disable=not show_progress, dynamic_ncols=True)
    for idx in bar:
        x, label = dataset[idx]
        x = x.to(device)
        t0 = time.time()
        try:
            row = work(x, int(label), idx)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            raise UserError(f"out of memory on {device} at image {idx}: {memory_hint} (the {len(results.rows)} rows "
                            f"written so far are kept; continue with --resume)") from None
        row["time"] = time.time() - t0
        results.write(row)
        new += 1
        new_correct += int(row["correct"])
        new_time += row["time"]
        bar.set_postfix(acc=f"{100.0 * new_correct / new:.1f}%", s_per_img=f"{new_time / new:.2f}")
    rows = results.rows
    return {"images": new, "skipped_done": len(results.done), "rows": len(rows),
            "accuracy": _mean(rows, "correct"), "seconds_per_image": _mean(rows, "time")}
