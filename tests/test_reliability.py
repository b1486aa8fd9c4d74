"""Issue 9: never destroy a trained model, resume only what matches, refuse every bad value in one line.

Every CLI runs in-process through its own ``main`` (the ``cli_main`` wrapper that real runs use),
on the shared tiny digits checkpoint, so each case takes well under a second or two.
"""
import importlib.util
import json
import math
import os
import re
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch

from conftest import DIGITS_CFG, ROOT, TINY
from DEQ.checkpoint import load_checkpoint, save_checkpoint
from DEQ.errors import UserError
from DEQ.files import atomic_write

CODE = Path(ROOT) / "SRS" / "code"


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CLI = {
    "train": _load(Path(ROOT) / "DEQ" / "tools" / "cls_train.py", "issue9_cls_train"),
    "certify": _load(CODE / "certify.py", "issue9_certify"),
    "predict": _load(CODE / "predict.py", "issue9_predict"),
    "qcrs": _load(CODE / "certify_qcrs.py", "issue9_certify_qcrs"),
    "analyze": _load(CODE / "analyze.py", "issue9_analyze"),
}
SMALL = ["--N0", "10", "--N", "40", "--batch", "20", "--f_thresh", "3", "--quiet", "--threads", "1"]
TSV = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"


def train_argv(out, *extra, noise="0.25", opts=()):
    return ["--cfg", DIGITS_CFG, "--noise", noise, "--out", str(out), "--quiet", "--threads", "1", *extra,
            *TINY, *opts]


def run_main(cli, argv):
    """Exit code and stderr of one CLI main (0 when it returns)."""
    try:
        CLI[cli].main(argv)
    except SystemExit as exc:
        return exc.code
    return 0


def tree(path):
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*"))


def one_error_line(capsys, stdout_empty=True):
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert captured.out == "" or not stdout_empty, captured.out  # refused before printing anything
    return err[0]


# ------------------------------------------------------------------ bad input: one table, every CLI
def _run_folder(t, ck):  # a run folder holding a trained model
    (t / "run").mkdir()
    shutil.copy(ck, t / "run" / "last.pth")
    shutil.copy(ck, t / "run" / "best.pth")


def _garbage(t, ck):
    (t / "garbage.pth").write_text("hello, I am not a checkpoint\n")
    (t / "binary.pth").write_bytes(bytes(range(256)) * 16)
    (t / "garbage.tsv").write_text("hello\nworld\n")
    (t / "binary.tsv").write_bytes(bytes(range(256)) * 16)
    (t / "afile").write_text("a file")
    (t / "folder").mkdir()


def _certified(t, ck):
    """A real one-row certify file; the case then edits or reuses it."""
    CLI["certify"].main(["digits", ck, "0.25", str(t / "r.tsv"), "--max", "1", *SMALL])


def _torn_header(t, ck):
    _certified(t, ck)
    text = (t / "r.tsv").read_text()
    (t / "r.tsv").write_text(text[: text.index("# srs:") + 9])  # killed while writing the header


def _old_header(t, ck):
    _certified(t, ck)
    lines = (t / "r.tsv").read_text().splitlines(keepends=True)
    (t / "r.tsv").write_text("".join(line for line in lines if not line.startswith("# tol:")))


def _two_image_sets(t, ck):
    (t / "skip1.tsv").write_text(TSV + "".join(f"{i}\t0\t0\t0.5\t1\t1.0\n" for i in range(4)))
    (t / "skip2.tsv").write_text(TSV + "".join(f"{i}\t0\t0\t0.5\t1\t0.1\n" for i in range(0, 8, 2)))


