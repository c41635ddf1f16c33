"""`gftrain` / `python -I -m runtime`: train compiled artifacts or a device bundle (no torch needed).

    gftrain BUNDLE --data images/ --steps 500 --export model.onnx [--trusted-key KEY.pub]

This is the installed runtime (`pip install gfcompile-runtime`); the bundle holds data only.
Every file is checked against the bundle's SHA256SUMS (and its signature against --trusted-key)
before anything loads. Errors are one line, `gfcompile: error: ...`, exit code 2, like every other
gfcompile entry point; SIGTERM and SIGHUP stop it like Ctrl-C, keeping the last checkpoint. Training resumes from the
checkpoint (default BUNDLE/trained_checkpoint) and stops at step `--steps` in total, so running
the same command again after a crash or power loss continues where the last checkpoint left off:
the data order depends only on (seed, step), and checkpoints are replaced atomically.
"""

from __future__ import annotations

import sys

from .errors import RunError
from .options import add_run_arguments
from .signals import exit_code, quiet_teardown, signal_name, stop_on_termination


def main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):  # usage errors in the same `gfcompile: error:` form as every other error
            self.print_usage(sys.stderr)
            self.exit(2, f"gfcompile: error: {message}\n")

    parser = Parser(prog="gftrain", description="Train gfcompile artifacts on this device.")
    parser.add_argument("artifacts", type=Path, help="artifacts folder or bundle written by gfcompile")
    parser.add_argument(
        "--data", type=Path, required=True, help=".npz with arrays x and y, or a folder with one subfolder per class"
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help="resume from (and save to) this checkpoint")
    add_run_arguments(parser)
    parser.add_argument(
        "--trusted-key",
        type=Path,
        default=None,
        help="Ed25519 public key (PEM): refuse a bundle whose SHA256SUMS.sig it did not sign",
    )
    stop_on_termination()
    try:
        return _train(parser.parse_args(argv))
    except RunError as exc:
        print(f"gfcompile: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        quiet_teardown()
        print(
            f"gfcompile: interrupted ({signal_name(stop)}); the last saved checkpoint is kept "
            "(run the same command to resume)",
            file=sys.stderr,
        )
        return exit_code(stop)


def _train(args) -> int:
    from . import training_run
    from .bundle import open_trainer
    from .data import load_data
    from .feature_cache import cache_settings

    checkpoint = args.checkpoint or args.artifacts / "trained_checkpoint"
    # gftrain always continues its checkpoint: the same command after a crash resumes the run.
    start = training_run.start_checkpoint(checkpoint, None, resume=True, restart=False)
    cache = cache_settings(args, checkpoint)
    trainer = open_trainer(args.artifacts, checkpoint=start, trusted_key=args.trusted_key, cache=cache)
    training_run.check_outputs(trainer, checkpoint, args.export)
    data = load_data(args.data, trainer.manifest, allow_nonfinite=args.skip_nonfinite)
    options = training_run.RunOptions(
        steps=args.steps,
        seed=args.seed,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        skip_nonfinite=args.skip_nonfinite,
    )
    training_run.train(trainer, data, options, checkpoint, resumed=start is not None)
    skipped = f"; skipped {len(trainer.skipped_steps)} non-finite batches" if trainer.skipped_steps else ""
    print(f"step {trainer.step}; checkpoint {checkpoint}{skipped}")
    if args.export is not None:
        worst = training_run.export_checked(trainer, args.export, data)
        print(f"inference model {args.export} (matches the trained eval model, max |diff| {worst:.2g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
