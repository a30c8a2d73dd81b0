"""ComfyUI as a user runs it (issue 15 item 4), the parts that need no ComfyUI: tooltips, saving twice, error
types, Cancel between the passes of a step, the cost estimate, CPU defaults, optional images, node text.

The pack is imported as ComfyUI 0.3.64 imports a custom node folder (nodes.load_custom_node): under a module
name made from the folder's path, ``module_path.replace(".", "_x_")``.
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest
import torch
from comfy_pack import load_pack
from unlearn_core.diffusers_backend import load_pipeline

REPO = Path(__file__).resolve().parents[1]
PACK = str(REPO).replace(".", "_x_")  # what ComfyUI calls this pack in sys.modules


@pytest.fixture(scope="module")
def pack():
    return load_pack(PACK)


def sub(name):
    return sys.modules[f"{PACK}.{name}"]


def node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[f"{name}|ConceptUnlearn"]


def _adapter(pack, finite=True):
    lora = sub("unlearn_core.lora")
    targets = sub("unlearn_core.targets")
    shapes = {t: (64, 32) for t in targets.complete_attention([targets.Target(0, "q"), targets.Target(1, "fc1")])}
    deltas = lora.Deltas(shapes, rank=2, seed=1)
    for up in deltas.up.values():
        torch.nn.init.normal_(up)
        if not finite:
            up.data[0, 0] = float("inf")
    return sub("nodes.host").ErasureAdapter(deltas, {"width": 32, "layers": 2, "probe": [0.1]},
                                            {"concept": "a red star", "method": "anchor", "steps": 3,
                                             "final_losses": {"loss": -1.228, "erase": -1.3, "keep": 0.072}})


@pytest.fixture
def fake_comfy(monkeypatch):
    """comfy.utils.ProgressBar and comfy.model_management's interrupt check, recorded."""
    record = {"bars": [], "checks": 0, "interrupt_after": None}

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.node_id, self.values = total, node_id, []
            record["bars"].append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.values.append(value)

    class Interrupted(Exception):
        pass

    def throw_exception_if_processing_interrupted():
        record["checks"] += 1
        if record["interrupt_after"] is not None and record["checks"] > record["interrupt_after"]:
            raise Interrupted("interrupted")

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.InterruptProcessingException = Interrupted
    comfy.utils, comfy.model_management = utils, mm
    for name, module in (("comfy", comfy), ("comfy.utils", utils), ("comfy.model_management", mm)):
        monkeypatch.setitem(sys.modules, name, module)
    record["Interrupted"] = Interrupted
    return record


# ---------------------------------------------------------------------------- tooltips

def test_every_input_of_every_node_has_a_tooltip(pack):
    missing = []
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        for section in ("required", "optional"):
            for input_name, spec in cls.INPUT_TYPES().get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                if not str(options.get("tooltip", "")).strip():
                    missing.append(f"{name}.{input_name}")
    assert not missing, missing


def test_tooltips_say_what_the_presets_mean(pack):
    required = node(pack, "UnlearnConceptLoRA").INPUT_TYPES()["required"]
    targets = required["targets"][1]["tooltip"]
    assert all(f"{preset} =" in targets for preset in ("fewshot", "first", "final", "all"))
    for method in sub("nodes.comfy_nodes").METHODS:
        assert f"{method}:" in required["method"][1]["tooltip"]


# ---------------------------------------------------------------------------- saving twice

def test_saving_again_adds_a_counter_instead_of_failing_after_the_work(pack, tmp_path, monkeypatch):
    host = sub("nodes.host")
    monkeypatch.setattr(host, "models_folder", lambda kind: tmp_path / kind)
    save = node(pack, "SaveErasureAdapter")()
    adapter = _adapter(pack)
    names = [save.run(adapter, "erasure/no-red-star", False)["result"][0] for _ in range(3)]
    assert names == ["erasure/no-red-star.safetensors", "erasure/no-red-star_00001_.safetensors",
                     "erasure/no-red-star_00002_.safetensors"]
    # counting goes on from the highest counter there (as Save Image does), whatever else is in the folder
    (tmp_path / "loras" / "erasure" / "no-red-star_00041_.safetensors").write_bytes(b"x")
    (tmp_path / "loras" / "erasure" / "no-red-star-2_00099_.safetensors").write_bytes(b"x")
    output = save.run(adapter, "erasure/no-red-star", False)
    assert output["result"][0] == "erasure/no-red-star_00042_.safetensors"
    # the node shows this run's file
    assert "saved: erasure/no-red-star_00042_.safetensors" in output["ui"]["concept_unlearn"][0]["lines"]
    assert save.run(adapter, "erasure/no-red-star", True)["result"][0] == "erasure/no-red-star.safetensors"


