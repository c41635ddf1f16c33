"""The zoo models and compile settings that have golden snapshots, and how a snapshot is made.

Each golden file is the canonical form (`gfcompile.diff`) of one compiled artifacts folder: the
training, eval and optimizer graphs node by node, the manifest, and every tensor as dtype, shape,
hash and statistics only. Refresh them on purpose with

    .venv/bin/python scripts/update_golden.py

and review the git diff: a pass change that alters a compiled graph shows up there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from gfcompile.config import CompileConfig
from gfcompile.diff import Snapshot, snapshot
from gfcompile.pipeline import compile_model
from tests.zoo_helpers import ZOO_CASES, export_case

GOLDEN_DIR = Path(__file__).resolve().parent
# What a snapshot must not pin: the exported file's exact bytes (the weights are compared by their
# statistics instead) and the package version.
GOLDEN_IGNORE = ("source.sha256", "gfcompile_version")
# Statistics and small values are kept to 7 significant digits; this absorbs last-bit differences of
# the exported weights between machines while any real change (a shape, an r, a layer) still shows.
GOLDEN_ATOL = 1e-5
BATCH = 2
# DeepLab's ASPP image-pooling conv sees a 1x1 map, so it keeps r = 1 when 4 layers are filtered.
ASPP_POOL_CONV = "classifier.0.convs.4.1.weight"
# The smallest inputs at which 4 filtered layers with r = 2 fit (the last maps are 2x2).
INPUT_SIZE = {"mobilenet_v2": 48, "resnet18": 48, "resnet34": 48, "mcunet": 48, "deeplabv3_resnet18": 33}


@dataclass(frozen=True)
class GoldenCase:
    model: str
    # The README's compile commands: "filter4" (--filter-layers 4), "train4" (--filter-layers 0
    # --train-layers 4), "rowtiles4" (--row-tiles 4 with --filter-layers 2).
    setting: str
    config: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.model}__{self.setting}"

    @property
    def path(self) -> Path:
        return GOLDEN_DIR / f"{self.name}.json"


def _cases() -> list[GoldenCase]:
    cases = []
    for model in INPUT_SIZE:
        patch_map = {ASPP_POOL_CONV: 1} if ZOO_CASES[model].segmentation else {}
        cases.append(GoldenCase(model, "filter4", {"filter_layers": 4, "patch_size_map": patch_map}))
        cases.append(GoldenCase(model, "train4", {"filter_layers": 0, "train_layers": 4}))
    # --row-tiles (README): the frozen prefix of a residual net in 4 bands, with filtering on top.
    cases.append(GoldenCase("resnet18", "rowtiles4", {"filter_layers": 2, "row_tiles": 4}))
    return cases


GOLDEN_CASES = _cases()


def compile_snapshot(case: GoldenCase, workdir: Path) -> Snapshot:
    """Export the zoo model (fixed seed), compile it with the case's settings, and snapshot the artifacts."""
    zoo = dataclasses.replace(ZOO_CASES[case.model], input_shape=(3, INPUT_SIZE[case.model], INPUT_SIZE[case.model]))
    workdir.mkdir(parents=True, exist_ok=True)
    _, onnx_path = export_case(zoo, workdir)
    config = CompileConfig(batch_size=BATCH, output_dir=workdir / case.name, **case.config)
    artifacts = compile_model(onnx_path, config, report=lambda message: None)
    snap = snapshot(artifacts)
    for key in GOLDEN_IGNORE:
        snap.data["manifest"].pop(key, None)
    return snap
