"""The one place that imports onnxruntime's training API without torch.

`onnxruntime/training/__init__.py` imports torch (for ORTModule), but the on-device
submodules (`api`, `artifacts`, `onnxblock`) do not need it. Registering a bare
package module with the right `__path__` before importing them skips that
`__init__` while keeping normal submodule imports working.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

_PACKAGE = "onnxruntime.training"


def _register_bare_package() -> None:
    if _PACKAGE in sys.modules:
        return
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(
            "onnxruntime's training API is missing: install onnxruntime-training-cpu==1.19.2 "
            "(the plain onnxruntime wheel cannot train)"
        )
    package = types.ModuleType(_PACKAGE)
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__package__ = _PACKAGE
    sys.modules[_PACKAGE] = package


def training_submodule(name: str) -> Any:
    """Import `onnxruntime.training.<name>` (e.g. "api", "artifacts") without importing torch."""
    _register_bare_package()
    return importlib.import_module(f"{_PACKAGE}.{name}")


def training_api() -> Any:
    return training_submodule("api")
