"""Federated fine-tuning with Flower: partitions, the torch-free client, FedAvg/FedProx, failures, deployment.

The server's aggregate is checked against a numpy FedAvg of what the clients actually returned,
captured inside the clients by a Flower mod (independent of the strategy under test).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gfcompile.config import CompileConfig
from gfcompile.federate import PARAMS_NAME, FederateConfig, simulate
from gfcompile.pipeline import compile_model
from runtime.data import load_npz
from runtime.errors import RunError
from runtime.federated import FederatedClient, trainable_values
from runtime.federated_data import class_skew, dirichlet_partition
from runtime.trainer import Trainer
from tests.federated_round import client_round

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "zoo" / "mobilenetv2_digits.onnx"
TRAIN = ROOT / "models" / "data" / "digits_5to9_train.npz"
TEST = ROOT / "models" / "data" / "digits_5to9_test.npz"
BATCH = 8


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fed") / "artifacts"
    config = CompileConfig(filter_layers=2, batch_size=BATCH, lr=0.003, output_dir=out)
    return compile_model(MODEL, config, report=lambda message: None)


def _client(artifacts: Path, samples: int = 64, lr: float | None = None) -> FederatedClient:
    manifest = json.loads((artifacts / "manifest.json").read_text())
    data = load_npz(TRAIN, manifest)
    data.x, data.y = data.x[:samples], data.y[:samples]
    return FederatedClient(artifacts, data, lr=lr)


# --- partitions ------------------------------------------------------------------------------


def test_dirichlet_partition_assigns_every_sample_once_and_is_deterministic() -> None:
    labels = np.random.default_rng(1).integers(0, 5, size=700)
    parts = dirichlet_partition(labels, 10, alpha=0.3, seed=4, min_size=8)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels)
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    assert min(len(part) for part in parts) >= 8
    again = dirichlet_partition(labels, 10, alpha=0.3, seed=4, min_size=8)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = dirichlet_partition(labels, 10, alpha=0.3, seed=5, min_size=8)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_class_skew_grows_as_alpha_shrinks() -> None:
    labels = np.repeat(np.arange(5), 140)
    skews = [
        np.mean([class_skew(labels, dirichlet_partition(labels, 10, alpha, seed)) for seed in range(5)])
        for alpha in (100.0, 1.0, 0.1)
    ]
    assert skews[0] < 0.1  # near IID
    assert skews[0] < skews[1] < skews[2]
    assert skews[2] > 0.5  # most partitions hold one or two classes


def test_dirichlet_partition_refuses_impossible_requests() -> None:
    labels = np.arange(20) % 2
    with pytest.raises(RunError, match="cannot give 5 partitions at least 8 samples"):
        dirichlet_partition(labels, 5, alpha=1.0, min_size=8)
    with pytest.raises(RunError, match="alpha must be > 0"):
        dirichlet_partition(labels, 2, alpha=0.0)


# --- the client ------------------------------------------------------------------------------


def test_client_returns_only_trainable_parameters_and_rejects_wrong_ones(artifacts: Path) -> None:
    client = _client(artifacts)
    reference = Trainer(artifacts)
    start = trainable_values(reference)
    result = client.fit(start, steps=2, seed=0)
    assert list(result.arrays) == reference.manifest["plan"]["trainable_params"]
    assert all(result.arrays[name].shape == start[name].shape for name in start)
    assert any(not np.array_equal(result.arrays[name], start[name]) for name in start)
    frozen = [name for name, _ in reference.state.parameters if name not in start]
    frozen_bytes = sum(reference.state.parameters[name].data.nbytes for name in frozen)
    payload = sum(value.nbytes for value in result.arrays.values())
    assert frozen and payload < frozen_bytes  # the frozen majority stays on the device

    loss, accuracy = client.evaluate(start)
    expected = reference.evaluate(client.data)
    assert (loss, accuracy) == pytest.approx((expected.loss, expected.accuracy))

    name = next(iter(start))
    wrong = {**start, name: np.zeros((3, 2), np.float32)}
    with pytest.raises(RunError, match=rf"parameter {name} has shape \[3, 2\], the bundle expects"):
        client.fit(wrong, steps=1)
    with pytest.raises(RunError, match="are not trainable in this bundle"):
        client.fit({**start, frozen[0]: reference.state.parameters[frozen[0]].data}, steps=1)
    with pytest.raises(RunError, match="missing trainable parameter"):
        client.fit({key: value for key, value in start.items() if key != name}, steps=1)
    with pytest.raises(RunError, match="NaN or Inf"):
        client.fit({**start, name: np.full_like(start[name], np.nan)}, steps=1)


def test_fedprox_pull_matches_the_sgd_proximal_step(tmp_path: Path) -> None:
    """Plain SGD: w2 = w1 - lr * (g(w1) + mu * (w1 - w0)), with w1 and g(w1) as without the term."""
    config = CompileConfig(
        filter_layers=2, batch_size=BATCH, optimizer="sgd", momentum=0.0, lr=0.01, output_dir=tmp_path
    )
    sgd = compile_model(MODEL, config, report=lambda message: None)
    client = _client(sgd)
    w0 = trainable_values(Trainer(sgd))
    mu = 5.0
    w1 = client.fit(w0, steps=1, seed=3).arrays
    plain = client.fit(w0, steps=2, seed=3).arrays
    prox = client.fit(w0, steps=2, seed=3, proximal_mu=mu).arrays
    for name in w0:
        expected = plain[name] - 0.01 * mu * (w1[name] - w0[name])
        np.testing.assert_allclose(prox[name], expected, rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(prox[name], plain[name]) for name in w0)


def test_client_runs_without_torch(artifacts: Path) -> None:
    script = f"""
