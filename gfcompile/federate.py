"""Federated fine-tuning of compiled artifacts with Flower: the server side.

The ServerApp runs Flower's FedAvg (or FedProx) over the bundle's trainable parameters only;
the frozen rest of the model is identical on every device and never travels. Before Flower
averages a round, every reply is checked against the trainable set (names, shapes, dtypes,
finite values) and its example count, which weights the average, against what that client was
assigned (finite, a whole number, 1 to the size of its partition; one node, one partition): a bad
reply is rejected with a one-line reason and the round goes on with the others, as it does for
clients that failed (Flower's error replies). An aggregate that is still not finite is dropped:
the round is skipped and the previous global model kept.
The global model is evaluated on the held-out test set before the first round and after each
one, and every round is logged (accuracy, bytes per client, time) to JSON and a PNG plot.

Simulation (`simulate`, `gfcompile federate`) runs Flower's simulation engine on this machine;
a real deployment runs the same apps under a SuperLink and SuperNodes
(`scripts/federated_loopback.py`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from runtime.bundle import open_trainer
from runtime.data import load_npz
from runtime.errors import RunError
from runtime.federated import (
    ARRAYS_KEY,
    PARTITION_KEY,
    WEIGHT_KEY,
    ClientConfig,
    Expected,
    Mod,
    build_client_app,
    check_arrays,
    expected_arrays,
    from_record,
    partitions,
    set_trainable,
    to_record,
    trainable_values,
    wire_bytes,
)

from .errors import GfError

LOG = logging.getLogger("flwr")
LOG_NAME = "federated_log.json"
PLOT_NAME = "federated.png"
PARAMS_NAME = "global_trainable.npz"


@dataclass
class FederateConfig:
    """One federated run. Paths are absolute in deployment: the apps run in other processes."""

    artifacts: Path
    train_data: Path
    test_data: Path
    out: Path
    num_clients: int = 10
    rounds: int = 3
    local_steps: int = 10
    alpha: float = 0.5
    seed: int = 0
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = 0.0
    fraction_train: float = 1.0
    lr: float | None = None
    timeout_s: float = 600.0
    # Clients cache their frozen-prefix features here (artifacts compiled with --feature-cache).
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        for name in ("artifacts", "train_data", "test_data", "out"):
            setattr(self, name, Path(getattr(self, name)))
        if self.num_clients < 1 or self.rounds < 1 or self.local_steps < 1:
            raise GfError("clients, rounds and local steps must each be at least 1")
        if not 0 < self.fraction_train <= 1:
            raise GfError(f"--fraction-train must be in (0, 1], got {self.fraction_train}")
        if self.strategy not in ("fedavg", "fedprox"):
            raise GfError(f"unknown strategy {self.strategy!r}: use fedavg or fedprox")
        if self.strategy == "fedprox" and not self.proximal_mu > 0:
            raise GfError("FedProx needs --proximal-mu > 0 (mu = 0 is FedAvg)")
        if not self.alpha > 0:
            raise GfError(f"the Dirichlet alpha must be > 0, got {self.alpha}")

    def client_config(self) -> ClientConfig:
        return ClientConfig(
            artifacts=str(self.artifacts.resolve()),
            train_data=str(self.train_data.resolve()),
            alpha=self.alpha,
            partition_seed=self.seed,
            lr=self.lr,
            cache_dir=str(self.cache_dir.resolve()) if self.cache_dir else "",
        )

    def run_config(self) -> dict[str, str | int | float]:
        """The Flower run config (`--run-config`) that a deployment's apps read this config from."""
        values: dict[str, str | int | float] = {
            "artifacts": str(self.artifacts.resolve()),
            "train-data": str(self.train_data.resolve()),
            "test-data": str(self.test_data.resolve()),
            "out": str(self.out.resolve()),
            "num-clients": self.num_clients,
            "num-rounds": self.rounds,
            "local-steps": self.local_steps,
            "alpha": self.alpha,
            "partition-seed": self.seed,
            "strategy": self.strategy,
            "proximal-mu": self.proximal_mu,
            "fraction-train": self.fraction_train,
            "lr": self.lr or 0.0,
            "timeout-s": self.timeout_s,
        }
        if self.cache_dir:
            values["cache-dir"] = str(self.cache_dir.resolve())
        return values

    @classmethod
    def from_run_config(cls, run_config: dict) -> FederateConfig:
        for key in ("artifacts", "train-data", "test-data", "out"):
            if not run_config.get(key):
                raise GfError(f"the Flower run config has no '{key}' (set it with --run-config \"{key}='...'\")")
        lr = float(run_config.get("lr", 0.0))
        return cls(
            artifacts=Path(str(run_config["artifacts"])),
            train_data=Path(str(run_config["train-data"])),
            test_data=Path(str(run_config["test-data"])),
            out=Path(str(run_config["out"])),
            num_clients=int(run_config.get("num-clients", 10)),
            rounds=int(run_config.get("num-rounds", 3)),
            local_steps=int(run_config.get("local-steps", 10)),
            alpha=float(run_config.get("alpha", 0.5)),
            seed=int(run_config.get("partition-seed", 0)),
            strategy=str(run_config.get("strategy", "fedavg")),  # type: ignore[arg-type]
            proximal_mu=float(run_config.get("proximal-mu", 0.0)),
            fraction_train=float(run_config.get("fraction-train", 1.0)),
            lr=lr if lr > 0 else None,
            timeout_s=float(run_config.get("timeout-s", 600.0)),
            cache_dir=Path(str(run_config["cache-dir"])) if run_config.get("cache-dir") else None,
        )


