"""The command line starts fast: ``--help``, every command's ``--help`` and usage errors (exit
code 2) import neither torch nor transformers (checked with ``python -X importtime`` in real
processes). The pushing command is checked in test_hub.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_llmc.cli.parser import build_parser

HEAVY = {"torch", "transformers"}


def imported_modules(argv: list[str], cwd: Path) -> tuple[int, set[str], str]:
    """Exit code, top-level modules imported, and the non-importtime stderr of one CLI run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "hf_llmc", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.splitlines()
    modules = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
    rest = "\n".join(line for line in lines if not line.startswith("import time:"))
    return proc.returncode, modules, rest


def commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


@pytest.mark.parametrize("argv", [["--help"], *([c, "--help"] for c in commands())], ids=lambda a: " ".join(a))
def test_help_imports_no_torch(argv, tmp_path):
    code, modules, err = imported_modules(argv, tmp_path)
    assert code == 0, err
    assert "hf_llmc" in modules and not modules & HEAVY, modules & HEAVY


def _usage_cases(tmp: Path) -> dict[str, list[str]]:
    (tmp / "busy").mkdir()
    (tmp / "busy" / "notes.txt").write_text("earlier results\n")
    (tmp / "eval.txt").write_text("some text")
    model = str(tmp / "no-model-needed")  # usage errors are found before any model is opened
    return {
        "argparse choice": ["barrier", model, model, "--data", "eval.txt", "--base", "c"],
        "alpha list": ["barrier", model, model, "--data", "eval.txt", "--alphas", "0,2"],
        "layer spec": ["barrier", model, model, "--data", "eval.txt", "--layers", "ffn.1"],
        "missing data": ["barrier", model, model, "--data", "missing.txt"],
        "sequential option": ["barrier", model, model, "--data", "eval.txt", "--target-se", "0"],
        "merge spec": ["merge", model, model, "--layers", "attn.0", "--alpha", "half", "--out", "merged"],
        "merge out": ["merge", model, model, "--layers", "attn.0", "--out", "busy"],
        "scan settings": ["scan", model, model, "--data", "eval.txt", "--window", "0", "--mode", "window"],
        "scan out": ["scan", model, model, "--data", "eval.txt", "--out", "busy"],
        "robustness samples": ["robustness", model, model, "--data", "eval.txt", "--samples", "0"],
        "distance spec": ["distance", model, model, "--layers", "attn.0-"],
        "search sets": ["search", model, model, "--data", "code=eval.txt", "--out", "s"],
        "search pick": ["search", model, model, "--data", "code=eval.txt", "--data", "prose=eval.txt", "--pick", "x"],
        "search out": ["search", model, model, "--data", "code=eval.txt", "--data", "prose=eval.txt", "--out", "busy"],
        "demo out": ["demo", "--out", "busy"],
        "recipe": ["run", "no-such-recipe.yaml"],
        "push folder": ["push", "busy", "user/repo"],
    }


def test_usage_errors_import_no_torch(tmp_path):
    for name, argv in _usage_cases(tmp_path).items():
        code, modules, err = imported_modules(argv, tmp_path)
        assert code == 2, (name, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "error:" in lines[0], (name, err)
        assert not modules & HEAVY, (name, modules & HEAVY)
