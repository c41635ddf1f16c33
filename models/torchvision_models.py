"""torchvision's model definitions, importable beside the CPU build of torch.

The torchvision wheel on the package index is a CUDA build: its compiled operators cannot load
beside torch's CPU build, and `import torchvision` then fails while registering fake kernels for
`torchvision::nms` and `torchvision::qnms`. The model definitions use none of its compiled ops, so
defining those two schemas (without kernels) before the import is enough. Models are always built
with `weights=None`: nothing is ever downloaded.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "SEGMENTATION_OUTPUT",
    "build_torchvision",
    "classification_names",
    "import_torchvision",
    "segmentation_names",
]

# The operator schemas torchvision registers fake kernels for at import (torchvision/csrc/ops/nms.cpp).
_OPERATOR_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# Segmentation models return {"out": logits, "aux": ...}; "out" is the prediction.
SEGMENTATION_OUTPUT = "out"
# Kept alive for the process: dropping a torch.library.Library removes its definitions.
_schema_library = None


def import_torchvision() -> ModuleType:
    """`import torchvision`, defining the operator schemas its compiled library would have defined."""
    global _schema_library
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    import torch

    if _schema_library is None and not _operator_defined("torchvision::nms"):
        library = torch.library.Library("torchvision", "DEF")
        for schema in _OPERATOR_SCHEMAS:
            library.define(schema)
        _schema_library = library
    import torchvision

    return torchvision


def _operator_defined(qualified_name: str) -> bool:
    import torch

    namespace, name = qualified_name.split("::")
    return hasattr(getattr(torch.ops, namespace), name)


def classification_names() -> list[str]:
    """torchvision's classification models that are CNNs (the transformers need no conv compiler)."""
    models = import_torchvision().models
    transformers = ("vit_", "swin_", "maxvit_")
    return [name for name in models.list_models(module=models) if not name.startswith(transformers)]


def segmentation_names() -> list[str]:
    models = import_torchvision().models
    return list(models.list_models(module=models.segmentation))


def build_torchvision(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """torchvision model `name` with random weights (weights=None, weights_backbone=None)."""
    models = import_torchvision().models
    if name not in models.list_models():
        raise KeyError(f"unknown torchvision model {name!r}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if name in models.list_models(module=models.segmentation):
        kwargs.setdefault("weights_backbone", None)
        kwargs.setdefault("aux_loss", False)
    return models.get_model(name, weights=None, **kwargs)
