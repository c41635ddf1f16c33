"""A Flower client over compiled artifacts or a device bundle: only trainable parameters travel.

Each round the client loads the artifacts afresh (so the optimizer state starts at zero, as
FedAvg assumes), overwrites the trainable parameters with the server's, trains a few local
steps on its own partition, and replies with the trainable parameters alone. Frozen
parameters come from the bundle's checkpoint on every device and never go over the wire.

The client reads and writes weights only through the trainers' `parameters()` and
`set_parameters()`, so it runs on either backend (the training build, or plain onnxruntime's
PortableTrainer, whichever `Trainer` picks) and with the feature cache (CachedTrainer).

Needs `flwr` besides the runtime's own dependencies; still no torch (the Flower client API
does not import it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .bundle import open_trainer
from .data import Dataset, batches, load_npz
from .errors import RunError
from .feature_cache import CachedTrainer, CacheSettings
from .federated_data import dirichlet_partition
from .trainer import Trainer, load_manifest

ARRAYS_KEY = "arrays"
PARTITION_KEY = "partition-id"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
WEIGHT_KEY = "num-examples"

LOG = logging.getLogger("flwr")

Expected = dict[str, tuple[tuple[int, ...], np.dtype]]


def trainable_values(trainer: Trainer) -> dict[str, np.ndarray]:
    """Copies of the trainable parameters, in the manifest's order: what goes over the wire."""
    return trainer.parameters()


def expected_arrays(trainer: Trainer) -> Expected:
    return {name: (tuple(value.shape), value.dtype) for name, value in trainable_values(trainer).items()}


def check_arrays(arrays: dict[str, np.ndarray], expected: Expected, source: str) -> None:
    """Refuse parameters that are not exactly the bundle's trainable set (names, shapes, dtypes, finite)."""
    missing = [name for name in expected if name not in arrays]
    if missing:
        raise RunError(f"{source}: missing trainable parameter(s) {', '.join(missing[:3])} ({len(missing)} in all)")
    extra = [name for name in arrays if name not in expected]
    if extra:
        raise RunError(
            f"{source}: parameter(s) {', '.join(extra[:3])} are not trainable in this bundle; only trainable ones travel"
        )
    for name, (shape, dtype) in expected.items():
        value = arrays[name]
        if tuple(value.shape) != shape:
            raise RunError(
                f"{source}: parameter {name} has shape {list(value.shape)}, the bundle expects {list(shape)}"
            )
        if value.dtype != dtype:
            raise RunError(f"{source}: parameter {name} has dtype {value.dtype}, the bundle expects {dtype}")
        if not np.all(np.isfinite(value)):
            raise RunError(f"{source}: parameter {name} contains NaN or Inf")


def set_trainable(trainer: Trainer, arrays: dict[str, np.ndarray]) -> None:
    """Load checked wire parameters (see check_arrays) into `trainer`, either backend."""
    trainer.set_parameters({name: arrays[name] for name in trainer.trainable})


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def wire_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialized tensors (npy headers included) that one copy of `record` puts on the wire."""
    return sum(len(array.data) for array in record.values())


@dataclass
class FitResult:
    arrays: dict[str, np.ndarray]
    num_examples: int
    loss: float
    steps: int


class FederatedClient:
    """One device: a compiled bundle and its private data."""

    def __init__(self, artifacts: Path, data: Dataset, lr: float | None = None, cache: CacheSettings | None = None):
        self.artifacts = Path(artifacts)
        self.lr = lr
        # With a cache, local epochs run the frozen prefix once per sample (runtime/feature_cache.py).
        self.cache = cache
        self._features: Dataset | None = None
        trainer = open_trainer(self.artifacts, lr=lr)  # every shipped file checked once, up front
        self.expected = expected_arrays(trainer)
        self.batch_size = trainer.batch_size
        self.manifest = trainer.manifest
        if len(data) < self.batch_size:
            raise RunError(
                f"the client holds {len(data)} samples, fewer than the compiled batch size {self.batch_size}"
            )
        self.data = data

    def fit(self, arrays: dict[str, np.ndarray], steps: int, seed: int = 0, proximal_mu: float = 0.0) -> FitResult:
        """Train `steps` local steps from the server's parameters; returns the new trainable parameters.

        FedProx's proximal term mu/2 |w - w_global|^2 is applied as its own step after each
        optimizer step, w -= lr * mu * (w_before - w_global): exact for plain SGD, and for AdamW
        a decoupled pull toward the global model (as AdamW decouples weight decay); neither
        backend exposes the gradient between backward and update, so the term cannot join it.
        """
        check_arrays(arrays, self.expected, "the server's parameters")
        if steps < 1:
            raise RunError(f"local steps must be at least 1, got {steps}")
        trainer = self._new_trainer()
        set_trainable(trainer, arrays)
        anchor = {name: np.asarray(arrays[name], dtype=np.float32) for name in trainer.trainable}
        stream = batches(self._training_data(trainer), trainer.batch_size, seed)
        losses = []
        for _ in range(steps):
            before = trainable_values(trainer) if proximal_mu else None
            losses.append(trainer.train_step(*next(stream)))
            if before is not None:
                after = trainable_values(trainer)
                trainer.set_parameters(
                    {
                        name: after[name] - trainer.lr * proximal_mu * (before[name] - anchor[name])
                        for name in trainer.trainable
                    }
                )
        return FitResult(
            arrays=trainable_values(trainer), num_examples=len(self.data), loss=float(np.mean(losses)), steps=steps
        )

    def evaluate(self, arrays: dict[str, np.ndarray]) -> tuple[float, float | None]:
        check_arrays(arrays, self.expected, "the server's parameters")
        trainer = self._new_trainer()
        set_trainable(trainer, arrays)
        result = trainer.evaluate(self.data)
        return result.loss, result.accuracy

    def _new_trainer(self) -> Trainer:
        if self.cache is None:
            return Trainer(self.artifacts, lr=self.lr)
        return CachedTrainer(self.artifacts, lr=self.lr, settings=self.cache)

    def _training_data(self, trainer: Trainer) -> Dataset:
        """The client's samples, or their cached prefix features (opened once, reused every round)."""
        if self.cache is None:
            return self.data
        if self._features is None:
            self._features = trainer.features(self.data)
        return self._features


