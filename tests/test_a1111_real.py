"""Our files through AUTOMATIC1111's own Lora code (skipped unless A1111_PATH is set).

A1111_PATH is a folder holding A1111 v1.10's files (never committed here):

    extensions-builtin/Lora/networks.py, network.py, network_lora.py, network_full.py, lora_patches.py, lyco_helpers.py
    modules/patches.py

A child interpreter imports them as A1111 does (the Lora folder and the A1111 root on sys.path), with small stand-ins
for what those files import from the rest of A1111 and that plays no part for a text-encoder LoRA: ``modules.shared``
(opts, cmd_opts, sd_model, walk_files), ``devices`` (cpu, dtype), ``sd_models`` (read_state_dict = safetensors),
``errors``, ``scripts``, ``sd_hijack``, ``cache``, ``hashes``, ``textual_inversion``, ``models.sd3.mmdit`` (QkvLinear),
``gradio``, ``lora_logger`` and, where the folder lacks them, the LyCORIS module types (hada, ia3, lokr, norm, glora,
oft: for kohya LoRA and ``.diff`` keys their create_module returns None). The text encoder is the open_clip-structured
model of tests/test_a1111_openclip.py, at ``sd_model.cond_stage_model.wrapped.model`` as A1111's
FrozenOpenCLIPEmbedder holds it. The file is applied by ``networks.load_networks`` and the LoraPatches forwards, as a
``<lora:name:strength>`` prompt applies it.

Checked here: every key of our LoRA and ``.diff`` files is matched (none dropped), A1111's merged weights equal
tests/a1111_reference.py's (float32 and float16 as on a GPU), and the conditioning equals the engine's; per-module
alphas; and the reference's model of what A1111 ignores (unmatched keys, q/k/v without out) against the real code.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from closeness import effect_error, relative_effect, relative_error
from unlearn_core.adapter_io import read_adapter, write_adapter
from unlearn_core.lora import Deltas
from unlearn_core.targets import Target, complete_attention

A1111 = os.environ.get("A1111_PATH")
pytestmark = pytest.mark.skipif(not A1111, reason="set A1111_PATH to a folder of A1111 v1.10's Lora files")
TESTS = Path(__file__).resolve().parent
REQUIRED = ["extensions-builtin/Lora/networks.py", "extensions-builtin/Lora/network.py",
            "extensions-builtin/Lora/network_lora.py", "extensions-builtin/Lora/network_full.py",
            "extensions-builtin/Lora/lora_patches.py", "extensions-builtin/Lora/lyco_helpers.py", "modules/patches.py"]

CHILD = r'''
import importlib, json, logging, os, sys, types
import torch
from safetensors import safe_open
from safetensors.torch import load_file

a1111, tests, work = sys.argv[1], sys.argv[2], sys.argv[3]
job = json.loads(open(os.path.join(work, "job.json")).read())
dtype = getattr(torch, job["dtype"])
sys.path[:0] = [os.path.join(a1111, "extensions-builtin", "Lora"), a1111, tests]

def stub(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(importlib.import_module(parent), child, module)
    return module

class Opts:
    lora_functional = False
    lora_in_memory_limit = 0
    lora_bundled_ti_to_infotext = False
    lora_not_found_warning_console = True
    lora_not_found_gradio_warning = False
    lora_preferred_name = "Alias from file"

def walk_files(path, allowed_extensions=None):
    for root, _, files in os.walk(path):
        for name in sorted(files):
            if allowed_extensions is None or os.path.splitext(name)[1] in allowed_extensions:
                yield os.path.join(root, name)

def read_metadata(filename):
    with safe_open(filename, framework="pt") as f:
        return f.metadata() or {}

class EmbeddingDb:
    word_embeddings, skipped_embeddings, expected_shape = {}, {}, -1

importlib.import_module("modules")  # A1111's own folder (modules/patches.py), a namespace package here
stub("gradio", Warning=lambda message: None)
stub("lora_logger", logger=logging.getLogger("lora"))
stub("modules.shared", opts=Opts(), cmd_opts=types.SimpleNamespace(lora_dir=job["lora_dir"],
     lyco_dir_backcompat=job["lora_dir"]), walk_files=walk_files, sd_model=None)
stub("modules.devices", cpu=torch.device("cpu"), device=torch.device("cpu"), dtype=dtype, torch_gc=lambda: None,
     cond_cast_unet=lambda x: x)
stub("modules.sd_models", read_state_dict=lambda filename, **kw: load_file(filename),
     read_metadata_from_safetensors=read_metadata)
stub("modules.errors", display=lambda e, task: print(f"A1111 error: {task}: {e!r}", file=sys.stderr),
     report=lambda message, exc_info=False: print(f"A1111 error: {message}", file=sys.stderr))
stub("modules.scripts", scripts_txt2img=None)
stub("modules.sd_hijack", model_hijack=types.SimpleNamespace(embedding_db=EmbeddingDb(), comments=[]))
stub("modules.cache", cached_data_for_file=lambda subsection, title, filename, func: func())
stub("modules.hashes", sha256_from_cache=lambda *a, **k: None, sha256=lambda *a, **k: "")
stub("modules.textual_inversion")
stub("modules.textual_inversion.textual_inversion", create_embedding_from_data=None)
stub("modules.models")
stub("modules.models.sd3")
stub("modules.models.sd3.mmdit", QkvLinear=type("QkvLinear", (torch.nn.Linear,), {}))
for kind, cls in [("hada", "Hada"), ("ia3", "Ia3"), ("lokr", "Lokr"), ("norm", "Norm"), ("glora", "GLora"), ("oft", "OFT")]:
    if not os.path.exists(os.path.join(a1111, "extensions-builtin", "Lora", f"network_{kind}.py")):
        import network
        stub(f"network_{kind}", **{f"ModuleType{cls}": type(f"ModuleType{cls}", (network.ModuleType,), {})})

import test_a1111_openclip as oc_test  # the open_clip-structured text encoder and A1111's SD2 encode
model = oc_test.TextCLIP()
model.load_state_dict(torch.load(os.path.join(work, "model.pt")))
model = model.to(dtype).eval()
sd_model = torch.nn.Module()
sd_model.is_sdxl = False
sd_model.cond_stage_model = torch.nn.Module()
sd_model.cond_stage_model.wrapped = torch.nn.Module()
sd_model.cond_stage_model.wrapped.model = model
sd_model.model = torch.nn.Module()  # the UNet: nothing of ours goes there
sys.modules["modules.shared"].sd_model = sd_model

import lora_patches, networks
networks.originals = lora_patches.LoraPatches()
networks.extra_network_lora = types.SimpleNamespace(errors={})
networks.assign_network_names_to_compvis_modules(sd_model)
ids = torch.tensor(job["ids"])
out = {}
try:
    with torch.no_grad():
        base = oc_test.encode_with_transformer(model, ids)
        for name in job["files"]:
            networks.list_available_networks()
            networks.load_networks([name], te_multipliers=[job["strength"]], unet_multipliers=[job["strength"]],
                                   dyn_dims=[None])
            cond = oc_test.encode_with_transformer(model, ids)
            net = networks.loaded_networks[0]
            state = {k: v.clone() for k, v in model.transformer.resblocks.state_dict().items()}
            networks.load_networks([])  # no <lora:...> in the next prompt: A1111 restores the weights
            restored = oc_test.encode_with_transformer(model, ids)
            out[name] = {"cond": cond, "state": state, "modules": sorted(net.modules),
                         "errors": dict(networks.extra_network_lora.errors), "restored": torch.equal(restored, base)}
        out["base"] = base
finally:
    networks.originals.undo()
torch.save(out, os.path.join(work, "out.pt"))
'''


def _run_a1111(tmp_path, model, files: dict[str, dict], dtype="float32", strength=1.0, ids=None):
    """Apply each file (name -> tensors) with A1111's code in a child interpreter; returns its results."""
    missing = [p for p in REQUIRED if not (Path(A1111) / p).is_file()]
    assert not missing, f"A1111_PATH lacks {missing}"
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir(parents=True)
    for name, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(lora_dir / f"{name}.safetensors"),
                  metadata={"ss_v2": "True", "ss_network_module": "networks.lora"})
    torch.save(model.state_dict(), tmp_path / "model.pt")
    job = {"dtype": dtype, "lora_dir": str(lora_dir), "files": list(files), "strength": strength,
           "ids": (ids if ids is not None else _ids()).tolist()}
    (tmp_path / "job.json").write_text(json.dumps(job))
    done = subprocess.run([sys.executable, "-c", CHILD, A1111, str(TESTS), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "A1111 error" not in done.stderr, done.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def _ids():
    from test_a1111_openclip import ids
    return ids()


def _model():
    from test_a1111_openclip import TextCLIP
    torch.manual_seed(0)
    model = TextCLIP()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _trained_like(deltas: Deltas, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(deltas.up.values()) + list(deltas.diff.values()):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return deltas


def _shapes(targets):
    return {t: (128, 32) if t.proj == "fc1" else ((32, 128) if t.proj == "fc2" else (32, 32)) for t in targets}


def _engine_conditioning(model, deltas, ids):
    from test_a1111_openclip import encode_with_transformer, linear_for, oc
    with torch.no_grad(), oc.routed_attention(model.transformer.resblocks) as splits, \
            deltas.inject(linear_for(splits, model)):
        return encode_with_transformer(model, ids)


def _reference_state(model, tensors, strength=1.0, dtype=torch.float32):
    import a1111_reference as ref
    state = {k: v.clone() for k, v in model.transformer.resblocks.state_dict().items()}
    state.update(ref.merged_weights(model.transformer.resblocks, tensors, strength, dtype))
    return state


def _files(tmp_path):
    """A LoRA file (fp16, as the CLI and the tab write it) and a .diff file, over every projection of 3 layers."""
    targets = complete_attention([Target(n, p) for n in range(3) for p in ("q", "fc1", "fc2")])
    lora = _trained_like(Deltas(_shapes(targets), rank=4, alpha=2.0, seed=1))
    full = _trained_like(Deltas(_shapes(targets), mode="full"), seed=2)
    paths = {"lora": write_adapter(tmp_path / "w" / "lora.safetensors", lora, None),
             "full": write_adapter(tmp_path / "w" / "full.safetensors", full, None)}
    from safetensors.torch import load_file
    return {name: load_file(str(path)) for name, path in paths.items()}, paths


def test_our_files_through_a1111s_code_equal_the_reference_and_the_engine(tmp_path):
    import a1111_reference as ref

    model, ids = _model(), _ids()
    files, paths = _files(tmp_path)
    out = _run_a1111(tmp_path / "run", model, files, strength=0.8)
    for name, tensors in files.items():
        got = out[name]
        expected = {name_ for name_ in ref.kohya_to_a1111(tensors, layers=4)}
        assert set(got["modules"]) == expected and len(expected) == 18, name  # every key matched, none dropped
        assert ref.unmatched_keys(tensors, layers=4) == []
        assert got["errors"] == {} and got["restored"], name
        reference = _reference_state(model, tensors, 0.8)
        for key, value in reference.items():
            assert relative_error(got["state"][key], value) < 1e-6, (name, key)
        deltas = read_adapter(paths[name]).deltas
        for t in deltas.targets:  # the engine's own strength: scale its deltas
            if deltas.mode == "lora":
                deltas.alphas[f"{t.layer}_{t.proj}"] *= 0.8
            else:
                deltas.diff[f"{t.layer}_{t.proj}"].data.mul_(0.8)
        engine = _engine_conditioning(model, deltas, ids)
        assert relative_effect(got["cond"], out["base"]) > 1e-3
        assert effect_error(got["cond"], engine, out["base"]) < 1e-4, name


def test_a1111_merges_in_float16_as_the_reference_says(tmp_path):
    """devices.dtype float16 (A1111 on a GPU without --no-half), on a float16 model."""
    model = _model()
    files, _ = _files(tmp_path)
    out = _run_a1111(tmp_path / "run", model, {"lora": files["lora"]}, dtype="float16")
    reference = _reference_state(model.half(), files["lora"], 1.0, torch.float16)
    merged = [k for k in reference if "c_fc" in k or "c_proj" in k or "in_proj_weight" in k or "out_proj.weight" in k]
    for key in merged:
        assert out["lora"]["state"][key].dtype == torch.float16
        assert torch.equal(out["lora"]["state"][key], reference[key]), key


def test_per_module_alphas_in_a1111_and_the_engine(tmp_path):
    targets = [Target(0, "fc1"), Target(1, "fc2"), Target(2, "fc1")]
    deltas = _trained_like(Deltas(_shapes(targets), rank=2, seed=3))
    tensors = deltas.to_kohya(torch.float32)
    for t, alpha in zip(targets, (0.5, 8.0, 2.0)):
        tensors[f"{t.kohya_name}.alpha"] = torch.tensor(alpha)
    model, ids = _model(), _ids()
    out = _run_a1111(tmp_path / "run", model, {"mixed": tensors})
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path), metadata={"ss_v2": "True"})
    engine = _engine_conditioning(model, read_adapter(path).deltas, ids)
    assert effect_error(out["mixed"]["cond"], engine, out["base"]) < 1e-4


def test_what_a1111_ignores_is_what_the_reference_ignores(tmp_path):
    """q/k/v without out: no attention update (and no error); keys matching no module: dropped silently; a layer
    number such as 01 reaches layer 1."""
    import a1111_reference as ref

    targets = [Target(0, "q"), Target(0, "k"), Target(0, "v"), Target(1, "fc1")]
    tensors = _trained_like(Deltas(_shapes(targets), rank=2, seed=4)).to_kohya(torch.float32)
    tensors = {k.replace("layers_1_", "layers_01_"): v for k, v in tensors.items()}
    tensors["lora_te_text_model_encoder_layers_9_mlp_fc1.alpha"] = torch.tensor(1.0)
    tensors["lora_unet_mid_block_attentions_0_proj_in.alpha"] = torch.tensor(1.0)
    model = _model()
    out = _run_a1111(tmp_path / "run", model, {"odd": tensors})
    got = out["odd"]
    assert set(got["modules"]) == set(ref.kohya_to_a1111(tensors, layers=4))
    assert len(ref.unmatched_keys(tensors, layers=4)) == 2
    reference = _reference_state(model, tensors)
    for key, value in reference.items():
        assert relative_error(got["state"][key], value) < 1e-6, key
    base = model.transformer.resblocks.state_dict()
    assert torch.equal(got["state"]["0.attn.in_proj_weight"], base["0.attn.in_proj_weight"])
    assert not torch.equal(got["state"]["1.mlp.c_fc.weight"], base["1.mlp.c_fc.weight"])