@dataclass
class RoundRecord:
    round: int
    accuracy: float | None = None
    loss: float | None = None
    time_s: float = 0.0  # training: configure_train -> aggregation done
    eval_time_s: float = 0.0
    bytes_down_per_client: int = 0
    clients: list[dict] = field(default_factory=list)  # accepted replies
    failures: list[dict] = field(default_factory=list)  # Flower error replies (crashed clients)
    rejected: list[dict] = field(default_factory=list)  # replies that failed validation
    skipped: str | None = None  # why the round's aggregate was dropped (the global model stayed as it was)


class RoundLog:
    """What happened in each round, filled in by the strategy and the server-side evaluation."""

    def __init__(self) -> None:
        self.rounds: dict[int, RoundRecord] = {}
        self._started: dict[int, float] = {}

    def get(self, server_round: int) -> RoundRecord:
        return self.rounds.setdefault(server_round, RoundRecord(round=server_round))

    def start(self, server_round: int, bytes_down: int) -> None:
        self._started[server_round] = time.perf_counter()
        self.get(server_round).bytes_down_per_client = bytes_down

    def finish(self, server_round: int) -> None:
        if server_round in self._started:
            self.get(server_round).time_s = time.perf_counter() - self._started[server_round]

    def as_list(self) -> list[dict]:
        return [asdict(self.rounds[key]) for key in sorted(self.rounds)]


def validate_reply(
    content, expected: Expected, assigned: dict[int, int]
) -> tuple[dict[str, np.ndarray], int, int, int]:
    """The arrays, example count, wire bytes and partition of one training reply; RunError if it cannot be averaged.

    `assigned` maps each partition to its sample count: FedAvg weights a reply by its example
    count, so a count of inf (NaN weights), 1e308 (an overflowing total) or more than the client
    holds would let one client poison or outweigh the round.
    """
    if len(content.array_records) != 1 or ARRAYS_KEY not in content.array_records:
        raise RunError(f"the reply must carry exactly one ArrayRecord named '{ARRAYS_KEY}'")
    if len(content.metric_records) != 1:
        raise RunError("the reply must carry exactly one MetricRecord")
    metrics = next(iter(content.metric_records.values()))
    partition = metrics.get(PARTITION_KEY)
    if not isinstance(partition, int) or isinstance(partition, bool) or partition not in assigned:
        raise RunError(f"the reply's '{PARTITION_KEY}' must be one of 0..{len(assigned) - 1}, got {partition!r}")
    weight = metrics.get(WEIGHT_KEY)
    limit = assigned[partition]
    if (
        not isinstance(weight, int | float)
        or isinstance(weight, bool)
        or not math.isfinite(weight)
        or not float(weight).is_integer()
        or not 1 <= weight <= limit
    ):
        raise RunError(
            f"the reply's '{WEIGHT_KEY}' must be a whole number of examples from 1 to {limit} "
            f"(partition {partition}'s size), got {weight!r}"
        )
    record = content.array_records[ARRAYS_KEY]
    try:
        arrays = from_record(record)
    except Exception as exc:  # a corrupted payload from the wire: refuse it, keep the round
        raise RunError(f"the reply's parameters cannot be decoded ({exc})") from None
    check_arrays(arrays, expected, "the client's parameters")
    return arrays, int(weight), wire_bytes(record), partition


