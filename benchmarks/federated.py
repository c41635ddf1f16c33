"""Federated fine-tuning with Flower: payload of a last-N-layers update vs a full-model update, and
global accuracy after R rounds with exact backprop vs gradient filtering (r = 2).

    python -m benchmarks.federated [--profile quick|full] [--out bench_results]

The task is the bundled one: MobileNetV2 pretrained on digits 0-4, fine-tuned on digits 5-9 split
across simulated clients with a Dirichlet(alpha) class split, evaluated on the held-out test set.
Both variants use the same partitions, batch order, learning rate and rounds; only the backward
of the trained convs differs. Payloads are the serialized tensors Flower puts on the wire (npy
headers included), per client and direction.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO_ROOT,
    Suite,
    SuiteContext,
    SuiteResult,
    fmt,
    machine_info,
    md_table,
    write_suite_outputs,
)

MODEL = REPO_ROOT / "models" / "zoo" / "mobilenetv2_digits.onnx"
TRAIN = REPO_ROOT / "models" / "data" / "digits_5to9_train.npz"
TEST = REPO_ROOT / "models" / "data" / "digits_5to9_test.npz"
BATCH = 8
LR = 0.003

SETTINGS = {
    "quick": {"layers": (1, 2, 4), "train_layers": 4, "clients": 10, "rounds": 3, "local_steps": 5, "alpha": 0.5},
    "full": {
        "layers": (1, 2, 4, 8, 16),
        "train_layers": 4,
        "clients": 20,
        "rounds": 10,
        "local_steps": 10,
        "alpha": 0.5,
    },
}


def _compile(out: Path, filter_layers: int, train_layers: int) -> Path:
    from gfcompile.config import CompileConfig
    from gfcompile.pipeline import compile_model

    config = CompileConfig(
        filter_layers=filter_layers, train_layers=train_layers, batch_size=BATCH, lr=LR, output_dir=out, force=True
    )
    return compile_model(MODEL, config, report=lambda message: None)


def full_model_arrays() -> dict:
    """Every float parameter of the uncompiled model: what a full-model federated update sends."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(MODEL))
    arrays = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    return {name: value for name, value in arrays.items() if np.issubdtype(value.dtype, np.floating)}


def payloads(work: Path, layers: tuple[int, ...]) -> list[dict[str, Any]]:
    from runtime.federated import to_record, trainable_values, wire_bytes
    from runtime.trainer import Trainer

    full = full_model_arrays()
    full_bytes = wire_bytes(to_record(full))
    rows = []
    for count in layers:
        trainer = Trainer(_compile(work / f"payload_{count}", filter_layers=0, train_layers=count))
        values = trainable_values(trainer)
        sent = wire_bytes(to_record(values))
        rows.append(
            {
                "update": f"last {count} conv(s) + head",
                "tensors": len(values),
                "parameters": int(sum(value.size for value in values.values())),
                "bytes_per_client": sent,
                "vs_full": sent / full_bytes,
            }
        )
    rows.append(
        {
            "update": "full model",
            "tensors": len(full),
            "parameters": int(sum(value.size for value in full.values())),
            "bytes_per_client": full_bytes,
            "vs_full": 1.0,
        }
    )
    return rows