def test_save_name_is_checked_when_the_prompt_is_queued(pack):
    save = node(pack, "SaveErasureAdapter")
    assert save.VALIDATE_INPUTS("erasure/no-cat") is True
    for bad in ("../outside", "/etc/no-cat", "", "a\\b"):
        message = save.VALIDATE_INPUTS(bad)
        assert isinstance(message, str) and "inside models/loras" in message
    assert isinstance(node(pack, "LearnConceptToken").VALIDATE_INPUTS("my token"), str)
    assert node(pack, "LearnConceptToken").VALIDATE_INPUTS("<my-token>") is True
    # a linked input is not known at queue time (ComfyUI then calls without it): checked when the node runs
    assert save.VALIDATE_INPUTS() is True and node(pack, "LearnConceptToken").VALIDATE_INPUTS() is True


# ---------------------------------------------------------------------------- error types in ComfyUI's dialog

def full_type_name(klass):  # ComfyUI 0.3.64 execution.py: the exception type its error dialog shows
    module = klass.__module__
    return klass.__qualname__ if module == "builtins" else module + "." + klass.__qualname__


def test_errors_show_a_type_without_a_file_path(pack, tmp_path, monkeypatch):
    host = sub("nodes.host")
    adapter_io = sub("unlearn_core.adapter_io")
    monkeypatch.setattr(host, "models_folder", lambda kind: tmp_path / kind)
    with pytest.raises(adapter_io.AdapterFileError) as caught:  # still the engine's class (and a ValueError)
        node(pack, "SaveErasureAdapter")().run(_adapter(pack, finite=False), "diverged", False)
    shown = full_type_name(type(caught.value))
    assert shown == "concept_unlearn.AdapterFileError", shown
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, sub("nodes.errors").ConceptUnlearnError)
    assert "inf or NaN" in str(caught.value) and not list((tmp_path / "loras").glob("*.safetensors"))
    # built-in exceptions already show their plain name and pass through unchanged
    with pytest.raises(ValueError) as caught:
        node(pack, "ApplyErasureAdapter")().run(None, 1.0, sub("nodes.comfy_nodes").NO_FILE)
    assert full_type_name(type(caught.value)) == "ValueError"


# ---------------------------------------------------------------------------- Cancel, progress and cost

def test_cancel_lands_between_the_passes_of_one_training_step(pack, sensitive, images, fake_comfy):
    """The interrupt is checked before every UNet / text-encoder pass, not only after each step."""
    pipe, _ = sensitive
    backend = importlib.import_module(f"{PACK}.unlearn_core.diffusers_backend").DiffusersBackend(pipe)
    host = sub("nodes.host")
    methods = sub("unlearn_core.methods")
    erase = sub("unlearn_core.erase").erase
    config = methods.method_config("weighted", "a red square", steps=2, preset="final")
    steps_done = []
    fake_comfy["interrupt_after"] = 3  # Cancel pressed during the first step
    with pytest.raises(fake_comfy["Interrupted"]):
        erase(host.Interruptible(backend), config, images, None, steps_done.append)
    assert steps_done == [] and fake_comfy["checks"] == 4
    # uninterrupted, a step of this method makes several checks (one per pass)
    fake_comfy.update(checks=0, interrupt_after=None)
    erase(host.Interruptible(backend), config, images, None, steps_done.append)
    assert len(steps_done) == 2 and fake_comfy["checks"] >= 2 * 3


