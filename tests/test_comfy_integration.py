"""Integration tests against a real ComfyUI checkout (skipped unless COMFYUI_PATH is set).

Run them with ComfyUI's own Python (its venv has ComfyUI's requirements, not ours):

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -q tests/test_comfy_integration.py

No weights are downloaded: an SD2-shaped checkpoint (SD 2.1 UNet config, 24-layer 1024-wide OpenCLIP text
encoder, SD VAE) with random weights is built with ComfyUI's own classes and saved with
comfy.sd.save_checkpoint, then loaded back the way CheckpointLoaderSimple does.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from comfy_pack import load_pack

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")
REPO = Path(__file__).resolve().parents[1]
PACK = "concept_unlearn_pack"


def comfy_on_path():
    if COMFYUI not in sys.path:
        sys.path.insert(0, COMFYUI)
    import comfy.cli_args  # library use: ComfyUI does not parse sys.argv, so set `--cpu` on its args

    comfy.cli_args.args.cpu = True


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                std = 0.02 if "embedding" in name else 1 / math.sqrt(p[0].numel())
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            elif name.endswith("weight"):  # 1-D weights are normalisation scales (GroupNorm, LayerNorm)
                p.fill_(1.0)
            else:
                p.zero_()


def build_sd2_checkpoint(path: Path, seed: int = 0, v_prediction: bool = True, small_unet: bool = True) -> Path:
    """Random-weight SD2 checkpoint built and saved by ComfyUI itself.

    Text encoder and VAE have the real SD2 shapes. The UNet has SD2's channels, heads and 1024-wide
    linear cross-attention (what ComfyUI's detection of SD20 looks at) with one res block per level
    instead of two when ``small_unet`` (2 CPU cores: a training step takes half the time)."""
    comfy_on_path()
    import comfy.ldm.models.autoencoder
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    generator = torch.Generator().manual_seed(seed)
    unet_config = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
                   'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320,
                   'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0],
                   'channel_mult': [1, 2, 4, 4], 'transformer_depth_middle': 1, 'use_linear_in_transformer': True,
                   'context_dim': 1024, 'num_head_channels': 64,
                   'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                   'use_temporal_attention': False, 'use_temporal_resblock': False}
    if small_unet:
        unet_config.update(num_res_blocks=[1, 1, 1, 1], transformer_depth=[1, 1, 1, 0],
                           transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0])
    config = comfy.supported_models.SD20(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    _randomise(model.diffusion_model, generator)
    if not small_unet:  # ComfyUI's SD20.model_type: std of output_blocks.11's norm1 bias > 0.09 means v-prediction
        marker = model.diffusion_model.output_blocks[11][1].transformer_blocks[0].norm1.bias
        with torch.no_grad():
            marker.copy_(torch.randn(marker.shape, generator=generator) * (0.2 if v_prediction else 0.0))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    clip = comfy.sd.CLIP(config.clip_target(), model_options={"dtype": torch.float32})
    _randomise(clip.cond_stage_model, generator)
    ddconfig = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
                'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}
    vae_model = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    _randomise(vae_model, generator)
    vae = comfy.sd.VAE(sd=vae_model.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.sd.save_checkpoint(str(path), patcher, clip, vae)
    return path



# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    cache = os.environ.get("CONCEPT_UNLEARN_TEST_CACHE")
    folder = Path(cache) if cache else tmp_path_factory.mktemp("checkpoints")
    path = folder / "sd2-small-unet.safetensors"
    if not path.exists():
        build_sd2_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def comfy_models(checkpoint, tmp_path_factory):
    """MODEL, CLIP, VAE as CheckpointLoaderSimple gives them (loaded in inference mode, like ComfyUI)."""
    comfy_on_path()
    import comfy.sd
    import folder_paths

    models_dir = tmp_path_factory.mktemp("models")
    for kind in ("loras", "embeddings"):
        (models_dir / kind).mkdir()
        folder_paths.add_model_folder_path(kind, str(models_dir / kind), is_default=True)
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(checkpoint), output_vae=True, output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return model, clip, vae, models_dir


@pytest.fixture(scope="session")
def pack():
    comfy_on_path()
    return load_pack(PACK)  # as ComfyUI's nodes.load_custom_node imports it


def node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name + "|ConceptUnlearn"]()


def result(output):
    return output["result"] if isinstance(output, dict) else output


def examples(count=2, size=64):
    images = torch.full((count, size, size, 3), 0.9)
    images[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4, 0] = 0.1
    return images


class Snapshot:
    """Everything a run could leave behind on the user's MODEL / CLIP."""

    def __init__(self, model, clip):
        self.model, self.clip = model, clip
        self.roots = {"unet": model.model, "clip": clip.cond_stage_model}
        self.tensors = {name: {k: v.clone() for k, v in root.state_dict().items()} for name, root in self.roots.items()}
        self.objects = {name: {k: id(v) for k, v in root.named_parameters()} for name, root in self.roots.items()}
        self.hooks = self._hooks()
        self.patches = (dict(model.patches), dict(clip.patcher.patches), dict(model.object_patches))
        self.grad_flags = {name: [p.requires_grad for p in root.parameters()] for name, root in self.roots.items()}

    def _hooks(self):
        return {name: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in root.modules())
                for name, root in self.roots.items()}

    def assert_unchanged(self):
        for name, root in self.roots.items():
            after = root.state_dict()
            assert after.keys() == self.tensors[name].keys()
            for key, value in self.tensors[name].items():
                assert torch.equal(after[key], value), f"{name}: {key} changed"
            assert {k: id(v) for k, v in root.named_parameters()} == self.objects[name], f"{name}: parameters replaced"
            assert [p.requires_grad for p in root.parameters()] == self.grad_flags[name]
        assert self._hooks() == self.hooks, "hooks left on the modules"
        assert (dict(self.model.patches), dict(self.clip.patcher.patches), dict(self.model.object_patches)) == self.patches


