"""The suite runs in a checkout folder of any name, the repository's own (`concept-unlearn`) included.

pytest collects a folder that has an `__init__.py` as a package and imports that file (pytest 9,
_pytest/python.py Package.setup). The repository root is a ComfyUI pack whose `__init__.py` imports
relatively; in a folder whose name is not a Python name it is imported with no parent package.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("folder", ["concept-unlearn", "Concept Unlearn.v2"])
def test_pytest_runs_in_a_checkout_whose_name_is_not_a_python_name(tmp_path, folder):
    checkout = tmp_path / folder
    (checkout / "tests").mkdir(parents=True)
    for name in ("__init__.py", "pyproject.toml"):
        (checkout / name).write_bytes((REPO / name).read_bytes())
    for name in ("nodes", "unlearn_core", "js"):  # the package the root __init__.py imports
        (checkout / name).symlink_to(REPO / name, target_is_directory=True)
    (checkout / "tests" / "test_probe.py").write_text(
        "def test_probe():\n    import unlearn_core.config\n    assert unlearn_core.config.TokenConfig\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_probe.py"],
                          cwd=checkout, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout
