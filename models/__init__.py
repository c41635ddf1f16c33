"""Model zoo for gfcompile: torchvision-compatible PyTorch definitions and data.

This package must stay importable without torch (the compiler may import
`models.digits` and friends), so the registry maps names to small loader
functions that import the torch-based submodule only when called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ZOO", "build"]

# zoo name -> (submodule, factory function)
_ENTRIES: dict[str, tuple[str, str]] = {
    "mobilenet_v2": ("models.mobilenetv2", "mobilenet_v2"),
    "resnet18": ("models.resnet", "resnet18"),
    "resnet34": ("models.resnet", "resnet34"),
    "mcunet": ("models.mcunet", "mcunet"),
    "mcunet_5fps": ("models.mcunet_5fps", "mcunet_5fps"),
    "deeplabv3_resnet18": ("models.deeplab", "deeplabv3_resnet18"),
    "vgg16_bn": ("models.vgg", "vgg16_bn"),
}


def _lazy(module: str, attr: str) -> Callable[..., nn.Module]:
    def factory(*args: Any, **kwargs: Any) -> nn.Module:
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    factory.__name__ = attr
    factory.__qualname__ = attr
    factory.__doc__ = f"Lazily imports {module} and calls {attr}(*args, **kwargs)."
    return factory


ZOO: dict[str, Callable[..., nn.Module]] = {name: _lazy(mod, fn) for name, (mod, fn) in _ENTRIES.items()}


def build(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate zoo model `name` with keyword arguments for its factory."""
    try:
        factory = ZOO[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; available: {sorted(ZOO)}") from None
    return factory(**kwargs)
