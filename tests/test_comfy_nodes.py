"""The ComfyUI pack without ComfyUI: registration, node declarations, and the node code that needs no comfy.*.

The pack is imported the way ComfyUI imports a custom node folder (nodes.load_custom_node in ComfyUI 0.3.64:
importlib.util.spec_from_file_location(<folder name>, <folder>/__init__.py) + exec_module).
"""
from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest
import torch
from comfy_pack import load_pack

REPO = Path(__file__).resolve().parents[1]
PACK = "concept_unlearn_ci"  # ComfyUI names the package after the folder; any name must work
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


@pytest.fixture(scope="module")
def pack():
    return load_pack(PACK)


def sub(name):
    return sys.modules[f"{PACK}.{name}"]


def test_registration_in_one_place(pack):
    names = set(pack.NODE_CLASS_MAPPINGS)
    assert names == {f"{n}|ConceptUnlearn" for n in ("LearnConceptToken", "UnlearnConceptLoRA", "ApplyErasureAdapter",
                                                     "SaveErasureAdapter", "LoadErasureAdapter", "ErasureAudit",
                                                     "StackErasureAdapters", "RemoveFromErasureStack")}
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == names
    assert (REPO / pack.WEB_DIRECTORY).is_dir() and list((REPO / pack.WEB_DIRECTORY).glob("*.js"))


def test_import_has_no_host_side_effects(tmp_path):
    """Importing the pack (fresh interpreter, as ComfyUI does) loads neither diffusers nor comfy, writes nothing."""
    import subprocess

    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(REPO / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(REPO)!r}])\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['pack'] = module; spec.loader.exec_module(module)\n"
        "assert module.NODE_CLASS_MAPPINGS\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('diffusers', 'comfy', 'server', 'folder_paths')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["LearnConceptToken", "UnlearnConceptLoRA", "ApplyErasureAdapter",
                                  "SaveErasureAdapter", "LoadErasureAdapter", "ErasureAudit",
                                  "StackErasureAdapters", "RemoveFromErasureStack"])
def test_node_declarations(pack, name):
    cls = pack.NODE_CLASS_MAPPINGS[f"{name}|ConceptUnlearn"]
    assert cls.CATEGORY == "Concept Unlearn"
    assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    declared = cls.INPUT_TYPES()
    assert set(declared) <= {"required", "optional", "hidden"}
    names = []
    for section, inputs in declared.items():
        for input_name, spec in inputs.items():
            names.append(input_name)
            if section == "hidden":
                continue
            kind = spec[0]
            assert isinstance(kind, (str, list)), f"{input_name}: type must be a name or a list of choices"
            if isinstance(kind, list):
                assert all(isinstance(c, str) for c in kind)
            if kind in ("INT", "FLOAT"):
                options = spec[1]
                assert options["min"] <= options["default"] <= options["max"], input_name
    signature = inspect.signature(getattr(cls(), cls.FUNCTION))
    parameters = signature.parameters
    for input_name in names:
        assert input_name in parameters, f"{name}.{cls.FUNCTION} does not take input {input_name}"
    required = {n for n, p in parameters.items() if p.default is inspect.Parameter.empty}
    assert required <= set(declared["required"]), f"{name}: arguments without inputs: {required - set(declared['required'])}"


def test_method_presets_build_valid_engine_configs(pack):
    nodes = sub("nodes.comfy_nodes")
    for method in nodes.METHODS:
        config = nodes.UnlearnConceptLoRA.config("a red star", "red star, star shape", method, "object", "all",
                                                 60, 4, 1e-3, "a photo", "a dog\n\na cat", 0)
        assert config.synonyms == ("red star", "star shape")
        assert config.preserve == ("a dog", "a cat", "")
        if method == "fewshot-paper":  # the published settings, whatever the sliders say; rank = SVD compression
            assert (config.lora.mode, config.lora.compress_rank, config.lora.preset) == ("full", 4, "fewshot")
            assert (config.lr, config.steps, config.preserve_weight) == (1e-5, 10, 0.0)
        else:
            assert config.method == method and config.lora.rank == 4 and config.steps == 60
            assert config.lora.preset == "all"
    surgery = nodes.UnlearnConceptLoRA.config("a red star", "", "weighted", "object", "final", 10, 4, 1e-3, "a photo",
                                              "", 0, True)
    assert surgery.gradient_surgery and surgery.lora.preset == "final"
    with pytest.raises(ValueError, match="concept"):
        nodes.UnlearnConceptLoRA.config(" ", "", "weighted", "object", "fewshot", 10, 4, 1e-3, "", "", 0)