def erase_inputs(steps=2, **overrides):
    inputs = dict(images=examples(), concept="a red square", synonyms="red box", method="weighted", kind="object",
                  targets="final", steps=steps, rank=2, learning_rate=1e-3, anchor="a photo",
                  preserve="a photo of a dog", keep="", contexts="", resolution=64, seed=0)
    inputs.update(overrides)
    return inputs


# ---------------------------------------------------------------------------- the bridge

def test_conditioning_is_comfyuis_own(pack, comfy_models):
    """encode_ids gives exactly what CLIPTextEncode gives (same modules, same forward)."""
    from importlib import import_module

    model, clip, vae, _ = comfy_models
    backend_mod = import_module(PACK + ".nodes.comfy_backend")
    prompts = ["a photo of a red square", "a painting"]
    with torch.inference_mode():
        expected = [clip.encode_from_tokens(clip.tokenize(p)) for p in prompts]
        backend = backend_mod.ComfyBackend(model, clip, vae, latent_size=8)
        assert (backend.num_layers, backend.width) == (23, 1024)
        with backend.session():
            cond = backend.encode_ids(backend.tokenize(prompts))
    for i, reference in enumerate(expected):
        assert torch.equal(cond[i:i + 1].to(reference.device), reference)


def test_gradients_reach_deltas_and_token_vectors(pack, comfy_models):
    from importlib import import_module

    model, clip, vae, _ = comfy_models
    backend_mod = import_module(PACK + ".nodes.comfy_backend")
    lora = import_module(PACK + ".unlearn_core.lora")
    targets = import_module(PACK + ".unlearn_core.targets")
    tokens = import_module(PACK + ".unlearn_core.tokens")
    before = Snapshot(model, clip)
    with torch.inference_mode():
        backend = backend_mod.ComfyBackend(model, clip, vae, latent_size=8)
        with backend.session():
            chosen = [targets.Target(0, "fc1"), targets.Target(22, "q")]
            deltas = lora.Deltas(lora.target_shapes(backend.linear, targets.complete_attention(chosen)), rank=2)
            for up in deltas.up.values():
                torch.nn.init.normal_(up, std=0.01)
            vectors = torch.nn.Parameter(torch.randn(2, 1024) * 0.02)
            token = tokens.ConceptToken("<sq>", vectors)
            with deltas.inject(backend.linear):
                cond = tokens.encode(backend, ["a photo of <sq>", "a dog"], token)
                x_t = torch.randn(2, 4, 8, 8)
                out = backend.predict(x_t, torch.tensor([10, 900]), cond)
                out.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in deltas.parameters())
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    before.assert_unchanged()


