"""Import this repository as ComfyUI imports a custom node pack (nodes.load_custom_node)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_pack(name: str):
    """The repository's ``__init__.py`` as package ``name`` (spec_from_file_location, as ComfyUI does); once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
