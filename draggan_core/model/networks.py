"""StyleGAN2 generator in plain PyTorch, numerically matching NVIDIA's networks.

Parameter and buffer names equal those of NVIDIA's `G_ema.state_dict()` (stylegan2-ada-pytorch /
stylegan3 repo, StyleGAN2 family), so official checkpoints load by name. One class per layer kind.
All computation is fp32 (NVIDIA's fp16 blocks are a CUDA speed trick; this code runs them in fp32).

The synthesis network can stop after a chosen block and return that block's feature map, which is
what the drag loop needs (it never looks at later blocks while optimising). A skip-architecture
network can also stop after a chosen block and return the running RGB image at that block's
resolution (`image_res`): what cheap preview frames show (draggan_core/edit/frames.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .ops import (LRELU_GAIN, bias_act, extend, make_fir_filter, modulated_conv2d, normalize_2nd_moment,
                  upsample2d)

NOISE_MODES = ("const", "random", "none")


@dataclass
class GeneratorConfig:
    """Everything needed to build a generator; stored in our checkpoints' metadata."""
    z_dim: int = 512
    w_dim: int = 512
    c_dim: int = 0
    img_resolution: int = 512
    img_channels: int = 3
    mapping_layers: int = 8
    mapping_lr_multiplier: float = 0.01
    mapping_normalize_z: bool = True
    # also feed the mapping sin/cos(2 pi k Phi(z)), k = 1..K, of every z component (Phi: the normal CDF),
    # so functions that cycle over a component's range (a colour palette) are a linear read-out
    mapping_z_fourier: int = 0
    w_avg_beta: float = 0.995
    channel_base: int = 32768
    channel_max: int = 512
    channels: dict[int, int] | None = None  # explicit {resolution: channels}; overrides base/max
    architecture: str = "skip"  # "skip" or "resnet"
    conv_clamp: float | None = None
    use_noise: bool = True
    resample_filter: tuple[int, ...] = (1, 3, 3, 1)
    family: str = "stylegan2"

    def __post_init__(self):
        res_log2 = int(round(math.log2(self.img_resolution)))
        if self.img_resolution < 4 or 2 ** res_log2 != self.img_resolution:
            raise ValueError(f"img_resolution must be a power of two >= 4, got {self.img_resolution}")
        if self.architecture not in ("skip", "resnet"):
            raise ValueError(f"architecture must be 'skip' or 'resnet', got {self.architecture!r}")
        if self.channels is None:
            self.channels = {res: min(self.channel_base // res, self.channel_max) for res in self.block_resolutions}
        else:
            self.channels = {int(k): int(v) for k, v in self.channels.items()}
            missing = [r for r in self.block_resolutions if r not in self.channels]
            if missing:
                raise ValueError(f"channels missing for resolutions {missing}")
        self.resample_filter = tuple(self.resample_filter)

    @property
    def block_resolutions(self) -> list[int]:
        return [2 ** i for i in range(2, int(math.log2(self.img_resolution)) + 1)]

    @property
    def num_ws(self) -> int:
        return 2 * int(math.log2(self.img_resolution)) - 2

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["channels"] = {str(k): v for k, v in self.channels.items()}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GeneratorConfig":
        d = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown generator config fields: {sorted(unknown)}")
        return cls(**d)


class FullyConnectedLayer(nn.Module):
    """Linear layer with equalised learning rate (weights stored / lr_multiplier, scaled at run time)."""

    def __init__(self, in_features, out_features, bias=True, activation="linear", lr_multiplier=1.0, bias_init=0.0):
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x):
        w = self.weight * self.weight_gain
        b = self.bias * self.bias_gain if self.bias is not None else None
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, activation=self.activation, gain=LRELU_GAIN if self.activation == "lrelu" else 1)


def z_fourier_features(z: torch.Tensor, k_max: int) -> torch.Tensor:
    """[N, Z] -> [N, 2 * k_max * Z]: sin and cos of 2 pi k Phi(z) for k = 1..k_max (Phi: the normal CDF)."""
    u = 0.5 * (1 + torch.erf(z.to(torch.float32) / math.sqrt(2)))
    return torch.cat([f(2 * math.pi * k * u) for k in range(1, k_max + 1) for f in (torch.sin, torch.cos)], dim=1)


