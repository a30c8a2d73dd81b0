"""The A1111 tab's UI builds under gradio 3.41 (A1111's pin), registered the way A1111 registers it.

Skipped unless gradio 3.x is importable (the CI venv has no gradio; run it in a venv with gradio==3.41.2).
A1111 itself is not imported: the few ``modules.*`` names the tab file touches while registering, building and
running a button are stand-ins with A1111's signatures (modules/script_callbacks.py on_ui_tabs/on_ui_settings,
shared.opts / OptionInfo, shared.state, shared.cmd_opts, paths, call_queue.queue_lock, devices, sd_hijack). A button
is run through the built Blocks' own handler with no model loaded (it must answer with one line and leave the
queue lock, shared.state and the cross-attention optimizations as they were); training runs are covered by
test_a1111_cu_logic.py. The tab's polled status event (``load(every=...)``) is run one round at a time against
the stand-in shared.state / queue_lock.
"""
from __future__ import annotations

import importlib.util
import inspect
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

    class State:  # modules/shared_state.py
        job, interrupted, skipped = "", False, False
        sampling_step = sampling_steps = 0
        textinfo = None

        def begin(self, job="(unknown)"):
            self.job, self.interrupted = job, False
            registered["jobs"].append(job)

        def end(self):
            self.job = ""

        def interrupt(self):
            self.interrupted = True

    registered["jobs"], registered["hijack"] = [], []
    shared = types.ModuleType("modules.shared")
    shared.OptionInfo, shared.opts = OptionInfo, Options()
    shared.opts.training_xattention_optimizations = False
    shared.cmd_opts = types.SimpleNamespace(lowvram=False, medvram=False, lora_dir=str(tmp_path / "loras"))
    shared.state = State()
    shared.sd_model = None
    paths = types.ModuleType("modules.paths")
    paths.models_path, paths.data_path, paths.script_path = str(tmp_path / "models"), str(tmp_path), str(tmp_path)
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "unlearn_cat.safetensors").write_bytes(b"")
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "mycat.safetensors").write_bytes(b"")
    call_queue = types.ModuleType("modules.call_queue")
    call_queue.queue_lock = threading.Lock()
    devices = types.ModuleType("modules.devices")
    devices.autocast = None
    devices.torch_gc = lambda: None
    sd_hijack = types.ModuleType("modules.sd_hijack")
    sd_hijack.undo_optimizations = lambda: registered["hijack"].append("undo")
    sd_hijack.apply_optimizations = lambda: registered["hijack"].append("apply")
    for name, module in {"modules": modules, "modules.script_callbacks": callbacks, "modules.shared": shared,
                         "modules.paths": paths, "modules.call_queue": call_queue, "modules.devices": devices,
                         "modules.sd_hijack": sd_hijack}.items():
        monkeypatch.setitem(sys.modules, name, module)
        if "." in name:
            setattr(modules, name.split(".")[1], module)
    return registered, shared