C = "{ck}"  # placeholder for the checkpoint path
BAD = [
    # item 1: a trained model is never overwritten silently
    ("train", "existing_run_folder", _run_folder, train_argv("{t}/run"), ["already holds last.pth and best.pth",
                                                                          "--resume", "--overwrite", "another --out"]),
    ("train", "resume_and_overwrite", _run_folder, train_argv("{t}/run", "--resume", "--overwrite"), ["give one"]),
    ("train", "flag_after_overrides", None, train_argv("{t}/run") + ["--resume"], ["--resume comes after", "flags first"]),
    # item 4: non-finite or negative noise
    ("train", "noise_nan", None, train_argv("{t}/run", noise="nan"), ["--noise must be a finite number >= 0, got nan"]),
    ("train", "noise_inf", None, train_argv("{t}/run", noise="inf"), ["--noise must be a finite number >= 0, got inf"]),
    ("train", "noise_negative", None, train_argv("{t}/run", noise="-0.5"), ["--noise must be a finite number >= 0"]),
    ("train", "noise_inf_in_config", None, ["--cfg", DIGITS_CFG, "--out", "{t}/run", *TINY, "TRAIN.NOISE", "1e999"],
     ["TRAIN.NOISE must be a finite number >= 0, got inf"]),
    # item 5: tracebacks before
    ("train", "out_is_a_file", _garbage, train_argv("{t}/afile"), ["--out", "afile is a file, not a run folder"]),
    ("train", "out_under_a_file", _garbage, train_argv("{t}/afile/run"), ["--out", "is a file, not a folder",
                                                                           "writable --out"]),
    ("train", "batch_size_zero", None, train_argv("{t}/run", opts=["TRAIN.BATCH_SIZE_PER_GPU", "0"]),
     ["TRAIN.BATCH_SIZE_PER_GPU must be an integer >= 1, got 0"]),
    ("train", "lr_negative", None, train_argv("{t}/run", opts=["TRAIN.LR", "-0.1"]), ["TRAIN.LR must be a finite number > 0"]),
    ("train", "resume_from_garbage", _garbage, train_argv("{t}/run", "--resume-from", "{t}/garbage.pth"),
     ["unreadable", "garbage.pth"]),
    ("train", "resume_from_binary", _garbage, train_argv("{t}/run", "--resume-from", "{t}/binary.pth"),
     ["unreadable", "binary.pth"]),
    ("train", "resume_from_bare_state_dict", lambda t, ck: torch.save({"state_dict": {}}, t / "bare.pth"),
     train_argv("{t}/run", "--resume-from", "{t}/bare.pth"), ["not a training checkpoint", "no optimizer"]),
    ("train", "resume_nothing_there", None, train_argv("{t}/run", "--resume"), ["--resume: no checkpoint at"]),
    # item 8: no ./data/cifar10 in the current folder
    ("train", "cifar10_without_data_dir", None,
     ["--cfg", os.path.join(ROOT, "experiments/cifar/cls_mdeq_SMALL.yaml"), "--noise", "0.5", "--out", "{t}/run",
      "--quiet", "--threads", "1"], ["cifar10 needs --data-dir", "DATASET.ROOT 'data/cifar10/' does not exist"]),
    # item 9: a directory is not "not found"
    ("train", "resume_from_directory", _run_folder, train_argv("{t}/new", "--resume-from", "{t}/run"),
     ["run is a directory, not a file", "e.g.", "last.pth"]),
    ("train", "cfg_directory", _garbage, ["--cfg", "{t}/folder", "--noise", "0.25"], ["folder is a directory"]),
    # item 11
    ("train", "threads_zero", None, train_argv("{t}/run", "--threads", "0"), ["--threads must be an integer >= 1"]),
    # issue 24, item 2: a resume continues the run as trained; other keys are refused, naming the key
    ("train", "resume_with_other_lr", _run_folder, train_argv("{t}/run", "--resume", opts=["TRAIN.LR", "0.01"]),
     ["--resume: TRAIN.LR is 0.01 here", "trained with 0.002", "start a new run"]),
    ("train", "resume_from_with_other_solver", _run_folder,
     train_argv("{t}/new", "--resume-from", "{t}/run/last.pth", opts=["DEQ.F_SOLVER", "anderson"]),
     ["--resume-from: DEQ.F_SOLVER is 'anderson' here", "trained with 'broyden'"]),
    # item 3: epochs that cannot be trained
    ("train", "end_epoch_zero", None, train_argv("{t}/run", opts=["TRAIN.END_EPOCH", "0"]),
     ["TRAIN.END_EPOCH must be an integer >= 1, got 0"]),
    ("train", "begin_after_end", None, train_argv("{t}/run", opts=["TRAIN.BEGIN_EPOCH", "5", "TRAIN.END_EPOCH", "3"]),
     ["TRAIN.END_EPOCH 3 must be larger than TRAIN.BEGIN_EPOCH 5"]),
    # item 4: a folder that cannot be created although its parent looks writable
    ("train", "out_under_proc", None, train_argv("/proc/t17"), ["--out /proc/t17: cannot create /proc/t17"]),
    # item 9: messages that name the problem and the fix
    ("train", "empty_yaml", lambda t, ck: (t / "empty.yaml").write_text("# only a comment\n"),
     ["--cfg", "{t}/empty.yaml", "--noise", "0.25", "--out", "{t}/run"], ["empty.yaml is empty", "pass a yaml"]),
    ("train", "type_mismatch", None, train_argv("{t}/run", opts=["PERCENT", "abc"]),
     ["PERCENT takes a float value (e.g. 0.1), got abc (str); give a float"]),
    ("train", "unknown_flag", None, train_argv("{t}/run", "--bogus"),
     ["unrecognized arguments: --bogus; see cls_train.py --help"]),
    ("certify", "resume_and_overwrite", _certified, ["digits", C, "0.25", "{t}/r.tsv", "--resume", "--overwrite", *SMALL],
     ["--resume continues OUTFILE and --overwrite replaces it"]),
    ("certify", "outfile_under_a_file", _garbage, ["digits", C, "0.25", "{t}/afile/o.tsv", *SMALL],
     ["cannot create the output folder", "afile is a file, not a folder"]),
    ("qcrs", "no_sigma", None, ["digits", C, "{t}/q.tsv", *SMALL],
     ["the following arguments are required: --sigma; see certify_qcrs.py --help"]),
    ("analyze", "comments_only", lambda t, ck: (t / "c.tsv").write_text("# mode: certify\n# sigma: 0.25\n"),
     ["{t}/c.tsv"], ["holds only '#' header lines, no column line and no rows"]),
    ("analyze", "radii_nan", _two_image_sets, ["{t}/skip1.tsv", "--radii", "0", "nan"], ["--radii must be finite"]),
    # items 6, 9, 11: certify / predict / QCRS values and paths
    ("certify", "max_negative", None, ["digits", C, "0.25", "{t}/o.tsv", "--max", "-5", *SMALL],
     ["--max must be an integer >= 1 (or -1), got -5"]),
    ("certify", "max_zero", None, ["digits", C, "0.25", "{t}/o.tsv", "--max", "0", *SMALL], ["--max must be", "got 0"]),
    ("certify", "tol_negative", None, ["digits", C, "0.25", "{t}/o.tsv", "--tol", "-0.001", *SMALL],
     ["--tol must be a finite number >= 0"]),
    ("certify", "tol_nan", None, ["digits", C, "0.25", "{t}/o.tsv", "--tol", "nan", *SMALL], ["--tol must be", "nan"]),
    ("certify", "threads_zero", None, ["digits", C, "0.25", "{t}/o.tsv", *SMALL, "--threads", "0"],
     ["--threads must be an integer >= 1"]),
    ("certify", "checkpoint_directory", _garbage, ["digits", "{t}/folder", "0.25", "{t}/o.tsv", *SMALL],
     ["checkpoint", "folder is a directory"]),
    ("certify", "outfile_directory", _garbage, ["digits", C, "0.25", "{t}/folder", *SMALL],
     ["OUTFILE", "folder is a directory"]),
    ("predict", "max_zero", None, ["digits", C, "0.25", "{t}/p.tsv", "--max", "0", "--N", "40", "--quiet"],
     ["--max must be"]),
    ("qcrs", "right_inf", None, ["digits", C, "{t}/q.tsv", "--sigma", "0.25", "--right", "inf", *SMALL],
     ["--right must be a finite number, got inf"]),
    ("qcrs", "left_nan", None, ["digits", C, "{t}/q.tsv", "--sigma", "0.25", "--left", "nan", *SMALL],
     ["--left must be a finite number, got nan"]),
    ("qcrs", "sigma_inf", None, ["digits", C, "{t}/q.tsv", "--sigma", "inf", *SMALL], ["sigma must be > 0 and finite"]),
    # items 3, 5, 9: --resume of certify on what is not this run's file
    ("certify", "resume_other_tol", _certified, ["digits", C, "0.25", "{t}/r.tsv", "--resume", "--tol", "0.01", *SMALL],
     ["--resume", "tol=0.0", "tol=0.01", "same settings"]),
    ("certify", "resume_old_header_without_tol", _old_header, ["digits", C, "0.25", "{t}/r.tsv", "--resume", *SMALL],
     ["--resume", "no 'tol' line", "older version"]),
    ("certify", "resume_torn_header", _torn_header, ["digits", C, "0.25", "{t}/r.tsv", "--resume", *SMALL],
     ["header of", "is incomplete", "--overwrite"]),
    ("certify", "resume_garbage_text", _garbage, ["digits", C, "0.25", "{t}/garbage.tsv", "--resume", *SMALL],
     ["not a results file"]),
    ("certify", "resume_binary", _garbage, ["digits", C, "0.25", "{t}/binary.tsv", "--resume", *SMALL],
     ["binary file, not a results file"]),
    # item 7: analyze
    ("analyze", "different_image_sets", _two_image_sets, ["{t}/skip1.tsv", "{t}/skip2.tsv"],
     ["cover different images", "--allow-different-images"]),
    ("analyze", "out_is_a_file", _two_image_sets, ["{t}/skip1.tsv", "--out", "{t}/skip2.tsv"],
     ["--out", "not a directory"]),
    ("analyze", "input_directory", _garbage, ["{t}/folder"], ["folder: is a directory"]),
]


