"""The frozen-prefix feature cache (gfcompile/prefix_split.py, runtime/feature_cache.py).

The reference is uncached training of the same artifacts' whole-graph models: N steps through
the cache must give the same weights (1e-6), with the same data order, on both backends.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from gfcompile.config import CompileConfig
from gfcompile.errors import GfError
from gfcompile.pipeline import compile_model
from runtime.data import Dataset
from runtime.errors import RunError
from runtime.feature_cache import FEATURES_FILE, HEADER_FILE, CachedTrainer, CacheSettings
from runtime.manifest import read_manifest
from runtime.portable import PortableTrainer
from runtime.trainer import Trainer
from tests.tiny_models import save, tiny_cnn
from tests.zoo_helpers import ZOO_CASES, export_case

BATCH = 2
STEPS = 5
# Filtered: the last two trained convs gradient-filtered; exact: the same layers, plain backward.
# Tiled: row tiling of the frozen prefix, which the prefix model keeps.
MODES = {
    "filtered": {"filter_layers": 2, "train_layers": 4},
    "exact": {"train_layers": 4},
    "tiled": {"train_layers": 4, "row_tiles": 2},
}
FAST = [("mobilenet_v2", "filtered")]
FULL = [
    *((name, mode) for name in ZOO_CASES for mode in ("filtered", "exact") if (name, mode) not in FAST),
    ("mobilenet_v2", "tiled"),
]


# Plain SGD: AdamW's first steps scale each gradient element to about +-lr whatever its size, so
# gradients that are ~0 turn float rounding (the prefix runs in another session) into 1e-5 weight
# differences; with SGD a weight difference is the gradient difference times lr.
OPTIMIZER = {"optimizer": "sgd", "lr": 0.005, "momentum": 0.9}


def compile_cached(model_path: Path, out: Path, **options) -> Path:
    config = CompileConfig(batch_size=BATCH, output_dir=out, feature_cache=True, **{**OPTIMIZER, **options})
    return compile_model(model_path, config, report=lambda message: None)


def dataset(shape: tuple, classes: int, samples: int = 7, seed: int = 0, segmentation: bool = False) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, *shape)).astype(np.float32)
    labels = (samples, *shape[1:]) if segmentation else (samples,)
    return Dataset(x=x, y=rng.integers(0, classes, size=labels).astype(np.int64))


def weights(trainer) -> dict[str, np.ndarray]:
    if isinstance(trainer, PortableTrainer):
        return trainer.parameters()
    return {name: trainer.state.parameters[name].data.copy() for name in trainer.trainable}


def assert_same_training(artifacts: Path, data: Dataset, cache_dir: Path, backend=Trainer) -> CachedTrainer:
    """N steps uncached (whole graph) and cached (tail on features) end at the same weights."""
    whole = backend(artifacts)
    whole.fit(data, STEPS, seed=3, log_every=0)
    # A cap that holds 3 samples: batches mix rows from memory and from the memory-mapped file.
    per_sample = sum(4 * int(np.prod(spec.shape[1:])) for spec in read_manifest(artifacts).feature_cache.cut)
    settings = CacheSettings(cache_dir, memory_mb=3 * per_sample / 2**20)
    cached = CachedTrainer(artifacts, settings=settings, backend=backend)
    cached.fit(data, STEPS, seed=3, log_every=0)
    assert cached.features(data).x.resident == 3
    expected, actual = weights(whole), weights(cached.tail)
    assert set(actual) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=0, atol=1e-6, err_msg=name)
    return cached


def zoo_artifacts(tmp_path: Path, name: str, mode: str) -> tuple[Path, Dataset]:
    case = ZOO_CASES[name]
    _, path = export_case(case, tmp_path)
    artifacts = compile_cached(path, tmp_path / "artifacts", **MODES[mode])
    classes = 5 if case.segmentation else 10
    return artifacts, dataset(case.input_shape, classes, segmentation=case.segmentation)


@pytest.mark.parametrize(("name", "mode"), FAST)
def test_cached_training_matches_uncached(tmp_path, name: str, mode: str) -> None:
    artifacts, data = zoo_artifacts(tmp_path, name, mode)
    assert_same_training(artifacts, data, tmp_path / "cache")


@pytest.mark.slow
@pytest.mark.zoo_matrix
@pytest.mark.parametrize(("name", "mode"), FULL)
def test_cached_training_matches_uncached_zoo(tmp_path, name: str, mode: str) -> None:
    artifacts, data = zoo_artifacts(tmp_path, name, mode)
    if mode == "tiled":
        assert read_manifest(artifacts).plan.row_tiles == 2
    assert_same_training(artifacts, data, tmp_path / "cache")
    assert_same_training(artifacts, data, tmp_path / "portable-cache", backend=PortableTrainer)


def test_multi_input_cut_resnet_block(tmp_path) -> None:
    """ResNet-18's last 4 convs: the downsample branch reads layer3's output, which crosses the cut."""
    artifacts, data = zoo_artifacts(tmp_path, "resnet18", "exact")
    cut = read_manifest(artifacts).feature_cache.cut
    assert len(cut) >= 2, cut
    cached = assert_same_training(artifacts, data, tmp_path / "cache")
    assert_same_training(artifacts, data, tmp_path / "portable-cache", backend=PortableTrainer)
    # Evaluation on cached features of a two-tensor cut, last batch padded: the prefix run per batch agrees.
    test = Dataset(x=data.x[:3].copy(), y=data.y[:3].copy())
    expected = cached.evaluate(test)
    actual = cached.evaluate(test, cache=CacheSettings(tmp_path / "test-cache"))
    assert (actual.samples, actual.accuracy) == (expected.samples, expected.accuracy)
    np.testing.assert_allclose(actual.loss, expected.loss, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tiny")
    model = save(tiny_cnn(batch=BATCH), directory / "tiny.onnx")
    return Path(model), compile_cached(Path(model), directory / "artifacts", train_layers=2)


def test_tiny_matches_on_both_backends_and_exports_the_whole_model(tiny, tmp_path) -> None:
    model_path, artifacts = tiny
    data = dataset((3, 16, 16), 5)
    cached = assert_same_training(artifacts, data, tmp_path / "cache")
    assert_same_training(artifacts, data, tmp_path / "portable", backend=PortableTrainer)
    import onnxruntime as ort

    exported = cached.export_inference(tmp_path / "model.onnx")
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i.name for i in onnx.load(model_path).graph.input]
    whole = Trainer(artifacts)
    whole.fit(data, STEPS, seed=3, log_every=0)
    _, reference = whole.outputs(data.x[:BATCH], data.y[:BATCH])
    (logits,) = session.run(None, {session.get_inputs()[0].name: data.x[:BATCH]})
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-5)


def test_resume_through_the_cache_ends_where_one_run_does(tiny, tmp_path) -> None:
    _, artifacts = tiny
    data = dataset((3, 16, 16), 5)
    settings = CacheSettings(tmp_path / "cache")
    straight = CachedTrainer(artifacts, settings=settings)
    straight.fit(data, 6, seed=1, log_every=0)
    first = CachedTrainer(artifacts, settings=settings)
    first.fit(data, 4, seed=1, log_every=0)
    first.save(tmp_path / "ckpt")
    resumed = CachedTrainer(artifacts, checkpoint=tmp_path / "ckpt", settings=settings)
    resumed.fit(data, 2, seed=1, log_every=0)
    assert not resumed.cache.built  # the cache written by the first run was reused
    for name, value in weights(straight.tail).items():
        np.testing.assert_array_equal(weights(resumed.tail)[name], value)


def test_cached_evaluation_matches_the_whole_graph_and_keeps_both_caches(tiny, tmp_path) -> None:
    """Evaluating on cached test features (the tail only) gives the whole graph's loss and accuracy
    after the same training, with a padded last batch; interleaving evaluation with training builds
    each dataset's cache once."""
    import io

    _, artifacts = tiny
    train, test = dataset((3, 16, 16), 5), dataset((3, 16, 16), 5, samples=5, seed=1)
    log = io.StringIO()
    whole = Trainer(artifacts)
    cached = CachedTrainer(artifacts, settings=CacheSettings(tmp_path / "train"), out=log)
    for _ in range(2):
        whole.fit(train, 2, seed=0, log_every=0)
        cached.fit(train, 2, seed=0, log_every=0)
        expected, actual = whole.evaluate(test), cached.evaluate(test, cache=CacheSettings(tmp_path / "test"))
        assert actual.samples == expected.samples == 5 and actual.accuracy == expected.accuracy
        np.testing.assert_allclose(actual.loss, expected.loss, rtol=1e-5)
    assert log.getvalue().count("feature cache: building") == 2, log.getvalue()
    assert (tmp_path / "test" / FEATURES_FILE).stat().st_size == 5 * (
        tmp_path / "train" / FEATURES_FILE
    ).stat().st_size // 7


