"""install.py: harmless outside A1111, installs only missing modules through A1111's launch.run_pip
(modules/launch_utils.py run_pip(command, desc)), never torch."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

INSTALL = Path(__file__).resolve().parents[1] / "install.py"


def load():
    spec = importlib.util.spec_from_file_location("cu_install", INSTALL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_as_a1111_runs_it_and_does_nothing_when_all_present():
    done = subprocess.run([sys.executable, str(INSTALL)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""


def test_never_lists_torch_peft_or_diffusers():
    install = load()
    assert not {"torch", "peft", "diffusers", "transformers"} & set(install.NEEDED.values())


def test_installs_only_missing_through_launch(monkeypatch):
    install = load()
    calls = []
    launch = types.ModuleType("launch")
    launch.run_pip = lambda command, desc=None: calls.append(command)
    monkeypatch.setitem(sys.modules, "launch", launch)
    monkeypatch.setattr(install, "NEEDED", {"numpy": "numpy", "cu_surely_missing_module": "cu-missing-pkg"})
    assert install.main() == 0
    assert calls == ["install cu-missing-pkg"]


def test_outside_a1111_it_only_reports(monkeypatch, capsys):
    install = load()
    monkeypatch.setitem(sys.modules, "launch", None)  # import launch -> ImportError
    monkeypatch.setattr(install, "NEEDED", {"cu_surely_missing_module": "cu-missing-pkg"})
    assert install.main() == 1
    assert "pip install cu-missing-pkg" in capsys.readouterr().err