import sys
from pathlib import Path
sys.modules["torch"] = None              # any `import torch` now raises ImportError
sys.modules["onnx_graphsurgeon"] = None
sys.path.insert(0, {str(ROOT)!r})
from runtime.data import load_npz
from runtime.federated import FederatedClient, build_client_app, trainable_values
from runtime.trainer import Trainer
build_client_app()
trainer = Trainer(Path({str(artifacts)!r}))
client = FederatedClient(trainer.artifacts, load_npz(Path({str(TRAIN)!r}), trainer.manifest))
client.fit(trainable_values(trainer), steps=1)
assert "torch" not in [name for name, module in sys.modules.items() if module is not None]
print("TORCH_FREE_OK")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "TORCH_FREE_OK" in result.stdout, result.stderr[-2000:]


# --- simulation ------------------------------------------------------------------------------


def _capture_mod(directory: Path, faults: dict | None = None):
    """A Flower mod that saves what each client received and returned, and can inject faults.

    It runs inside the simulation's Ray workers, so it reports through files. `faults` maps
    (round, partition) to "crash" (raise after training, i.e. mid-round), "bad-shape", or a number
    (int or float) that replaces the reply's example count (a poisoning client).
    """
    faults = dict(faults or {})

    def mod(msg, context, call_next):
        from flwr.app import Array, Message, RecordDict

        partition = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        received = {name: array.numpy() for name, array in msg.content["arrays"].items()}
        mu = float(msg.content["config"].get("proximal-mu", -1.0))
        np.savez(directory / f"in_r{server_round}_p{partition}.npz", __mu__=np.array(mu), **received)
        reply = call_next(msg, context)
        fault = faults.get((server_round, partition))
        if fault == "crash":
            raise RuntimeError("simulated device crash in the middle of the round")
        if reply.has_error():
            return reply
        returned = {name: array.numpy() for name, array in reply.content["arrays"].items()}
        if fault == "bad-shape":
            first = next(iter(returned))
            returned[first] = returned[first].reshape(-1)[:7]
            arrays = reply.content["arrays"]
            arrays[first] = Array(returned[first])
            reply = Message(RecordDict({"arrays": arrays, "metrics": reply.content["metrics"]}), reply_to=msg)
            return reply
        if isinstance(fault, int | float):
            reply.content["metrics"]["num-examples"] = fault
            return reply
        weight = reply.content["metrics"]["num-examples"]
        np.savez(directory / f"out_r{server_round}_p{partition}.npz", __weight__=np.array(weight), **returned)
        return reply

    return mod


