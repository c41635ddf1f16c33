"""The typed manifest (runtime/manifest.py): what the compiler writes reads back the same, and a
manifest that is valid JSON with the wrong structure is refused by every entry point with one line
naming the field, exit code 2, no traceback and no output written.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gfcompile.cli import main as gfcompile_main
from gfcompile.config import CompileConfig
from gfcompile.pipeline import compile_model
from runtime.__main__ import main as gftrain_main
from runtime.errors import RunError
from runtime.manifest import FORMAT_VERSION, Manifest, ManifestError, canonical_bytes, manifest_sha256, read_manifest
from runtime.trainer import Trainer
from tests.tiny_models import save, tiny_cnn

ROOT = Path(__file__).resolve().parents[1]
BATCH = 4


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("manifest")
    model = save(tiny_cnn(seed=0), tmp / "tiny.onnx")
    artifacts = compile_model(
        Path(model),
        CompileConfig(train_layers=2, filter_layers=1, batch_size=BATCH, output_dir=tmp / "artifacts"),
        report=lambda message: None,
    )
    rng = np.random.default_rng(0)
    np.savez(tmp / "data.npz", x=rng.standard_normal((8, 3, 16, 16)).astype(np.float32), y=rng.integers(0, 5, 8))
    return {"tmp": tmp, "artifacts": artifacts, "data": tmp / "data.npz"}


def _raw(artifacts: Path) -> dict:
    return json.loads((artifacts / "manifest.json").read_text())


# ---- what the compiler writes


def test_compiled_manifest_round_trips_through_the_typed_form(compiled: dict) -> None:
    raw = _raw(compiled["artifacts"])
    manifest = read_manifest(compiled["artifacts"])
    assert manifest.to_json() == raw
    assert Manifest.from_json(manifest.to_json()) == manifest
    # The typed fields are what the JSON says (read here independently of the typed reader).
    assert manifest.batch_size == raw["inputs"][0]["shape"][0] == BATCH
    assert list(manifest.plan.trainable_params) == raw["plan"]["trainable_params"]
    assert manifest.optimizer.lr == raw["optimizer"]["lr"] and manifest.optimizer.type == "adamw"
    assert manifest.model_files() == {
        "training": "training_model.onnx",
        "eval": "eval_model.onnx",
        "optimizer": "optimizer_model.onnx",
    }


def test_canonical_bytes_ignore_layout_and_cover_every_value(compiled: dict) -> None:
    raw = _raw(compiled["artifacts"])
    reordered = json.loads(json.dumps(dict(reversed(list(raw.items())))))
    assert canonical_bytes(reordered) == canonical_bytes(raw) == canonical_bytes(Manifest.from_json(raw))
    edited = copy.deepcopy(raw)
    edited["optimizer"]["lr"] = 0.901  # issue 15's silent learning-rate edit
    assert manifest_sha256(edited) != manifest_sha256(raw)


def test_unknown_top_level_entries_are_kept(compiled: dict) -> None:
    raw = _raw(compiled["artifacts"]) | {"signature": {"by": "someone"}}
    assert Manifest.from_json(raw).to_json() == raw


# ---- wrong structure: one line naming the field, from every entry point


def _set(path: str, value) -> Callable[[dict], None]:
    """An edit that sets a nested entry ("plan.row_tiles", "inputs.0.shape.1") to `value`."""

    def edit(manifest: dict) -> None:
        *parents, last = path.split(".")
        target = manifest
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[int(last) if isinstance(target, list) else last] = value

    return edit


def _delete(path: str) -> Callable[[dict], None]:
    """An edit that removes a nested entry ("plan", "files.checkpoint")."""

    def edit(manifest: dict) -> None:
        *parents, last = path.split(".")
        target = manifest
        for key in parents:
            target = target[key]
        del target[last]

    return edit


# name -> (edit of the parsed manifest (in place, or returning the new text), or the new text; what the error says)
WRONG: dict[str, tuple[Callable[[dict], str | None] | str, str]] = {
    "missing plan": (_delete("plan"), "plan: missing"),
    "missing optimizer": (_delete("optimizer"), "optimizer: missing"),
    "row tiles as a string": (_set("plan.row_tiles", "4"), "plan.row_tiles: expected an integer"),
    "inputs as an object": (_set("inputs", {"x": [4, 3, 16, 16]}), "inputs: expected a list"),
    "negative shape": (_set("inputs.0.shape.1", -3), "inputs[0].shape[1]: dimensions must be >= 1"),
    "fractional shape": (_set("inputs.0.shape.2", 16.5), "inputs[0].shape[2]: expected an integer or a name"),
    "no data input": (_set("inputs", []), "inputs: must list the model's data input"),
    "non-string parameter names": (
        _set("plan.trainable_params", [1, 2]),
        "plan.trainable_params[0]: expected a string",
    ),
    "filtered as a list": (_set("plan.filtered", ["conv3"]), "plan.filtered: expected an object"),
    "patch size zero": (_set("plan.filtered", {"conv3": 0}), "plan.filtered['conv3']: patch size must be >= 1"),
    "parameter both trainable and frozen": (
        _set("plan.frozen_params", ["conv1.weight", "fc.bias"]),
        "plan.frozen_params: 'fc.bias' is also in trainable_params",
    ),
    "negative learning rate": (_set("optimizer.lr", -0.5), "optimizer.lr: must be a positive number"),
    "learning rate as a string": (_set("optimizer.lr", "0.001"), "optimizer.lr: expected a number"),
    "unknown optimizer": (_set("optimizer.type", "adam"), "optimizer.type: expected one of 'adamw', 'sgd'"),
    "momentum one": (_set("optimizer.momentum", 1.0), "optimizer.momentum: must be in [0, 1)"),
    "unknown loss": (_set("loss", "hinge"), "loss: expected one of"),
    "output batch differs": (_set("outputs.0.shape.0", 8), "outputs[0].shape: batch dimension 8 differs"),
    "object dtype": (_set("inputs.0.dtype", "object"), "inputs[0].dtype: 'object' is not a numeric numpy dtype"),
    "unknown execution order": (
        _set("session_options.execution_order", "FASTEST"),
        "session_options.execution_order: expected one of",
    ),
    "flag as a string": (_set("session_options.enable_mem_reuse", "no"), "session_options.enable_mem_reuse"),
    "file outside the folder": (
        _set("files", {"../../etc/passwd": "0" * 64}),
        "files['../../etc/passwd']: '../../etc/passwd' is not a file name inside the folder",
    ),
    "checkpoint not hashed": (
        _delete("files.checkpoint"),
        "files: lists no sha256 for checkpoint",
    ),
    "source hash not hex": (_set("source.sha256", "xyz"), "source.sha256: expected 64 lowercase hex digits"),
    "unknown plan entry": (_set("plan.tiles", 3), "plan.tiles: unknown entry"),
    "format version as a string": (_set("format_version", "1"), "format_version: manifest format '1' is not 1"),
    "unknown format version": (_set("format_version", 2), "format_version: manifest format 2 is not 1"),
    "a list, not an object": ("[1, 2, 3]", "manifest.json: expected a JSON object, got a list"),
    "nested deeper than the stack": ("[" * 100_000 + "]" * 100_000, "corrupted manifest (not JSON: nested too deeply)"),
    # Parses (json's own limit is about 1,000 levels), but serialising or diffing it recursed past the stack.
    "free-form entry nested 900 deep": (
        lambda m: json.dumps(m).replace('"config": {', '"config": {"deep": ' + "[" * 900 + "]" * 900 + ", ", 1),
        "manifest.json: nested too deeply (902 levels; a manifest has at most 32)",
    ),
}

ENTRY_POINTS: dict[str, Callable[[dict, Path, Path], tuple[Callable, list[str]]]] = {
    "train": lambda c, art, out: (
        gfcompile_main,
        ["train", art, "--data", c["data"], "--steps", "1", "--save", out],
    ),
    "eval": lambda c, art, out: (gfcompile_main, ["eval", art, "--data", c["data"]]),
    "inspect": lambda c, art, out: (gfcompile_main, ["inspect", art, "--plot", out]),
    "diff": lambda c, art, out: (gfcompile_main, ["diff", art, c["artifacts"], "--snapshot", out]),
    "bundle": lambda c, art, out: (gfcompile_main, ["bundle", art, "-o", out]),
    "gftrain": lambda c, art, out: (gftrain_main, [art, "--data", c["data"], "--steps", "1", "--checkpoint", out]),
}


@pytest.fixture(scope="module")
def wrong_artifacts(compiled: dict) -> dict[str, Path]:
    """One copy of the artifacts per wrong manifest (models and checkpoint untouched, so their hashes match)."""
    folders = {}
    for name, (change, _) in WRONG.items():
        folder = compiled["tmp"] / "wrong" / name.replace(" ", "_")
        shutil.copytree(compiled["artifacts"], folder)
        if isinstance(change, str):
            (folder / "manifest.json").write_text(change)
        else:
            manifest = _raw(folder)
            replaced = change(manifest)  # an edit in place, or the whole new text
            (folder / "manifest.json").write_text(replaced if isinstance(replaced, str) else json.dumps(manifest))
        folders[name] = folder
    return folders


def test_at_least_twelve_wrong_structures_are_covered() -> None:
    assert len(WRONG) >= 12


@pytest.mark.parametrize("name", list(WRONG))
def test_typed_reader_names_the_field(wrong_artifacts: dict, name: str) -> None:
    with pytest.raises(RunError) as caught:
        read_manifest(wrong_artifacts[name])
    assert WRONG[name][1] in str(caught.value)
    assert "manifest.json" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_refuses_every_wrong_structure(
    compiled: dict, wrong_artifacts: dict, entry: str, tmp_path: Path, capsys
) -> None:
    for name, (_, field_message) in WRONG.items():
        folder = wrong_artifacts[name]
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        out = tmp_path / name.replace(" ", "_") / "out"
        out.parent.mkdir()
        main, argv = ENTRY_POINTS[entry](compiled, folder, out)
        code = main([str(arg) for arg in argv])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, (entry, name, captured.err)
        assert len(lines) == 1 and lines[0].startswith("gfcompile: error: "), (entry, name, captured.err)
        assert "manifest.json" in lines[0] and field_message in lines[0], (entry, name, lines[0])
        assert "Traceback" not in captured.err
        assert list(out.parent.iterdir()) == [], (entry, name)  # nothing written, no temporaries
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, (entry, name)


def test_wrong_structure_from_the_command_line_is_one_line(wrong_artifacts: dict, compiled: dict, tmp_path) -> None:
    folder = wrong_artifacts["negative shape"]
    command = [sys.executable, "-m", "gfcompile", "train", folder, "--data", compiled["data"], "--save", tmp_path / "c"]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"gfcompile: error: {folder / 'manifest.json'}: inputs[0].shape[1]: dimensions must be >= 1, got -3"
    ]


def test_trainer_uses_the_typed_values(compiled: dict) -> None:
    trainer = Trainer(compiled["artifacts"])
    raw = _raw(compiled["artifacts"])
    assert trainer.spec == Manifest.from_json(raw)
    assert trainer.manifest == raw  # the JSON form, for readers that take it
    assert trainer.batch_size == BATCH and trainer.lr == raw["optimizer"]["lr"]


def test_manifest_error_is_a_run_error_with_the_field() -> None:
    with pytest.raises(ManifestError) as caught:
        Manifest.from_json({"format_version": FORMAT_VERSION})
    assert caught.value.field_path == "source" and caught.value.problem == "missing"


# ---- inspect reads the tiles the plan applied


def test_inspect_reports_memory_budget_tiling_as_tiled_layers(tmp_path: Path) -> None:
    """--memory-budget sets the plan's row tiles (the config keeps None): inspect must group the band convs.

    Reference: the same model compiled with the --row-tiles the budget picked, which inspect read correctly before.
    """
    from gfcompile.inspection import inspect_path
    from tests.tiny_models import ConvSpec

    model = Path(
        save(tiny_cnn([ConvSpec(8), ConvSpec(8), ConvSpec(8, stride=2), ConvSpec(8)], (3, 32, 32)), tmp_path / "m.onnx")
    )

    def compiled_with(name: str, **options) -> Path:
        config = CompileConfig(train_layers=1, batch_size=2, output_dir=tmp_path / name, **options)
        return compile_model(model, config, report=lambda message: None)

    untiled = inspect_path(compiled_with("untiled"))
    budget = compiled_with("budget", memory_budget_mb=0.1)
    raw = _raw(budget)
    tiles = raw["plan"]["row_tiles"]
    assert tiles >= 2 and raw["config"]["row_tiles"] == 0  # what made inspect list one layer per band
    explicit = inspect_path(compiled_with("explicit", row_tiles=tiles))
    from_budget = inspect_path(budget)

    def table(inspection) -> list[tuple]:
        return [(row.name, row.status, row.tiles, row.input_shape) for row in inspection.rows]

    assert table(from_budget) == table(explicit)
    assert [row.name for row in from_budget.rows] == [row.name for row in untiled.rows]
    assert {row.status for row in from_budget.rows[:3]} == {"tile"}


@pytest.mark.parametrize("names", [["fc.weight", "fc.bias", "bogus.weight"], ["conv1.weight"]])
def test_trainable_params_the_checkpoint_does_not_train_are_one_line(
    compiled: dict, tmp_path: Path, names: list[str], capsys
) -> None:
    """Well-formed, but naming parameters the checkpoint lacks or holds frozen: refused before a step."""
    folder = tmp_path / "artifacts"
    shutil.copytree(compiled["artifacts"], folder)
    manifest = _raw(folder)
    manifest["plan"]["trainable_params"] = names
    manifest["plan"]["frozen_params"] = [p for p in manifest["plan"]["frozen_params"] if p not in names]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for main, argv in (
        (gfcompile_main, ["train", folder, "--data", compiled["data"], "--save", tmp_path / "c"]),
        (gfcompile_main, ["eval", folder, "--data", compiled["data"]]),
        (gftrain_main, [folder, "--data", compiled["data"], "--checkpoint", tmp_path / "c"]),
    ):
        assert main([str(arg) for arg in argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"plan.trainable_params: {names[-1]!r} is not a trainable parameter" in lines[0]
    assert not (tmp_path / "c").exists()


def test_consistent_shapes_the_models_do_not_take_are_one_line(compiled: dict, tmp_path: Path, capsys) -> None:
    """A well-formed manifest whose batch (everywhere) differs from the compiled graphs': onnxruntime refuses
    the first batch, and that is one line, with no checkpoint written."""
    folder = tmp_path / "artifacts"
    shutil.copytree(compiled["artifacts"], folder)
    manifest = _raw(folder)
    for key in ("inputs", "labels", "outputs"):
        manifest[key][0]["shape"][0] = 2 * BATCH
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for main, argv in (
        (gfcompile_main, ["train", folder, "--data", compiled["data"], "--save", tmp_path / "c"]),
        (gfcompile_main, ["eval", folder, "--data", compiled["data"]]),
        (gftrain_main, [folder, "--data", compiled["data"], "--checkpoint", tmp_path / "c"]),
    ):
        assert main([str(arg) for arg in argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "onnxruntime cannot run the model on this batch" in lines[0], lines
        assert f"Got: {2 * BATCH} Expected: {BATCH}" in lines[0]
    assert not (tmp_path / "c").exists()