@pytest.mark.parametrize("kind", ["EPS", "V_PREDICTION"])
def test_predict_is_the_raw_unet_output(pack, comfy_models, kind):
    """predict(x_t, t, cond) == diffusion_model(x_t, t, context) for eps and v models, via apply_model."""
    from importlib import import_module

    import comfy.model_base

    model, clip, vae, _ = comfy_models
    backend_mod = import_module(PACK + ".nodes.comfy_backend")
    base = model.model
    original = base.model_sampling
    base.model_sampling = comfy.model_base.model_sampling(base.model_config, getattr(comfy.model_base.ModelType, kind))
    try:
        with torch.inference_mode():
            backend = backend_mod.ComfyBackend(model, clip, vae, latent_size=8)
            assert backend.schedule.prediction_type == {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}[kind]
            with backend.session():
                generator = torch.Generator().manual_seed(0)
                x_t = torch.randn(2, 4, 8, 8, generator=generator)
                t = torch.tensor([3, 700])
                cond = backend.encode_ids(backend.tokenize(["a red square", "a dog"]))
                got = backend.predict(x_t, t, cond)
                direct = base.diffusion_model(x_t, t.float(), context=cond)
    finally:
        base.model_sampling = original
    assert torch.allclose(got, direct, rtol=1e-3, atol=1e-4 * float(direct.abs().max()))


def test_sd1_clip_is_refused_clearly(pack):
    from importlib import import_module

    import comfy.sd
    import comfy.supported_models

    backend_mod = import_module(PACK + ".nodes.comfy_backend")
    sd1 = comfy.supported_models.SD15({"context_dim": 768, "model_channels": 320, "use_linear_in_transformer": False,
                                       "adm_in_channels": None, "use_temporal_attention": False})
    clip = comfy.sd.CLIP(sd1.clip_target(), model_options={"dtype": torch.float32})
    with pytest.raises(ValueError, match="Stable Diffusion 1.x.*2.x only"):
        backend_mod.TextEncoderView(clip)


# ---------------------------------------------------------------------------- nodes in process

def test_unlearn_node_leaves_model_and_clip_bit_identical(pack, comfy_models):
    model, clip, vae, _ = comfy_models
    before = Snapshot(model, clip)
    with torch.inference_mode():
        output = node(pack, "UnlearnConceptLoRA").run(model, clip, vae, **erase_inputs())
    adapter, curve = result(output)
    before.assert_unchanged()
    assert curve.ndim == 4 and curve.shape[-1] == 3
    assert len(adapter.deltas.targets) == 6 and adapter.info["steps"] == 2
    assert any(float(up.abs().sum()) > 0 for up in adapter.deltas.up.values())
    info = output["ui"]["concept_unlearn"][0]
    assert info["concept"] == "a red square" and info["seconds_per_step"] > 0


def test_interrupt_cancels_and_leaves_everything_unchanged(pack, comfy_models):
    import comfy.model_management as mm

    model, clip, vae, _ = comfy_models
    before = Snapshot(model, clip)
    mm.interrupt_current_processing(True)
    try:
        with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
            node(pack, "UnlearnConceptLoRA").run(model, clip, vae, **erase_inputs(steps=5))
    finally:
        mm.interrupt_current_processing(False)
    before.assert_unchanged()


def test_error_mid_run_leaves_everything_unchanged(pack, comfy_models):
    model, clip, vae, _ = comfy_models
    before = Snapshot(model, clip)
    with torch.inference_mode(), pytest.raises(Exception, match="loss became|NaN"):
        node(pack, "UnlearnConceptLoRA").run(model, clip, vae, **erase_inputs(steps=3, learning_rate=1e30))
    before.assert_unchanged()


def test_saved_adapter_through_stock_loraloader_equals_apply(pack, comfy_models):
    import nodes as comfy_nodes  # ComfyUI's own nodes module

    model, clip, vae, models_dir = comfy_models
    with torch.inference_mode():
        adapter, _ = result(node(pack, "UnlearnConceptLoRA").run(model, clip, vae, **erase_inputs()))
        name = result(node(pack, "SaveErasureAdapter").run(adapter, "test/apply-equals-loader", True))[0]
        assert (models_dir / "loras" / name).is_file()
        again = result(node(pack, "SaveErasureAdapter").run(adapter, "test/apply-equals-loader", False))[0]
        assert again == "test/apply-equals-loader_00001_.safetensors"  # a counter, never an error after the work
        applied = result(node(pack, "ApplyErasureAdapter").run(clip, 0.8, "(connected adapter)", adapter))[0]
        from_file = result(node(pack, "ApplyErasureAdapter").run(clip, 0.8, name))[0]
        _, stock = comfy_nodes.LoraLoader().load_lora(model, clip, name, 1.0, 0.8)
        prompt = "a photo of a red square"
        conds = [c.encode_from_tokens(c.tokenize(prompt)) for c in (applied, from_file, stock, clip)]
    assert torch.equal(conds[0], conds[2]) and torch.equal(conds[1], conds[2])
    assert not torch.equal(conds[0], conds[3])  # the adapter does something
    loaded = result(node(pack, "LoadErasureAdapter").run(clip, name, False))[0]
    assert loaded.info["concept"] == "a red square" and loaded.source == name


