"""The device bundle trains on arm64 (Debian trixie under qemu-user) as on the x86 training build.

scripts/arm64_smoke.py sets up the emulated userland, its venv (the README's Deploy install) and
the bundle, trains it 3 steps with `gftrain` and a probe, and compares the losses and every trained
parameter with the training build (onnxruntime-training) run here. Emulation takes many CPU
minutes, so this is in the portable_matrix (`pytest -m portable_matrix tests/test_arm64_qemu.py`),
and it runs only where qemu-user and the userland are there (make them with the script).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "arm64_smoke.py"


def _smoke_module():
    spec = importlib.util.spec_from_file_location("arm64_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.portable_matrix
def test_bundle_trains_on_emulated_arm64_like_the_training_build(tmp_path) -> None:
    smoke = _smoke_module()
    userland = Path(os.environ.get("GF_ARM64_ROOT", "/opt/arm64root"))
    if not (shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")):
        pytest.skip("qemu-user is not installed (apt-get install -y qemu-user mmdebstrap)")
    if not (userland / "usr" / "bin" / "python3").exists():
        pytest.skip(f"no arm64 userland at {userland} (make it with: python scripts/arm64_smoke.py)")

    report_path = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(userland), "--work", str(tmp_path), "--json", str(report_path)],
        capture_output=True,
        text=True,
        timeout=3 * 3600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads(report_path.read_text())

    assert report["arm64"]["machine"] == "aarch64" and report["arm64"]["backend"] == "PortableTrainer", report
    assert report["arm64"]["python"].startswith("3.13."), report
    assert report["x86"]["backend"] == "Trainer", report  # the training build is the reference
    assert len(report["arm64_losses"]) == smoke.STEPS == len(report["x86_losses"])
    assert report["trainable_tensors"] > 0
    for key in ("loss_max_abs_diff", "parameter_max_abs_diff", "gftrain_checkpoint_max_abs_diff"):
        assert report[key] <= smoke.TOLERANCE, (key, report[key])
    assert any(line.startswith(f"step {smoke.STEPS};") for line in report["gftrain_stdout"]), report["gftrain_stdout"]
    assert (tmp_path / "m.onnx").is_file()