class _TrainableOnly:
    """Validation and logging around a Flower strategy; aggregation itself stays Flower's."""

    def __init__(self, *, expected: Expected, assigned: dict[int, int], round_log: RoundLog, **kwargs) -> None:
        super().__init__(**kwargs)
        self.expected = expected
        self.assigned = assigned
        self.round_log = round_log
        self.partition_of_node: dict[int, int] = {}  # the first claim binds: a node cannot switch partitions

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.round_log.start(server_round, wire_bytes(arrays))
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        entry = self.round_log.get(server_round)
        accepted = []
        claimed: set[int] = set()  # partitions already answered this round
        for message in replies:
            node = int(message.metadata.src_node_id)
            if message.has_error():
                reason = message.error.reason.strip().splitlines()[-1] if message.error.reason else "no reason"
                LOG.warning("round %d: node %d failed (%s); the round goes on without it", server_round, node, reason)
                entry.failures.append({"node_id": node, "reason": reason})
                continue
            try:
                _, weight, payload, partition = validate_reply(message.content, self.expected, self.assigned)
                self._bind(node, partition, claimed)
            except RunError as exc:
                LOG.error("round %d: rejected the reply of node %d: %s", server_round, node, exc)
                entry.rejected.append({"node_id": node, "reason": str(exc)})
                continue
            metrics = next(iter(message.content.metric_records.values()))
            entry.clients.append(
                {
                    "node_id": node,
                    "partition_id": metrics.get("partition-id"),
                    "num_examples": weight,
                    "bytes_up": payload,
                    "train_loss": metrics.get("train-loss"),
                }
            )
            accepted.append(message)
        arrays, metrics = super().aggregate_train(server_round, accepted) if accepted else (None, None)
        if not accepted:
            LOG.error("round %d: no usable replies; the global model stays as it was", server_round)
        elif arrays is not None:
            bad = [name for name, value in from_record(arrays).items() if not np.isfinite(value).all()]
            if bad:
                entry.skipped = f"the aggregate of {bad[0]} is not finite ({len(bad)} tensors)"
                LOG.error("round %d: %s; round skipped, the global model stays as it was", server_round, entry.skipped)
                arrays = None
        self.round_log.finish(server_round)
        return arrays, metrics

    def _bind(self, node: int, partition: int, claimed: set[int]) -> None:
        bound = self.partition_of_node.get(node)
        if bound is not None and bound != partition:
            raise RunError(f"node {node} answered for partition {bound} before, now claims partition {partition}")
        owner = next((other for other, part in self.partition_of_node.items() if part == partition), node)
        if owner != node or partition in claimed:
            raise RunError(f"partition {partition} already belongs to another node")
        self.partition_of_node[node] = partition
        claimed.add(partition)


class TrainableFedAvg(_TrainableOnly, FedAvg):
    """FedAvg (weighted by the clients' example counts) over the trainable parameters."""


class TrainableFedProx(_TrainableOnly, FedProx):
    """FedProx: FedAvg on the server, the proximal pull in each client (see runtime.federated)."""


def make_strategy(config: FederateConfig, expected: Expected, assigned: dict[int, int], round_log: RoundLog):
    # Flower samples max(fraction * connected, min_train_nodes) nodes, counting the connected
    # ones before it waits for them; pinning the minimum keeps round 1 at the full fraction.
    wanted = max(1, math.ceil(config.fraction_train * config.num_clients))
    common = dict(
        expected=expected,
        assigned=assigned,
        round_log=round_log,
        fraction_train=config.fraction_train,
        fraction_evaluate=0.0,  # the server evaluates the global model on the held-out test set
        min_train_nodes=wanted,
        min_available_nodes=config.num_clients,
    )
    if config.strategy == "fedprox":
        return TrainableFedProx(proximal_mu=config.proximal_mu, **common)
    return TrainableFedAvg(**common)