def test_adapter_for_another_base_is_a_clear_error(pack, comfy_models):
    from importlib import import_module

    model, clip, vae, models_dir = comfy_models
    adapter_io = import_module(PACK + ".unlearn_core.adapter_io")
    with torch.inference_mode():
        adapter, _ = result(node(pack, "UnlearnConceptLoRA").run(model, clip, vae, **erase_inputs(steps=1)))
    other = dict(adapter.fingerprint, probe=[v + 0.5 for v in adapter.fingerprint["probe"]])
    adapter_io.write_adapter(models_dir / "loras" / "other-base.safetensors", adapter.deltas, other, adapter.info,
                             overwrite=True)
    with pytest.raises(ValueError, match="made for another base model"):
        node(pack, "LoadErasureAdapter").run(clip, "other-base.safetensors", False)
    assert result(node(pack, "LoadErasureAdapter").run(clip, "other-base.safetensors", True))[0].deltas.targets


def test_learn_token_saves_an_embedding_comfyui_loads(pack, comfy_models):
    model, clip, vae, models_dir = comfy_models
    before = Snapshot(model, clip)
    with torch.inference_mode():
        output = node(pack, "LearnConceptToken").run(model, clip, vae, examples(), "sq-token", "object", "object", 2,
                                                     2, 5e-3, 64, 0, True, True)
        token, curve, word = result(output)
        before.assert_unchanged()
        assert word == "embedding:sq-token" and (models_dir / "embeddings" / "sq-token.safetensors").is_file()
        tokens = clip.tokenize("a photo of embedding:sq-token")["h"][0]
        spliced = [t[0] for t in tokens if not isinstance(t[0], int)]  # ComfyUI puts one entry per vector
        assert torch.allclose(torch.stack(spliced).float(), token.vectors)



# ---------------------------------------------------------------------------- as a user runs it (issue 15 item 4)

class Hook:
    """ComfyUI's progress-bar hook (main.py installs one that also checks the interrupt): records updates and
    presses Cancel at the given update."""

    def __init__(self, cancel_at=None):
        self.updates, self.cancel_at = [], cancel_at

    def __call__(self, value, total, preview, node_id=None, prompt_id=None):
        import comfy.model_management as mm

        self.updates.append((value, total, node_id))
        if self.cancel_at is not None and len(self.updates) >= self.cancel_at:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()


@pytest.fixture
def progress_hook():
    import comfy.model_management as mm
    import comfy.utils

    previous = comfy.utils.PROGRESS_BAR_HOOK
    hooks = []

    def install(cancel_at=None):
        hook = Hook(cancel_at)
        comfy.utils.set_progress_bar_global_hook(hook)
        hooks.append(hook)
        return hook
    yield install
    comfy.utils.set_progress_bar_global_hook(previous)
    mm.interrupt_current_processing(False)


AUDIT = dict(prompts="a photo of a red square\na photo of a dog", negative="", strength=1.0, seed=0, steps=3,
             cfg=7.0, sampler_name="euler", scheduler="normal", width=64, height=64, attack_steps=0)


def test_audit_shows_progress_and_stops_on_cancel(pack, comfy_models, progress_hook):
    import comfy.model_management as mm

    model, clip, vae, _ = comfy_models
    with torch.inference_mode():
        adapter, _ = result(node(pack, "UnlearnConceptLoRA").run(model, clip, vae, **erase_inputs(steps=1)))
        hook = progress_hook()
        node(pack, "ErasureAudit").run(model, clip, vae, adapter, **AUDIT, unique_id="6")
        assert [v for v, _, _ in hook.updates] == list(range(1, 2 * 2 * 3 + 1))  # every sampling step, one bar
        assert {(t, n) for _, t, n in hook.updates} == {(12, "6")}
        hook = progress_hook(cancel_at=2)  # Cancel pressed during the first image
        with pytest.raises(mm.InterruptProcessingException):
            node(pack, "ErasureAudit").run(model, clip, vae, adapter, **AUDIT, unique_id="6")
    assert len(hook.updates) == 2


def test_unlearn_cancel_lands_within_a_step(pack, comfy_models, progress_hook, monkeypatch):
    """Cancel is checked before every UNet / text-encoder pass: pressed during step 1, no step completes."""
    import comfy.model_management as mm

    model, clip, vae, _ = comfy_models
    before = Snapshot(model, clip)
    hook = progress_hook()
    original = mm.throw_exception_if_processing_interrupted
    checks = []

    def check():
        checks.append(1)
        if len(checks) == 3:
            mm.interrupt_current_processing(True)  # pressed while the first step is running
        original()
    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", check)
    with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
        node(pack, "UnlearnConceptLoRA").run(model, clip, vae, **erase_inputs(steps=3), unique_id="5")
    assert hook.updates == [] and len(checks) == 3  # stopped at the next pass, before step 1 ended
    before.assert_unchanged()