@pytest.mark.parametrize("cli,name,setup,argv,needles", BAD, ids=[f"{c[0]}-{c[1]}" for c in BAD])
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(tiny_checkpoint, tmp_path, capsys, monkeypatch,
                                                               cli, name, setup, argv, needles):
    monkeypatch.chdir(tmp_path)  # nothing may appear in the current folder either (./data/cifar10, output/)
    if setup:
        setup(tmp_path, tiny_checkpoint)
    before = _contents(tmp_path)
    capsys.readouterr()
    argv = [a.replace("{t}", str(tmp_path)).replace(C, tiny_checkpoint) for a in argv]
    assert run_main(cli, argv) == 2
    line = one_error_line(capsys)
    for needle in needles:
        assert needle in line, (needle, line)
    assert _contents(tmp_path) == before  # refused before any work: no file or folder created or changed


def _contents(path):
    return {p: (Path(path, p).read_bytes() if Path(path, p).is_file() else None) for p in tree(path)}


# ------------------------------------------------------------------ items 1, 2: training run folders
def test_train_resume_flag_takes_no_value_and_resume_from_takes_a_path():
    parse = CLI["train"].parse_args
    a = parse(["--cfg", "x.yaml", "--noise", "0.25", "--resume", "TRAIN.END_EPOCH", "5"])
    assert a.resume is True and a.resume_from is None and a.opts == ["TRAIN.END_EPOCH", "5"]
    b = parse(["--cfg", "x.yaml", "--resume-from", "run/best.pth", "TRAIN.END_EPOCH", "5"])
    assert b.resume is False and b.resume_from == "run/best.pth" and b.opts == ["TRAIN.END_EPOCH", "5"]


