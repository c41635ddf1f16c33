"""Smoke test of the README's demo: the bundled pretrained model fine-tunes on digits 5-9 with filtering.

Not correctness evidence: a gradient 4x too large still lowers the loss. Exactness of the filtered
step is pinned by tests/test_filter_e2e.py against the torch reference.
"""

from __future__ import annotations

from pathlib import Path

from gfcompile.config import CompileConfig
from gfcompile.pipeline import compile_model
from runtime.data import load_npz
from runtime.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "zoo" / "mobilenetv2_digits.onnx"
TRAIN = ROOT / "models" / "data" / "digits_5to9_train.npz"
TEST = ROOT / "models" / "data" / "digits_5to9_test.npz"


def test_demo_smoke_fine_tunes_the_bundled_model(tmp_path: Path) -> None:
    config = CompileConfig(filter_layers=4, batch_size=32, lr=0.003, output_dir=tmp_path / "out")
    trainer = Trainer(compile_model(MODEL, config, report=lambda message: None))
    assert len(trainer.manifest["plan"]["filtered"]) == 4
    assert trainer.manifest["preprocess"]["dtype"] == "uint8"
    train, test = load_npz(TRAIN, trainer.manifest), load_npz(TEST, trainer.manifest)
    before = trainer.evaluate(test)
    losses = trainer.fit(train, steps=40, log_every=0)
    after = trainer.evaluate(test)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert after.loss < before.loss
    # The pretrained model never saw digits 5-9, so it starts near 0% and must learn them.
    assert before.accuracy < 0.1 and after.accuracy > 0.5, (before, after)
