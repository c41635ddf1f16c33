"""Screen fine-tuning settings for gradient filtering with its PyTorch reference, in minutes.

The compiled convergence suite (`python -m benchmarks.convergence`) is the measurement of time to
accuracy, but one setting costs it tens of minutes of machine time. This screen answers the cheaper
question first: in which settings does a filtered run's accuracy even come near exact
backprop's? It trains what a compile with `--train-layers N` trains (the last N convs, the BN
affine after each, the classifier; BN in eval mode) in PyTorch on features that the frozen prefix
computed once, either exactly or with the last N convs replaced by the reference filtered conv
(`tests/reference/gradient_filter_torch.py`, which the compiled graph equals within 1e-4 per
step, tests/test_filter_e2e.py). Batches come from `runtime.data.batches`, so a seed sees the
compiled suite's batch order. It reports the suite's statistics (target = exact's mean plateau
minus 1 point, steps to reach and hold it, plateau gaps with paired 95% intervals), in steps only:
wall-clock time is the compiled suite's job.

    python scripts/filter_screen.py --size 224 --layers 4 --patch-size 2 --seeds 10 --steps 500

Settings beyond the suite's: `--optimizer sgd --momentum 0 --lr 0.05 --cosine --clip 2` is the
paper's released recipe; `--size S` other than 64 and 224 runs the 224² model at S² (the digits
rendered at S²); `--task shifted` fine-tunes on the pretraining classes 0-4 seen through a
blurred, low-contrast, noisy sensor (the paper's scenario: same classes, another device's data).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.convergence import TARGET_MARGIN, paired_interval, plateau, reach_and_hold  # noqa: E402
from models.digits import preprocess  # noqa: E402
from models.pretrain_digits_224 import digits_224_task, load_digits_model  # noqa: E402
from runtime.data import Dataset, batches  # noqa: E402
from tests.reference.gradient_filter_torch import replace_convs  # noqa: E402

MODELS = {
    64: ROOT / "models" / "zoo" / "mobilenetv2_digits.onnx",
    224: ROOT / "models" / "zoo" / "mobilenetv2_digits_224.onnx",
}


@dataclass(frozen=True)
class ScreenSettings:
    size: int = 224
    task: str = "finetune"  # finetune: digits 5-9 (new classes); shifted: digits 0-4 through another sensor
    layers: int = 4
    patch_size: int = 2
    optimizer: str = "adamw"
    lr: float = 0.003
    momentum: float = 0.0
    cosine: bool = False  # lr follows a half cosine from lr to 0 over the run
    clip: float = 0.0  # global gradient-norm clipping (0: none)
    batch: int = 32
    seeds: int = 10
    steps: int = 500
    eval_every: int = 10


def load_model(size: int) -> nn.Module:
    """The digits MobileNetV2 with the zoo model's weights; sizes other than 64 use the 224² weights."""
    return load_digits_model(MODELS.get(size, MODELS[224])).eval()


def sensor_shift(x: np.ndarray, seed: int) -> np.ndarray:
    """Blur, lower contrast and add noise: the same digits as another camera would deliver them."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    size = x.shape[-1]
    out = np.empty_like(x)
    for index, image in enumerate(x[:, 0].astype(np.float32)):
        image = 0.75 * gaussian_filter(image, size / 56) + 40 + rng.normal(0, 15, image.shape)
        out[index, 0] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return out


def task_data(size: int, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """uint8 train images, labels, test images, labels."""
    if size == 64 and task == "finetune":
        train, test = (np.load(ROOT / "models" / "data" / f"digits_5to9_{part}.npz") for part in ("train", "test"))
        return train["x"], train["y"], test["x"], test["y"]
    split = digits_224_task(size)
    if task == "finetune":
        return (*split["finetune_train"], *split["finetune_test"])
    (x_train, y_train), (x_test, y_test) = split["pretrain_train"], split["pretrain_test"]
    return sensor_shift(x_train, 1), y_train, sensor_shift(x_test, 2), y_test


def trained_convs(model: nn.Module, n: int) -> list[str]:
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    return convs[len(convs) - n :]


def trainable_names(model: nn.Module, convs: list[str]) -> list[str]:
    """Parameters a compile with --train-layers len(convs) trains: each conv, the BN right after it, the head."""
    modules = dict(model.named_modules())
    owners = list(convs)
    for conv in convs:
        parent, _, index = conv.rpartition(".")
        follower = f"{parent}.{int(index) + 1}"
        if isinstance(modules.get(follower), nn.BatchNorm2d):
            owners.append(follower)
    owners.append("classifier")
    return [
        name
        for name, _ in model.named_parameters()
        if name.rpartition(".")[0] in owners or name.startswith("classifier.")
    ]


class Screen:
    """One fine-tuning run: the frozen prefix's features in, the trainable tail trained in PyTorch."""

    def __init__(self, settings: ScreenSettings, filtered: bool):
        self.settings = settings
        self.model = load_model(settings.size)
        convs = trained_convs(self.model, settings.layers)
        self.trainable = trainable_names(self.model, convs)
        # The prefix ends before the block that holds the first trained conv (features.K...).
        self.split = int(convs[0].split(".")[1])
        if filtered:
            replace_convs(self.model, dict.fromkeys(convs, settings.patch_size))
        parameters = dict(self.model.named_parameters())
        for name, parameter in parameters.items():
            parameter.requires_grad_(name in self.trainable)
        self.parameters = [parameters[name] for name in self.trainable]
        if settings.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(self.parameters, lr=settings.lr, weight_decay=0.0)
        else:
            self.optimizer = torch.optim.SGD(self.parameters, lr=settings.lr, momentum=settings.momentum)
        self.step = 0

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        chunks = []
        for start in range(0, len(images), 64):
            h = torch.from_numpy(preprocess(images[start : start + 64]))
            chunks.append(self.model.features[: self.split](h).numpy())
        return np.concatenate(chunks)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        h = self.model.features[self.split :](features)
        return self.model.classifier(h.mean(dim=(2, 3)))

    def train_step(self, features: np.ndarray, labels: np.ndarray) -> float:
        s = self.settings
        if s.cosine:
            for group in self.optimizer.param_groups:
                group["lr"] = s.lr * 0.5 * (1 + math.cos(math.pi * self.step / s.steps))
        loss = nn.functional.cross_entropy(self.logits(torch.from_numpy(features)), torch.from_numpy(labels))
        self.optimizer.zero_grad()
        loss.backward()
        if s.clip:
            nn.utils.clip_grad_norm_(self.parameters, s.clip)
        self.optimizer.step()
        self.step += 1
        return loss.item()

    @torch.no_grad()
    def accuracy(self, features: np.ndarray, labels: np.ndarray) -> float:
        return float((self.logits(torch.from_numpy(features)).argmax(1).numpy() == labels).mean())