@pytest.mark.parametrize("method", ["anchor", "contextual"])
def test_methods_without_images_run_with_none_connected(pack, comfy_models, method):
    model, clip, vae, _ = comfy_models
    inputs = erase_inputs(steps=1, method=method)
    del inputs["images"]
    with torch.inference_mode():
        adapter, _ = result(node(pack, "UnlearnConceptLoRA").run(model, clip, vae, **inputs))
    assert adapter.info["method"] == method and adapter.info["steps"] == 1


# ---------------------------------------------------------------------------- ComfyUI over HTTP

WORKFLOWS = REPO / "example_workflows"
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url):
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(url, payload):
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """`python main.py --cpu` with this repo linked into custom_nodes/, in a throwaway base directory."""
    import subprocess
    import time

    base = tmp_path_factory.mktemp("comfy-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "concept-unlearn").symlink_to(REPO, target_is_directory=True)
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / checkpoint.name).symlink_to(checkpoint)
    (base / "input").mkdir()
    (base / "user" / "default").mkdir(parents=True)  # a returning user: no first-visit template dialog
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    for shipped in sorted((REPO / "examples" / "images" / "red-star").glob("*.png")):  # what the workflows load
        (base / "input" / shipped.name).write_bytes(shipped.read_bytes())
    port = _free_port()
    log = open(base / "comfyui.log", "w")
    process = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                "--base-directory", str(base), "--disable-auto-launch"],
                               cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if process.poll() is not None:
                raise RuntimeError("ComfyUI exited: " + (base / "comfyui.log").read_text()[-3000:])
            try:
                _get(url + "/system_stats")
                break
            except OSError:
                time.sleep(1)
        yield {"url": url, "base": base, "log": base / "comfyui.log", "checkpoint": checkpoint.name}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def to_api(workflow: dict, object_info: dict, overrides: dict) -> dict:
    """UI-format workflow (what the template browser loads) -> API prompt, as the front end converts it."""
    sources = {link[0]: (str(link[1]), link[2]) for link in workflow["links"]}
    prompt = {}
    for entry in workflow["nodes"]:
        info = object_info[entry["type"]]
        order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
        values = list(entry.get("widgets_values", []))
        inputs = {}
        for section in ("required", "optional"):
            for name in order.get(section, []):
                spec = info["input"][section][name]
                kind = spec[0]
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if isinstance(kind, list) or kind in WIDGETS:
                    if not values:
                        break
                    inputs[name] = values.pop(0)
                    if options.get("control_after_generate") or name in ("seed", "noise_seed"):
                        values.pop(0)
        for slot in entry.get("inputs", []):
            if slot.get("link") is not None:
                inputs[slot["name"]] = list(sources[slot["link"]])
        inputs.update(overrides.get(entry["type"], {}))
        prompt[str(entry["id"])] = {"class_type": entry["type"], "inputs": inputs}
    return prompt


def run_prompt(server, prompt, timeout=1200):
    import time

    queued = _post(server["url"] + "/prompt", {"prompt": prompt, "client_id": "concept-unlearn-tests"})
    prompt_id = queued["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = _get(f"{server['url']}/history/{prompt_id}")
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(2)
    raise TimeoutError(f"prompt did not finish in {timeout} s")


SMALL = {
    "UnlearnConceptLoRA|ConceptUnlearn": {"steps": 2, "resolution": 64, "targets": "final", "preserve": "a photo"},
    "LearnConceptToken|ConceptUnlearn": {"steps": 2, "resolution": 64, "overwrite": True},
    "ErasureAudit|ConceptUnlearn": {"steps": 2, "width": 64, "height": 64, "attack_steps": 1,
                                    "prompts": "a photo of a red star\na photo of a dog"},
    "SaveErasureAdapter|ConceptUnlearn": {"overwrite": True},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 2},
}


def _workflow(server, name, extra=None):
    object_info = _get(server["url"] + "/object_info")
    overrides = {k: dict(v) for k, v in SMALL.items()}
    overrides["CheckpointLoaderSimple"] = {"ckpt_name": server["checkpoint"]}
    for key, value in (extra or {}).items():
        overrides.setdefault(key, {}).update(value)
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
    return to_api(workflow, object_info, overrides)