def accuracy_runs(work: Path, settings: dict, log) -> list[dict[str, Any]]:
    from gfcompile.federate import FederateConfig, simulate

    n = settings["train_layers"]
    variants = {
        f"exact BP, last {n} convs": {"filter_layers": 0, "train_layers": n},
        f"gradient filtering r=2, last {n} convs": {"filter_layers": n, "train_layers": n},
    }
    results = []
    for name, spec in variants.items():
        artifacts = _compile(work / f"acc_{spec['filter_layers']}", **spec)
        config = FederateConfig(
            artifacts=artifacts,
            train_data=TRAIN,
            test_data=TEST,
            out=work / f"run_{spec['filter_layers']}",
            num_clients=settings["clients"],
            rounds=settings["rounds"],
            local_steps=settings["local_steps"],
            alpha=settings["alpha"],
        )
        log(f"federated: {name}, {settings['clients']} clients x {settings['rounds']} rounds ...")
        start = time.perf_counter()
        run_log = simulate(config)
        wall = time.perf_counter() - start
        rounds = run_log["rounds"]
        results.append(
            {
                "variant": name,
                "accuracy_per_round": [entry["accuracy"] for entry in rounds],
                "final_accuracy": rounds[-1]["accuracy"],
                "train_time_s_per_round": [entry["time_s"] for entry in rounds[1:]],
                "bytes_up_per_client": rounds[-1]["clients"][0]["bytes_up"] if rounds[-1]["clients"] else None,
                "wall_s": wall,
            }
        )
    return results


def run(ctx: SuiteContext) -> SuiteResult:
    settings = SETTINGS[ctx.profile]
    with tempfile.TemporaryDirectory(prefix="bench-federated-") as scratch:
        work = Path(scratch)
        payload_rows = payloads(work, settings["layers"])
        accuracy = accuracy_runs(work, settings, ctx.log)
    clients = settings["clients"]
    payload_table = md_table(
        ["update", "tensors", "parameters", "bytes per client (up)", "per round, all clients, up + down", "vs full"],
        [
            [
                row["update"],
                row["tensors"],
                row["parameters"],
                row["bytes_per_client"],
                f"{2 * clients * row['bytes_per_client'] / 2**20:.2f} MiB",
                f"{row['vs_full']:.3f}x",
            ]
            for row in payload_rows
        ],
    )
    rounds = settings["rounds"]
    accuracy_table = md_table(
        ["variant", *[f"acc r{i}" for i in range(rounds + 1)], "median train s/round"],
        [
            [
                entry["variant"],
                *[fmt(value, 3) for value in entry["accuracy_per_round"]],
                fmt(sorted(entry["train_time_s_per_round"])[len(entry["train_time_s_per_round"]) // 2], 1),
            ]
            for entry in accuracy
        ],
    )
    markdown = (
        f"Payload per client and round (MobileNetV2 on 64x64 digits, {clients} clients):\n\n{payload_table}\n\n"
        f"Global accuracy on the held-out digits 5-9 after each round ({clients} clients, Dirichlet alpha "
        f"{settings['alpha']}, {settings['local_steps']} local steps of batch {BATCH}, AdamW lr {LR}, FedAvg):\n\n"
        f"{accuracy_table}\n"
    )

    def plot(path: Path) -> None:
        from matplotlib import pyplot as plt

        figure, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        names = [row["update"] for row in payload_rows]
        axes[0].barh(names, [row["bytes_per_client"] / 2**20 for row in payload_rows])
        axes[0].set(title="update size per client and round", xlabel="MiB")
        for entry in accuracy:
            axes[1].plot(range(rounds + 1), entry["accuracy_per_round"], marker="o", label=entry["variant"])
        axes[1].set(title="global accuracy", xlabel="round", ylabel="accuracy", ylim=(0, 1))
        axes[1].legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)

    data = {"settings": {**settings, "batch": BATCH, "lr": LR}, "payload": payload_rows, "accuracy": accuracy}
    return SuiteResult(data=data, markdown=markdown, plot=plot)


SUITE = Suite("federated", "Flower: last-N-layers vs full-model payload, exact BP vs gradient filtering accuracy", run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.federated", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=tuple(SETTINGS), default="quick")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench_results")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="recorded only (ORT's default)")
    args = parser.parse_args(argv)
    ctx = SuiteContext(profile=args.profile, out_dir=args.out, threads=args.threads)
    start = time.perf_counter()
    machine = machine_info(args.threads)
    result = run(ctx)
    paths = write_suite_outputs(ctx, SUITE, result, machine, time.perf_counter() - start)
    print(result.markdown)
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
