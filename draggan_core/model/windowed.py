"""Exact cropped computation of a synthesis block's feature map.

Convolutions, FIR up-sampling, bias/activation and const noise are all local, and demodulation
depends only on weights and styles, so the features inside a window follow from a slightly larger
window of each earlier block. Outside the image every layer's input is zero (that is what the full
computation's padding sees), so windows that cross the border are zero-extended.

Windows are (y0, y1, x0, x1) half-open ranges in the pixel grid of the block they belong to.
"""
from __future__ import annotations

import torch

from .networks import SynthesisNetwork
from .ops import clip_window, extend

Window = tuple[int, int, int, int]


def grow(win: Window, margin: int) -> Window:
    y0, y1, x0, x1 = win
    return y0 - margin, y1 + margin, x0 - margin, x1 + margin


def up_input_window(out: Window) -> Window:
    """Half-resolution input window whose 2x up-conv covers `out` exactly.

    An up-conv (3x3 transposed stride 2 + 4-tap FIR) over input rows [s, e) yields rows [2s, 2e),
    exact on [2s + 2, 2e - 2).
    """
    y0, y1, x0, x1 = out
    return y0 // 2 - 1, (y1 + 1) // 2 + 1, x0 // 2 - 1, (x1 + 1) // 2 + 1


def zero_outside(x: torch.Tensor, win: Window, size: int) -> torch.Tensor:
    """x covers `win` (possibly crossing the border): zero the part outside the size x size grid."""
    inner = clip_window(win, size)
    y0, _, x0, _ = win
    x = x[..., inner[0] - y0: inner[1] - y0, inner[2] - x0: inner[3] - x0]
    return extend(x, inner, win, size)


def block_windows(feature_res: int, window: Window) -> dict[int, Window]:
    """Output window of every block up to `feature_res` needed for `window` of the feature block."""
    windows = {feature_res: clip_window(window, feature_res)}
    res = feature_res
    while res > 4:
        conv0_out = grow(windows[res], 1)  # conv1 is a 3x3 'same' conv
        windows[res // 2] = clip_window(up_input_window(conv0_out), res // 2)
        res //= 2
    return windows


def features_in_window(synthesis: SynthesisNetwork, ws: torch.Tensor, feature_res: int, window: Window,
                       noise_mode: str = "const", fused: bool | None = None) -> torch.Tensor:
    """Feature map of block `feature_res` restricted to `window` (clipped to the map), exactly.

    Returns [N, C, y1 - y0, x1 - x0] for the clipped window. Needs the 'skip' architecture and
    deterministic noise.
    """
    if synthesis.cfg.architecture != "skip":
        raise NotImplementedError("windowed features need the skip architecture")
    if noise_mode == "random":
        raise ValueError("windowed features need deterministic noise ('const' or 'none')")
    windows = block_windows(feature_res, window)
    x = have = None
    for res in sorted(windows):
        block = synthesis.block(res)
        start = synthesis.ws_offset(res)
        target = windows[res]
        conv1_in = grow(target, 1)
        if res == 4:
            const = block.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
            x = extend(const, (0, 4, 0, 4), conv1_in, 4)
            x = block.conv1(x, ws[:, start], noise_mode, fused, noise_region=conv1_in)
        else:
            s = up_input_window(conv1_in)
            x = extend(x, have, s, res // 2)
            up_region = (2 * s[0], 2 * s[1], 2 * s[2], 2 * s[3])
            x = block.conv0(x, ws[:, start], noise_mode, fused, noise_region=up_region)
            oy, ox = conv1_in[0] - up_region[0], conv1_in[2] - up_region[2]
            x = x[..., oy: oy + conv1_in[1] - conv1_in[0], ox: ox + conv1_in[3] - conv1_in[2]]
            x = zero_outside(x, conv1_in, res)  # conv1's input must read as zero padding off-image
            x = block.conv1(x, ws[:, start + 1], noise_mode, fused, noise_region=conv1_in)
        x = x[..., 1:-1, 1:-1]  # the exact interior, which is `target`
        have = target
    return x
