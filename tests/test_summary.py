"""The per-layer cost table uses the paper's definitions, pinned per layer kind by hand arithmetic.

Definitions (batch 1, fp32): memory is the trained conv's saved input, C_in*H_x*W_x*4 bytes vanilla
and C_in*p_h*p_w*4 filtered (p = ceil(H_y/r)); vanilla backward FLOPs are 2 per MAC for grad_W and
again for grad_x (not for the first trainable conv, where backprop stops); filtered FLOPs are the
r x r mean pool of g_y (C_out*H_y*W_y adds), grad_W (2*C_out*C_in/g*p_h*p_w) and grad_x (the same
again, times the taps a dilated conv keeps at patch resolution). Every expected number below is
worked out by hand from the layer's shapes, not by calling the code under test.
"""

from __future__ import annotations

from gfcompile.config import CompileConfig
from gfcompile.loading import pin_shapes
from gfcompile.planning import select_layers
from gfcompile.summary import format_table, layer_costs, totals
from tests.tiny_models import ConvSpec, tiny_cnn

# Input 4 x 16 x 16. Shapes per conv (C x H x W):
KINDS = [
    ConvSpec(8, kernel=3, pad=1),  # regular: 4x16x16 -> 8x16x16
    ConvSpec(8, kernel=3, pad=1, group=8),  # depthwise: 8x16x16 -> 8x16x16
    ConvSpec(16, kernel=1, pad=0),  # pointwise: 8x16x16 -> 16x16x16
    ConvSpec(16, kernel=3, stride=2, pad=1),  # strided: 16x16x16 -> 16x8x8
    ConvSpec(16, kernel=3, pad=4, dilation=4),  # dilated: 16x8x8 -> 16x8x8
]

# r = 2, every conv filtered. Patch grids: 8x8 for the 16x16 outputs, 4x4 for the 8x8 ones.
FILTERED_R2 = {
    # regular, first trainable (no grad_x): act 4*16*16*4; MACs 8*16*16*4*9 = 73728, x2 (grad_W only);
    # filtered act 4*8*8*4; pool 8*16*16 = 2048 + grad_W 2*8*4*64 = 4096.
    "regular": (4096, 147456, 1024, 6144),
    # depthwise (C_in/g = 1): act 8*256*4; MACs 8*256*1*9 = 18432, x2 x2; filtered act 8*64*4;
    # pool 8*256 = 2048 + grad_W 2*8*1*64 = 1024 + grad_x 1024 (one tap group: W~ mix).
    "depthwise": (8192, 73728, 2048, 4096),
    # pointwise: act 8*256*4; MACs 16*256*8 = 32768, x2 x2; filtered act 8*64*4;
    # pool 16*256 = 4096 + grad_W 2*16*8*64 = 16384 + grad_x 16384.
    "pointwise": (8192, 131072, 2048, 36864),
    # strided (s=2, so x~ pools 4x4 input windows): act 16*256*4; MACs 16*64*16*9 = 147456, x2 x2;
    # filtered act 16*(4*4)*4; pool 16*64 = 1024 + grad_W 2*16*16*16 = 8192 + grad_x 8192.
    "strided": (16384, 589824, 1024, 17408),
    # dilated d=4: act 16*64*4; MACs 16*64*16*9 = 147456, x2 x2; filtered act 16*16*4;
    # d/r = 2 at patch resolution, 'same' pad 2 on a 4-patch grid: all 3 taps per axis reach the grid,
    # so grad_x is 9 x 8192; pool 1024 + grad_W 8192 + grad_x 73728.
    "dilated": (4096, 589824, 1024, 82944),
}


def _rows(filter_layers: int, r: int = 2) -> list[dict]:
    config = CompileConfig(filter_layers=filter_layers, train_layers=len(KINDS), patch_size=r, batch_size=8)
    model = tiny_cnn(KINDS, input_shape=(4, 16, 16))
    plan = select_layers(pin_shapes(model, config), config)
    rows = layer_costs(plan)
    assert [row["layer"] for row in rows] == [f"conv{i + 1}" for i in range(len(KINDS))]
    return rows


def test_costs_follow_the_paper_definitions() -> None:
    rows = _rows(filter_layers=len(KINDS))  # batch 8 is pinned; the table must stay per sample
    for (kind, expected), row in zip(FILTERED_R2.items(), rows, strict=True):
        actual = (
            row["vanilla_activation_bytes"],
            row["vanilla_backward_flops"],
            row["compiled_activation_bytes"],
            row["compiled_backward_flops"],
        )
        assert actual == expected, kind
        assert row["r"] == 2, kind
    total = totals(rows)
    assert total["vanilla_activation_bytes"] == 4096 + 8192 + 8192 + 16384 + 4096
    assert total["compiled_activation_bytes"] == 1024 + 2048 + 2048 + 1024 + 1024
    last = format_table(rows).splitlines()[-1]
    # 40960 / 7168 = 5.7; (147456 + 73728 + 131072 + 589824 + 589824) / (6144 + 4096 + 36864 + 17408 + 82944) = 10.4
    assert last == "activation memory 5.7x smaller, backward FLOPs 10.4x fewer"


def test_unfiltered_trainable_layers_cost_vanilla_and_large_r_shrinks_the_grid() -> None:
    rows = _rows(filter_layers=2, r=4)  # the strided and the dilated conv, r = 4: 2x2 patch grids
    vanilla = [(row["vanilla_activation_bytes"], row["vanilla_backward_flops"]) for row in rows]
    assert vanilla == [(expected[0], expected[1]) for expected in FILTERED_R2.values()]
    for row in rows[:3]:
        assert row["r"] is None
        assert row["compiled_activation_bytes"] == row["vanilla_activation_bytes"]
        assert row["compiled_backward_flops"] == row["vanilla_backward_flops"]
    strided, dilated = rows[3:]
    # strided r=4: act 16*(2*2)*4 = 256; pool 16*64 = 1024 + grad_W 2*16*16*4 = 2048 + grad_x 2048.
    assert (strided["compiled_activation_bytes"], strided["compiled_backward_flops"]) == (256, 5120)
    # dilated d=4, r=4: d/r = 1, 'same' pad 1 on a 2-patch grid: taps at offsets 1, 0, -1 all reach it
    # (|offset| <= 1), so grad_x is 9 x 2048; pool 1024 + grad_W 2048 + grad_x 18432.
    assert (dilated["compiled_activation_bytes"], dilated["compiled_backward_flops"]) == (256, 21504)