def run_server(grid: Grid, config: FederateConfig) -> dict:
    """Run the federated rounds and write the log, the plot and the final trainable parameters."""
    evaluator = open_trainer(config.artifacts)
    test = load_npz(config.test_data, evaluator.manifest)
    initial = trainable_values(evaluator)
    expected = expected_arrays(evaluator)
    _, parts = partitions(config.client_config(), config.num_clients)
    assigned = {partition: len(indices) for partition, indices in enumerate(parts)}
    round_log = RoundLog()
    strategy = make_strategy(config, expected, assigned, round_log)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        start = time.perf_counter()
        set_trainable(evaluator, from_record(arrays))
        result = evaluator.evaluate(test)
        entry = round_log.get(server_round)
        entry.accuracy, entry.loss = result.accuracy, result.loss
        entry.eval_time_s = time.perf_counter() - start
        values = {"loss": result.loss}
        if result.accuracy is not None:
            values["accuracy"] = result.accuracy
        return MetricRecord(values)

    initial_record = to_record(initial)
    outcome = strategy.start(
        grid=grid,
        initial_arrays=initial_record,
        num_rounds=config.rounds,
        timeout=config.timeout_s,
        train_config=ConfigRecord({"local-steps": config.local_steps, "seed": config.seed}),
        evaluate_fn=evaluate,
    )
    final = from_record(outcome.arrays) if len(outcome.arrays) else initial
    log = {
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()},
        "trainable_params": list(expected),
        "trainable_bytes": int(sum(value.nbytes for value in initial.values())),
        "model_wire_bytes": wire_bytes(initial_record),
        "rounds": round_log.as_list(),
    }
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / LOG_NAME).write_text(json.dumps(log, indent=2))
    np.savez(config.out / PARAMS_NAME, **final)
    plot_log(log, config.out / PLOT_NAME)
    return log


def build_server_app(config: FederateConfig | None = None) -> ServerApp:
    """A Flower ServerApp; without `config` it reads the run config (deployment, `flwr run`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, config or FederateConfig.from_run_config(dict(context.run_config)))

    return app


def simulate(
    config: FederateConfig, client_mods: Iterable[Mod] = (), cpus: int | None = None, client_cpus: float = 1.0
) -> dict:
    """Run `config.num_clients` virtual clients in Flower's simulation engine (Ray) on this machine."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network here, and none wanted
    from flwr.simulation import run_simulation

    config.out.mkdir(parents=True, exist_ok=True)
    log_path = config.out / LOG_NAME
    log_path.unlink(missing_ok=True)
    backend_config = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus or os.cpu_count() or 1, "include_dashboard": False},
    }
    run_simulation(
        server_app=build_server_app(config),
        client_app=build_client_app(config.client_config(), mods=client_mods),
        num_supernodes=config.num_clients,
        backend_config=backend_config,
    )
    if not log_path.is_file():
        raise GfError("the federated simulation ended without a round log; see the Flower log above")
    return json.loads(log_path.read_text())


def plot_log(log: dict, path: Path) -> Path:
    """Global accuracy, bytes sent per client, and time, per round."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on CI machines
    from matplotlib import pyplot as plt

    rounds = log["rounds"]
    numbers = [entry["round"] for entry in rounds]
    accuracy = [entry["accuracy"] if entry["accuracy"] is not None else float("nan") for entry in rounds]
    trained = [entry for entry in rounds if entry["round"] > 0]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(numbers, accuracy, marker="o")
    axes[0].set(title="global accuracy (held-out test set)", xlabel="round", ylabel="accuracy", ylim=(0, 1))
    axes[0].set_xticks(numbers)
    up = [np.mean([c["bytes_up"] for c in entry["clients"]]) / 1024 if entry["clients"] else 0 for entry in trained]
    down = [entry["bytes_down_per_client"] / 1024 for entry in trained]
    positions = np.array([entry["round"] for entry in trained], dtype=float)
    axes[1].bar(positions - 0.2, down, width=0.4, label="server -> client")
    axes[1].bar(positions + 0.2, up, width=0.4, label="client -> server")
    axes[1].set(title="payload per client (trainable params only)", xlabel="round", ylabel="KiB")
    axes[1].legend(fontsize=8, loc="lower right")
    axes[2].bar(positions, [entry["time_s"] for entry in trained], label="train round")
    axes[2].bar(
        positions, [entry["eval_time_s"] for entry in trained], bottom=[e["time_s"] for e in trained], label="eval"
    )
    axes[2].set(title="time per round", xlabel="round", ylabel="s")
    axes[2].legend(fontsize=8, loc="lower right")
    for axis in axes[1:]:
        axis.set_xticks(positions)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
