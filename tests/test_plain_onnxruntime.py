"""The exported inference model runs in plain onnxruntime (the current release, not the training build).

The training wheel and the plain wheel cannot share one environment, so this test builds a
throw-away venv with the plain `onnxruntime` from the package index and runs the model there.
"""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gfcompile.config import CompileConfig
from gfcompile.pipeline import compile_model
from runtime.data import load_npz
from runtime.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def test_trained_model_exports_to_plain_onnxruntime(tmp_path: Path) -> None:
    config = CompileConfig(filter_layers=2, batch_size=8, lr=0.003, output_dir=tmp_path / "out")
    trainer = Trainer(compile_model(ROOT / "models/zoo/mobilenetv2_digits.onnx", config, report=lambda m: None))
    data = load_npz(ROOT / "models/data/digits_5to9_train.npz", trainer.manifest)
    trainer.fit(data, steps=5, log_every=0)
    exported = trainer.export_inference(tmp_path / "inference.onnx")
    x = data.x[:8]
    np.save(tmp_path / "x.npy", x)
    (reference,) = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).run(None, {"input": x})

    env_dir = tmp_path / "plain"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # Isolated (-I, no PYTHON* variables): in a full `make test` run the throwaway venv imported the
    # project venv's training build (something earlier in the session leaves the environment pointing
    # there; not pinned down), which would make this test vacuous.
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    install = subprocess.run(
        [str(python), "-I", "-m", "pip", "install", "--quiet", "onnxruntime", "numpy"],
        capture_output=True,
        text=True,
        env=clean_env,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    script = f"""
import numpy as np, onnxruntime as ort
session = ort.InferenceSession({str(exported)!r}, providers=["CPUExecutionProvider"])
(out,) = session.run(None, {{"input": np.load({str(tmp_path / "x.npy")!r})}})
np.save({str(tmp_path / "plain.npy")!r}, out)
import importlib.util, os
print(os.path.realpath(ort.__file__))
print(importlib.util.find_spec("onnxruntime.training") is None)
"""
    result = subprocess.run([str(python), "-I", "-c", script], capture_output=True, text=True, env=clean_env)
    assert result.returncode == 0, result.stderr[-2000:]
    module_file, no_training = result.stdout.split()
    # The plain build in the throwaway venv ran it, not the training build of the project's venv.
    assert Path(module_file).is_relative_to(env_dir.resolve()) and no_training == "True", result.stdout
    np.testing.assert_allclose(np.load(tmp_path / "plain.npy"), reference, rtol=1e-4, atol=1e-5)
