"""One training run, shared by `gftrain` and `gfcompile train`.

Where a run starts (a fresh start, or resuming its own checkpoint), checks of everything it will
write before the first step (so a bad `--save` or `--export` never costs the trained work),
periodic checkpoints, and the inference export, written beside its target, checked against the
trained eval model and renamed into place.

A run records the step it started at in its checkpoints, so `--steps N` means "N steps from the
start of this run" also after a resume: rerunning the same command after a crash ends at the
same step, with the same weights, as a run that was never interrupted (the data order depends
only on (seed, step)).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from . import checkpoints
from .data import Dataset, eval_batches
from .errors import RunError
from .trainer import Trainer, check_writable_file


@dataclass(frozen=True)
class RunOptions:
    steps: int  # how many steps this run trains, counted from the step it started at
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # 0: save only at the end
    skip_nonfinite: bool = False


def start_checkpoint(save: Path, start: Path | None, resume: bool, restart: bool) -> Path | None:
    """Which checkpoint a run loads (None: the compiled initial one), given where it saves.

    An existing `save` checkpoint is never silently replaced by a run from other weights: it is
    resumed (`resume`), knowingly replaced (`restart`), or the run is refused.
    """
    if not save.exists():
        return start
    if save.is_dir():
        raise RunError(f"{save}: is a directory; give a file name for the checkpoint")
    if not save.is_file() or not checkpoints.record_path(save).is_file():
        raise RunError(
            f"{save}: already exists and is not a checkpoint the trainer wrote (no "
            f"{checkpoints.record_path(save).name} beside it); not overwriting it, choose another checkpoint path"
        )
    if resume:
        return save
    if start is not None and start.resolve() == save.resolve():
        return save
    if restart:
        return start
    origin = start if start is not None else "the compiled initial weights"
    raise RunError(
        f"{save}: a trained checkpoint is already there; --resume continues it, --restart trains again "
        f"from {origin} and replaces it"
    )


def check_outputs(trainer: Trainer, save: Path, export: Path | None) -> None:
    """Refuse, before the first step, a checkpoint or export path that the run could not write."""
    trainer.check_save_path(save)
    if export is None:
        return
    if export.resolve() == save.resolve():
        raise RunError(f"{export}: is also the checkpoint path; export the inference model to another file")
    if export.resolve() in trainer.protected_files():
        raise RunError(f"{export}: would overwrite {export.name} of the artifacts in {trainer.artifacts}")
    check_writable_file(export, "inference model")


def train(
    trainer: Trainer, data: Dataset, options: RunOptions, save: Path, resumed: bool, out: TextIO = sys.stderr
) -> list[float]:
    """Train until `options.steps` after the run's start, saving every `checkpoint_every` steps and at the end."""
    if not resumed or trainer.run_start is None:
        trainer.run_start = trainer.step
    target = trainer.run_start + options.steps
    if resumed and trainer.step:
        print(f"resuming from {save} at step {trainer.step} (this run trains to step {target})", file=out)
    losses = trainer.fit(
        data,
        max(0, target - trainer.step),
        seed=options.seed,
        log_every=options.log_every,
        checkpoint=save,
        checkpoint_every=options.checkpoint_every,
        out=out,
        skip_nonfinite=options.skip_nonfinite,
    )
    trainer.save(save)
    return losses


def export_checked(trainer: Trainer, path: Path, data: Dataset) -> float:
    """Write the inference model beside `path`, compare it with the eval model, rename it into place.

    Returns the largest output difference measured; a crash never leaves half a model under `path`.
    """
    from .bundle import check_inference_model

    temporary = path.with_name(path.name + ".tmp.onnx")
    try:
        trainer.export_inference(temporary)
        x, y, _ = next(eval_batches(data, trainer.batch_size))
        worst = check_inference_model(temporary, trainer, x, y)
        os.replace(temporary, path)
    except OSError as exc:
        raise RunError(f"{path}: cannot write the inference model ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(OSError):  # the folder itself may be what failed
            temporary.unlink(missing_ok=True)
    return worst
