"""The results file: one owner for its columns, its header, writing, resuming and reading.

A TSV: ``# key: value`` header, column names, one row per image (first six columns as locuslab/smoothing).
Rows are flushed and fsynced one by one; ``--resume`` drops a torn last line and refuses a header that differs
outside :data:`RESUME_IGNORED_KEYS`.  :class:`ResultsFile` writes; :func:`read_results` and :func:`read_rows` read.
"""
from __future__ import annotations

import glob
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from DEQ.checks import writable_dir_problem
from DEQ.errors import UserError
from DEQ.files import atomic_write

# ----------------------------------------------------------------------------- columns
REQUIRED_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
INT_COLUMNS = ("idx", "label", "predict", "correct")
PREDICTION_COLUMNS = ("idx", "label", "predict", "correct", "time")  # what predict and attack files must have
FIXED_COLUMNS = ("fixed_predict", "fixed_radius", "fixed_correct")

CERTIFY_COLUMNS = REQUIRED_COLUMNS + ("n_A", "n", "p_A_lower", "p_m_upper", "N_A_E", "K", "K_A", "M", "nfe",
                                      "residual", "status", "route", "std_calls", "std_rows")
# Sequential CERTIFY (``SRS.sequential``): certify's columns (n = estimation samples drawn up to the stop), then
# the noisy samples drawn (selection + estimation) and why sampling stopped (decided | N | nonfinite).
SEQUENTIAL_COLUMNS = CERTIFY_COLUMNS + ("samples", "stop")
# The ladder (``SRS.ladder``): the certified model's certify row plus every rung's result on the same noise.
LADDER_COLUMNS = CERTIFY_COLUMNS + ("ladder",)
# A row entry (never a column) with seconds of the row's work that belong to no method: the runner leaves
# them out of ``time`` (the ladder's lower-rung heads).
UNTIMED = "_untimed"
# A row entry (never a column) with the seconds the pairing planner took within the row's time (``SRS.pairing``;
# ``Certificate.planner_seconds``): the runner reports their mean in its summary, ``planner_seconds``.
PLANNER = "_planner_seconds"
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time", "n1", "n2", "pvalue", "p_m_upper", "K", "K_A", "M",
                   "nfe", "std_calls", "status")
# QCRS: certify's columns (predict / radius / correct / p_A_lower are the QCRS result), then the search,
# then the fixed-sigma certificate (read by analysis --compare-fixed).  ``time`` is the whole row (search +
# both certificates): the QCRS-only time is time - fixed_time.  search_nfe is the search's evaluations of f.
QCRS_EXTRA_COLUMNS = ("best_sigma", "search_samples", "search_evals", "search_nfe", "search_time", "fixed_predict",
                      "fixed_radius", "fixed_correct", "fixed_p_A_lower", "fixed_samples", "fixed_time")
QCRS_COLUMNS = CERTIFY_COLUMNS + QCRS_EXTRA_COLUMNS
# Attack runs: PREDICT of the smoothed classifier at the attacked input (the field's format of attack runs),
# then the perturbation's size and the base model's prediction there.  The attack, its epsilon and m are
# header entries (constant per file, checked on --resume).
ATTACK_COLUMNS = PREDICT_COLUMNS + ("adv_norm", "base_predict_adv")


# ----------------------------------------------------------------------------- header
def header_value(value) -> str:
    """How a header value is written: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def parse_header_line(line: str) -> Optional[Tuple[str, str]]:
    """``# key: value`` -> (key, value), both stripped; None for other lines."""
    if not line.lstrip().startswith("#"):
        return None
    key, sep, value = line.lstrip().lstrip("#").partition(":")
    if not sep or not key.strip():
        return None
    return key.strip(), value.strip()


def parse_header(lines: Sequence[str]) -> Dict[str, str]:
    """The ``# key: value`` entries of ``lines`` (other lines ignored)."""
    return dict(kv for kv in map(parse_header_line, lines) if kv is not None)


