"""Integration tests against a real ComfyUI checkout (skipped unless COMFYUI_PATH is set).

Run them with ComfyUI's own Python (its venv has ComfyUI's requirements, not ours):

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -q tests/test_comfy_integration.py

No weights are downloaded: an SD2-shaped checkpoint (SD 2.1 UNet config, 24-layer 1024-wide OpenCLIP text
encoder, SD VAE) with random weights is built with ComfyUI's own classes and saved with
comfy.sd.save_checkpoint, then loaded back the way CheckpointLoaderSimple does.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")
REPO = Path(__file__).resolve().parents[1]
PACK = "concept_unlearn_pack"


def comfy_on_path():
    if COMFYUI not in sys.path:
        sys.path.insert(0, COMFYUI)
    import comfy.cli_args  # library use: ComfyUI does not parse sys.argv, so set `--cpu` on its args

    comfy.cli_args.args.cpu = True


def load_pack():
    """Import the repo as ComfyUI does (nodes.load_custom_node: spec_from_file_location on __init__.py)."""
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


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


def build_sd2_checkpoint(path: Path, seed: int = 0, v_prediction: bool = True) -> Path:
    """Random-weight SD2 checkpoint with real SD2 shapes, built and saved by ComfyUI itself."""
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
    config = comfy.supported_models.SD20(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    _randomise(model.diffusion_model, generator)
    marker = model.diffusion_model.output_blocks[11][1].transformer_blocks[0].norm1.bias
    with torch.no_grad():  # ComfyUI's SD20.model_type: std of this bias > 0.09 means v-prediction
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


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "build":
    COMFYUI = os.environ["COMFYUI_PATH"]
    print(build_sd2_checkpoint(Path(sys.argv[2])))
