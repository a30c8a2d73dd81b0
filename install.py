"""Dependency check for Concept Unlearn, run by AUTOMATIC1111 (and ComfyUI-Manager) after installing the repo.

The engine (unlearn_core) needs torch, safetensors, numpy, pillow and tqdm. It does not import transformers,
peft or diffusers on the host paths (diffusers only in the optional diffusers backend), so it runs beside
A1111's pins (transformers 4.30.2, safetensors 0.3.1, accelerate 0.21.0, numpy 1.23.5, gradio 3.41.2): checked
in a venv with exactly those. Nothing is installed over a package that is already present, so no host pin is
ever upgraded, and torch is never installed: users run their own (CUDA) build.

Deliberately NOT installed: peft (current peft fails to import under transformers 4.30 and pulls accelerate>=1.x,
which breaks A1111's accelerate 0.21 pin; the engine has its own hook-based LoRA) and diffusers (needs a
huggingface-hub that transformers 4.30 refuses).
"""
from __future__ import annotations

import importlib.util
import sys

# import name -> pip requirement, installed only when the module is missing altogether
NEEDED = {"safetensors": "safetensors", "numpy": "numpy", "PIL": "pillow", "tqdm": "tqdm"}


def missing() -> list[str]:
    return [req for mod, req in NEEDED.items() if importlib.util.find_spec(mod) is None]


def main() -> int:
    if importlib.util.find_spec("torch") is None:
        print("[Concept Unlearn] torch is not installed: install your host (AUTOMATIC1111 / ComfyUI) first; "
              "this extension never installs torch.", file=sys.stderr)
        return 1
    try:
        import launch  # AUTOMATIC1111's installer helpers: only importable inside A1111
    except ImportError:
        launch = None
    todo = missing()
    for requirement in todo:
        if launch is not None:
            launch.run_pip(f"install {requirement}", f"{requirement} for Concept Unlearn")
        else:
            print(f"[Concept Unlearn] missing {requirement}: pip install {requirement}", file=sys.stderr)
    return 0 if launch is not None or not todo else 1


if __name__ == "__main__":  # A1111 (launch_utils.run_extension_installer) runs this file as a subprocess
    sys.exit(main())