def _assert_success(entry, server):
    status = entry.get("status", {})
    errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
    assert status.get("status_str") == "success", (errors, server["log"].read_text()[-3000:])


def test_comfyui_starts_with_the_pack(server):
    log = server["log"].read_text()
    ours = [line for line in log.splitlines() if line.rstrip().endswith("custom_nodes/concept-unlearn")
            or "concept-unlearn" in line and "IMPORT FAILED" in line]
    assert ours and all("IMPORT FAILED" not in line for line in ours), log[-3000:]
    # ComfyUI's own audio nodes fail without torchaudio; no traceback may come from this pack
    assert str(REPO) not in log and "concept-unlearn/" not in log, log[-3000:]
    object_info = _get(server["url"] + "/object_info")
    for name in ("LearnConceptToken", "UnlearnConceptLoRA", "ApplyErasureAdapter", "SaveErasureAdapter",
                 "LoadErasureAdapter", "ErasureAudit"):
        assert object_info[f"{name}|ConceptUnlearn"]["category"] == "Concept Unlearn"
    templates = _get(server["url"] + "/workflow_templates")
    assert set(templates["concept-unlearn"]) >= {"erase-a-concept-and-compare", "learn-a-token", "apply-a-shared-adapter"}
    extensions = _get(server["url"] + "/extensions")
    assert any(path.endswith("concept-unlearn/concept_unlearn.js") for path in extensions)


def test_example_workflows_run_over_http(server):
    import time

    started = time.time()
    erase_run = run_prompt(server, _workflow(server, "erase-a-concept-and-compare"))
    _assert_success(erase_run, server)
    saved = server["base"] / "models" / "loras" / "erasure" / "no-red-star.safetensors"
    assert saved.is_file()
    ui = [o["concept_unlearn"][0] for o in erase_run["outputs"].values() if "concept_unlearn" in o]
    assert any("audit" in u for u in ui) and any(u.get("saved") == "erasure/no-red-star.safetensors" for u in ui)

    token_run = run_prompt(server, _workflow(server, "learn-a-token"))
    _assert_success(token_run, server)
    assert (server["base"] / "models" / "embeddings" / "my-concept.safetensors").is_file()

    apply_run = run_prompt(server, _workflow(server, "apply-a-shared-adapter"))
    _assert_success(apply_run, server)
    assert list((server["base"] / "output" / "concept-unlearn").glob("erased_*.png"))
    print(f"three example workflows over HTTP: {time.time() - started:.0f} s")


def test_interrupt_over_http(server):
    import threading
    import time

    prompt = _workflow(server, "erase-a-concept-and-compare",
                       {"UnlearnConceptLoRA|ConceptUnlearn": {"steps": 200}})
    result_box = {}
    thread = threading.Thread(target=lambda: result_box.update(run_prompt(server, prompt)))
    thread.start()
    time.sleep(25)
    _post(server["url"] + "/interrupt", {})
    thread.join(timeout=600)
    status = result_box["status"]
    assert status["status_str"] == "error"
    interrupted = [m[1] for m in status["messages"] if m[0] == "execution_interrupted"]
    assert interrupted and interrupted[0]["node_type"] == "UnlearnConceptLoRA|ConceptUnlearn", status["messages"]
    again = run_prompt(server, _workflow(server, "apply-a-shared-adapter"))  # the server is still usable
    _assert_success(again, server)



def test_every_input_has_a_tooltip_over_http(server):
    object_info = _get(server["url"] + "/object_info")
    ours = {k: v for k, v in object_info.items() if k.endswith("|ConceptUnlearn")}
    assert len(ours) >= 6
    missing = [f"{name}.{input_name}" for name, info in ours.items() for section in ("required", "optional")
               for input_name, spec in info["input"].get(section, {}).items()
               if len(spec) < 2 or not spec[1].get("tooltip")]
    assert not missing, missing


def test_saving_again_over_http_adds_a_counter(server):
    """Queue the erase workflow again with one audit prompt changed: the audit and Save run again (training is
    cached), and Save writes the next counter instead of failing with 'already exists'."""
    extra = {"SaveErasureAdapter|ConceptUnlearn": {"overwrite": False}}
    first = run_prompt(server, _workflow(server, "erase-a-concept-and-compare", extra))
    _assert_success(first, server)
    extra["ErasureAudit|ConceptUnlearn"] = {"prompts": "a photo of a red star\na photo of a cat"}
    second = run_prompt(server, _workflow(server, "erase-a-concept-and-compare", extra))
    _assert_success(second, server)
    saved = [o["concept_unlearn"][0].get("saved") for o in second["outputs"].values() if "concept_unlearn" in o]
    counted = [name for name in saved if name]
    assert counted and counted[0].startswith("erasure/no-red-star_") and counted[0].endswith("_.safetensors")
    assert (server["base"] / "models" / "loras" / counted[0]).is_file()


