"""Plain-PyTorch versions of the StyleGAN2 primitives (no compiled extensions).

The numerics follow NVIDIA's reference implementations: FIR resampling by zero-insertion + padding +
depthwise convolution, modulated convolution with optional demodulation, bias + activation with
gain and clamp. Everything runs on any device PyTorch supports.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)


def make_fir_filter(taps=(1, 3, 3, 1)) -> torch.Tensor:
    """2-D separable FIR filter from 1-D taps, normalised to sum 1 (StyleGAN2's resample filter)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    if f.ndim == 1:
        f = torch.outer(f, f)
    return f / f.sum()


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, up: int = 1, pad=(0, 0, 0, 0), gain: float = 1.0) -> torch.Tensor:
    """Upsample by zero insertion, pad (x0, x1, y0, y1; negative crops), convolve with the 2-D FIR f.

    Down-sampling is not needed by the generator and is not implemented.
    """
    batch, channels, height, width = x.shape
    if up > 1:
        x = x.reshape(batch, channels, height, 1, width, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(batch, channels, height * up, width * up)
    px0, px1, py0, py1 = pad
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]
    # conv2d is a correlation: flip the filter to get a true convolution (a no-op for symmetric taps).
    weight = (f * gain ** (f.ndim / 2)).to(x.dtype).flip([0, 1])
    weight = weight[None, None].expand(channels, 1, *f.shape)
    return F.conv2d(x, weight, groups=channels)


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """FIR up-sampling by `up` keeping the signal centred (used on the RGB skip path)."""
    fw = f.shape[-1]
    p0, p1 = (fw + up - 1) // 2, (fw - up) // 2
    return upfirdn2d(x, f, up=up, pad=(p0, p1, p0, p1), gain=up * up)


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, activation: str = "linear", gain: float = 1.0,
             clamp: float | None = None) -> torch.Tensor:
    """Add a per-channel bias, apply the activation, scale by gain and clamp to [-clamp, clamp].

    Without autograd (renders) the same operations run in place on `x`, which the callers pass as a
    fresh convolution output: a 1024 px layer's map is 128 MB, and allocating it anew for every
    operation cost more than the arithmetic. The numbers are identical."""
    if activation not in ("lrelu", "linear"):
        raise ValueError(f"unknown activation {activation!r}")
    inplace = not torch.is_grad_enabled()
    if bias is not None:
        b = bias.reshape(1, -1, *([1] * (x.ndim - 2)))
        x = x.add_(b) if inplace else x + b
    if activation == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE, inplace=inplace)
    if gain != 1:
        x = x.mul_(gain) if inplace else x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp_(-clamp, clamp) if inplace else x.clamp(-clamp, clamp)
    return x


def conv_up2(x: torch.Tensor, weight: torch.Tensor, f: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """3x3 (or k x k) convolution that doubles the resolution: transposed stride-2 conv + FIR blur.

    Equivalent to zero-insertion, FIR low-pass and a padded convolution, as in StyleGAN2.
    weight: [out, in/groups, k, k].
    """
    out_channels, in_per_group, kh, kw = weight.shape
    if groups == 1:
        w = weight.transpose(0, 1)
    else:
        w = weight.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
        w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)
    x = F.conv_transpose2d(x, w, stride=2, groups=groups)
    fw = f.shape[-1]
    # Padding that makes the blurred output exactly 2x the input size (see StyleGAN2's conv2d_resample).
    p0 = kw // 2 + (fw + 1) // 2 - (kw - 1)
    p1 = kw // 2 + (fw - 2) // 2 - (kw - 2)
    return upfirdn2d(x, f, pad=(p0, p1, p0, p1), gain=4)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, up: int = 1,
                     demodulate: bool = True, resample_filter: torch.Tensor | None = None,
                     fused: bool | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """StyleGAN2 modulated convolution. x: [N, I, H, W], weight: [O, I, k, k], styles: [N, I].

    fused=True builds one kernel per sample and runs a grouped convolution (fastest at batch 1);
    fused=False scales activations instead (fastest for training batches). Both give the same result
    up to float rounding. `noise` is added before the caller's bias/activation, as in StyleGAN2.
    """
    batch = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    assert styles.shape == (batch, in_channels), (styles.shape, batch, in_channels)
    if fused is None:
        fused = batch == 1
    padding = kh // 2
    if not fused:
        # Scale activations instead of weights: the conv then uses the (frozen) weight as is, so
        # backward needs no weight gradient. sum_ik (W_oik s_i)^2 = sum_i s_i^2 sum_k W_oik^2.
        if demodulate:
            dcoefs = (styles.square() @ weight.square().sum(dim=[2, 3]).t() + 1e-8).rsqrt()  # [N, O]
        x = x * styles.reshape(batch, in_channels, 1, 1)
        x = conv_up2(x, weight, resample_filter) if up == 2 else F.conv2d(x, weight, padding=padding)
        inplace = not torch.is_grad_enabled()  # x is a fresh output: in place, as in `bias_act`
        if demodulate:
            d = dcoefs.reshape(batch, out_channels, 1, 1)
            x = x.mul_(d) if inplace else x * d
        if noise is not None:
            x = x.add_(noise) if inplace else x + noise
        return x
    w = weight[None] * styles.reshape(batch, 1, in_channels, 1, 1)
    if demodulate:
        w = w * (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt().reshape(batch, out_channels, 1, 1, 1)
    x = x.reshape(1, batch * in_channels, *x.shape[2:])
    w = w.reshape(batch * out_channels, in_channels, kh, kw)
    if up == 2:
        x = conv_up2(x, w, resample_filter, groups=batch)
    else:
        x = F.conv2d(x, w, padding=padding, groups=batch)
    x = x.reshape(batch, out_channels, *x.shape[2:])
    return x if noise is None else x + noise


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


# Windows (y0, y1, x0, x1): half-open pixel ranges of a layer's grid, used by cropped computation.

def clip_window(win, size: int):
    y0, y1, x0, x1 = win
    return max(y0, 0), min(y1, size), max(x0, 0), min(x1, size)


def extend(x: torch.Tensor, have, want, size: int) -> torch.Tensor:
    """x covers window `have` (inside a size x size grid); return window `want`, zero outside the grid."""
    hy0, hy1, hx0, hx1 = have
    cy0, cy1, cx0, cx1 = clip_window(want, size)
    assert hy0 <= cy0 and cy1 <= hy1 and hx0 <= cx0 and cx1 <= hx1, (have, want)
    x = x[..., cy0 - hy0: cy1 - hy0, cx0 - hx0: cx1 - hx0]
    wy0, wy1, wx0, wx1 = want
    return F.pad(x, [cx0 - wx0, wx1 - cx1, cy0 - wy0, wy1 - cy1])