def test_images_from_comfy_layout(pack):
    host = sub("nodes.host")
    images = torch.rand(3, 48, 64, 4)  # [B, H, W, C] with alpha, as ComfyUI's IMAGE can be
    out = host.images_to_engine(images, 32)
    assert out.shape == (3, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    assert host.images_to_engine(images, 0).shape == (3, 3, 48, 48)
    with pytest.raises(ValueError, match="no example images"):
        host.images_to_engine(torch.zeros(0, 8, 8, 3), 32)


def _adapter(pack):
    lora = sub("unlearn_core.lora")
    targets = sub("unlearn_core.targets")
    shapes = {t: (64, 32) for t in targets.complete_attention([targets.Target(0, "q"), targets.Target(1, "fc1")])}
    deltas = lora.Deltas(shapes, rank=2, seed=1)
    for up in deltas.up.values():
        torch.nn.init.normal_(up)
    return sub("nodes.host").ErasureAdapter(deltas, {"width": 32, "layers": 2, "probe": [0.1]},
                                            {"concept": "<b>a red star</b>", "method": "anchor", "steps": 3})


def test_save_node_writes_what_apply_uses_and_never_replaces_unasked(pack, tmp_path, monkeypatch):
    host = sub("nodes.host")
    adapter_io = sub("unlearn_core.adapter_io")
    monkeypatch.setattr(host, "models_folder", lambda kind: tmp_path / kind)
    adapter = _adapter(pack)
    save = pack.NODE_CLASS_MAPPINGS["SaveErasureAdapter|ConceptUnlearn"]()
    output = save.run(adapter, "sub/no-star", False)
    name = output["result"][0]
    assert name == "sub/no-star.safetensors"
    file = adapter_io.read_adapter(tmp_path / "loras" / name)
    assert file.info("concept") == "<b>a red star</b>" and file.metadata["ss_network_module"] == "networks.lora"
    from safetensors.torch import load_file

    on_disk = load_file(str(tmp_path / "loras" / name))
    in_memory = adapter.kohya_tensors()
    assert on_disk.keys() == in_memory.keys()
    assert all(torch.equal(on_disk[k], in_memory[k]) for k in on_disk)  # Apply == LoraLoader(file)
    # a name already taken gets a counter (as Save Image does), never an error after the work
    assert save.run(adapter, "sub/no-star", False)["result"][0] == "sub/no-star_00001_.safetensors"
    assert save.run(adapter, "sub/no-star.safetensors", True)["result"][0] == "sub/no-star.safetensors"
    with pytest.raises(ValueError, match="inside models/loras"):
        save.run(adapter, "../outside", False)
    ui = output["ui"]["concept_unlearn"][0]
    assert ui["concept"] == "<b>a red star</b>" and ui["rank"] == 2


def test_adapter_summary_is_json(pack):
    summary = _adapter(pack).summary()
    assert json.loads(json.dumps(summary))["modules"] == 5


def _widget_inputs(cls):
    declared = cls.INPUT_TYPES()
    widgets = []
    for section in ("required", "optional"):
        for name, spec in declared.get(section, {}).items():
            if isinstance(spec[0], list) or spec[0] in WIDGET_TYPES:
                widgets.append((name, spec))
    return widgets


@pytest.mark.parametrize("path", sorted((REPO / "example_workflows").glob("*.json")), ids=lambda p: p.name)
def test_example_workflows_match_the_nodes(pack, path):
    workflow = json.loads(path.read_text())
    assert workflow["nodes"] and "links" in workflow
    ours = [n for n in workflow["nodes"] if n["type"].endswith("|ConceptUnlearn")]
    assert ours, "an example workflow should use the pack"
    for entry in ours:
        cls = pack.NODE_CLASS_MAPPINGS[entry["type"]]
        widgets = _widget_inputs(cls)
        # seeds get an extra 'control_after_generate' value in the UI format
        expected = len(widgets) + sum(1 for name, spec in widgets if name == "seed")
        assert len(entry.get("widgets_values", [])) == expected, f"{entry['type']} widget values"


def test_example_workflows_exist():
    names = {p.stem for p in (REPO / "example_workflows").glob("*.json")}
    assert {"erase-a-concept-and-compare", "learn-a-token", "apply-a-shared-adapter"} <= names


def test_registry_metadata_and_no_torch_for_users():
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "Concept Unlearn" and comfy["Icon"].endswith("js/icon.svg")
    assert (REPO / "js" / "icon.svg").is_file()
    requirements = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    for requirement in project["project"]["dependencies"] + [r for r in requirements if r]:
        assert re.split(r"[<>=!~\[ ]", requirement)[0].lower() not in {"torch", "torchvision", "torchaudio"}, requirement
