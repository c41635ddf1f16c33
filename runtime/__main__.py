"""`python -m runtime` / `gftrain`: train compiled artifacts on a device (no torch needed)."""

from __future__ import annotations

import sys

from .errors import RunError


def main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    from .data import load_npz
    from .trainer import Trainer

    parser = argparse.ArgumentParser(prog="gftrain", description="Train gfcompile artifacts on this device.")
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--data", type=Path, required=True, help=".npz with arrays x and y")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--checkpoint", type=Path, default=None, help="resume from (and save to) this checkpoint")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        checkpoint = args.checkpoint or args.artifacts / "trained_checkpoint"
        trainer = Trainer(args.artifacts, checkpoint=checkpoint if checkpoint.exists() else None)
        data = load_npz(args.data, trainer.manifest)
        remaining = max(0, args.steps - trainer.step)
        trainer.fit(data, remaining, seed=args.seed, checkpoint=checkpoint, checkpoint_every=args.checkpoint_every)
        trainer.save(checkpoint)
        print(f"step {trainer.step}; checkpoint {checkpoint}")
        return 0
    except RunError as exc:
        print(f"gftrain: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
