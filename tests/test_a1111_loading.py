"""scripts/*.py load the way AUTOMATIC1111 loads them, in a fresh interpreter.

A1111 (modules/scripts.py load_scripts + modules/script_loading.py load_module) lists every scripts/*.py of an
extension, sorts them, and for each one puts the extension folder first on sys.path, calls
``spec_from_file_location(basename, path)`` / ``module_from_spec`` / ``exec_module`` (no sys.modules entry), and
restores sys.path. Button handlers run later, with sys.path restored. So: every file must load that way (in any
state, also a second time, as on Reload UI), exactly one file registers callbacks, the engine must stay importable
afterwards, and the repository root (which holds ``nodes``, ``tests``, ``bench``, ``scripts`` and a ComfyUI
``__init__.py``) must not stay on sys.path. The editable install of this repository (dev venv) is hidden from the
child so that ``unlearn_core`` can only come from the scripts' own loader.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import importlib, importlib.util, json, sys, types
from pathlib import Path

root, with_modules = Path(sys.argv[1]), sys.argv[2] == "1"
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if p not in ("", str(root))]
assert importlib.util.find_spec("unlearn_core") is None, "precondition: engine not importable by name"
registered = []
if with_modules:
    modules = types.ModuleType("modules")
    modules.__path__ = []
    callbacks = types.ModuleType("modules.script_callbacks")
    callbacks.on_ui_tabs = lambda fn: registered.append(["tabs", fn.__module__, fn.__name__])
    callbacks.on_ui_settings = lambda fn: registered.append(["settings", fn.__module__, fn.__name__])
    modules.script_callbacks = callbacks
    sys.modules["modules"], sys.modules["modules.script_callbacks"] = modules, callbacks

def load_all():
    loaded = {}
    for path in sorted((root / "scripts").glob("*.py")):
        syspath = sys.path
        try:
            sys.path = [str(root)] + sys.path
            spec = importlib.util.spec_from_file_location(path.name, str(path))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            loaded[path.name] = module
        finally:
            sys.path = syspath
    return loaded

passes = []
for _ in range(2):
    registered.clear()
    loaded = load_all()
    passes.append({"registered": list(registered),
                   "callbacks_defined": sorted(name for name, m in loaded.items()
                                               if hasattr(m, "on_ui_tabs") or hasattr(m, "on_ui_settings"))})
lazy = importlib.import_module("unlearn_core.tiny")  # a module nothing imported yet: found via the package path
logic = sys.modules["concept_unlearn_logic"]
print(json.dumps({
    "passes": passes,
    "files": sorted(loaded),
    "engine": sys.modules["unlearn_core"].__file__,
    "lazy": lazy.__file__,
    "root_on_path": str(root) in sys.path,
    "shadowing": sorted(n for n in ("nodes", "tests", "bench", "scripts") if n in sys.modules),
    "siblings": sorted(k for k in sys.modules if k.startswith("concept_unlearn")),
    "logic_works": logic.file_stem("a b"),
    "tab_logic_registered": loaded["concept_unlearn_tab.py"].logic is logic,
    "host_backend": sys.modules[logic.BACKEND].__file__,
}))
'''


@pytest.mark.parametrize("with_modules", [True, False], ids=["inside_a1111", "outside_a1111"])
def test_scripts_load_as_a1111_loads_them(tmp_path, with_modules):
    done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), "1" if with_modules else "0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["files"] == ["concept_unlearn_a1111_backend.py", "concept_unlearn_logic.py",
                            "concept_unlearn_openclip.py", "concept_unlearn_tab.py"]
    expected = [["tabs", "concept_unlearn_tab.py", "on_ui_tabs"],
                ["settings", "concept_unlearn_tab.py", "on_ui_settings"]] if with_modules else []
    for one in out["passes"]:  # the second pass is A1111's Reload UI
        assert one["registered"] == expected
        assert one["callbacks_defined"] == ["concept_unlearn_tab.py"]
    assert Path(out["engine"]) == ROOT / "unlearn_core" / "__init__.py"
    assert Path(out["lazy"]) == ROOT / "unlearn_core" / "tiny.py"
    assert out["root_on_path"] is False and out["shadowing"] == []
    assert out["siblings"] == ["concept_unlearn_a1111_backend", "concept_unlearn_logic", "concept_unlearn_openclip"]
    assert out["logic_works"] == "unlearn_a_b" and out["tab_logic_registered"] is True
    assert Path(out["host_backend"]) == ROOT / "scripts" / "concept_unlearn_a1111_backend.py"


FAILING = r'''
import importlib.util, json, sys
from pathlib import Path

root = Path(sys.argv[1])
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if p not in ("", str(root))]
sibling = root / "scripts" / "concept_unlearn_openclip.py"
good = sibling.read_text()

def load_tab():
    path = root / "scripts" / "concept_unlearn_tab.py"
    spec = importlib.util.spec_from_file_location(path.name, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

sibling.write_text(good + "\nraise RuntimeError('broken sibling')\n")
try:
    load_tab()
    error = None
except RuntimeError as e:
    error = str(e)
after_failure = sorted(k for k in sys.modules if k.startswith("concept_unlearn"))
sibling.write_text(good)  # fixed, then A1111's Reload UI loads the scripts again
tab = load_tab()
print(json.dumps({"error": error, "after_failure": after_failure,
                  "after_retry": sorted(k for k in sys.modules if k.startswith("concept_unlearn")),
                  "works": tab.logic.file_stem("x")}))
'''


def test_a_failed_load_leaves_nothing_registered_and_a_retry_loads(tmp_path):
    """The tab's bootstrap registers the backend only once it has loaded, and the backend's loader removes what it
    registered when a file fails: after a failure nothing half-loaded is left, and the next load starts clean."""
    root = tmp_path / "extension"
    (root / "scripts").mkdir(parents=True)
    for path in (ROOT / "scripts").glob("*.py"):
        (root / "scripts" / path.name).write_text(path.read_text())
    (root / "unlearn_core").symlink_to(ROOT / "unlearn_core", target_is_directory=True)
    done = subprocess.run([sys.executable, "-c", FAILING, str(root)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["error"] == "broken sibling" and out["after_failure"] == []
    assert out["after_retry"] == ["concept_unlearn_a1111_backend", "concept_unlearn_logic", "concept_unlearn_openclip"]
    assert out["works"] == "unlearn_x"
