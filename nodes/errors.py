"""Errors the nodes raise, named so that ComfyUI's error dialog shows a readable type.

ComfyUI (0.3.64, execution.py full_type_name) shows an exception's type as ``<class module>.<class name>``,
and it imports a custom node folder under a module name made from the folder's path
(nodes.load_custom_node: ``module_path.replace(".", "_x_")``). So every exception class defined in this
pack, the engine's included, would show as ``/home/me/ComfyUI/custom_nodes/concept-unlearn.unlearn_core.
backend.UnsupportedModelError``. The nodes re-raise those as classes whose module is ``concept_unlearn``;
built-in exceptions (ValueError, FileExistsError, ...) already show as their plain name and pass through.
"""
from __future__ import annotations

import functools

MODULE = "concept_unlearn"


class ConceptUnlearnError(Exception):
    """Base of the errors the Concept Unlearn nodes raise (the engine's own errors are re-raised as subclasses)."""

    __module__ = MODULE


_CLEAN: dict[type, type] = {}


def _is_ours(cls: type, package: str) -> bool:
    return cls.__module__ == package or cls.__module__.startswith(package + ".")


def clean_error(error: BaseException, package: str) -> BaseException:
    """``error`` itself, or, when its class is defined inside ``package``, an equal error whose class is a
    subclass of both the original class and ConceptUnlearnError, with the module ``concept_unlearn``."""
    cls = type(error)
    if not _is_ours(cls, package) or isinstance(error, ConceptUnlearnError):
        return error
    if cls not in _CLEAN:
        _CLEAN[cls] = type(cls.__name__, (cls, ConceptUnlearnError),
                           {"__module__": MODULE, "__qualname__": cls.__name__, "__doc__": cls.__doc__})
    clean = _CLEAN[cls].__new__(_CLEAN[cls], *error.args)
    clean.args = error.args
    clean.__dict__.update(getattr(error, "__dict__", {}))
    return clean


def readable_errors(package: str):
    """Decorator for a node's FUNCTION: errors of this pack's own classes leave it with a clean class module."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except Exception as error:
                clean = clean_error(error, package)
                if clean is error:
                    raise
                raise clean.with_traceback(error.__traceback__) from None
        return wrapper

    return decorate
