"""Concept Unlearn as a ComfyUI custom node pack.

ComfyUI imports this folder as a package (its name is the folder's name), so everything here is
imported relatively: ComfyUI has its own top-level ``nodes`` module, and the engine is the sibling
subpackage ``.unlearn_core``. Nothing happens at import time beyond defining the node classes.

Imported as a plain module instead (no parent package: pytest collecting a checkout whose folder name is
not a Python name, such as ``concept-unlearn``), there is nothing to register and the file defines nothing.
"""
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    WEB_DIRECTORY = "./js"

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