@dataclass
class ClientConfig:
    """Where a client finds its bundle and data; in a Flower app these come from the run config."""

    artifacts: str
    train_data: str
    alpha: float = 0.5
    partition_seed: int = 0
    lr: float | None = None
    cache_dir: str = ""  # with a folder, clients cache their frozen-prefix features there (one per partition)

    @classmethod
    def from_run_config(cls, run_config: dict) -> ClientConfig:
        for key in ("artifacts", "train-data"):
            if not run_config.get(key):
                raise RunError(f"the Flower run config has no '{key}' (set it with --run-config \"{key}='...'\")")
        lr = float(run_config.get("lr", 0.0))
        return cls(
            artifacts=str(run_config["artifacts"]),
            train_data=str(run_config["train-data"]),
            alpha=float(run_config.get("alpha", 0.5)),
            partition_seed=int(run_config.get("partition-seed", 0)),
            lr=lr if lr > 0 else None,
            cache_dir=str(run_config.get("cache-dir", "")),
        )


_CLIENTS: dict[tuple, FederatedClient] = {}


def partition_client(config: ClientConfig, partition_id: int, num_partitions: int) -> FederatedClient:
    """The client for one Dirichlet partition of the training set, built once per process.

    Simulation actors serve many virtual clients in turn; the partition is a pure function of
    the config, so every process computes the same split.
    """
    key = (
        config.artifacts,
        config.train_data,
        config.alpha,
        config.partition_seed,
        config.lr,
        config.cache_dir,
        partition_id,
        num_partitions,
    )
    if key not in _CLIENTS:
        if not 0 <= partition_id < num_partitions:
            raise RunError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
        full, parts = partitions(config, num_partitions)
        index = parts[partition_id]
        cache = (
            CacheSettings(Path(config.cache_dir) / f"partition-{partition_id}-of-{num_partitions}")
            if config.cache_dir
            else None
        )
        _CLIENTS[key] = FederatedClient(
            Path(config.artifacts), Dataset(x=full.x[index], y=full.y[index]), config.lr, cache
        )
    return _CLIENTS[key]


def partitions(config: ClientConfig, num_partitions: int) -> tuple[Dataset, list[np.ndarray]]:
    """The training set and its Dirichlet split: what each client trains on, and what the server caps
    each client's reported example count by."""
    manifest = load_manifest(Path(config.artifacts), verify=False)  # the client verifies every file later
    full = load_npz(Path(config.train_data), manifest)
    batch_size = int(manifest["inputs"][0]["shape"][0])
    return full, dirichlet_partition(full.y, num_partitions, config.alpha, config.partition_seed, min_size=batch_size)


def _node_partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise RunError("the SuperNode has no partition-id/num-partitions in its --node-config")
    return int(node["partition-id"]), int(node["num-partitions"])


def local_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Different batches per client and round, reproducible from the run's seed."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])


def handle_train(msg: Message, context: Context, config: ClientConfig | None = None) -> Message:
    config = config or ClientConfig.from_run_config(dict(context.run_config))
    partition_id, num_partitions = _node_partition(context)
    client = partition_client(config, partition_id, num_partitions)
    round_config = msg.content[CONFIG_KEY]
    server_round = int(round_config.get("server-round", 0))
    result = client.fit(
        from_record(msg.content[ARRAYS_KEY]),
        steps=int(round_config.get("local-steps", 10)),
        seed=local_seed(int(round_config.get("seed", 0)), server_round, partition_id),
        proximal_mu=float(round_config.get("proximal-mu", 0.0)),
    )
    record = to_record(result.arrays)
    payload = wire_bytes(record)
    LOG.info(
        "partition %d, round %d: %d local steps, loss %.4f, sending %d trainable tensors (%d bytes); frozen stay local",
        partition_id,
        server_round,
        result.steps,
        result.loss,
        len(record),
        payload,
    )
    metrics = MetricRecord(
        {
            WEIGHT_KEY: result.num_examples,
            "train-loss": result.loss,
            "payload-bytes": payload,
            PARTITION_KEY: partition_id,
        }
    )
    return Message(RecordDict({ARRAYS_KEY: record, METRICS_KEY: metrics}), reply_to=msg)


def handle_evaluate(msg: Message, context: Context, config: ClientConfig | None = None) -> Message:
    config = config or ClientConfig.from_run_config(dict(context.run_config))
    partition_id, num_partitions = _node_partition(context)
    client = partition_client(config, partition_id, num_partitions)
    loss, accuracy = client.evaluate(from_record(msg.content[ARRAYS_KEY]))
    values = {WEIGHT_KEY: len(client.data), "loss": loss}
    if accuracy is not None:
        values["accuracy"] = accuracy
    return Message(RecordDict({METRICS_KEY: MetricRecord(values)}), reply_to=msg)


Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def build_client_app(config: ClientConfig | None = None, mods: Iterable[Mod] = ()) -> ClientApp:
    """A Flower ClientApp; without `config` it reads the run config (deployment, `flwr run`)."""
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, config)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, config)

    return app
