"""`gfcompile diff` and the golden snapshots of compiled zoo graphs.

Canonical form: renamed internal tensors (and reordered nodes) compare equal; a changed r, layer
count or weight is a difference with exit code 1 and a readable message; errors exit 2. The golden
test compiles every zoo model in the README's settings and compares with tests/golden/.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from gfcompile.config import CompileConfig
from gfcompile.diff import compare, format_text, read_snapshot, snapshot, write_snapshot
from gfcompile.pipeline import compile_model
from tests.golden.cases import GOLDEN_ATOL, GOLDEN_CASES, GOLDEN_IGNORE, compile_snapshot
from tests.zoo_helpers import ZOO_CASES, export_case

ROOT = Path(__file__).resolve().parents[1]
CASE = dataclasses.replace(ZOO_CASES["mobilenet_v2"], input_shape=(3, 48, 48))


def gfcompile(*args: str | Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gfcompile", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)


def _compile(onnx_path: Path, out: Path, **overrides) -> Path:
    config = CompileConfig(**{"filter_layers": 2, "batch_size": 2, "output_dir": out, **overrides})
    return compile_model(onnx_path, config, report=lambda message: None)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    _, path = export_case(CASE, tmp_path_factory.mktemp("diff_model"))
    return path


@pytest.fixture(scope="module")
def artifacts(model_path: Path, tmp_path_factory) -> Path:
    return _compile(model_path, tmp_path_factory.mktemp("diff_artifacts") / "base")


def _rename_internal_tensors(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Every tensor that is not a graph input/output or a layer parameter gets a random name; nodes are shuffled."""
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    graph = renamed.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    initializers = {init.name for init in graph.initializer}
    for node in graph.node:  # parameters: Conv/Gemm weights and biases, BN statistics
        slots = {"Conv": (1, 2), "Gemm": (1, 2), "BatchNormalization": (1, 2, 3, 4)}.get(node.op_type, ())
        keep |= {node.input[i] for i in slots if i < len(node.input) and node.input[i] in initializers}
    internal = sorted({n for node in graph.node for n in [*node.input, *node.output] if n and n not in keep})
    rng = random.Random(seed)
    mapping = {name: f"tensor_{rng.randrange(10**9)}_{i}" for i, name in enumerate(internal)}
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
        node.name = f"renamed/{node.name}"
    for value in [*graph.initializer, *graph.value_info]:
        value.name = mapping.get(value.name, value.name)
    nodes = list(graph.node)
    rng.shuffle(nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    return renamed


def test_renamed_internal_tensors_compare_equal(artifacts: Path, model_path: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "renamed"
    shutil.copytree(artifacts, renamed)
    for name in ("training_model.onnx", "eval_model.onnx"):
        original = onnx.load(str(artifacts / name))
        changed = _rename_internal_tensors(original)
        assert {n.output[0] for n in changed.graph.node} != {n.output[0] for n in original.graph.node}
        onnx.save(changed, str(renamed / name))

    result = gfcompile("diff", artifacts, renamed)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "equal" in result.stdout

    # Plain .onnx files too: the source model with its internal tensors renamed.
    onnx.save(_rename_internal_tensors(onnx.load(str(model_path)), seed=1), str(tmp_path / "renamed.onnx"))
    result = gfcompile("diff", model_path, tmp_path / "renamed.onnx", "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["equal"] is True


def test_changed_patch_size_is_a_difference(artifacts: Path, model_path: Path, tmp_path: Path) -> None:
    # r = 1 set for one layer (a global --patch-size 1 now means "not filtered", so it is set per layer).
    layer = "/features/features.18/features.18.0/Conv"
    other = _compile(model_path, tmp_path / "r1", patch_size_map={layer: 1})
    result = gfcompile("diff", artifacts, other)
    assert result.returncode == 1, result.stderr
    assert f"config.patch_size_map['{layer}']: only in B: 1" in result.stdout
    assert f"plan.filtered['{layer}']: 2 -> 1" in result.stdout
    assert "training_model:" in result.stdout and "nodes changed (~):" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("differ: manifest")

    report = json.loads(gfcompile("diff", artifacts, other, "--format", "json").stdout)
    assert report["equal"] is False
    assert {"manifest", "training_model"} <= set(report["differences"])
    assert "eval_model" not in report["differences"]  # filtering changes only the backward


def test_changed_layer_count_is_a_difference(artifacts: Path, model_path: Path, tmp_path: Path) -> None:
    other = _compile(model_path, tmp_path / "n3", filter_layers=3)
    result = gfcompile("diff", artifacts, other, "--limit", "0")
    assert result.returncode == 1, result.stderr
    assert "config.filter_layers: 2 -> 3" in result.stdout
    assert (
        'plan.trainable_convs: 2 -> 3 items; added ["/features/features.17/conv/conv.1/conv.1.0/Conv"]' in result.stdout
    )
    assert "nodes added (+):" in result.stdout
    # The newly trained conv's weight is a trainable checkpoint tensor now, no longer a folded frozen one.
    assert "features.17.conv.1.0.weight: added float32[336,1,3,3]" in result.stdout
    assert "features.17.conv.1.0.weight.bnfolded: removed float32[336,1,3,3]" in result.stdout


def test_changed_weight_is_a_difference_unless_within_atol(artifacts: Path, model_path: Path, tmp_path: Path) -> None:
    model = onnx.load(str(model_path))
    weight = next(init for init in model.graph.initializer if init.name == "classifier.1.weight")
    values = numpy_helper.to_array(weight).copy()
    values[0, 0] += 0.125
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    changed_path = tmp_path / "changed.onnx"
    onnx.save(model, str(changed_path))

    # The source models themselves.
    result = gfcompile("diff", model_path, changed_path)
    assert result.returncode == 1
    assert "classifier.1.weight: float32[10,1280] values differ: max |A-B| = 0.125 > atol 0" in result.stdout
    assert gfcompile("diff", model_path, changed_path, "--atol", "0.2").returncode == 0

    # Compiled: the weight lives in the checkpoint, the source hash in the manifest.
    other = _compile(changed_path, tmp_path / "changed")
    result = gfcompile("diff", artifacts, other)
    assert result.returncode == 1
    assert "parameters:" in result.stdout and "classifier.1.weight" in result.stdout
    assert "source.sha256" in result.stdout
    relaxed = gfcompile("diff", artifacts, other, "--atol", "0.2", "--ignore", "source.sha256")
    assert relaxed.returncode == 0, relaxed.stdout


def test_snapshot_file_round_trip(artifacts: Path, tmp_path: Path) -> None:
    live = snapshot(artifacts)
    write_snapshot(live, tmp_path / "snap.json")
    stored = read_snapshot(tmp_path / "snap.json")
    assert compare(stored, live).equal
    assert "%n0" in (tmp_path / "snap.json").read_text()
    # The CLI takes a snapshot on either side, and can write one.
    result = gfcompile("diff", tmp_path / "snap.json", artifacts, "--snapshot", tmp_path / "again.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert compare(read_snapshot(tmp_path / "again.json"), stored).equal


def test_diff_errors_exit_2_with_one_line(artifacts: Path, model_path: Path, tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_text("not a protobuf\n" * 5)
    (tmp_path / "junk.json").write_text("{}")
    cases = [
        ([tmp_path / "missing.onnx", model_path], "no such file or directory"),
        ([model_path, artifacts], "cannot compare"),
        ([tmp_path / "junk.onnx", model_path], "not a readable ONNX model"),
        ([tmp_path / "junk.json", model_path], "not a gfcompile snapshot"),
        ([tmp_path, artifacts], "no manifest.json"),
        ([model_path, model_path, "--atol", "-1"], "--atol must be >= 0"),
    ]
    for args, message in cases:
        result = gfcompile("diff", *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.startswith("gfcompile: error:")]
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_golden_comparison_catches_a_graph_change(tmp_path: Path) -> None:
    """What a pass change looks like to the golden test: the snapshot no longer matches."""
    case = next(c for c in GOLDEN_CASES if c.name == "mobilenet_v2__filter4")
    changed = dataclasses.replace(case, config={**case.config, "patch_size": 1})
    report = compare(read_snapshot(case.path), compile_snapshot(changed, tmp_path), GOLDEN_ATOL, GOLDEN_IGNORE)
    assert not report.equal
    assert any(d.section == "training_model" and d.kind == "node_changed" for d in report.differences)


@pytest.mark.slow
@pytest.mark.parametrize("case", GOLDEN_CASES, ids=lambda case: case.name)
def test_compiled_graphs_match_golden_snapshots(case, tmp_path: Path) -> None:
    assert case.path.is_file(), f"{case.path} is missing; run .venv/bin/python scripts/update_golden.py"
    fresh = compile_snapshot(case, tmp_path)
    report = compare(read_snapshot(case.path), fresh, atol=GOLDEN_ATOL, ignore=GOLDEN_IGNORE)
    assert report.equal, (
        f"the compiled graph of {case.name} no longer matches its golden snapshot. If the change is "
        f"intended, run `.venv/bin/python scripts/update_golden.py {case.name}` and commit tests/golden/.\n"
        + format_text(report, limit=10)
    )


def test_golden_snapshots_are_small_and_hold_no_weights() -> None:
    for case in GOLDEN_CASES:
        text = case.path.read_text()
        assert len(text) < 300_000, case.name
        data = json.loads(text)
        for summary in data["parameters"].values():
            assert "values" in summary or "stats" in summary
            assert np.prod(summary["shape"]) <= 16 or "values" not in summary


def test_malformed_snapshots_and_unwritable_snapshot_paths_are_one_line(tmp_path: Path, capsys) -> None:
    """Valid JSON of the wrong shape (or nested past Python's stack) is refused before compare() walks it."""
    from gfcompile.cli import main
    from tests.tiny_models import save, tiny_cnn

    model = Path(save(tiny_cnn(), tmp_path / "tiny.onnx"))
    write_snapshot(snapshot(model), tmp_path / "good.json")
    good = json.loads((tmp_path / "good.json").read_text())
    broken = {
        "nested": "[" * 100_000 + "]" * 100_000,
        "models_list": json.dumps({**good, "models": []}),
        "nodes_object": json.dumps({**good, "models": {"model": {**good["models"]["model"], "nodes": {"a": 1}}}}),
        "node_without_op": json.dumps(
            {**good, "models": {"model": {**good["models"]["model"], "nodes": [{"inputs": [], "outputs": []}]}}}
        ),
        "counts_as_text": json.dumps(
            {**good, "models": {"model": {**good["models"]["model"], "op_counts": {"Conv": "3"}}}}
        ),
        "unknown_kind": json.dumps({**good, "kind": "bundle"}),
        "deep_inside": json.dumps({**good, "manifest": {"x": 1}}).replace('"x": 1', '"x": ' + "[" * 900 + "]" * 900),
        "bad_utf8": b'{"format": "\xff"}',
    }
    (tmp_path / "a_dir").mkdir()
    cases = []
    for name, text in broken.items():
        path = tmp_path / f"{name}.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        cases.append(([path, model], "not a"))
    cases.append(([model, model, "--snapshot", tmp_path / "a_dir"], "is a directory"))
    cases.append(([model, model, "--snapshot", tmp_path / "good.json" / "x.json"], "cannot write the snapshot"))
    for args, message in cases:
        code = main(["diff", *map(str, args)])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("gfcompile: error:"), (args, err)
        assert message in lines[0] and "Traceback" not in err, (args, lines)
    assert sorted(p.name for p in (tmp_path / "a_dir").iterdir()) == []
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_artifacts_manifest_is_read_through_the_typed_manifest(artifacts: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(artifacts, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["plan"]["filtered"] = [2, 2]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    result = gfcompile("diff", artifacts, broken)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"gfcompile: error: {broken / 'manifest.json'}: plan.filtered: expected an object, got a list"
    ]
