"""Console commands: ``pip install -e .`` gives deq-train, deq-certify, ... beside the reference script paths.

The entry-point table lives in ``setup.cfg``; every entry must name a function that imports and is callable,
and the console commands must behave as the scripts do (same parser, one-line errors), naming themselves.
"""
import configparser
import importlib
import os
import subprocess
import sys

import pytest

from conftest import ROOT

COMMANDS = {"deq-train": "DEQ/tools/cls_train.py", "deq-certify": "SRS/code/certify.py",
            "deq-predict": "SRS/code/predict.py", "deq-certify-qcrs": "SRS/code/certify_qcrs.py",
            "deq-attack": "SRS/code/attack.py", "deq-analyze": "SRS/code/analyze.py"}


def _entry_points():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    lines = [line.strip() for line in cfg["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    return dict((part.strip() for part in line.split("=", 1)) for line in lines)


def _load(target):
    module, func = target.split(":")
    return importlib.import_module(module), getattr(importlib.import_module(module), func)


def test_every_console_command_names_a_callable_main_of_its_script():
    table = _entry_points()
    assert set(table) == set(COMMANDS)
    for name, target in table.items():
        module, main = _load(target)
        assert callable(main), name
        assert os.path.samefile(module.__file__, os.path.join(ROOT, COMMANDS[name])), (name, module.__file__)


def test_the_script_folders_are_packages_so_a_plain_install_ships_them():
    from setuptools import find_packages
    found = set(find_packages(ROOT, include=["DEQ*", "SRS*"]))
    assert {"DEQ.tools", "SRS.code"} <= found


@pytest.mark.parametrize("name", ["deq-certify", "deq-analyze", "deq-train"])
def test_help_through_the_entry_function_names_the_console_command(name, monkeypatch, capsys):
    """``--help`` via the entry point's function prints the usage under the console command's name and exits 0."""
    monkeypatch.setattr(sys, "argv", [os.path.join("/usr/local/bin", name), "--help"])
    _, main = _load(_entry_points()[name])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {name} ")


def test_console_command_bad_flag_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["deq-predict", "digits", "x.pth", "0.25", "out.tsv", "--bogus"])
    _, main = _load(_entry_points()["deq-predict"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: unrecognized arguments: --bogus; see deq-predict --help"]


def test_reference_script_path_still_runs():
    """The script path keeps its own name (python SRS/code/certify.py --help)."""
    res = subprocess.run([sys.executable, os.path.join(ROOT, "SRS", "code", "certify.py"), "--help"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0 and res.stdout.startswith("usage: certify.py "), res.stderr
