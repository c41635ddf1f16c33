"""`gfcompile federate`: federated fine-tuning of compiled artifacts in Flower's simulation engine.

    gfcompile federate out/ --train-data models/data/digits_5to9_train.npz \
        --test-data models/data/digits_5to9_test.npz --clients 10 --rounds 3 -o fed/

A real deployment (a SuperLink and SuperNodes as separate processes) runs the same apps through
`scripts/federated_loopback.py` or Flower's own `flwr run scripts/federated_app`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import GfError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `federate` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "federate",
        help="federated fine-tuning with Flower (simulation)",
        description="Federated fine-tuning with Flower: FedAvg/FedProx over the trainable parameters only, "
        "simulated clients with Dirichlet non-IID partitions of the training set.",
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifacts", type=Path, help="folder written by gfcompile (or a device bundle)")
    parser.add_argument("--train-data", type=Path, required=True, help=".npz (x, y) split across the clients")
    parser.add_argument("--test-data", type=Path, required=True, help=".npz the server evaluates the global model on")
    parser.add_argument("-o", "--output", type=Path, default=Path("federated"), help="folder for log, plot, params")
    parser.add_argument("--clients", type=int, default=10, help="virtual clients (default 10)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=10, help="training steps per client and round")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the class split (small: non-IID)")
    parser.add_argument("--seed", type=int, default=0, help="partition and batch-order seed")
    parser.add_argument("--strategy", choices=("fedavg", "fedprox"), default="fedavg")
    parser.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx's mu")
    parser.add_argument("--fraction-train", type=float, default=1.0, help="share of clients sampled per round")
    parser.add_argument("--lr", type=float, default=None, help="override the compiled learning rate")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="clients cache their frozen-prefix features here and train the tail only (artifacts compiled "
        "with --feature-cache)",
    )
    parser.add_argument("--cpus", type=int, default=None, help="CPUs for the simulation (default: all)")
    parser.add_argument("--client-cpus", type=float, default=1.0, help="CPUs per virtual client")


def run(args: argparse.Namespace) -> int:
    """Run the simulation; GfError/RunError propagate to the caller's one-line error handler."""
    from .federate import LOG_NAME, PLOT_NAME, FederateConfig, simulate

    if not (args.artifacts / "manifest.json").is_file():
        raise GfError(f"{args.artifacts}: no manifest.json; compile the model first (gfcompile MODEL -o DIR)")
    config = FederateConfig(
        artifacts=args.artifacts,
        train_data=args.train_data,
        test_data=args.test_data,
        out=args.output,
        num_clients=args.clients,
        rounds=args.rounds,
        local_steps=args.local_steps,
        alpha=args.alpha,
        seed=args.seed,
        strategy=args.strategy,
        proximal_mu=args.proximal_mu,
        fraction_train=args.fraction_train,
        lr=args.lr,
        cache_dir=args.cache_dir,
    )
    log = simulate(config, cpus=args.cpus, client_cpus=args.client_cpus)
    for entry in log["rounds"]:
        accuracy = "n/a" if entry["accuracy"] is None else f"{entry['accuracy']:.3f}"
        sent = sum(client["bytes_up"] for client in entry["clients"])
        problems = len(entry["failures"]) + len(entry["rejected"])
        print(
            f"round {entry['round']:>3}: accuracy {accuracy}, {len(entry['clients'])} clients, "
            f"{sent / 1024:,.0f} KiB up, {entry['time_s']:.1f} s"
            + (f", {problems} failed/rejected" if problems else ""),
            file=sys.stderr,
        )
    print(f"wrote {args.output / LOG_NAME} and {args.output / PLOT_NAME}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m gfcompile.federate_cli`) until `gfcompile federate` is wired in."""
    from runtime.errors import RunError

    parser = argparse.ArgumentParser(prog="gfcompile federate")
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except (GfError, RunError) as exc:
        print(f"gfcompile: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