def _fedavg(directory: Path, server_round: int) -> dict[str, np.ndarray]:
    """numpy FedAvg: the example-weighted mean of the replies the clients returned in one round."""
    replies = [dict(np.load(path)) for path in sorted(directory.glob(f"out_r{server_round}_p*.npz"))]
    weights = np.array([float(reply.pop("__weight__")) for reply in replies])
    weights /= weights.sum()
    return {
        name: sum(w * reply[name].astype(np.float64) for w, reply in zip(weights, replies, strict=True))
        for name in replies[0]
    }


def _received(directory: Path, server_round: int, partition: int) -> tuple[dict[str, np.ndarray], float]:
    arrays = dict(np.load(directory / f"in_r{server_round}_p{partition}.npz"))
    return arrays, float(arrays.pop("__mu__"))


def _assert_close(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_simulation_ten_clients_learn_and_aggregate_is_numpy_fedavg(artifacts: Path, tmp_path: Path) -> None:
    captured = tmp_path / "captured"
    captured.mkdir()
    config = FederateConfig(
        artifacts=artifacts,
        train_data=TRAIN,
        test_data=TEST,
        out=tmp_path / "out",
        num_clients=10,
        rounds=3,
        local_steps=5,
    )
    log = simulate(config, client_mods=[_capture_mod(captured)])

    rounds = log["rounds"]
    assert [entry["round"] for entry in rounds] == [0, 1, 2, 3]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.1
    trainable_bytes = log["trainable_bytes"]
    for entry in rounds[1:]:
        assert len(entry["clients"]) == 10 and not entry["failures"] and not entry["rejected"]
        # Each reply carries the trainable tensors plus small npy headers, nothing frozen.
        assert all(trainable_bytes <= client["bytes_up"] < trainable_bytes + 2048 for client in entry["clients"])
        assert entry["time_s"] > 0
    assert (tmp_path / "out" / "federated.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The global model after round r is what every client received in round r + 1, and after the
    # last round what the server saved; each must equal the numpy FedAvg of round r's replies.
    for server_round in (1, 2):
        sent, mu = _received(captured, server_round + 1, 0)
        assert mu == -1.0  # FedAvg sends no proximal term
        _assert_close(sent, _fedavg(captured, server_round))
    _assert_close(dict(np.load(tmp_path / "out" / PARAMS_NAME)), _fedavg(captured, 3))


def test_crashed_and_malformed_clients_do_not_stop_the_fedprox_round(artifacts: Path, tmp_path: Path) -> None:
    captured = tmp_path / "captured"
    captured.mkdir()
    faults = {(1, 1): "crash", (1, 2): "bad-shape"}
    config = FederateConfig(
        artifacts=artifacts,
        train_data=TRAIN,
        test_data=TEST,
        out=tmp_path / "out",
        num_clients=4,
        rounds=2,
        local_steps=2,
        strategy="fedprox",
        proximal_mu=0.1,
    )
    log = simulate(config, client_mods=[_capture_mod(captured, faults)])

    first, second = log["rounds"][1], log["rounds"][2]
    assert sorted(client["partition_id"] for client in first["clients"]) == [0, 3]
    assert len(first["failures"]) == 1 and "simulated device crash" in first["failures"][0]["reason"]
    assert len(first["rejected"]) == 1
    assert "has shape [7], the bundle expects" in first["rejected"][0]["reason"]
    # The round's aggregate is the FedAvg of the two good replies only.
    sent, mu = _received(captured, 2, 0)
    assert mu == pytest.approx(0.1)  # FedProx's mu reaches the clients
    _assert_close(sent, _fedavg(captured, 1))
    # The crashed and the malformed client take part again in the next round.
    assert len(second["clients"]) == 4 and not second["failures"] and not second["rejected"]


def test_federate_config_and_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    from gfcompile.errors import GfError
    from gfcompile.federate_cli import main

    with pytest.raises(GfError, match="FedProx needs --proximal-mu > 0"):
        FederateConfig(artifacts=tmp_path, train_data=TRAIN, test_data=TEST, out=tmp_path, strategy="fedprox")
    with pytest.raises(GfError, match="fraction-train must be in"):
        FederateConfig(artifacts=tmp_path, train_data=TRAIN, test_data=TEST, out=tmp_path, fraction_train=0.0)
    assert main([str(tmp_path), "--train-data", str(TRAIN), "--test-data", str(TEST)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no manifest.json; compile the model first" in error[0]


# --- deployment ------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_loopback_deployment_three_supernodes_two_rounds_then_shutdown(artifacts: Path, tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(ROOT / "scripts" / "federated_loopback.py"),
        str(artifacts),
        "--train-data",
        str(TRAIN),
        "--test-data",
        str(TEST),
        "-o",
        str(tmp_path / "out"),
        "--supernodes",
        "3",
        "--rounds",
        "2",
        "--local-steps",
        "3",
        "--timeout",
        "240",
        "--keep-logs",
        str(tmp_path / "logs"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["leftover_pids"] == []
    # SuperLink, 3 SuperNodes and the processes they spawned (SuperExec, ServerApp, ClientApps).
    assert len(summary["pids"]) >= 4
    assert not [pid for pid in summary["pids"] if _alive(pid)]
    log = json.loads((tmp_path / "out" / "federated_log.json").read_text())
    assert [entry["round"] for entry in log["rounds"]] == [0, 1, 2]
    for entry in log["rounds"][1:]:
        assert sorted(client["partition_id"] for client in entry["clients"]) == [0, 1, 2]
    assert (tmp_path / "out" / "federated.png").is_file()


# --- poisoning -------------------------------------------------------------------------------


def test_example_counts_are_checked_against_the_assigned_partition(artifacts: Path) -> None:
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from gfcompile.federate import validate_reply
    from runtime.federated import expected_arrays, to_record

    trainer = Trainer(artifacts)
    arrays = to_record(trainable_values(trainer))
    assigned = {0: 40, 1: 25}

    def reply(weight, partition=1, record: ArrayRecord = arrays) -> RecordDict:
        return RecordDict(
            {"arrays": record, "metrics": MetricRecord({"num-examples": weight, "partition-id": partition})}
        )

    assert validate_reply(reply(25), expected_arrays(trainer), assigned)[1:4:2] == (25, 1)
    assert validate_reply(reply(3.0), expected_arrays(trainer), assigned)[1] == 3
    for weight in (float("inf"), float("nan"), 1e308, 26, 2.5, 0, -1):
        with pytest.raises(RunError, match=r"whole number of examples from 1 to 25 \(partition 1's size\)"):
            validate_reply(reply(weight), expected_arrays(trainer), assigned)
    for partition in (2, -1, 1.0):
        with pytest.raises(RunError, match="partition-id' must be one of 0..1"):
            validate_reply(reply(5, partition), expected_arrays(trainer), assigned)


def test_poisoning_clients_are_rejected_in_a_real_simulation(artifacts: Path, tmp_path: Path) -> None:
    """inf (NaN weights), and two replies of 1e308 (their total overflows, which zeroes the model)."""
    captured = tmp_path / "captured"
    captured.mkdir()
    faults = {(1, 0): float("inf"), (1, 1): 1e308, (1, 2): 1e308}
    config = FederateConfig(
        artifacts=artifacts, train_data=TRAIN, test_data=TEST, out=tmp_path / "out", num_clients=4, rounds=2,
        local_steps=1,
    )  # fmt: skip
    log = simulate(config, client_mods=[_capture_mod(captured, faults)])
    first, second = log["rounds"][1], log["rounds"][2]
    assert [client["partition_id"] for client in first["clients"]] == [3]
    assert len(first["rejected"]) == 3 and first["skipped"] is None
    assert all("whole number of examples" in entry["reason"] for entry in first["rejected"])
    # The global model after round 1 is the honest client's reply, finite and not zeroed.
    sent, _ = _received(captured, 2, 0)
    _assert_close(sent, _fedavg(captured, 1))
    assert all(np.isfinite(value).all() and np.abs(value).max() > 0 for value in sent.values())
    assert len(second["clients"]) == 4 and not second["rejected"]


def test_a_non_finite_aggregate_skips_the_round(artifacts: Path, tmp_path: Path, monkeypatch) -> None:
    """With the reply check switched off (a gap in validation), an inf example count makes FedAvg's
    aggregate NaN: the round is dropped and the next round starts from the previous global model."""
    import gfcompile.federate as federate
    from runtime.federated import from_record

    def unchecked(content, expected, assigned):  # accepts what validate_reply would refuse
        metrics = content["metrics"]
        return from_record(content["arrays"]), metrics["num-examples"], 0, int(metrics["partition-id"])

    monkeypatch.setattr(federate, "validate_reply", unchecked)
    captured = tmp_path / "captured"
    captured.mkdir()
    config = FederateConfig(
        artifacts=artifacts, train_data=TRAIN, test_data=TEST, out=tmp_path / "out", num_clients=2, rounds=2,
        local_steps=1,
    )  # fmt: skip
    log = simulate(config, client_mods=[_capture_mod(captured, {(1, 0): float("inf")})])
    first, second = log["rounds"][1], log["rounds"][2]
    assert "is not finite" in first["skipped"] and second["skipped"] is None
    initial, _ = _received(captured, 1, 1)
    after_skip, _ = _received(captured, 2, 1)
    _assert_close(after_skip, initial)  # round 1 changed nothing
    final = dict(np.load(tmp_path / "out" / PARAMS_NAME))
    assert all(np.isfinite(value).all() for value in final.values())
    _assert_close(final, _fedavg(captured, 2))


# --- the portable backend ----------------------------------------------------------------------


def _server_parameters(artifacts: Path) -> dict[str, np.ndarray]:
    """Parameters unlike the compiled checkpoint's, so a client that ignored them would be caught."""
    rng = np.random.default_rng(7)
    initial = Trainer(artifacts).parameters()
    return {
        name: (value + 0.05 * rng.standard_normal(value.shape)).astype(np.float32) for name, value in initial.items()
    }


def _hide_training_build(monkeypatch) -> None:
    """From here on `Trainer(...)` is the PortableTrainer, as on a device with plain onnxruntime only
    (the switch Trainer.__new__ reads), and every federated client is built anew."""
    import runtime.federated
    import runtime.portable

    monkeypatch.setattr(runtime.portable, "training_build_installed", lambda: False)
    monkeypatch.setattr(runtime.federated, "_CLIENTS", {})


@pytest.fixture(scope="module")
def cached_artifacts(tmp_path_factory) -> Path:
    # Plain SGD: with the prefix in its own session, AdamW would turn rounding in near-zero gradient
    # elements into lr-sized differences (tests/test_feature_cache.py).
    out = tmp_path_factory.mktemp("fed_cached") / "artifacts"
    config = CompileConfig(
        filter_layers=2, batch_size=BATCH, optimizer="sgd", momentum=0.9, lr=0.01, feature_cache=True, output_dir=out
    )
    return compile_model(MODEL, config, report=lambda message: None)


@pytest.mark.parametrize(("cached", "mu"), [(False, 0.0), (False, 0.5), (True, 0.5)])
def test_portable_client_round_equals_the_training_build_client(
    artifacts: Path, cached_artifacts: Path, tmp_path: Path, monkeypatch, cached: bool, mu: float
) -> None:
    from runtime.feature_cache import CachedTrainer
    from runtime.federated import ClientConfig
    from runtime.portable import PortableTrainer

    bundle = cached_artifacts if cached else artifacts
    # AdamW at lr 1e-4 (the uncached artifacts): near-zero gradient elements then move the weights
    # by much less than 1e-5 whatever their rounding (tests/test_portable.py).
    lr = 0.01 if cached else 1e-4

    def config(backend: str) -> ClientConfig:
        cache_dir = str(tmp_path / f"cache-{backend}") if cached else ""
        return ClientConfig(artifacts=str(bundle), train_data=str(TRAIN), lr=lr, cache_dir=cache_dir)

    server = _server_parameters(bundle)
    round_config = {"server-round": 1, "local-steps": 3, "seed": 5, "proximal-mu": mu}
    expected, expected_metrics = client_round(config("build"), server, round_config)
    expected_eval = client_round(config("build"), server, {}, kind="evaluate")[1]

    _hide_training_build(monkeypatch)
    opened = CachedTrainer(bundle, settings=None).tail if cached else Trainer(bundle)
    assert type(opened) is PortableTrainer
    actual, metrics = client_round(config("portable"), server, round_config)
    evaluation = client_round(config("portable"), server, {}, kind="evaluate")[1]

    assert list(actual) == list(expected)
    for name, value in expected.items():
        assert not np.allclose(value, server[name], rtol=0, atol=1e-7), f"{name} did not train"
        np.testing.assert_allclose(actual[name], value, rtol=0, atol=1e-5, err_msg=name)
    assert metrics["num-examples"] == expected_metrics["num-examples"]
    assert metrics["train-loss"] == pytest.approx(expected_metrics["train-loss"], abs=1e-5)
    assert evaluation["loss"] == pytest.approx(expected_eval["loss"], abs=1e-5)
    assert evaluation["accuracy"] == pytest.approx(expected_eval["accuracy"])


def test_set_parameters_on_both_backends(artifacts: Path) -> None:
    from runtime.portable import PortableTrainer

    server = _server_parameters(artifacts)
    name = next(iter(server))
    for trainer in (Trainer(artifacts), PortableTrainer(artifacts)):
        trainer.set_parameters(server)
        assert all(np.array_equal(value, server[key]) for key, value in trainer.parameters().items())
        with pytest.raises(RunError, match=rf"parameter {name} has shape .*, not \[3\]"):
            trainer.set_parameters({name: np.zeros(3, np.float32)})
        with pytest.raises(RunError, match="'frozen.weight' is not a trainable parameter"):
            trainer.set_parameters({"frozen.weight": np.zeros(3, np.float32)})


@pytest.mark.slow
@pytest.mark.portable_matrix
def test_client_round_on_python313_plain_onnxruntime(artifacts: Path, tmp_path: Path) -> None:
    """A throwaway Python 3.13 venv with the newest plain onnxruntime, numpy and the runtime package
    with its Flower extra (no training build, torch or onnx) runs one client round through Flower's
    ClientApp; it equals the same round run here by the training build."""
    import shutil

    from tests.test_portable import _clean_env, _python313

    env_dir = tmp_path / "py313"
    subprocess.run([str(_python313()), "-m", "venv", str(env_dir)], check=True, env=_clean_env())
    runtime_source = tmp_path / "runtime_source"  # a copy, so no build/ folder lands in the checkout
    shutil.copytree(
        ROOT / "runtime", runtime_source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    )
    install = [str(env_dir / "bin" / "python"), "-I", "-m", "pip", "install", "--quiet", "onnxruntime", "numpy"]
    installed = subprocess.run(
        [*install, f"{runtime_source}[federated]"], capture_output=True, text=True, env=_clean_env()
    )
    assert installed.returncode == 0, installed.stderr[-2000:]

    np.savez(tmp_path / "server.npz", **_server_parameters(artifacts))
    round_config = json.dumps({"server-round": 1, "local-steps": 3, "seed": 5, "proximal-mu": 0.5})
    reports = {}
    for backend, python in (("build", sys.executable), ("plain", env_dir / "bin" / "python")):
        arguments = [artifacts, TRAIN, tmp_path / "server.npz", tmp_path / f"{backend}.npz", 1e-4, round_config]
        command = [str(python), "-I", str(ROOT / "tests" / "federated_round.py"), *map(str, arguments)]
        result = subprocess.run(command, capture_output=True, text=True, env=_clean_env(), timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        reports[backend] = json.loads(result.stdout.strip().splitlines()[-1])

    assert reports["build"]["backend"] == "Trainer"
    assert reports["plain"]["backend"] == "PortableTrainer" and reports["plain"]["python"] == [3, 13]
    assert reports["plain"]["train-loss"] == pytest.approx(reports["build"]["train-loss"], abs=1e-5)
    with np.load(tmp_path / "build.npz") as expected, np.load(tmp_path / "plain.npz") as actual:
        assert sorted(actual.files) == sorted(expected.files)
        for name in expected.files:
            np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=1e-5, err_msg=name)
