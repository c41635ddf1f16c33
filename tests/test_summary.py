"""The per-layer cost table uses the paper's definitions; checked against hand-derived counts."""

from __future__ import annotations

import math
from pathlib import Path

from gfcompile.config import CompileConfig
from gfcompile.loading import load_and_validate, pin_shapes
from gfcompile.planning import select_layers
from gfcompile.summary import format_table, layer_costs, totals

MODEL = Path(__file__).resolve().parents[1] / "models" / "zoo" / "mobilenetv2_digits.onnx"


def test_costs_follow_the_paper_definitions() -> None:
    config = CompileConfig(filter_layers=2, train_layers=3, patch_size=2, batch_size=8)
    plan = select_layers(pin_shapes(load_and_validate(MODEL), config), config)
    rows = layer_costs(plan)
    assert [row["layer"] for row in rows] == plan.trainable_convs
    for position, row in enumerate(rows):
        layer = plan.conv(row["layer"])
        _, c_in, h_x, w_x = layer.x_shape
        _, c_out, h_y, w_y = layer.y_shape
        # Memory: fp32 input activation at batch 1 (the batch of 8 must not leak in).
        assert row["vanilla_activation_bytes"] == 4 * c_in * h_x * w_x
        macs = c_out * h_y * w_y * (c_in // layer.group) * layer.kernel[0] * layer.kernel[1]
        # FLOPs: grad_W and (except for the first trainable conv) grad_x, 2 FLOPs per MAC each.
        assert row["vanilla_backward_flops"] == 2 * macs * (1 if position == 0 else 2)
        if layer.node in plan.filtered:
            r = plan.filtered[layer.node]
            assert row["compiled_activation_bytes"] == 4 * c_in * math.ceil(h_y / r) * math.ceil(w_y / r)
            assert row["compiled_backward_flops"] < row["vanilla_backward_flops"]
        else:
            assert row["compiled_activation_bytes"] == row["vanilla_activation_bytes"]
    total = totals(rows)
    assert total["vanilla_activation_bytes"] == sum(row["vanilla_activation_bytes"] for row in rows)
    assert "smaller" in format_table(rows).splitlines()[-1]