def test_progress_callback_says_what_the_run_will_cost_after_its_first_step(pack, fake_comfy, monkeypatch):
    host = sub("nodes.host")
    train = sub("unlearn_core.train")
    sent, logged = [], []
    monkeypatch.setattr(host, "send", lambda event, data: sent.append(data))
    clock = iter([0.0, 91.0, 181.0, 275.0])
    callback = host.progress_callback("7", "Unlearn Concept", log=logged.append, clock=lambda: next(clock))
    for step in (1, 2, 3):
        callback(train.StepInfo(step, 60, {"loss": 1.0}))
    assert logged == ["Unlearn Concept: step 1 of 60 took 1 min 31 s (setup included); the run will take about "
                      "1 h 31 min in all (Cancel stops it)"]
    assert [d["seconds_left"] for d in sent] == [59 * 91.0, 58 * 90.0, 57 * 92.0]
    assert fake_comfy["bars"][0].node_id == "7" and fake_comfy["bars"][0].values == [1, 2, 3]
    assert fake_comfy["checks"] == 3


def test_audit_progress_counts_sampling_steps_and_checks_cancel(pack, fake_comfy):
    host = sub("nodes.host")
    progress = host.Progress(2 * 3 * 4, "9")
    step = progress.sampler_callback()
    for i in range(4):
        step(i, None, None, 4)
    assert fake_comfy["bars"][0].values == [1, 2, 3, 4] and fake_comfy["checks"] == 4
    fake_comfy["interrupt_after"] = 4
    with pytest.raises(fake_comfy["Interrupted"]):
        step(4, None, None, 4)


# ---------------------------------------------------------------------------- defaults and optional images

def test_lighter_defaults_on_a_cpu(pack, monkeypatch):
    host = sub("nodes.host")
    for cpu, size in ((True, 256), (False, 512)):
        monkeypatch.setattr(host, "on_cpu", lambda: cpu)
        assert node(pack, "UnlearnConceptLoRA").INPUT_TYPES()["required"]["resolution"][1]["default"] == size
        assert node(pack, "LearnConceptToken").INPUT_TYPES()["required"]["resolution"][1]["default"] == size
        audit = node(pack, "ErasureAudit").INPUT_TYPES()["required"]
        assert audit["width"][1]["default"] == audit["height"][1]["default"] == size


def test_methods_without_images_run_with_no_images_connected(pack, monkeypatch):
    nodes = sub("nodes.comfy_nodes")
    methods = sub("unlearn_core.methods")
    unlearn = node(pack, "UnlearnConceptLoRA")
    assert "images" in unlearn.INPUT_TYPES()["optional"] and "images" not in unlearn.INPUT_TYPES()["required"]

    class Reached(Exception):
        pass

    def backend(*_args):
        raise Reached

    monkeypatch.setattr(nodes, "_backend", backend)
    args = dict(concept="a red star", synonyms="", kind="object", targets="final", steps=2, rank=2,
                learning_rate=1e-3, anchor="", keep="", contexts="", preserve="a photo", resolution=64, seed=0)
    image_free = [name for name, m in methods.METHODS.items() if not m.needs_images]
    assert {"anchor", "contextual"} <= set(image_free)
    for method in methods.METHODS:
        expected = ValueError if methods.METHODS[method].needs_images else Reached
        with pytest.raises(expected):
            unlearn().run(None, None, None, method=method, **args)


# ---------------------------------------------------------------------------- node text

def test_node_text_names_each_loss_once(pack):
    lines = sub("nodes.host").display_lines(_adapter(pack).summary())
    assert "final loss: -1.228 (erase -1.3, keep 0.072)" in lines
    assert not any("loss loss" in line for line in lines)
    assert "concept: a red star" in lines and "method: anchor" in lines


# ---------------------------------------------------------------------------- continual erasure (erase_after)

def _continual_node(pack, monkeypatch, tmp_path, pipe):
    """Unlearn Concept LoRA over a tiny diffusers model (the engine's backend with ComfyBackend's session) and a
    models/loras folder in tmp_path."""
    from contextlib import contextmanager

    nodes, host = sub("nodes.comfy_nodes"), sub("nodes.host")
    backend = importlib.import_module(f"{PACK}.unlearn_core.diffusers_backend").DiffusersBackend(pipe)

    @contextmanager
    def session(images=None):
        with torch.enable_grad():
            yield backend

    backend.session = session
    monkeypatch.setattr(nodes, "_backend", lambda *args: backend)
    monkeypatch.setattr(host, "models_folder", lambda kind: tmp_path / kind)
    monkeypatch.setattr(host, "full_path", lambda kind, name: str(tmp_path / kind / name))
    return node(pack, "UnlearnConceptLoRA")(), backend


