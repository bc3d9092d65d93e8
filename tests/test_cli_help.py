"""Every console script answers `--help` at once: it parses its arguments before importing torch.

Importing torch (and accelerate, tensorboard, torchvision behind it) takes seconds on a cold laptop;
`--help`, a typo in an option and `--version`-style questions should not wait for it. A wall-clock
bound would be flaky on a loaded machine, so the test checks the cause instead: after `--help`,
torch is not among the loaded modules. Both ways of starting a script are checked, the installed
entry point (`main()` of the module pyproject.toml names) and `python -m module`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]

# Runs a script's entry point (or the module as __main__) with --help, then reports on its last line
# whether it exited and whether torch was loaded.
PROBE = """
import importlib, json, runpy, sys
name, target, how = sys.argv[1:4]
module, _, function = target.partition(":")
sys.argv = [name, "--help"]
code = "returned"
try:
    if how == "entry point":
        getattr(importlib.import_module(module), function)()
    else:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
print(json.dumps({"exit": code, "torch": "torch" in sys.modules}))
"""


@pytest.mark.parametrize("how", ["entry point", "python -m"])
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_exits_zero_with_usage_and_without_importing_torch(name, how):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", PROBE, name, SCRIPTS[name], how], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    *help_lines, last = proc.stdout.rstrip("\n").splitlines()
    report = json.loads(last)
    assert report["exit"] == 0, (report, proc.stderr)
    assert help_lines and help_lines[0].startswith(f"usage: {name}"), proc.stdout
    assert not report["torch"], f"{name} --help ({how}) imported torch before parsing its arguments"
