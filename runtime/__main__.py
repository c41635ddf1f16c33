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
from .signals import exit_code, signal_name, stop_on_termination


def main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="gftrain", description="Train gfcompile artifacts on this device.")
    parser.add_argument("artifacts", type=Path, help="artifacts folder or bundle written by gfcompile")
    parser.add_argument(
        "--data", type=Path, required=True, help=".npz with arrays x and y, or a folder with one subfolder per class"
    )
    parser.add_argument("--steps", type=int, default=50, help="train until this many steps in total (resumes)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="resume from (and save to) this checkpoint")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="save every N steps (0: only at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--export", type=Path, default=None, help="write an inference .onnx model after training")
    parser.add_argument(
        "--trusted-key",
        type=Path,
        default=None,
        help="Ed25519 public key (PEM): refuse a bundle whose SHA256SUMS.sig it did not sign",
    )
    parser.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="accept samples with NaN/Inf inputs (refused by default) and skip any batch whose loss or gradient "
        "is not finite instead of stopping; the weights and checkpoints never take NaN values either way",
    )
    args = parser.parse_args(argv)
    stop_on_termination()
    try:
        return _train(args)
    except RunError as exc:
        print(f"gfcompile: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        print(
            f"gfcompile: interrupted ({signal_name(stop)}); the last saved checkpoint is kept "
            "(run the same command to resume)",
            file=sys.stderr,
        )
        return exit_code(stop)


def _train(args) -> int:
    import os

    from .bundle import check_inference_model, open_trainer
    from .data import eval_batches, load_data

    if args.steps < 0 or args.checkpoint_every < 0:
        raise RunError("--steps and --checkpoint-every must be >= 0")
    checkpoint = args.checkpoint or args.artifacts / "trained_checkpoint"
    trainer = open_trainer(
        args.artifacts, checkpoint=checkpoint if checkpoint.exists() else None, trusted_key=args.trusted_key
    )
    data = load_data(args.data, trainer.manifest, allow_nonfinite=args.skip_nonfinite)
    if trainer.step:
        print(f"resuming from {checkpoint} at step {trainer.step}", file=sys.stderr)
    remaining = max(0, args.steps - trainer.step)
    trainer.fit(
        data,
        remaining,
        seed=args.seed,
        log_every=args.log_every,
        checkpoint=checkpoint,
        checkpoint_every=args.checkpoint_every,
        skip_nonfinite=args.skip_nonfinite,
    )
    trainer.save(checkpoint)
    skipped = f"; skipped {len(trainer.skipped_steps)} non-finite batches" if trainer.skipped_steps else ""
    print(f"step {trainer.step}; checkpoint {checkpoint}{skipped}")
    if args.export is not None:
        # Written beside the target and renamed, so a crash never leaves half a model under that name.
        args.export.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.export.with_name(args.export.name + ".tmp.onnx")
        try:
            trainer.export_inference(temporary)
            x, y, _ = next(eval_batches(data, trainer.batch_size))
            worst = check_inference_model(temporary, trainer, x, y)
            os.replace(temporary, args.export)
        finally:
            temporary.unlink(missing_ok=True)
        print(f"inference model {args.export} (matches the trained eval model, max |diff| {worst:.2g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