def split_table(text: str) -> Tuple[Dict[str, str], Optional[List[str]], List[Tuple[int, List[str]]]]:
    """Our file layout: ``# key: value`` lines, then the column line, then rows.

    Returns:
        (header entries, column names or None, [(line number, fields)] of the non-empty rows).
    """
    meta, columns, rows = {}, None, []
    for lineno, line in enumerate(text.splitlines(), start=1):
        kv = parse_header_line(line) if columns is None else None
        if kv is not None:
            meta[kv[0]] = kv[1]
        elif columns is None:
            columns = line.split("\t")
        elif line:
            rows.append((lineno, line.split("\t")))
    return meta, columns, rows


def provenance() -> Dict[str, object]:
    """The header entries that record how a file was made (not checked on --resume)."""
    import DEQ
    return {
        "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv),
        "versions": f"deq-certify {DEQ.__version__}, torch {torch.__version__}, python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# Header entries that do not change a row: everything else in the '# key: value' header (sigma, N, tol,
# solvers, certificate, data set path, QCRS search settings, ... and any key added later) must match on
# --resume, and a key present on only one side is refused too.  checkpoint is the path: the file itself
# is checked through checkpoint_sha256.
# compile: eager and compiled evaluation of the same model at the same precision give the same certificates up to
# floating-point rounding (tests/test_compile.py), like another device; precision changes the certified model.
RESUME_IGNORED_KEYS = frozenset({"command", "versions", "date", "max", "device", "checkpoint", "quiet", "threads",
                                 "guarantee", "compile"})
# Header entries added later, with the value every file written before them had: a file without the line
# resumes when this run has that value (and is refused otherwise).
RESUME_DEFAULTS = {"precision": "fp32"}


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
            problem = writable_dir_problem(folder) or exc.strerror
            raise UserError(f"cannot create the output folder {folder}: {problem}; choose a writable OUTFILE") from None
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
                self._fh.write(f"# {key}: {header_value(value)}\n")
            self._fh.write("\t".join(self.columns) + "\n")
            self._sync()
        return self

    def _load_existing(self, truncate: bool = True):
        """Read the file to continue: check its header against this run, keep its rows, cut a torn last row
        (``truncate``; else only skip it).  Every refusal leaves the file untouched (the cut comes last)."""
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
        old_meta, header, rows = split_table(text)
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
            if int(fields[0]) in done:
                raise UserError(f"--resume: {self.path}: idx {int(fields[0])} appears more than once (line {lineno}); "
                                f"remove the repeated row (analyze.py refuses the file too), or start again with "
                                f"--overwrite")
            done.add(int(fields[0]))
            kept.append(dict(zip(self.columns, fields)))
        if torn and truncate:
            with open(self.path, "r+b") as fh:
                fh.truncate(cut)
        self.done, self.rows = done, kept

    def _check_settings(self, old_meta: Dict[str, str]) -> None:
        """Every header entry outside RESUME_IGNORED_KEYS must be the same, in one line naming the key."""
        new_meta = {k: header_value(v).strip() for k, v in self.meta.items()}
        old_meta = {**{k: v for k, v in RESUME_DEFAULTS.items() if k in new_meta}, **old_meta}
        for key in list(new_meta) + [k for k in old_meta if k not in new_meta]:
            if key in RESUME_IGNORED_KEYS:
                continue
            if key not in old_meta:
                raise UserError(f"--resume: {self.path} has no '{key}' line in its header (another kind of run, or an "
                                f"older version) and this run has {key}={new_meta[key]}; rerun with the same settings or "
                                f"use a new OUTFILE")
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


# ----------------------------------------------------------------------------- shards (torchrun)
SHARD_GLOB = ".shard-*-of-*"


def shard_path(outfile: str, rank: int, world_size: int) -> str:
    """The file rank ``rank`` of a ``world_size``-process run writes (merged into OUTFILE at the end)."""
    return f"{outfile}.shard-{rank}-of-{world_size}"


def shard_files(outfile: str) -> List[str]:
    """Shard files of OUTFILE left by earlier distributed runs (of any world size), sorted."""
    return sorted(glob.glob(glob.escape(outfile) + SHARD_GLOB))


def consolidate(outfile: str, columns: Sequence[str], meta: Dict[str, object], resume: bool, overwrite: bool) -> None:
    """Merge OUTFILE and its shard files into OUTFILE in image order, then remove the shards.

    Each source is checked as ``--resume`` checks a file before anything changes; a row in several sources is kept
    once.  OUTFILE is replaced atomically before the shards are removed: a crash at any point loses no row.  Without
    ``resume`` existing results are refused (``overwrite``: deleted)."""
    shards = shard_files(outfile)
    exists = os.path.isfile(outfile) and os.path.getsize(outfile) > 0
    if not shards and not exists:
        return
    if not resume:
        if not overwrite:
            what = outfile if exists else f"{len(shards)} shard file(s) of an interrupted distributed run ({shards[0]}, ...)"
            raise UserError(f"{what} already holds results: pass --resume to continue it, --overwrite to replace it, "
                            f"or choose another OUTFILE")
        for path in shards + ([outfile] if exists else []):
            os.remove(path)
        return
    merged: Dict[int, Dict[str, str]] = {}
    for path in ([outfile] if exists else []) + shards:
        if path != outfile and count_rows(path) == 0:
            continue  # a rank stopped before its first row (its header may be torn): nothing to keep
        part = ResultsFile(path, columns, meta)
        part._load_existing(truncate=False)
        for row in part.rows:
            merged.setdefault(int(row["idx"]), row)
    with atomic_write(outfile, "w", prefix=".merge-", suffix=".tsv") as fh:
        for key, value in meta.items():
            fh.write(f"# {key}: {header_value(value)}\n")
        fh.write("\t".join(columns) + "\n")
        for idx in sorted(merged):
            fh.write("\t".join(merged[idx][c] for c in columns) + "\n")
    for path in shards:
        os.remove(path)


def count_rows(path: str) -> int:
    """Complete rows in a results file being written (for progress displays); 0 if absent."""
    try:
        with open(path, "rb") as fh:
            lines = fh.read().split(b"\n")[:-1]
    except OSError:
        return 0
    return max(sum(1 for line in lines if not line.startswith(b"#")) - 1, 0)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.6g}"
    return str(v)



