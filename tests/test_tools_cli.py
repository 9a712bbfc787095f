"""The ``marginops`` command (marginops.tools.cli): its entry points, its help, the README's main
job (`marginops train`) in a CI-sized configuration, bad arguments, and the old implementation
name the bench still accepts."""

import importlib
import json
import os
import re
import subprocess
import sys

import pytest

from marginops.tools import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return subprocess.run([sys.executable, "-m", "marginops", *args], capture_output=True, text=True, check=True)


def test_console_script_names_the_cli_main():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        target = re.search(r'^marginops = "([\w.]+):(\w+)"$', f.read(), re.M)
    assert target is not None
    module, func = target.groups()
    assert module == "marginops.tools.cli"
    assert callable(getattr(importlib.import_module(module), func))


def test_help_of_every_subcommand_without_issue_numbers(capsys):
    for args in ([], ["bench"], ["demo"], ["train"]):
        with pytest.raises(SystemExit) as exit:
            cli.main([*args, "--help"])
        assert exit.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: marginops")
        assert not re.search(r"#\d|\bissue\b", text, re.I), args


def test_python_dash_m_marginops_runs_the_cli():
    assert "{bench,demo,train}" in run("--help").stdout


def test_train_marginops_vs_eager(tmp_path):
    """The README's main job, `marginops train`, in a CI-sized configuration."""
    out = tmp_path / "train.json"
    proc = run(
        *("train", "--classes", "3000", "--batch", "64", "--dim", "16", "--samples", "256", "--steps", "12"),
        *("--json", str(out)),
    )
    assert "marginops / eager: step time" in proc.stdout
    data = json.loads(out.read_text())
    mine, eager = data["results"]["marginops"], data["results"]["eager"]
    assert len(mine["losses"]) == 12
    assert max(abs(a - b) for a, b in zip(mine["losses"], eager["losses"])) < 1e-3
    assert mine["losses"][-1] < 0.5 * mine["losses"][0], "the synthetic task is learnt in three epochs"


def test_bad_arguments_exit_with_usage():
    proc = subprocess.run(
        [sys.executable, "-m", "marginops", "train", "--margin", "nope"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_bench_accepts_the_old_name_fused_with_a_notice(tmp_path):
    proc = run(
        "bench",
        *("--quick", "--no-max-classes", "--classes", "300", "--impls", "fused,reference", "--repeat", "1"),
        *("--repeat-time-s", "0", "--out", str(tmp_path)),
    )
    assert "'fused' is deprecated" in proc.stderr and "use 'marginops'" in proc.stderr
    data = json.loads((tmp_path / "cpu-bench.json").read_text())
    assert {r["impl"] for r in data["results"]} == {"marginops", "reference", "gemm3"}
