"""scripts/filter_screen.py trains what the compiled artifacts train, with their equations.

The screen is only worth its time if a screened run is the compiled run in miniature: the same
trainable parameters, the same frozen prefix/tail split and the same filtered backward. The
reference here is the compiled training step itself (exact and gradient-filtered artifacts of
the bundled 64² model, plain SGD), one step on the same batch.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from gfcompile.config import CompileConfig
from gfcompile.pipeline import compile_model
from models.digits import preprocess
from runtime.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
LR = 0.05


def _screen_module():
    spec = importlib.util.spec_from_file_location("filter_screen", ROOT / "scripts" / "filter_screen.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("layers", "r"), [(2, 0), (4, 2)])
def test_one_screen_step_equals_the_compiled_step(tmp_path: Path, layers: int, r: int) -> None:
    screen_module = _screen_module()
    settings = screen_module.ScreenSettings(size=64, layers=layers, patch_size=max(r, 2), optimizer="sgd", lr=LR)
    config = CompileConfig(
        train_layers=layers,
        filter_layers=layers if r else 0,
        patch_size=max(r, 2),
        batch_size=8,
        optimizer="sgd",
        momentum=0.0,
        lr=LR,
        output_dir=tmp_path / "artifacts",
    )
    artifacts = compile_model(screen_module.MODELS[64], config, report=lambda message: None)
    x_train, y_train, _, _ = screen_module.task_data(64, "finetune")
    x, y = x_train[:8], y_train[:8].astype(np.int64)

    compiled = Trainer(artifacts)
    assert sorted(compiled.trainable) == sorted(screen_module.Screen(settings, filtered=False).trainable)
    compiled.train_step(preprocess(x), y)
    expected = compiled.parameters()

    screen = screen_module.Screen(settings, filtered=bool(r))
    before = {name: p.detach().numpy().copy() for name, p in zip(screen.trainable, screen.parameters, strict=True)}
    screen.train_step(screen.features(x), y)
    moved = 0
    for name, parameter in zip(screen.trainable, screen.parameters, strict=True):
        got = parameter.detach().numpy()
        update, want = got - before[name], expected[name] - before[name]
        scale = max(float(np.abs(want).max()), 1e-12)
        assert float(np.abs(update - want).max()) <= 1e-3 * scale + 1e-7, name
        moved += bool(np.abs(want).max() > 0)
    assert moved == len(screen.trainable)


def test_filtered_screen_step_differs_from_exact() -> None:
    """The filtered variant really filters: its first update differs from exact's on the same batch."""
    screen_module = _screen_module()
    settings = screen_module.ScreenSettings(size=64, layers=2, patch_size=2, optimizer="sgd", lr=LR)
    x_train, y_train, _, _ = screen_module.task_data(64, "finetune")
    x, y = x_train[:8], y_train[:8].astype(np.int64)
    updates = []
    for filtered in (False, True):
        screen = screen_module.Screen(settings, filtered=filtered)
        screen.train_step(screen.features(x), y)
        updates.append(screen.parameters[0].detach().numpy().copy())
    assert float(np.abs(updates[0] - updates[1]).max()) > 1e-6