def read_rows(path) -> Tuple[Dict[str, str], List[str], List[Dict[str, str]], List[str]]:
    """A results file as strings: (header entries, column names, rows as dicts, raw row lines)."""
    meta, columns, rows = split_table(Path(path).read_text())
    return meta, columns, [dict(zip(columns, f)) for _, f in rows], ["\t".join(f) for _, f in rows]


# ----------------------------------------------------------------------------- reading for analysis
# str(datetime.timedelta): "H:MM:SS[.ffffff]", prefixed by "N day(s), " for long runs.
_TIMEDELTA = re.compile(r"^(?:(-?\d+) days?, )?(\d+):(\d{1,2}):(\d{1,2}(?:\.\d*)?)$")


# ----------------------------------------------------------------------------- reading


def parse_time(value: str) -> float:
    """Seconds from a float string or a ``datetime.timedelta`` string; NaN if neither."""
    try:
        return float(value)
    except ValueError:
        pass
    m = _TIMEDELTA.match(value.strip())
    if not m:
        return math.nan
    days, hours, minutes, seconds = m.groups()
    return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _dedupe(names: list[str]) -> list[str]:
    """Make header names unique (``x``, ``x.1``, ...) so a repeated extra column cannot shadow another."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        n = seen.get(name, 0)
        seen[name] = n + 1
        out.append(name if n == 0 else f"{name}.{n}")
    return out


def _to_numeric(df: pd.DataFrame, column: str, path, line_numbers: list[int], integer: bool) -> None:
    """Convert one column in place; a bad cell becomes a UserError naming file, line and column."""
    raw = df[column]
    values = raw.map(parse_time) if column == "time" else pd.to_numeric(raw, errors="coerce")
    bad = values.isna()
    if integer:
        bad |= values.notna() & (values != values.round())
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        hint = "seconds or H:MM:SS.ffffff" if column == "time" else ("an integer" if integer else "a number")
        raise UserError(f"{path}: line {line_numbers[i]}: column '{column}' has {raw.iloc[i]!r}, "
                        f"expected {hint}; fix or remove that row")
    df[column] = values.astype(np.int64) if integer else values.astype(float)


def read_results(path, required: Sequence[str] = REQUIRED_COLUMNS) -> pd.DataFrame:
    """Read a certification TSV (either dialect) into a DataFrame: ``time`` in float seconds, integer
    columns int64, wholly numeric extra columns numbers, ``attrs['meta']`` the header and ``attrs['path']``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a results file; pass the TSV file inside it")
    if not path.is_file():
        raise UserError(f"{path}: file not found; check the path (give FILE or FILE:LABEL)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc.__class__.__name__}); pass a tab-separated text results file")

    comments, rows = [], []  # rows: (line number, fields)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):  # metadata; a trailing comment (e.g. a footer) is skipped too
            comments.append(line)
        else:
            rows.append((lineno, [field.strip() for field in line.split("\t")]))
    if not rows and comments:
        raise UserError(f"{path}: holds only '#' header lines, no column line and no rows (the run wrote no result); "
                        f"run certification first or pass another file")
    if not rows:
        raise UserError(f"{path}: file is empty; pass a results file written by certify")
    header = _dedupe(rows[0][1])
    missing = [c for c in required if c not in header]
    if missing:
        hint = " (is it tab-separated?)" if len(header) == 1 and " " in header[0] else ""
        raise UserError(f"{path}: missing required column(s) {', '.join(missing)}{hint}; "
                        f"the header must start with {' '.join(required)}")
    body = rows[1:]
    if not body:
        raise UserError(f"{path}: no result rows, only a header; run certification first or pass another file")
    for lineno, fields in body:
        if len(fields) != len(header):
            raise UserError(f"{path}: line {lineno} has {len(fields)} fields but the header has {len(header)}; "
                            "fix the truncated or malformed row")

    df = pd.DataFrame([fields for _, fields in body], columns=header)
    line_numbers = [lineno for lineno, _ in body]
    for column in tuple(required) + tuple(c for c in FIXED_COLUMNS if c in header):
        integer = column in INT_COLUMNS or column in ("fixed_predict", "fixed_correct")
        _to_numeric(df, column, path, line_numbers, integer)
    for column in ("correct",) + (("fixed_correct",) if "fixed_correct" in header else ()):
        if not df[column].isin([0, 1]).all():
            raise UserError(f"{path}: column '{column}' must be 0 or 1; fix the file (is it a certification result?)")
    for column in header:
        if column not in required and df[column].dtype == object or str(df[column].dtype) == "str":
            converted = pd.to_numeric(df[column], errors="coerce")
            if converted.notna().sum() == (df[column].str.lower() != "nan").sum():
                df[column] = converted
    dup = df["idx"][df["idx"].duplicated()]
    if len(dup):
        raise UserError(f"{path}: idx {int(dup.iloc[0])} appears more than once; "
                        "remove repeated rows (e.g. from an interrupted and restarted run)")
    df.attrs["meta"] = parse_header(comments)
    df.attrs["path"] = str(path)
    return df




__all__ = ["REQUIRED_COLUMNS", "PREDICTION_COLUMNS", "INT_COLUMNS", "FIXED_COLUMNS", "CERTIFY_COLUMNS", "PREDICT_COLUMNS", "QCRS_EXTRA_COLUMNS",
           "QCRS_COLUMNS", "SEQUENTIAL_COLUMNS", "ATTACK_COLUMNS", "LADDER_COLUMNS", "UNTIMED", "PLANNER", "RESUME_IGNORED_KEYS", "ResultsFile", "header_value", "parse_header_line", "parse_header",
           "provenance", "read_rows", "read_results", "parse_time", "shard_path", "shard_files", "consolidate",
           "count_rows"]
