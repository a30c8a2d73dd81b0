"""The UNet key/value edit through AUTOMATIC1111's own Lora code (skipped unless A1111_PATH is set; see
tests/test_a1111_real.py for the folder and the child interpreter, reused here with a UNet added).

The UNet is an LDM-named module tree (ldm's ``input_blocks.N.1.transformer_blocks.M.attn2.to_k`` ... as
``sd_model.model.diffusion_model`` holds it in A1111) carrying an SD2-layout diffusers UNet's cross-attention weights.
A file written by the engine (text-encoder LoRA + ``lora_unet_*attn2_to_k/to_v`` keys for every projection the A1111
backend's ``cross_attention_kv`` names) is applied by ``networks.load_networks`` as ``<lora:name:s>`` does: every UNet
key is matched (none dropped) and each module's merged weight is its base + s x the file's LoRA for the canonical name
the backend gave that module.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ldm_format import unet_to_ldm  # noqa: E402
from test_a1111_real import A1111, CHILD, REQUIRED, _ids, _model, _shapes, _trained_like  # noqa: E402
from test_kv_host_maps import _a1111_backend_module, _diffusers_unet, ldm_tree  # noqa: E402

from unlearn_core.adapter_io import write_adapter  # noqa: E402
from unlearn_core.kv_edit import KVDeltas, kohya_name  # noqa: E402
from unlearn_core.lora import Deltas  # noqa: E402
from unlearn_core.targets import Target, complete_attention  # noqa: E402

pytestmark = pytest.mark.skipif(not A1111, reason="set A1111_PATH to a folder of A1111 v1.10's Lora files")

_UNET_IN = 'sd_model.model = torch.nn.Module()  # the UNet: nothing of ours goes there\n'
_UNET_OUT = ('sd_model.model = torch.nn.Module()\n'
             'sd_model.model.diffusion_model = torch.load(os.path.join(work, "unet.pt"), weights_only=False)\n')
_AFTER = '            cond = oc_test.encode_with_transformer(model, ids)\n'
_MERGE = (_AFTER +
          '            unet = sd_model.model.diffusion_model\n'
          '            for m in unet.modules():  # A1111 merges a Linear\'s LoRA when the Linear runs\n'
          '                if isinstance(m, torch.nn.Linear):\n'
          '                    m(torch.zeros(1, m.in_features, dtype=m.weight.dtype))\n'
          '            unet_state = {k: v.clone() for k, v in unet.state_dict().items()}\n')
_OUT_IN = '"modules": sorted(net.modules),'
_OUT_OUT = '"modules": sorted(net.modules), "unet": unet_state,'


def _child() -> str:
    child = CHILD
    for old, new in ((_UNET_IN, _UNET_OUT), (_AFTER, _MERGE), (_OUT_IN, _OUT_OUT)):
        assert child.count(old) == 1, f"tests/test_a1111_real.py's child changed: {old!r}"
        child = child.replace(old, new)
    return child


def test_a1111_applies_the_unet_edit_to_the_modules_the_backend_named(tmp_path):
    missing = [p for p in REQUIRED if not (Path(A1111) / p).is_file()]
    assert not missing, f"A1111_PATH lacks {missing}"
    ab = _a1111_backend_module()
    tree = ldm_tree(unet_to_ldm(_diffusers_unet(2)), 2)
    modules = ab.a1111_kv_modules(tree)  # canonical name -> module, as cross_attention_kv gives them
    assert len(modules) == 32
    generator = torch.Generator().manual_seed(5)
    factors = {n: (torch.randn(m.weight.shape[0], 3, generator=generator) * 0.1,
                   torch.randn(3, m.weight.shape[1], generator=generator) * 0.1) for n, m in modules.items()}
    unet_deltas = KVDeltas(factors)
    targets = complete_attention([Target(n, p) for n in range(3) for p in ("q", "fc1", "fc2")])
    text = _trained_like(Deltas(_shapes(targets), rank=4, alpha=2.0, seed=1))
    path = write_adapter(tmp_path / "w" / "kv.safetensors", text, None, unet=unet_deltas)
    from safetensors.torch import load_file
    tensors = load_file(str(path))

    work = tmp_path / "run"
    lora_dir = work / "Lora"
    lora_dir.mkdir(parents=True)
    (lora_dir / "kv.safetensors").write_bytes(path.read_bytes())
    torch.save(_model().state_dict(), work / "model.pt")
    torch.save(tree, work / "unet.pt")
    strength = 0.8
    job = {"dtype": "float32", "lora_dir": str(lora_dir), "files": ["kv"], "strength": strength,
           "ids": _ids().tolist()}
    (work / "job.json").write_text(json.dumps(job))
    done = subprocess.run([sys.executable, "-c", _child(), A1111, str(Path(__file__).parent), str(work)],
                          capture_output=True, text=True, timeout=300, cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "A1111 error" not in done.stderr, done.stderr[-3000:]
    got = torch.load(work / "out.pt")["kv"]
    assert got["errors"] == {}
    paths = {id(m): p for p, m in tree.named_modules()}
    expected_unet = {"diffusion_model_" + paths[id(m)].replace(".", "_") for m in modules.values()}
    assert {m for m in got["modules"] if m.startswith("diffusion_model_")} == expected_unet  # every UNet key matched
    assert len(got["modules"]) == len(expected_unet) + len(text.targets) == 32 + 18  # and every text-encoder one
    base = tree.state_dict()
    for name, module in modules.items():
        key = kohya_name(name)
        stored = (tensors[f"{key}.lora_up.weight"].float() @ tensors[f"{key}.lora_down.weight"].float()
                  * float(tensors[f"{key}.alpha"]) / tensors[f"{key}.lora_down.weight"].shape[0])
        weight = paths[id(module)] + ".weight"
        merged = got["unet"][weight]
        assert float((merged - base[weight] - strength * stored).norm() / (strength * stored).norm()) < 1e-5, name
        engine = unet_deltas.delta_weight(name).detach()
        assert float((merged - base[weight] - strength * engine).norm() / (strength * engine).norm()) < 2e-3, name
    untouched = [k for k in base if "attn1" in k or "to_q" in k]
    assert untouched and all(torch.equal(got["unet"][k], base[k]) for k in untouched)
