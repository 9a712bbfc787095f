"""The layout: the library (every module of marginops outside marginops/tools) never imports the
tools, and each tools module imports first in a fresh interpreter (no import cycle)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "marginops")


def modules(under):
    """Dotted names of the modules and packages under marginops/<under> ("" for all), found by
    walking the directory."""
    names = []
    top = os.path.join(PACKAGE, under)
    for folder, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        rel = os.path.relpath(folder, ROOT).split(os.sep)
        for f in sorted(files):
            if f.endswith(".py") and f != "__main__.py":
                names.append(".".join(rel if f == "__init__.py" else rel + [f[:-3]]))
    return names


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def test_the_library_never_imports_the_tools():
    library = [m for m in modules("") if not (m + ".").startswith("marginops.tools.")]
    assert "marginops" in library and "marginops.reference" in library
    # one interpreter (the op library registers once per process): after each import, the first
    # library module whose import brought a tools module in is named
    code = f"""
import sys
for name in {library!r}:
    __import__(name)
    tools = sorted(m for m in sys.modules if m == "marginops.tools" or m.startswith("marginops.tools."))
    if tools:
        print(name, "imports", tools)
        break
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", proc.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_each_tools_module_imports_first():
    tools = modules("tools")
    assert {"marginops.tools.cli", "marginops.tools.bench", "marginops.tools.demo", "marginops.tools.memory"} <= set(
        tools
    )
    # one interpreter with torch loaded forks a child per module: each child imports its module
    # before any other marginops module, as a fresh interpreter would, without paying for torch again
    code = f"""
import os, sys, traceback
import torch
failed = []
for name in {tools!r}:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed.append(name)
print(failed)
"""
    proc = run_python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