def load_tab():
    # A1111 modules/script_loading.load_module: spec_from_file_location(basename, path), no sys.modules entry
    spec = importlib.util.spec_from_file_location(TAB.name, TAB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(registered):
    assert len(registered["tabs"]) == 1 and len(registered["settings"]) == 1
    (blocks, title, elem_id), = registered["tabs"][0]()
    assert isinstance(blocks, gr.Blocks) and title == "Concept Unlearn" and elem_id == "concept_unlearn"
    return blocks


def components(blocks):
    return {getattr(b, "elem_id", None): b for b in blocks.blocks.values()}


def handler(blocks, button):
    """The function gradio runs for a click on ``button`` (with its input and output components)."""
    for dependency, fn in zip(blocks.dependencies, blocks.fns):
        if any(t == button._id or t == (button._id, "click") for t in dependency["targets"]):
            return fn.fn, dependency
    raise AssertionError(f"no handler for {button.elem_id}")


def test_tab_registers_and_builds_under_gradio_3(a1111_modules):
    registered, shared = a1111_modules
    load_tab()
    registered["settings"][0]()
    assert set(shared.opts.data_labels) == {"concept_unlearn_resolution", "concept_unlearn_overwrite",
                                            "concept_unlearn_lr"}
    assert {info.section for info in shared.opts.data_labels.values()} == {("concept_unlearn", "Concept Unlearn")}
    blocks = build(registered)
    by_id = components(blocks)
    buttons = {b.value for b in blocks.blocks.values() if isinstance(b, gr.Button)}
    assert {"Learn Token", "Erase", "Audit", "Interrupt"} <= buttons, buttons
    assert isinstance(by_id["concept_unlearn_images"], gr.File)
    assert by_id["concept_unlearn_images"].file_count == "multiple"
    for elem_id in ("concept_unlearn_concept", "concept_unlearn_synonyms", "concept_unlearn_method",
                    "concept_unlearn_preset", "concept_unlearn_steps", "concept_unlearn_rank", "concept_unlearn_seed"):
        assert elem_id in by_id, elem_id
    # the token / adapter lists show the files of embeddings/ and of --lora-dir
    assert [c[0] if isinstance(c, (list, tuple)) else c for c in by_id["concept_unlearn_token"].choices] == ["mycat"]
    assert [c[0] if isinstance(c, (list, tuple)) else c for c in by_id["concept_unlearn_adapter"].choices] \
        == ["unlearn_cat"]
    # "erase after" (continual erasure): none, or an earlier adapter of --lora-dir
    assert [c[0] if isinstance(c, (list, tuple)) else c for c in by_id["concept_unlearn_erase_after"].choices] \
        == ["none", "unlearn_cat"]
    assert by_id["concept_unlearn_erase_after"].value == "none"
    for elem_id in ("concept_unlearn_erase", "concept_unlearn_learn", "concept_unlearn_audit"):
        fn, _ = handler(blocks, by_id[elem_id])
        default = inspect.signature(fn).parameters["progress"].default
        assert isinstance(default, gr.Progress), elem_id  # gradio 3.41 injects its progress tracker


def test_buttons_answer_in_one_line_and_interrupt_sets_state(a1111_modules):
    registered, shared = a1111_modules
    load_tab()
    blocks = build(registered)
    by_id = components(blocks)
    fn, dependency = handler(blocks, by_id["concept_unlearn_erase"])
    typed = {"concept_unlearn_concept": "a cat", "concept_unlearn_method": "Anchor (no images needed)"}
    values = [typed.get(blocks.blocks[i].elem_id, getattr(blocks.blocks[i], "value", None))
              for i in dependency["inputs"]]
    message, curve, _adapter, _erase_after = fn(*values)
    assert message.startswith("Error: no model is loaded") and curve is None and "\n" not in message
    assert registered["jobs"] == ["concept_unlearn"] and shared.state.job == ""
    assert registered["hijack"] == ["undo", "apply"]  # A1111's Train tab rule, undone whatever happens
    assert sys.modules["modules.call_queue"].queue_lock.acquire(blocking=False)  # released
    sys.modules["modules.call_queue"].queue_lock.release()
    shared.state.job = "txt2img"
    fn, dependency = handler(blocks, by_id["concept_unlearn_audit"])
    message, _curve = fn(*[getattr(blocks.blocks[i], "value", None) for i in dependency["inputs"]])
    assert message.startswith("Busy: another job (txt2img) is running")
    fn, dependency = handler(blocks, by_id["concept_unlearn_interrupt"])
    assert dependency["queue"] is False  # answered at once, not queued behind the running job
    fn()
    assert shared.state.interrupted is True


def test_status_line_and_buttons_follow_a1111_state_live(a1111_modules):
    registered, shared = a1111_modules
    tab = load_tab()
    blocks = build(registered)
    by_id = components(blocks)
    buttons = [by_id[e] for e in ("concept_unlearn_learn", "concept_unlearn_erase", "concept_unlearn_audit")]
    status_line = by_id["concept_unlearn_status"]
    assert isinstance(status_line, gr.Markdown)
    polled = [(dependency, fn.fn) for dependency, fn in zip(blocks.dependencies, blocks.fns)
              if dependency["trigger"] == "load" and dependency["every"]]
    assert len(polled) == 1, [d["trigger"] for d in blocks.dependencies]
    dependency, continuous = polled[0]
    assert dependency["every"] == tab.STATUS_EVERY and dependency["types"]["continuous"]
    assert dependency["targets"] == [] and dependency["inputs"] == [] and dependency["show_progress"] == "hidden"
    assert dependency["outputs"] == [status_line._id] + [b._id for b in buttons]
    assert by_id["concept_unlearn_interrupt"]._id not in dependency["outputs"]  # Interrupt stays enabled always

    def poll():  # one round of the event gradio runs every STATUS_EVERY seconds (the first one without a wait)
        updates = next(continuous())
        assert len(updates) == 4 and all(u["__type__"] == "update" for u in updates)
        return updates[0]["value"], [u["interactive"] for u in updates[1:]]

    assert poll() == ("Ready", [True] * 3)
    shared.state.begin("txt2img")  # another job
    assert poll() == ("AUTOMATIC1111 is busy with txt2img: the buttons come back when it finishes", [False] * 3)
    shared.state.end()
    assert poll() == ("Ready", [True] * 3)
    with sys.modules["modules.call_queue"].queue_lock:  # the queue lock held with no job
        text, enabled = poll()
        assert text.startswith("AUTOMATIC1111 is busy with a queued task") and enabled == [False] * 3
    shared.state.begin("concept_unlearn")  # our own run: its step, not a refusal
    shared.state.textinfo = "Erase 3/60"
    assert poll() == ("Concept Unlearn is running: Erase 3/60 (Interrupt stops it and saves nothing)", [False] * 3)
    shared.state.end()
    # the updates are valid for these components in gradio 3.41 (interactive becomes the frontend's mode)
    shared.state.job = "txt2img"
    sent = [gr.blocks.postprocess_update_dict(block, update) for block, update in
            zip([status_line] + buttons, next(continuous()))]
    assert [u.get("mode") for u in sent[1:]] == ["static"] * 3 and "busy with txt2img" in sent[0]["value"]
    # A1111 renders the tab into its own Blocks (modules/ui.py create_ui) and enables the queue, which `every` needs
    with gr.Blocks(analytics_enabled=False) as demo:
        with gr.Tabs():
            with gr.TabItem("Concept Unlearn"):
                blocks.render()
    demo.queue(64)
    demo.validate_queue_settings()
    config = demo.get_config_file()
    assert [d["outputs"] for d in config["dependencies"] if d["trigger"] == "load" and d["every"]] \
        == [[status_line._id] + [b._id for b in buttons]]
