"""The A1111 tab's UI builds under gradio 3.41 (A1111's pin), registered the way A1111 registers it.

Skipped unless gradio 3.x is importable (the CI venv has no gradio; run it in a venv with gradio==3.41.2).
A1111 itself is not imported: the few ``modules.*`` names the tab file touches while registering and building
are stand-ins with A1111's signatures (modules/script_callbacks.py on_ui_tabs/on_ui_settings, shared.opts /
OptionInfo, shared.state, paths, call_queue.queue_lock). Running a job from the UI is not covered here.
"""
from __future__ import annotations

import importlib.util
import sys
import threading
import types
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
if not gr.__version__.startswith("3."):
    pytest.skip(f"gradio {gr.__version__} is not A1111's 3.x", allow_module_level=True)

TAB = Path(__file__).resolve().parents[1] / "scripts" / "concept_unlearn_tab.py"


@pytest.fixture
def a1111_modules(monkeypatch, tmp_path):
    registered = {"tabs": [], "settings": []}
    modules = types.ModuleType("modules")
    modules.__path__ = []
    callbacks = types.ModuleType("modules.script_callbacks")
    callbacks.on_ui_tabs = registered["tabs"].append
    callbacks.on_ui_settings = registered["settings"].append

    class OptionInfo:
        def __init__(self, default=None, label="", component=None, component_args=None, onchange=None,
                     section=None, refresh=None, **kwargs):
            self.default, self.label, self.section = default, label, section

    class Options:
        def __init__(self):
            self.data_labels = {}

        def add_option(self, key, info):
            self.data_labels[key] = info

    shared = types.ModuleType("modules.shared")
    shared.OptionInfo, shared.opts = OptionInfo, Options()
    shared.cmd_opts = types.SimpleNamespace(lowvram=False, medvram=False)
    shared.state = types.SimpleNamespace(job="", interrupted=False, interrupt=lambda: None)
    shared.sd_model = None
    paths = types.ModuleType("modules.paths")
    paths.models_path, paths.data_path, paths.script_path = str(tmp_path / "models"), str(tmp_path), str(tmp_path)
    call_queue = types.ModuleType("modules.call_queue")
    call_queue.queue_lock = threading.Lock()
    for name, module in {"modules": modules, "modules.script_callbacks": callbacks, "modules.shared": shared,
                         "modules.paths": paths, "modules.call_queue": call_queue}.items():
        monkeypatch.setitem(sys.modules, name, module)
        if "." in name:
            setattr(modules, name.split(".")[1], module)
    return registered, shared


def test_tab_registers_and_builds_under_gradio_3(a1111_modules):
    registered, shared = a1111_modules
    # A1111 modules/script_loading.load_module: spec_from_file_location(basename, path), no sys.modules entry
    spec = importlib.util.spec_from_file_location(TAB.name, TAB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert len(registered["tabs"]) == 1
    for settings in registered["settings"]:
        settings()
    (blocks, title, elem_id), = registered["tabs"][0]()
    assert isinstance(blocks, gr.Blocks) and title == "Concept Unlearn" and elem_id
    labels = {getattr(b, "label", None) for b in blocks.blocks.values()} | \
             {getattr(b, "value", None) for b in blocks.blocks.values() if isinstance(b, gr.Button)}
    for wanted in ("Erase", "Interrupt"):
        assert wanted in labels, labels
