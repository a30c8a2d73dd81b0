"""Concept Unlearn engine: erase concepts from Stable Diffusion 2.x text encoders.

    from unlearn_core import DiffusersBackend, EraseConfig, erase, write_adapter, base_fingerprint
    backend = DiffusersBackend(pipe)
    result = erase(backend, EraseConfig(concept="a red star"), images)
    write_adapter("no-red-star.safetensors", result.deltas, base_fingerprint(backend), result.info())
"""
from .adapter_io import (AdapterFile, AdapterFileError, base_fingerprint, inspect, read_adapter, read_token,
                         write_adapter, write_token)
from .backend import Backend, NoiseSchedule, UnsupportedModelError
from .config import EraseConfig, LoraConfig, TokenConfig
from .erase import EraseResult, erase
from .inversion import TokenResult, learn_token
from .lora import Deltas
from .methods import METHODS, method_config
from .targets import Target, resolve_targets
from .tokens import ConceptToken, encode
from .train import Cancelled, StepInfo, TrainingDiverged


def __getattr__(name):
    # diffusers is optional for hosts: import its backend only when asked for
    if name in ("DiffusersBackend", "load_pipeline"):
        from . import diffusers_backend

        return getattr(diffusers_backend, name)
    raise AttributeError(f"module 'unlearn_core' has no attribute {name!r}")


__all__ = [
    "AdapterFile", "AdapterFileError", "Backend", "Cancelled", "ConceptToken", "Deltas", "DiffusersBackend",
    "EraseConfig", "EraseResult", "LoraConfig", "NoiseSchedule", "StepInfo", "Target", "TokenConfig",
    "TokenResult", "TrainingDiverged", "UnsupportedModelError", "base_fingerprint", "encode", "erase",
    "METHODS", "inspect", "learn_token", "load_pipeline", "method_config", "read_adapter", "read_token", "resolve_targets",
    "write_adapter", "write_token",
]