def run(settings: ScreenSettings, report=print) -> dict:
    x_train, y_train, x_test, y_test = task_data(settings.size, settings.task)
    probe = Screen(settings, filtered=False)
    train = Dataset(probe.features(x_train), y_train.astype(np.int64))
    test = (probe.features(x_test), y_test.astype(np.int64))
    curves: dict[str, list[list[dict]]] = {"exact": [], f"r{settings.patch_size}": []}
    for seed in range(settings.seeds):
        for key in curves:
            started = time.perf_counter()
            screen = Screen(settings, filtered=key != "exact")
            curve = [{"step": 0, "accuracy": screen.accuracy(*test)}]
            stream = batches(train, settings.batch, seed)
            while screen.step < settings.steps:
                screen.train_step(*next(stream))
                if screen.step % settings.eval_every == 0 or screen.step == settings.steps:
                    curve.append({"step": screen.step, "accuracy": screen.accuracy(*test)})
            curves[key].append(curve)
            report(
                f"seed {seed} {key}: {curve[-1]['accuracy']:.4f} after {settings.steps} steps ({time.perf_counter() - started:.0f} s)"
            )
    return {"settings": asdict(settings), **analyse(curves)}


def analyse(curves: dict[str, list[list[dict]]]) -> dict:
    """The convergence suite's statistics, in steps."""
    exact = curves["exact"]
    target = float(np.mean([plateau(curve) for curve in exact])) - TARGET_MARGIN
    variants = {}
    for key, runs in curves.items():
        reached = [reach_and_hold(curve, target) for curve in runs]
        steps = [point["step"] for point in reached if point is not None]
        gaps = [plateau(mine) - plateau(base) for mine, base in zip(runs, exact, strict=True)]
        variants[key] = {
            "plateau": float(np.mean([plateau(curve) for curve in runs])),
            "reached": len(steps),
            "runs": len(runs),
            "median_steps": float(np.median(steps)) if steps else None,
            "gap": paired_interval(gaps) if key != "exact" else None,
        }
    return {"target": target, "variants": variants, "curves": curves}


def main(argv: list[str] | None = None) -> int:
    defaults = ScreenSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=defaults.size)
    parser.add_argument("--task", choices=("finetune", "shifted"), default=defaults.task)
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--patch-size", type=int, default=defaults.patch_size)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default=defaults.optimizer)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--momentum", type=float, default=defaults.momentum)
    parser.add_argument("--cosine", action="store_true")
    parser.add_argument("--clip", type=float, default=defaults.clip)
    parser.add_argument("--seeds", type=int, default=defaults.seeds)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--json", type=Path, default=None, help="also write the curves and statistics here")
    args = parser.parse_args(argv)
    settings = ScreenSettings(**{k: v for k, v in vars(args).items() if k != "json"})
    torch.set_num_threads(1)
    result = run(settings, report=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"target (exact's plateau - 1 point): {result['target']:.4f}")
    for key, v in result["variants"].items():
        gap = v["gap"]
        gap_text = (
            ""
            if gap is None
            else f", gap {gap['mean'] * 100:+.1f} pts ({(gap['low'] or 0) * 100:+.1f} to {(gap['high'] or 0) * 100:+.1f})"
        )
        print(
            f"{key}: plateau {v['plateau']:.4f}{gap_text}, reached and held in {v['reached']}/{v['runs']} seeds, median step {v['median_steps']}"
        )
    if args.json:
        args.json.write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