@pytest.mark.parametrize("timeout,data_dir", [("--dist-timeout", "--data-dir"), ("--dist_timeout", "--data_dir")])
def test_multi_word_flags_take_hyphens_and_underscores(timeout, data_dir, capsys):
    """Training (documented with hyphens) and certification (underscores, the reference code's names) both
    take either spelling of every multi-word flag; --help shows the documented one only."""
    from SRS.cli import certify_parser
    train = CLI["train"].parse_args(["--cfg", "x.yaml", timeout, "7", data_dir, "/data", "TRAIN.END_EPOCH", "5"])
    assert (train.dist_timeout, train.data_dir, train.opts) == (7.0, "/data", ["TRAIN.END_EPOCH", "5"])
    certify = certify_parser().parse_args(["cifar10", "ck.pth", "0.5", "out.tsv", timeout, "9", data_dir, "/data",
                                           "--f-thresh", "3", "--std_thresh", "30"])
    assert (certify.dist_timeout, certify.data_dir, certify.f_thresh, certify.std_thresh) == (9.0, "/data", 3, 30)
    assert CLI["train"].parse_args(["--cfg", "x.yaml", "--dist", "2"]).dist_timeout == 2.0  # one flag, two spellings
    with pytest.raises(SystemExit):
        CLI["train"].parse_args(["--help"])
    helps = {"train": capsys.readouterr().out, "certify": certify_parser().format_help()}
    for cli, shown, hidden in (("train", "--dist-timeout", "--dist_timeout"), ("train", "--data-dir", "--data_dir"),
                               ("certify", "--f_thresh", "--f-thresh"), ("certify", "--data-dir", "--data_dir")):
        assert shown in helps[cli] and hidden not in helps[cli], (cli, shown)
    with pytest.raises(SystemExit):
        CLI["train"].parse_args(["--cfg", "x.yaml", "--dist-time_out", "2"])  # mixed separators: no such flag
    assert "unrecognized arguments: --dist-time_out" in capsys.readouterr().err