class MappingNetwork(nn.Module):
    """z (and optional class label c) -> w, broadcast to num_ws, with truncation towards w_avg."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        embed_features = cfg.w_dim if cfg.c_dim > 0 else 0
        if cfg.c_dim > 0:
            self.embed = FullyConnectedLayer(cfg.c_dim, embed_features)
        features = [cfg.z_dim * (1 + 2 * cfg.mapping_z_fourier) + embed_features] + [cfg.w_dim] * cfg.mapping_layers
        for i in range(cfg.mapping_layers):
            setattr(self, f"fc{i}", FullyConnectedLayer(features[i], features[i + 1], activation="lrelu",
                                                        lr_multiplier=cfg.mapping_lr_multiplier))
        self.register_buffer("w_avg", torch.zeros([cfg.w_dim]))

    def forward(self, z, c=None, truncation_psi=1.0, truncation_cutoff=None, update_w_avg=False):
        cfg = self.cfg
        x = None
        if cfg.z_dim > 0:
            assert z.ndim == 2 and z.shape[1] == cfg.z_dim, f"z must be [N, {cfg.z_dim}], got {tuple(z.shape)}"
            x = normalize_2nd_moment(z) if cfg.mapping_normalize_z else z
            if cfg.mapping_z_fourier:
                x = torch.cat([x, z_fourier_features(z, cfg.mapping_z_fourier).to(x.dtype)], dim=1)
        if cfg.c_dim > 0:
            if c is None or c.shape[-1] != cfg.c_dim:
                raise ValueError(f"this model is conditional: pass a class label vector c of size {cfg.c_dim}")
            y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y
        for i in range(cfg.mapping_layers):
            x = getattr(self, f"fc{i}")(x)
        if update_w_avg:
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, cfg.w_avg_beta))
        x = x.unsqueeze(1).repeat(1, cfg.num_ws, 1)
        if truncation_psi != 1:
            cutoff = cfg.num_ws if truncation_cutoff is None else truncation_cutoff
            x[:, :cutoff] = self.w_avg.lerp(x[:, :cutoff], truncation_psi)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (+ optional 2x up-sampling), noise, bias, leaky ReLU, clamp."""

    def __init__(self, in_channels, out_channels, w_dim, resolution, up=1, use_noise=True, conv_clamp=None,
                 resample_filter=(1, 3, 3, 1)):
        super().__init__()
        self.resolution, self.up, self.use_noise, self.conv_clamp = resolution, up, use_noise, conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        if use_noise:
            self.register_buffer("noise_const", torch.randn(resolution, resolution))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("resample_filter", make_fir_filter(resample_filter))

    def forward(self, x, w, noise_mode="const", fused=None, gain=1.0, noise_region=None):
        """noise_region: the output's (y0, y1, x0, x1) in this layer's pixel grid when x is a window
        (cropped computation); the const noise of that region is used, zero outside the image."""
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            out_shape = (x.shape[0], 1, x.shape[2] * self.up, x.shape[3] * self.up)
            noise = torch.randn(out_shape, device=x.device) * self.noise_strength
        elif self.use_noise and noise_mode == "const":
            const = self.noise_const
            if noise_region is not None:
                r = self.resolution
                const = extend(const[None, None], (0, r, 0, r), noise_region, r)
            noise = const * self.noise_strength
        x = modulated_conv2d(x, self.weight, styles, up=self.up, resample_filter=self.resample_filter,
                             fused=fused, noise=noise)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, activation="lrelu", gain=LRELU_GAIN * gain, clamp=clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv without demodulation, producing the image contribution of a block."""

    def __init__(self, in_channels, out_channels, w_dim, conv_clamp=None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x, w, fused=None):
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused=fused)
        return bias_act(x, self.bias, clamp=self.conv_clamp)


class SkipConvLayer(nn.Module):
    """Resnet-architecture shortcut: 1x1 conv (no bias) followed by FIR 2x up-sampling."""

    def __init__(self, in_channels, out_channels, resample_filter=(1, 3, 3, 1)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.register_buffer("resample_filter", make_fir_filter(resample_filter))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x, gain=1.0):
        x = torch.nn.functional.conv2d(x, self.weight * self.weight_gain)
        return upsample2d(x, self.resample_filter) * gain


class SynthesisBlock(nn.Module):
    """One resolution level: (const | 2x up-conv) + conv, plus the ToRGB skip contribution."""

    def __init__(self, in_channels, out_channels, w_dim, resolution, img_channels, is_last, cfg: GeneratorConfig):
        super().__init__()
        self.in_channels, self.out_channels, self.resolution = in_channels, out_channels, resolution
        self.is_last, self.architecture = is_last, cfg.architecture
        layer_kwargs = dict(use_noise=cfg.use_noise, conv_clamp=cfg.conv_clamp, resample_filter=cfg.resample_filter)
        self.num_conv = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, **layer_kwargs)
        self.num_conv += 1
        self.num_torgb = 0
        if is_last or cfg.architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=cfg.conv_clamp)
            self.num_torgb = 1
        if in_channels != 0 and cfg.architecture == "resnet":
            self.skip = SkipConvLayer(in_channels, out_channels, cfg.resample_filter)
        self.register_buffer("resample_filter", make_fir_filter(cfg.resample_filter))

    def forward_features(self, x, ws, noise_mode="const", fused=None):
        """Feature path only (no ToRGB). ws: [N, num_conv, w_dim]."""
        w_iter = iter(ws.unbind(dim=1))
        if self.in_channels == 0:
            x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
            return self.conv1(x, next(w_iter), noise_mode, fused)
        if self.architecture == "resnet":
            y = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv0(x, next(w_iter), noise_mode, fused)
            x = self.conv1(x, next(w_iter), noise_mode, fused, gain=math.sqrt(0.5))
            return y + x
        x = self.conv0(x, next(w_iter), noise_mode, fused)
        return self.conv1(x, next(w_iter), noise_mode, fused)

    def forward(self, x, img, ws, noise_mode="const", fused=None):
        """ws: [N, num_conv + num_torgb, w_dim] (the ToRGB style is shared with the next block's conv0)."""
        assert ws.ndim == 3 and ws.shape[1] == self.num_conv + self.num_torgb, tuple(ws.shape)
        x = self.forward_features(x, ws[:, :self.num_conv], noise_mode, fused)
        if img is not None:
            img = upsample2d(img, self.resample_filter)
        if self.num_torgb:
            y = self.torgb(x, ws[:, self.num_conv], fused=fused)
            img = y if img is None else img + y
        return x, img


class SynthesisNetwork(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        self.block_resolutions = cfg.block_resolutions
        for res in self.block_resolutions:
            in_channels = cfg.channels[res // 2] if res > 4 else 0
            block = SynthesisBlock(in_channels, cfg.channels[res], cfg.w_dim, res, cfg.img_channels,
                                   is_last=res == cfg.img_resolution, cfg=cfg)
            setattr(self, f"b{res}", block)
        self.num_ws = cfg.num_ws

    def block(self, res: int) -> SynthesisBlock:
        return getattr(self, f"b{res}")

    def ws_offset(self, res: int) -> int:
        """Index of the first style vector used by block `res`."""
        return 0 if res == 4 else 2 * int(math.log2(res)) - 5

    @property
    def has_skip_images(self) -> bool:
        """Whether every block adds to a running RGB image (skip architecture); resnet: only the last."""
        return self.cfg.architecture == "skip"

    def forward(self, ws, noise_mode="const", fused=None, feature_res=None, stop_at_feature=False, image_res=None):
        """ws: [N, num_ws, w_dim] -> image [N, C, H, W] (float32, unclamped, about [-1, 1]).

        feature_res: also return the feature map (block output before ToRGB) of that block.
        stop_at_feature: skip everything after that block (no image; returns (None, features)).
        image_res: stop after that block and return the running skip image [N, C, image_res, image_res]
            (the image the next block would up-sample and add its detail to). Without a skip image
            (resnet architecture) the full render [N, C, R, R] is returned: callers check the shape.
        """
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        assert ws.ndim == 3 and ws.shape[1:] == (self.num_ws, self.cfg.w_dim), \
            f"ws must be [N, {self.num_ws}, {self.cfg.w_dim}], got {tuple(ws.shape)}"
        if feature_res is not None and feature_res not in self.block_resolutions:
            raise ValueError(f"feature block {feature_res} not in {self.block_resolutions}")
        if image_res is not None and image_res not in self.block_resolutions:
            raise ValueError(f"image block {image_res} not in {self.block_resolutions}")
        if image_res is not None and feature_res is not None and feature_res > image_res:
            raise ValueError(f"feature block {feature_res} comes after the image block {image_res}")
        stop_res = image_res if image_res is not None and self.has_skip_images else self.cfg.img_resolution
        x = img = feature = None
        for res in self.block_resolutions:
            block = self.block(res)
            start = self.ws_offset(res)
            if stop_at_feature and res == feature_res:
                return None, block.forward_features(x, ws[:, start:start + block.num_conv], noise_mode, fused)
            x, img = block(x, img, ws[:, start:start + block.num_conv + block.num_torgb], noise_mode, fused)
            if res == feature_res:
                feature = x
            if res == stop_res:
                break
        assert img.shape[1:] == (self.cfg.img_channels, stop_res, stop_res), tuple(img.shape)
        return (img, feature) if feature_res is not None else img


class Generator(nn.Module):
    """mapping + synthesis. Frozen (requires_grad False) unless `trainable=True`."""

    def __init__(self, cfg: GeneratorConfig, trainable: bool = False):
        super().__init__()
        self.cfg = cfg
        self.mapping = MappingNetwork(cfg)
        self.synthesis = SynthesisNetwork(cfg)
        self.num_ws = cfg.num_ws
        self.requires_grad_(trainable)
        if not trainable:
            self.eval()

    @property
    def z_dim(self):
        return self.cfg.z_dim

    @property
    def w_dim(self):
        return self.cfg.w_dim

    @property
    def img_resolution(self):
        return self.cfg.img_resolution

    def forward(self, z, c=None, truncation_psi=1.0, truncation_cutoff=None, noise_mode="const", **synthesis_kwargs):
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, **synthesis_kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def to_uint8_image(img: torch.Tensor) -> np.ndarray:
    """[1, C, H, W] or [C, H, W] generator output in [-1, 1] -> HxWxC uint8, as the official code does."""
    if img.ndim == 4:
        img = img[0]
    return (img.detach() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