CONTINUAL = dict(synonyms="", method="contextual", kind="object", targets="final", steps=3, rank=2,
                 learning_rate=1e-2, anchor="", keep="green circle", contexts="a {} on a table\na big {} in a room",
                 preserve="a photo", resolution=64, seed=0)


def test_erase_after_an_earlier_adapter_outputs_the_grown_stack(pack, tmp_path, monkeypatch, pipe, fake_comfy):
    stacking = sub("unlearn_core.stacking")
    unlearn, _ = _continual_node(pack, monkeypatch, tmp_path, pipe)
    assert "erase_after" in unlearn.INPUT_TYPES()["optional"]
    assert unlearn.INPUT_TYPES()["optional"]["erase_after"][1]["default"] == "none"
    first = unlearn.run(None, None, None, concept="red square", **CONTINUAL)["result"][0]
    earlier = node(pack, "SaveErasureAdapter")().run(first, "erasure/no-red", False)["result"][0]
    earlier_path = tmp_path / "loras" / earlier
    before = earlier_path.read_bytes()
    adapter, curve = unlearn.run(None, None, None, concept="blue triangle", erase_after=earlier, **CONTINUAL)["result"]
    assert adapter.stored is not None and adapter.stored.is_stack and curve.ndim == 4
    concepts = [p.concept for p in stacking.unstack(adapter.stored)]
    assert concepts == ["red square", "blue triangle"]
    assert earlier_path.read_bytes() == before  # the earlier file is untouched
    saved = node(pack, "SaveErasureAdapter")().run(adapter, "erasure/no-red-blue", False)["result"][0]
    on_disk = stacking.load(tmp_path / "loras" / saved)
    assert [p.concept for p in stacking.unstack(on_disk)] == ["red square", "blue triangle"]
    assert any(k.startswith("lora_unet_") for k in on_disk.tensors)  # the UNet key/value edits stack too
    # the new part comes out again exactly: what remains is the earlier file's adapter
    rest = stacking.remove(on_disk, "blue triangle")
    assert [p.concept for p in rest.parts("rest")] == ["red square"]


def test_erase_after_a_bad_earlier_file_is_one_clear_error(pack, tmp_path, monkeypatch, pipe, fake_comfy,
                                                           other_model_dir):
    adapter_io = sub("unlearn_core.adapter_io")
    unlearn, _ = _continual_node(pack, monkeypatch, tmp_path, pipe)
    (tmp_path / "loras").mkdir(parents=True)
    (tmp_path / "loras" / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(adapter_io.AdapterFileError) as caught:
        unlearn.run(None, None, None, concept="blue triangle", erase_after="broken.safetensors", **CONTINUAL)
    assert full_type_name(type(caught.value)) == "concept_unlearn.AdapterFileError"
    with pytest.raises(ValueError, match="erase_after: .*contextual method, not 'anchor'"):
        unlearn.run(None, None, None, concept="blue triangle", erase_after="broken.safetensors",
                    **(CONTINUAL | {"method": "anchor"}))
    # an adapter made for another base model is refused before any training
    other = load_pipeline(other_model_dir)
    other_node, _ = _continual_node(pack, monkeypatch, tmp_path, other)
    first = other_node.run(None, None, None, concept="red square", **CONTINUAL)["result"][0]
    name = node(pack, "SaveErasureAdapter")().run(first, "other/no-red", False)["result"][0]
    unlearn, _ = _continual_node(pack, monkeypatch, tmp_path, pipe)
    fake_comfy["checks"] = 0
    with pytest.raises(adapter_io.AdapterFileError, match="another base model") as caught:
        unlearn.run(None, None, None, concept="blue triangle", erase_after=name, **CONTINUAL)
    assert full_type_name(type(caught.value)) == "concept_unlearn.AdapterFileError"
    assert fake_comfy["checks"] == 0  # no training step ran