def test_error_dialog_shows_a_type_without_a_file_path(server):
    """ComfyUI shows `<class module>.<class name>`; it imports the pack under a module name made from its path."""
    broken = server["base"] / "models" / "loras" / "broken.safetensors"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"not a safetensors file")
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server["checkpoint"]}},
              "2": {"class_type": "LoadErasureAdapter|ConceptUnlearn",
                    "inputs": {"clip": ["1", 1], "lora_name": "broken.safetensors", "allow_other_base": False}},
              "3": {"class_type": "SaveErasureAdapter|ConceptUnlearn",
                    "inputs": {"adapter": ["2", 0], "name": "erasure/broken-copy", "overwrite": False}}}
    entry = run_prompt(server, prompt)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors, entry["status"]
    shown = errors[0]["exception_type"]
    assert shown == "concept_unlearn.AdapterFileError", shown
    assert "/" not in shown and "concept-unlearn" not in shown


# ---------------------------------------------------------------------------- the front end in headless Chromium

CHROMIUM = next((c for c in ("chromium", "chromium-browser", "google-chrome") if __import__("shutil").which(c)), None)


async def _drive_page(url, workflow, steps_override, screenshot_path, run=True):
    """Open ComfyUI in headless Chromium (Chrome DevTools Protocol over aiohttp, which ComfyUI ships with),
    load the workflow, queue it from the page, and collect console errors and a screenshot."""
    import asyncio
    import base64
    import subprocess
    import tempfile

    import aiohttp

    port = _free_port()
    profile = tempfile.mkdtemp(prefix="chromium-")
    browser = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
                                f"--user-data-dir={profile}", "--window-size=1800,1000", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    errors, messages = [], []
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(60):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/json") as response:
                        targets = await response.json()
                    page = next(t for t in targets if t["type"] == "page")
                    break
                except (aiohttp.ClientError, StopIteration):
                    await asyncio.sleep(0.5)
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                counter = {"id": 0}
                pending = {}

                async def reader():
                    async for msg in ws:
                        data = json.loads(msg.data)
                        if "id" in data and data["id"] in pending:
                            pending.pop(data["id"]).set_result(data)
                        elif data.get("method") == "Runtime.exceptionThrown":
                            errors.append(data["params"]["exceptionDetails"].get("exception", {}).get("description")
                                          or data["params"]["exceptionDetails"].get("text"))
                        elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] == "error":
                            errors.append(" ".join(str(a.get("value", a.get("description"))) for a in data["params"]["args"]))
                        elif data.get("method") == "Log.entryAdded" and data["params"]["entry"]["level"] == "error":
                            errors.append(data["params"]["entry"].get("text", "") + " " + data["params"]["entry"].get("url", ""))

                task = asyncio.ensure_future(reader())

                async def call(method, **params):
                    counter["id"] += 1
                    future = asyncio.get_event_loop().create_future()
                    pending[counter["id"]] = future
                    await ws.send_json({"id": counter["id"], "method": method, "params": params})
                    return await asyncio.wait_for(future, 120)

                async def evaluate(expression):
                    reply = await call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
                    result = reply["result"]
                    if "exceptionDetails" in result:
                        raise AssertionError(f"{expression[:80]}: {result['exceptionDetails']}")
                    return result["result"].get("value")

                await call("Runtime.enable")
                await call("Log.enable")
                await call("Page.enable")
                await call("Emulation.setDeviceMetricsOverride", width=1800, height=1000, deviceScaleFactor=1, mobile=False)
                await call("Page.navigate", url=url)
                for _ in range(120):
                    await asyncio.sleep(1)
                    if await evaluate("!!(window.app && window.app.graph && window.LiteGraph)"):
                        break
                await asyncio.sleep(3)
                await call("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)
                loaded = await evaluate("(async () => { const m = await import('/extensions/concept-unlearn/concept_unlearn.js');"
                                        " return app.extensionManager !== undefined || true })()")
                await evaluate(f"app.loadGraphData({json.dumps(workflow)})")
                await asyncio.sleep(2)
                await evaluate("""(() => { const o = %s;
                    for (const n of app.graph._nodes) for (const w of (n.widgets || [])) {
                        const v = (o[n.type] || {})[w.name]; if (v !== undefined) w.value = v; }
                    app.canvas.ds.scale = 0.62; app.canvas.ds.offset = [40, 60]; app.graph.setDirtyCanvas(true, true);
                    return true })()""" % json.dumps(steps_override))
                rendered = await evaluate("app.graph._nodes.filter(n => n.type.endsWith('|ConceptUnlearn'))"
                                          ".map(n => [n.type, n.widgets ? n.widgets.length : 0, n.size[0] > 0])")
                if not run:
                    task.cancel()
                    return errors, {"rendered": rendered}
                await evaluate("app.queuePrompt(0, 1)")
                finished = False
                for _ in range(900):
                    await asyncio.sleep(2)
                    queue = await evaluate("fetch('/queue').then(r => r.json())")
                    if not queue["queue_running"] and not queue["queue_pending"]:
                        finished = True
                        break
                await asyncio.sleep(3)
                lines = await evaluate("app.graph._nodes.filter(n => n.__cuLines).map(n => [n.type, n.__cuLines])")
                progress = await evaluate("app.graph._nodes.filter(n => n.__cuProgress).map(n => [n.type, n.__cuProgress.step, n.__cuProgress.total])")
                shot = await call("Page.captureScreenshot", format="jpeg", quality=85)
                Path(screenshot_path).write_bytes(base64.b64decode(shot["result"]["data"]))
                task.cancel()
                messages.append({"loaded": loaded, "rendered": rendered, "finished": finished, "lines": lines,
                                 "progress": progress})
    finally:
        browser.terminate()
        browser.wait(timeout=30)
    return errors, messages[0] if messages else {}


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)")
def test_front_end_renders_the_nodes_and_live_values(server, tmp_path):
    import asyncio

    workflow = json.loads((WORKFLOWS / "erase-a-concept-and-compare.json").read_text())
    for entry in workflow["nodes"]:
        if entry["type"] == "CheckpointLoaderSimple":
            entry["widgets_values"][0] = server["checkpoint"]
        if entry["type"] == "ErasureAudit|ConceptUnlearn":  # untrusted text must be drawn as text
            entry["widgets_values"][0] = "a photo of a red star\n<img src=x onerror=alert(1)>"
    overrides = {k: v for k, v in SMALL.items() if k.endswith("|ConceptUnlearn")}
    overrides["UnlearnConceptLoRA|ConceptUnlearn"] = dict(overrides["UnlearnConceptLoRA|ConceptUnlearn"], steps=4)
    overrides["ErasureAudit|ConceptUnlearn"] = {k: v for k, v in overrides["ErasureAudit|ConceptUnlearn"].items()
                                                if k != "prompts"}
    screenshot = Path(os.environ.get("CONCEPT_UNLEARN_SCREENSHOT", tmp_path / "comfyui-concept-unlearn.jpg"))
    # Baseline: the same page with this pack's extension disabled (ComfyUI's Comfy.Extension.Disabled setting).
    # The stock front end logs errors of its own here (404s for optional user files, no internet for
    # api.comfy.org, ...): the pack may add none.
    _post(server["url"] + "/settings/Comfy.Extension.Disabled", ["ConceptUnlearn.UI"])
    baseline, _ = asyncio.run(_drive_page(server["url"], workflow, overrides, tmp_path / "baseline.jpg", run=False))
    _post(server["url"] + "/settings/Comfy.Extension.Disabled", [])
    errors, seen = asyncio.run(_drive_page(server["url"], workflow, overrides, screenshot))
    screenshot.with_suffix(".json").write_text(json.dumps({"errors": errors, "baseline": baseline, "seen": seen},
                                                          indent=1))
    first_lines = {str(e).splitlines()[0] for e in baseline if e}
    errors = [e for e in errors if e and str(e).splitlines()[0] not in first_lines]
    assert not any("concept_unlearn" in str(e) or "concept-unlearn" in str(e) for e in errors), errors
    assert len(seen["rendered"]) == 3 and all(ok for _, _, ok in seen["rendered"])
    assert seen["finished"]
    assert any(node == "UnlearnConceptLoRA|ConceptUnlearn" and step == total == 4 for node, step, total in seen["progress"])
    shown = {node: lines for node, lines in seen["lines"]}
    assert any(line.startswith("concept: a red star") for line in shown["UnlearnConceptLoRA|ConceptUnlearn"])
    assert any("<img src=x onerror=alert(1)>" in line for line in shown["ErasureAudit|ConceptUnlearn"])
    assert screenshot.stat().st_size > 10_000
    assert not errors, errors


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "build":
    COMFYUI = os.environ["COMFYUI_PATH"]
    print(build_sd2_checkpoint(Path(sys.argv[2])))