def test_cache_rebuilds_when_data_or_prefix_change_and_never_trusts_a_corrupted_file(tiny, tmp_path) -> None:
    model_path, artifacts = tiny
    data = dataset((3, 16, 16), 5)
    settings = CacheSettings(tmp_path / "cache", memory_mb=0.001)

    def opened(artifacts: Path, data: Dataset) -> CachedTrainer:
        trainer = CachedTrainer(artifacts, settings=settings)
        trainer.features(data)
        return trainer

    assert opened(artifacts, data).cache.built
    assert not opened(artifacts, data).cache.built
    changed = Dataset(x=data.x.copy(), y=data.y)
    changed.x[3, 0, 0, 0] += 1.0
    assert opened(artifacts, changed).cache.built
    assert opened(artifacts, data).cache.built  # back to the first data: its key, rebuilt again

    # Another prefix: the same model with other first-layer weights, compiled again.
    other = onnx.load(model_path)
    weight = next(init for init in other.graph.initializer if init.name == "conv1.weight")
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 0.5, weight.name))
    other_path = Path(save(other, tmp_path / "other.onnx"))
    other_artifacts = compile_cached(other_path, tmp_path / "other", train_layers=2)
    assert opened(other_artifacts, data).cache.built

    # One flipped byte in the cached features: detected by the content hash, rebuilt, training exact.
    cached = opened(artifacts, data)
    assert cached.cache.built
    features = settings.directory / FEATURES_FILE
    content = bytearray(features.read_bytes())
    content[len(content) // 2] ^= 0x40
    features.write_bytes(bytes(content))
    assert opened(artifacts, data).cache.built
    header = json.loads((settings.directory / HEADER_FILE).read_text())
    header["key"] = "0" * 64
    (settings.directory / HEADER_FILE).write_text(json.dumps(header))
    assert opened(artifacts, data).cache.built
    assert_same_training(artifacts, data, settings.directory)


def _with_prefix_node(model: onnx.ModelProto, node: onnx.NodeProto) -> onnx.ModelProto:
    """`model` with `node` (reading and writing relu1's tensor) inserted after the first ReLU."""
    for consumer in model.graph.node:
        consumer.input[:] = [node.output[0] if name == "relu1" else name for name in consumer.input]
    position = next(i for i, n in enumerate(model.graph.node) if n.name == "relu1") + 1
    model.graph.node.insert(position, node)
    return model


def test_refusals_are_one_line(tiny, tmp_path) -> None:
    model_path, artifacts = tiny
    noise = helper.make_node("RandomNormalLike", ["relu1"], ["noise"], name="noise", dtype=1)
    noisy = _with_prefix_node(onnx.load(model_path), noise)
    added = helper.make_node("Add", ["relu1", "noise"], ["noisy"], name="add_noise")
    for consumer in noisy.graph.node:
        if consumer.name == "conv2":
            consumer.input[0] = "noisy"
    noisy.graph.node.insert(next(i for i, n in enumerate(noisy.graph.node) if n.name == "noise") + 1, added)
    with pytest.raises(GfError, match=r"RandomNormalLike node 'noise'.*random at every step") as refused:
        compile_cached(Path(save(noisy, tmp_path / "noisy.onnx")), tmp_path / "noisy", train_layers=2)
    assert "\n" not in str(refused.value)

    with pytest.raises(GfError, match="the first layer trains, so there is no frozen prefix"):
        compile_cached(model_path, tmp_path / "all", train_layers=3)

    plain = compile_model(
        model_path,
        CompileConfig(train_layers=2, batch_size=BATCH, output_dir=tmp_path / "plain"),
        report=lambda m: None,
    )
    with pytest.raises(RunError, match="compiled without --feature-cache.*recompile with gfcompile --feature-cache"):
        CachedTrainer(plain, settings=CacheSettings(tmp_path / "cache"))

    # The whole graph's files are protected too, not only the tail's.
    with pytest.raises(RunError, match="would overwrite checkpoint of the artifacts"):
        CachedTrainer(artifacts, settings=CacheSettings(tmp_path / "cache")).check_save_path(artifacts / "checkpoint")

    manifest_path = artifacts / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    augmented = tmp_path / "augmented"
    augmented.mkdir()
    for name in manifest["files"]:
        (augmented / name).parent.mkdir(parents=True, exist_ok=True)
        (augmented / name).write_bytes((artifacts / name).read_bytes())
    manifest["preprocess"] = {"scale": 1.0, "random_flip": True}
    (augmented / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunError, match="random 'random_flip'.*cannot be cached") as refused:
        CachedTrainer(augmented, settings=CacheSettings(tmp_path / "cache"))
    assert "\n" not in str(refused.value)


def test_gftrain_cache_features_end_to_end(tiny, tmp_path) -> None:
    """The command line: train, resume (the cache reused), export; same weights as gftrain without the cache."""
    import subprocess
    import sys

    _, artifacts = tiny
    data = dataset((3, 16, 16), 5)
    np.savez(tmp_path / "data.npz", x=data.x, y=data.y)

    def gftrain(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "runtime", str(artifacts), "--data", str(tmp_path / "data.npz"), *args]
        return subprocess.run(command, capture_output=True, text=True, check=False, cwd=Path(__file__).parents[1])

    cached = gftrain("--steps", "3", "--checkpoint", str(tmp_path / "c"), "--cache-features", "--log-every", "0")
    assert cached.returncode == 0, cached.stderr
    assert "feature cache: building" in cached.stderr
    resumed = gftrain(
        "--steps",
        "5",
        "--checkpoint",
        str(tmp_path / "c"),
        "--cache-features",
        "--log-every",
        "0",
        "--export",
        str(tmp_path / "model.onnx"),
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "feature cache: building" not in resumed.stderr
    assert (tmp_path / "model.onnx").is_file()
    plain = gftrain("--steps", "5", "--checkpoint", str(tmp_path / "p"), "--log-every", "0")
    assert plain.returncode == 0, plain.stderr
    whole = Trainer(artifacts, checkpoint=tmp_path / "p")
    tail = CachedTrainer(artifacts, checkpoint=tmp_path / "c", settings=CacheSettings(tmp_path / "c.features"))
    for name, value in weights(whole).items():
        np.testing.assert_allclose(weights(tail.tail)[name], value, rtol=0, atol=1e-6)
    refused = gftrain("--steps", "2", "--checkpoint", str(tmp_path / "c"), "--cache-memory-mb", "-1")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith("gfcompile: error:")


def test_federated_client_trains_the_same_through_the_cache(tiny, tmp_path) -> None:
    """A Flower client's local epochs on cached prefix features return the parameters that training
    the whole graph returns; the second round reuses the features built in the first."""
    from runtime.federated import FederatedClient

    _, artifacts = tiny
    data = dataset((3, 16, 16), 5, samples=6)
    plain = FederatedClient(artifacts, data)
    cached = FederatedClient(artifacts, data, cache=CacheSettings(tmp_path / "cache"))
    start = weights(Trainer(artifacts))
    for round_seed in (0, 1):
        expected = plain.fit(start, steps=3, seed=round_seed)
        actual = cached.fit(start, steps=3, seed=round_seed)
        assert set(actual.arrays) == set(expected.arrays)
        for name, value in expected.arrays.items():
            np.testing.assert_allclose(actual.arrays[name], value, rtol=0, atol=1e-6, err_msg=name)
        assert not all(np.array_equal(expected.arrays[n], start[n]) for n in start), "nothing trained"
        start = expected.arrays
    assert cached._features is not None
