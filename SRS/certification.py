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

# Settings that must match for --resume to continue a file (the rest may change, e.g. --max).
RESUME_KEYS = ("mode", "dataset", "split", "sigma", "N0", "N", "alpha", "skip", "batch", "seed", "checkpoint_sha256",
               "standard", "srs")


@dataclass
class ResultsFile:
    """Append-only TSV with a metadata header; safe to resume."""
    path: str
    columns: Sequence[str]
    meta: Dict[str, object]
    done: set = field(default_factory=set)

    def open(self, resume: bool, overwrite: bool) -> "ResultsFile":
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the output folder {folder}: {exc.strerror}; choose a writable OUTFILE") from None
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
                self._fh.write(f"# {key}: {value if isinstance(value, str) else json.dumps(value)}\n")
            self._fh.write("\t".join(self.columns) + "\n")
            self._sync()
        return self

    def _load_existing(self):
        with open(self.path, "rb") as fh:
            raw = fh.read()
        # torn last row from a crash: drop it, it will be recomputed.  The file itself is only cut
        # below, after the columns and settings checks pass: a refused --resume leaves it untouched.
        cut = len(raw) if raw.endswith(b"\n") else raw.rfind(b"\n") + 1
        torn = cut < len(raw)
        raw = raw[:cut]
        old_meta, header, rows = {}, None, []
        for line in raw.decode().splitlines():
            if line.startswith("# "):
                key, _, value = line[2:].partition(": ")
                old_meta[key] = value
            elif header is None:
                header = line.split("\t")
            elif line:
                rows.append(line.split("\t"))
        if header != list(self.columns):
            raise UserError(f"--resume: {self.path} has other columns (another mode or version); use a new OUTFILE")
        for key in RESUME_KEYS:
            new = self.meta.get(key)
            new = new if isinstance(new, str) else json.dumps(new)
            if key in old_meta and old_meta[key] != new:
                raise UserError(f"--resume: {self.path} was made with {key}={old_meta[key]} but this run has {key}={new}; "
                                f"rerun with the same settings or use a new OUTFILE")
        if torn:
            with open(self.path, "r+b") as fh:
                fh.truncate(cut)
        self.done = {int(r[0]) for r in rows}

    def write(self, row: Dict[str, object]):
        self._fh.write("\t".join(_fmt(row[c]) for c in self.columns) + "\n")
        self._sync()

    def _sync(self):
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self):
        if getattr(self, "_fh", None):
            self._fh.close()


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


def run_over_images(dataset, indices: Iterable[int], results: ResultsFile, work: Callable, device,
                    progress_label: str = "certify", show_progress: bool = True) -> Dict[str, float]:
    """Call ``work(x, label, idx) -> row dict`` for every index not yet in the file; write rows as they come."""
    todo = [i for i in indices if i not in results.done]
    correct = done = 0
    total_time = 0.0
    bar = tqdm(todo, desc=progress_label, unit="img", disable=not show_progress, dynamic_ncols=True)
    for idx in bar:
        x, label = dataset[idx]
        x = x.to(device)
        t0 = time.time()
        row = work(x, int(label), idx)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["time"] = time.time() - t0
        results.write(row)
        done += 1
        correct += int(row["correct"])
        total_time += row["time"]
        bar.set_postfix(acc=f"{100.0 * correct / done:.1f}%", s_per_img=f"{total_time / done:.2f}")
    return {"images": done, "skipped_done": len(results.done), "accuracy": correct / done if done else float("nan"),
            "seconds_per_image": total_time / done if done else float("nan")}