def test_train_refuses_then_resumes_with_an_override_then_overwrites(tiny_checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    _run_folder(tmp_path, tiny_checkpoint)
    before = (run / "last.pth").read_bytes()
    assert run_main("train", train_argv(run, opts=["TRAIN.END_EPOCH", "1", "PERCENT", "1.0"])) == 2
    assert "already holds" in one_error_line(capsys) and (run / "last.pth").read_bytes() == before
    # the README's form: --resume, then KEY VALUE overrides (the first one is not taken as a checkpoint)
    (run / ".tmp-abcd1234.pth").write_bytes(b"half a checkpoint")  # left by a kill during a write
    assert run_main("train", train_argv(run, "--resume", opts=["TRAIN.END_EPOCH", "2", "PERCENT", "0.1"])) == 0
    assert load_checkpoint(str(run / "last.pth"))["epoch"] == 2
    assert not list(run.glob(".tmp-*"))  # item 8: cleaned at the start
    mode = stat.S_IMODE(os.stat(run / "last.pth").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # item 8: the umask's mode, not mkstemp's 0600
    assert run_main("train", train_argv(run, "--overwrite", opts=["TRAIN.END_EPOCH", "1", "PERCENT", "0.1"])) == 0
    assert load_checkpoint(str(run / "last.pth"))["epoch"] == 1 and load_checkpoint(str(run / "best.pth"))["epoch"] == 1


def test_resume_raising_end_epoch_extends_the_cosine_schedule_and_stores_what_it_applied(tmp_path):
    from DEQ.config import config_from_text
    run = tmp_path / "run"
    assert run_main("train", train_argv(run, opts=["TRAIN.END_EPOCH", "2"])) == 0
    first = load_checkpoint(str(run / "last.pth"))
    steps = first["steps_per_epoch"]
    assert first["scheduler"]["T_max"] == 2 * steps and first["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-6)
    assert run_main("train", train_argv(run, "--resume", opts=["TRAIN.END_EPOCH", "3", "PRINT_FREQ", "1"])) == 0
    ckpt = load_checkpoint(str(run / "last.pth"))
    cfg = config_from_text(ckpt["config"], "last.pth")
    assert ckpt["epoch"] == 3 and cfg.TRAIN.END_EPOCH == 3 and cfg.TRAIN.LR == 0.002
    # the decay is stretched to the new end: the third epoch's lr falls to eta_min, it never climbs again
    assert ckpt["scheduler"]["T_max"] == 3 * steps and ckpt["scheduler"]["last_epoch"] == 3 * steps
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-6)
    log = (run / "train.log").read_text()
    assert f"re-laid to end at TRAIN.END_EPOCH 3 ({3 * steps} steps; the checkpoint's run planned {2 * steps})" in log
    lrs = [float(lr) for lr in re.findall(r"epoch 3 step \d+ .* lr (\S+)\n", log)]
    assert len(lrs) == steps and lrs == sorted(lrs, reverse=True) and lrs[0] < 0.002 * (1 + math.cos(math.pi * 2 / 3)) / 2
    # item 10: no Jacobian step was drawn (pretraining, JAC_LOSS_FREQ): '-' instead of nan
    assert "jac -" in log and "jac nan" not in log


def test_checkpoint_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        save_checkpoint({"x": torch.zeros(1)}, str(tmp_path / "c.pth"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "c.pth").st_mode) == 0o640


def test_atomic_write_replaces_whole_files_with_the_umask_mode(tmp_path):
    """The one writer of checkpoints and merged results: the new file gets 0666 minus the umask (not
    mkstemp's 0600) and replaces the old one whole; a failure mid-write leaves the old file and no temporary."""
    path = tmp_path / "results.tsv"
    path.write_text("old\n")
    old = os.umask(0o027)
    try:
        with atomic_write(str(path), prefix=".merge-", suffix=".tsv") as fh:
            fh.write("new\n")
            assert path.read_text() == "old\n"  # nothing is seen before the block ends
    finally:
        os.umask(old)
    assert path.read_text() == "new\n" and stat.S_IMODE(os.stat(path).st_mode) == 0o640
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(str(path), "wb") as fh:
            fh.write(b"half a fi")
            raise RuntimeError("disk full")
    assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["results.tsv"]


# ------------------------------------------------------------------ item 8: a failed run leaves nothing
def test_failed_training_start_leaves_no_folder_behind(tmp_path, monkeypatch, capsys):
    from DEQ import training

    def boom(self):
        raise RuntimeError("simulated crash in the first epoch")
    monkeypatch.setattr(training.Trainer, "train_epoch", boom)
    out = tmp_path / "output" / "digits" / "run"
    with pytest.raises(RuntimeError, match="simulated"):
        CLI["train"].main(train_argv(out))
    assert tree(tmp_path) == []  # no run folder with only train.log, and no empty parents
    # a run folder that existed before keeps what it had, and only that
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="simulated"):
        CLI["train"].main(train_argv(out))
    assert tree(out) == ["notes.txt"]


# ------------------------------------------------------------------ item 3: every header key is checked
def _results(path, meta, resume):
    from SRS.results import ResultsFile
    return ResultsFile(str(path), ("idx", "correct", "time"), meta).open(resume, False)


META = {"command": "x", "versions": "v1", "date": "today", "mode": "certify", "sigma": 0.25, "max": 5,
        "device": "cpu", "checkpoint": "a.pth", "checkpoint_sha256": "abc", "threads": 2, "tol": 0.001,
        "srs": "off", "a_setting_added_later": "k=1"}


@pytest.mark.parametrize("key,value,refused", [
    ("tol", 0.01, True), ("sigma", 0.5, True), ("srs", "step=anderson:1", True), ("checkpoint_sha256", "def", True),
    ("a_setting_added_later", "k=2", True),   # a key nobody listed is checked too
    ("command", "y", False), ("versions", "v2", False), ("date", "tomorrow", False), ("max", 9, False),
    ("device", "cuda:0", False), ("checkpoint", "b.pth", False), ("threads", 1, False),
])
def test_resume_checks_every_header_entry_but_the_allow_list(tmp_path, key, value, refused):
    path = tmp_path / "r.tsv"
    f = _results(path, META, False)
    f.write({"idx": 0, "correct": 1, "time": 0.5})
    f.close()
    before = path.read_bytes()
    if refused:
        with pytest.raises(UserError, match=f"--resume: .* made with {key}=.* but this run has {key}="):
            _results(path, {**META, key: value}, True)
        assert path.read_bytes() == before
    else:
        f = _results(path, {**META, key: value}, True)
        assert f.done == {0}
        f.close()
    # a key on one side only is refused, naming it
    with pytest.raises(UserError, match="no 'new_key' line"):
        _results(path, {**META, "new_key": 1}, True)
    with pytest.raises(UserError, match="made with a_setting_added_later=k=1, a setting this run does not have"):
        _results(path, {k: v for k, v in META.items() if k != "a_setting_added_later"}, True)


def test_header_holds_tol_and_the_row_changing_settings(tiny_checkpoint, tmp_path):
    out = tmp_path / "r.tsv"
    assert run_main("certify", ["digits", tiny_checkpoint, "0.25", str(out), "--max", "1", *SMALL]) == 0
    meta = dict(line[2:].split(": ", 1) for line in out.read_text().splitlines() if line.startswith("# "))
    assert meta["tol"] == "0.0"  # the checkpoint config's CERTIFY.TOL (its default: no section): the tolerance used
    assert meta["threads"] == "1" and meta["cfg_sha256"] == "null" and meta["data_dir"] == "null"
    assert json.loads(meta["batch"]) == 20 and meta["standard"] == "anderson:3"  # CERTIFY.SOLVER, --f_thresh


# ------------------------------------------------------------------ item 10: the summary covers the file
def test_summary_after_resume_covers_the_whole_file(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "r.tsv"
    argv = ["digits", tiny_checkpoint, "0.25", str(out), *SMALL]
    assert run_main("certify", argv + ["--max", "2"]) == 0
    capsys.readouterr()
    assert run_main("certify", argv + ["--max", "3", "--resume"]) == 0
    printed = capsys.readouterr().out
    rows = [line.split("\t") for line in out.read_text().splitlines() if line[:1].isdigit()]
    accuracy = 100 * sum(int(r[4]) for r in rows) / len(rows)
    assert len(rows) == 3
    assert "certified 1 images (2 already in the file); all 3 rows of the file" in printed
    assert f"accuracy at radius 0 {accuracy:.1f}%" in printed


# ------------------------------------------------------------------ item 5: out of memory
def test_out_of_memory_in_certify_says_lower_batch(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from SRS.smooth import Smooth

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(Smooth, "certify", oom)
    assert run_main("certify", ["digits", tiny_checkpoint, "0.25", str(tmp_path / "o.tsv"), *SMALL]) == 2
    line = one_error_line(capsys, stdout_empty=False)  # the work had started: the certified model's line is out
    assert "out of memory" in line and "lower --batch (now 20)" in line and "--resume" in line


# ------------------------------------------------------------------ item 11: threads
def test_default_threads_share_the_usable_cores(monkeypatch):
    from DEQ.utils import default_threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_threads() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert default_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # an explicit choice is kept
    assert default_threads() == 3


def test_threads_flag_sets_torch_threads(tiny_checkpoint, tmp_path):
    torch.set_num_threads(2)
    assert run_main("certify", ["digits", tiny_checkpoint, "0.25", str(tmp_path / "o.tsv"), "--max", "1", *SMALL]) == 0
    assert torch.get_num_threads() == 1


def test_out_of_memory_in_training_says_lower_the_batch_size(tmp_path, monkeypatch, capsys):
    from DEQ import training

    def oom(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(training.Trainer, "train_epoch", oom)
    assert run_main("train", train_argv(tmp_path / "run")) == 2
    line = one_error_line(capsys)
    assert "out of memory" in line and "lower TRAIN.BATCH_SIZE_PER_GPU" in line
    assert tree(tmp_path) == []
