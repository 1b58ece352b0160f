"""GAN inversion: find the W+ latent whose image best matches a user's picture, so it can be dragged.

    from draggan_core.edit.inversion import invert, invert_iter, load_image

    result = invert(G, "photo.png")                  # blocking; InversionResult
    result.w_plus                                    # [1, num_ws, w_dim] float32 -> DragSession(G, result.w_plus)
    result.image, result.psnr                        # HxWx3 uint8 reconstruction, dB against the prepared target

    for ev in invert_iter(G, pil_image, should_stop=cancel_flag.is_set):   # streaming (web UI)
        ev.step, ev.total, ev.loss, ev.psnr, ev.image   # ev.image: uint8 preview every `preview_every` steps
        if ev.done: result = ev.result                  # last event; result.cancelled tells a stop request

Breaking out of the `invert_iter` loop is also a valid way to cancel (nothing is left behind). The shared
generator is only read: gradients are taken with `torch.autograd.grad` w.r.t. the latent alone, and the
optional pivotal tuning (PTI) works on a deep copy that is returned as `result.generator` for that
session only (use `DragSession(result.generator, result.w_plus)`); `G.state_dict()` stays bit-identical.

Input (`load_image`): a path, bytes, PIL image or uint8 array (HxW, HxWx1/3/4) of any size and mode.
Refused with InversionError (a ValueError, one-line message): empty or non-image data, files over
MAX_FILE_BYTES, images with a zero side, a side over MAX_SIDE or more than MAX_PIXELS pixels (checked
from the header before decoding; PIL's decompression-bomb check is turned into an error too).
EXIF rotation is applied, the first frame of animations is used, transparency is composited on white,
16-bit / float / grayscale / palette / CMYK images are converted to 8-bit RGB. `prepare_target` then
centre-crops to a square and resizes with LANCZOS (antialiased) to the generator's resolution.

Method (our own implementation; the recipe follows the published StyleGAN2 projector / PTI ideas):
  * parameterisation w = w_avg + w_std * u with w_std the RMS distance of mapped samples from w_avg,
    so one learning rate suits every model;
  * start: the best (lowest loss) of `init_samples` mapped random z (psi 1), or w_avg (`init="avg"`);
  * phase 1, `w_steps` steps: one W vector shared by all layers (stays on the generator's manifold);
  * phase 2, the remaining steps: W+ (one vector per layer) started from the W solution, with
    `w_plus_reg` * mean((u_layer - u_W)^2) pulling towards it;
  * Adam (betas 0.9, 0.999), per phase a learning-rate ramp: linear warm-up over the first 5 %, cosine
    ramp-down over the last 50 %;
  * loss: L1 + `l2_weight` * MSE on [-1, 1] pixels, plus `multiscale_weight` * L1 of 2x/4x/8x average-
    pooled images (colour and layout first), optionally `landmark_weight` * MSE of our landmark net's
    16x16 trunk features (only when checkpoints/landmarks64.safetensors exists; off by default);
  * the latent with the best PSNR seen is returned (not merely the last one);
  * noise inputs (NVIDIA models): kept at the model's constant noise, not optimised, so that the W+
    we return reproduces the image with the shared generator exactly as DragSession renders it
    (optimised noise maps would have to travel with the latent; PTI covers the remaining detail);
  * optional PTI (`pti_steps` > 0): fine-tune a copy of the synthesis weights on the target with the
    W+ fixed (Adam lr `pti_lr`, same loss).

Measurements (embedded faces model, a PRELIMINARY checkpoint that was still training; 1 torch thread
on a 2-core machine shared with the training run, load average ~7, so wall times are 2-4x the CPU
time). PSNR in dB for 2 generated images (seeds 10**6.., psi 0.7) and 3 held-out renderer images
(render(sample_z(3, 10**6 + 7))); each line compares variants on one and the same checkpoint:
    run A (150 steps, w_steps 75):  default 50.4 48.0 | 22.8 26.2 26.3;  init w_avg 49.6 49.8 | 22.5 25.4
        26.3;  no multi-scale L1 51.4 48.8 | 23.2 26.2 26.5;  lr 0.05: 50.6 48.5 | 22.6 26.4 26.2;
        lr 0.2: 48.2 47.1 | 22.9 26.4 26.7   -> init / lr / multi-scale hardly matter (< 0.5 dB)
    run B: 100 steps (w 50) 45.2 43.3 | 23.4 27.8 27.8;  150 steps, w_steps 40: 48.0 47.5 | 24.1 28.8 28.6;
        150 steps, W+ reg 0: 47.3 46.5 | 23.8 28.2 28.2;  100 steps + 50 PTI: 47.8 47.0 | 24.0 28.8 28.5;
        150 steps + landmark features (weight 1): 47.8 42.7 | 24.0 28.4 27.8
    run C: 150 steps, w_steps 75: 47.1 44.6 | 24.2 29.0 28.5;  w_steps 40: 47.7 45.7 | 24.5 29.5 28.8
  -> defaults: 150 steps, a short W phase (a quarter), W+ reg 0.01, best-of-16 start, lr 0.1 / 0.05,
     multi-scale on (harmless, helps colour on harder images), landmark features off (costs ~15 %
     time, no gain), PTI off (no gain over the same time spent on W+ steps on this model; kept as an
     option for real photos with NVIDIA models). Generated images are reconstructed far above the
     30 dB target; renderer images are limited by what the (still blurry) model can draw, not by the
     optimiser: at that checkpoint G(z_true) itself scored 24.1 dB against held-out renderer images
     (training log, step 8000), and inversion finds latents that match them better than z_true does.
  Cost: one step = one synthesis forward + backward w.r.t. the latent: ~0.09 s CPU for the 64 px
  embedded model (fused=False, 1 thread), so 150 steps ~ 14 s CPU (measured 15-60 s wall under load).
  Noise: not measured on a trained NVIDIA model (none available offline); see the choice above.
  `python -m training.inversion_metrics` measures PSNR/SSIM/time/drag success on the current model.
"""
from __future__ import annotations

import copy
import io
import math
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..model.networks import to_uint8_image

MAX_FILE_BYTES = 50 * 1024 ** 2     # compressed input
MAX_PIXELS = 40_000_000             # decoded input (about 160 MB as RGBA)
MAX_SIDE = 16_384
MIN_SIDE = 1


class InversionError(ValueError):
    """The image could not be inverted (bad input or settings); the message is meant for users."""


# --------------------------------------------------------------------------------------------------
# input images
# --------------------------------------------------------------------------------------------------

def _check_size(width: int, height: int, name: str) -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        raise InversionError(f"{name}: image is {width}x{height}, it has no pixels")
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise InversionError(f"{name}: image is {width}x{height}, too large (limit {MAX_SIDE} px a side, "
                             f"{MAX_PIXELS / 1e6:.0f} megapixels)")


def _pil_to_rgb(im, name: str) -> np.ndarray:
    from PIL import Image, ImageOps
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # broken EXIF: keep the pixels as stored
        pass
    mode = im.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode == "F":
            lo, hi = 0.0, 1.0 if (np.nanmax(arr) if arr.size else 0) <= 1.0 else 255.0
        else:
            lo, hi = 0.0, 65535.0 if (arr.max() if arr.size else 0) > 255 else 255.0
        arr = np.nan_to_num((arr - lo) / (hi - lo), nan=0.0).clip(0, 1)
        gray = (arr * 255 + 0.5).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("1", "L", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        im = im.convert("RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im).convert("RGB")
    elif im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy()


def _array_to_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        if arr.dtype.kind == "f" and arr.size and np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1:
            arr = (arr * 255 + 0.5).astype(np.uint8)
        else:
            raise InversionError(f"{name}: image array has dtype {arr.dtype}; give uint8 (0..255) or "
                                 "float in [0, 1]")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        _check_size(arr.shape[1], arr.shape[0], name)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InversionError(f"{name}: image array has shape {arr.shape}; expected HxW, HxWx3 or HxWx4")
    _check_size(arr.shape[1], arr.shape[0], name)
    if arr.shape[2] == 4:  # composite on white
        alpha = arr[:, :, 3:4].astype(np.float32) / 255
        rgb = arr[:, :, :3].astype(np.float32) * alpha + 255 * (1 - alpha)
        return (rgb + 0.5).astype(np.uint8)
    return np.ascontiguousarray(arr)


def load_image(source, name: str | None = None) -> np.ndarray:
    """Path / bytes / file object / PIL image / array -> HxWx3 uint8 RGB (validated, see module doc)."""
    from PIL import Image
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, name or "image")
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, name or "image")
        return _pil_to_rgb(source, name or "image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), name or "image data"
        if len(data) > MAX_FILE_BYTES:
            raise InversionError(f"{name}: {len(data) / 1024 ** 2:.1f} MB, larger than the "
                                 f"{MAX_FILE_BYTES // 1024 ** 2} MB limit")
        f = io.BytesIO(data)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = name or str(path)
        if not path.is_file():
            raise InversionError(f"{name}: no such image file")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise InversionError(f"{name}: {path.stat().st_size / 1024 ** 2:.1f} MB, larger than the "
                                 f"{MAX_FILE_BYTES // 1024 ** 2} MB limit")
        f = open(path, "rb")
    elif hasattr(source, "read"):
        name = name or "image"
        data = source.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise InversionError(f"{name}: larger than the {MAX_FILE_BYTES // 1024 ** 2} MB limit")
        f = io.BytesIO(data)
    else:
        raise InversionError(f"cannot read an image from a {type(source).__name__}")
    with f:
        if f.read(1) == b"":
            raise InversionError(f"{name}: empty file")
        f.seek(0)
        # (no warnings.catch_warnings here: it is not thread-safe. PIL warns above MAX_IMAGE_PIXELS and
        # raises above twice that; our own MAX_PIXELS limit is lower and is checked from the header.)
        try:
            with Image.open(f) as im:
                _check_size(im.width, im.height, name)  # header only: nothing decoded yet
                im.load()
                return _pil_to_rgb(im, name)
        except InversionError:
            raise
        except Image.DecompressionBombError:
            raise InversionError(f"{name}: image is too large (decompression bomb?)") from None
        except Image.UnidentifiedImageError:
            raise InversionError(f"{name}: not an image (unknown or unsupported format)") from None
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InversionError(f"{name}: unreadable image ({reason})") from None


def prepare_target(image, resolution: int, channels: int = 3) -> np.ndarray:
    """Any accepted image -> centre-cropped square, LANCZOS-resized to resolution: HxWxC uint8."""
    from PIL import Image
    rgb = load_image(image) if not (isinstance(image, np.ndarray) and image.dtype == np.uint8
                                    and image.ndim == 3 and image.shape[2] == 3) else image
    _check_size(rgb.shape[1], rgb.shape[0], "image")
    h, w = rgb.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    im = Image.fromarray(np.ascontiguousarray(rgb[top:top + s, left:left + s]))
    if s != resolution:
        im = im.resize((resolution, resolution), Image.LANCZOS, reducing_gap=3.0 if s > 4 * resolution else None)
    if channels == 1:
        return np.asarray(im.convert("L"), dtype=np.uint8)[:, :, None].copy()
    return np.asarray(im, dtype=np.uint8).copy()


# --------------------------------------------------------------------------------------------------
# settings, events, result
# --------------------------------------------------------------------------------------------------

@dataclass
class InversionConfig:
    steps: int = 150              # total latent-optimisation steps (W phase + W+ phase)
    w_steps: int | None = None    # steps of the W phase (default: a quarter of `steps`)
    lr: float = 0.1               # Adam peak learning rate in w_std units (W phase)
    w_plus_lr: float | None = None  # W+ phase peak learning rate (default: lr / 2)
    w_plus_reg: float = 0.01      # pull of each W+ row towards the W solution
    init: str = "best_of"         # "best_of" mapped random z, or "avg" (w_avg)
    init_samples: int = 16
    l2_weight: float = 1.0
    multiscale_weight: float = 1.0
    landmark_weight: float = 0.0  # needs checkpoints/landmarks64.safetensors; ignored when missing
    pti_steps: int = 0            # > 0: pivotal tuning of a copy of the synthesis weights
    pti_lr: float = 3e-4
    preview_every: int = 10       # a uint8 preview image in every k-th event (0: only the last)
    seed: int = 0

    def check(self) -> "InversionConfig":
        c = replace(self)
        if c.steps < 0 or c.pti_steps < 0 or c.init_samples < 0 or c.preview_every < 0:
            raise InversionError("steps, pti_steps, init_samples and preview_every must be >= 0")
        if c.steps > 100_000 or c.pti_steps > 100_000:
            raise InversionError("at most 100000 steps")
        c.w_steps = c.steps // 4 if c.w_steps is None else c.w_steps
        if not 0 <= c.w_steps <= c.steps:
            raise InversionError(f"w_steps must be in 0..steps ({c.steps}), got {c.w_steps}")
        c.w_plus_lr = c.lr / 2 if c.w_plus_lr is None else c.w_plus_lr
        for name in ("lr", "w_plus_lr", "pti_lr"):
            v = getattr(c, name)
            if not (math.isfinite(v) and 0 < v < 10):
                raise InversionError(f"{name} must be in (0, 10), got {v}")
        for name in ("w_plus_reg", "l2_weight", "multiscale_weight", "landmark_weight"):
            v = getattr(c, name)
            if not (math.isfinite(v) and v >= 0):
                raise InversionError(f"{name} must be a finite number >= 0, got {v}")
        if c.init not in ("best_of", "avg"):
            raise InversionError(f"init must be 'best_of' or 'avg', got {c.init!r}")
        return c


@dataclass
class InversionResult:
    w_plus: torch.Tensor                 # [1, num_ws, w_dim] float32, CPU
    image: np.ndarray                    # HxWx3 uint8 reconstruction (by `generator` when PTI ran)
    psnr: float                          # dB, uint8 reconstruction vs uint8 target
    history: list[dict] = field(default_factory=list)  # per step: step, phase, loss, psnr
    target: np.ndarray | None = None     # the prepared HxWx3 uint8 target
    seconds: float = 0.0
    cancelled: bool = False
    generator: object | None = None      # the session's PTI-tuned copy of G (None without PTI)


@dataclass
class InversionEvent:
    step: int                            # 1-based steps done so far (all phases)
    total: int                           # steps planned (latent steps + PTI steps)
    phase: str                           # "init" | "w" | "w+" | "pti" | "done"
    loss: float
    psnr: float                          # dB of the current image (float, clamped), vs target
    image: np.ndarray | None = None      # HxWx3 uint8 preview (every preview_every steps and at the end)
    done: bool = False
    result: InversionResult | None = None  # set on the final event


# --------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------

class _Loss:
    def __init__(self, target: torch.Tensor, cfg: InversionConfig):
        self.cfg = cfg
        self.target = target
        res = target.shape[-1]
        self.scales = [s for s in (2, 4, 8) if res // s >= 4]
        self.target_pools = [F.avg_pool2d(target, s) for s in self.scales]
        self.landmark = None
        if cfg.landmark_weight > 0:
            self.landmark = _landmark_trunk(target.device)
            if self.landmark is not None:
                with torch.no_grad():
                    self.target_feat = self.landmark(self._to64(target))

    @staticmethod
    def _to64(x):
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != 64:
            x = F.interpolate(x, size=(64, 64), mode="area" if x.shape[-1] > 64 else "bilinear",
                              align_corners=None if x.shape[-1] > 64 else False)
        return x

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """img: [N, C, H, W]; returns per-image loss [N]."""
        diff = img - self.target
        loss = diff.abs().mean(dim=(1, 2, 3)) + self.cfg.l2_weight * diff.square().mean(dim=(1, 2, 3))
        if self.cfg.multiscale_weight:
            ms = sum((F.avg_pool2d(img, s) - t).abs().mean(dim=(1, 2, 3)) for s, t in zip(self.scales, self.target_pools))
            loss = loss + self.cfg.multiscale_weight * ms / max(len(self.scales), 1)
        if self.landmark is not None:
            feat = self.landmark(self._to64(img.clamp(-1, 1)))
            loss = loss + self.cfg.landmark_weight * (feat - self.target_feat).square().mean(dim=(1, 2, 3))
        return loss


_LANDMARK_CACHE: dict = {}


def _landmark_trunk(device):
    """The landmark net's 16x16 trunk (stem + block4) as a frozen feature extractor, or None."""
    key = str(device)
    if key not in _LANDMARK_CACHE:
        try:
            from ..model.landmark_net import LandmarkDetector
            det = LandmarkDetector.load(device=device)
            trunk = torch.nn.Sequential(det.net.stem, det.net.block4).eval().requires_grad_(False)
        except Exception:
            trunk = None
        _LANDMARK_CACHE[key] = trunk
    return _LANDMARK_CACHE[key]


def _psnr_float(img: torch.Tensor, target: torch.Tensor) -> float:
    mse = ((img.detach().clamp(-1, 1) - target) / 2).square().mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * math.log10(255.0 ** 2 / max(mse, 1e-12)))


def _lr_at(t: float, base: float, rampup: float = 0.05, rampdown: float = 0.5) -> float:
    """t in [0, 1): linear warm-up, then flat, then cosine ramp-down to 0."""
    up = min(1.0, (t + 1e-9) / rampup) if rampup > 0 else 1.0
    down = 0.5 - 0.5 * math.cos(math.pi * min(1.0, (1.0 - t) / rampdown)) if rampdown > 0 else 1.0
    return base * up * max(down, 0.02)


# --------------------------------------------------------------------------------------------------
# the optimisation
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def w_statistics(G, samples: int = 512, seed: int = 0) -> tuple[torch.Tensor, float]:
    """(w_avg [w_dim], w_std scalar): w_std = RMS distance of mapped random z from w_avg."""
    device = _device_of(G)
    w_avg = G.mapping.w_avg.detach().to(device, torch.float32).clone()
    if G.cfg.c_dim > 0 or G.cfg.z_dim == 0:
        return w_avg, 1.0
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, G.cfg.z_dim, generator=gen).to(device)
    w = G.mapping(z)[:, 0]
    std = float((w - w_avg).square().sum(dim=1).mean().sqrt().item()) / math.sqrt(G.w_dim)
    return w_avg, std if math.isfinite(std) and std > 0 else 1.0


def _device_of(G) -> torch.device:
    p = next(G.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _target_tensor(target_u8: np.ndarray, device) -> torch.Tensor:
    t = torch.from_numpy(target_u8).to(device, torch.float32).permute(2, 0, 1)[None]
    return t / 127.5 - 1.0


def invert_iter(G, image, config: InversionConfig | None = None,
                should_stop: Callable[[], bool] | None = None, **settings) -> Iterator[InversionEvent]:
    """Invert `image` into G's W+ space, yielding an InversionEvent per optimisation step.

    Settings are InversionConfig fields, given as a config or as keyword arguments (which override it).
    Cancel by returning True from `should_stop` (checked between steps: the last event then carries
    the best result so far with `cancelled=True`) or simply by leaving the loop.
    Raises InversionError for unusable images or settings (before any work).
    """
    unknown = set(settings) - {f.name for f in fields(InversionConfig)}
    if unknown:
        raise InversionError(f"unknown inversion settings: {sorted(unknown)}")
    cfg = replace(config or InversionConfig(), **settings) if settings else (config or InversionConfig())
    cfg = cfg.check()
    channels = int(G.cfg.img_channels)
    target_u8 = prepare_target(image, int(G.img_resolution), channels)
    return _run(G, cfg, target_u8, should_stop)


def _run(G, cfg: InversionConfig, target_u8: np.ndarray, should_stop) -> Iterator[InversionEvent]:
    t_start = time.perf_counter()
    device = _device_of(G)
    target = _target_tensor(target_u8, device)
    loss_fn = _Loss(target, cfg)
    num_ws, w_dim = G.num_ws, G.w_dim
    w_avg, w_std = w_statistics(G, seed=cfg.seed)
    total = cfg.steps + cfg.pti_steps
    history: list[dict] = []
    stop = should_stop or (lambda: False)
    synth = G.synthesis

    def render(ws, net=synth, fused=False):
        return net(ws, noise_mode="const", fused=fused)

    # ---- start point
    u0 = torch.zeros(1, 1, w_dim, device=device)
    if cfg.init == "best_of" and cfg.init_samples > 0 and G.cfg.c_dim == 0 and G.cfg.z_dim > 0:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(cfg.seed + 1)
            z = torch.randn(cfg.init_samples, G.cfg.z_dim, generator=gen).to(device)
            cand = torch.cat([w_avg[None], G.mapping(z)[:, 0]])  # w_avg competes too
            losses = torch.cat([loss_fn(render(c[:, None, :].expand(-1, num_ws, -1)))
                                for c in cand.split(8)])
            best = int(torch.argmin(losses))
            u0 = ((cand[best] - w_avg) / w_std).view(1, 1, w_dim)

    def to_ws(u):
        return w_avg + w_std * u.expand(1, num_ws, w_dim)

    best = {"psnr": -math.inf, "u": u0.expand(1, num_ws, w_dim).clone()}
    step = 0

    def make_event(phase, loss, img, psnr, force_preview=False):
        preview = None
        if force_preview or (cfg.preview_every and step % cfg.preview_every == 0):
            preview = to_uint8_image(img)
        history.append({"step": step, "phase": phase, "loss": loss, "psnr": psnr})
        return InversionEvent(step=step, total=total, phase=phase, loss=loss, psnr=psnr, image=preview)

    cancelled = False
    # ---- phases 1 (W) and 2 (W+)
    u_w = u0.clone()
    phases = [("w", cfg.w_steps, cfg.lr), ("w+", cfg.steps - cfg.w_steps, cfg.w_plus_lr)]
    for phase, n, base_lr in phases:
        if n <= 0 or cancelled:
            continue
        if phase == "w":
            param = u_w.clone().requires_grad_(True)
        else:
            anchor = u_w.detach().expand(1, num_ws, w_dim).clone()
            param = anchor.clone().requires_grad_(True)
        opt = torch.optim.Adam([param], lr=base_lr, betas=(0.9, 0.999))
        for i in range(n):
            if stop():
                cancelled = True
                break
            for g in opt.param_groups:
                g["lr"] = _lr_at(i / n, base_lr)
            img = render(to_ws(param))
            loss = loss_fn(img).sum()
            if phase == "w+" and cfg.w_plus_reg > 0:
                loss = loss + cfg.w_plus_reg * (param - anchor).square().mean()
            psnr = _psnr_float(img, target)
            if psnr > best["psnr"]:
                best = {"psnr": psnr, "u": param.detach().expand(1, num_ws, w_dim).clone()}
            (grad,) = torch.autograd.grad(loss, [param])
            param.grad = grad
            opt.step()
            step += 1
            yield make_event(phase, float(loss.item()), img, psnr)
        if phase == "w":
            u_w = param.detach().clone()
    w_plus = to_ws(best["u"]).detach()
    if not cancelled and (cfg.steps > 0):  # the last step's update has not been looked at yet
        with torch.no_grad():
            img = render(to_ws(param.detach()))
            psnr = _psnr_float(img, target)
            if psnr > best["psnr"]:
                w_plus = to_ws(param.detach().expand(1, num_ws, w_dim)).detach()

    # ---- optional pivotal tuning on a private copy
    tuned = None
    if cfg.pti_steps > 0 and not cancelled:
        tuned = copy.deepcopy(G)
        tuned.requires_grad_(False)
        params = [p for p in tuned.synthesis.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=cfg.pti_lr)
        for i in range(cfg.pti_steps):
            if stop():
                cancelled = True
                break
            for g in opt.param_groups:
                g["lr"] = _lr_at(i / cfg.pti_steps, cfg.pti_lr, rampup=0.0, rampdown=0.3)
            img = render(w_plus, net=tuned.synthesis, fused=None)
            loss = loss_fn(img).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            yield make_event("pti", float(loss.item()), img, _psnr_float(img, target))
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        tuned.eval()

    with torch.no_grad():
        net = tuned.synthesis if tuned is not None else synth
        img = render(w_plus, net=net)
        final_loss = float(loss_fn(img).sum().item())
    image = to_uint8_image(img)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    target_rgb = target_u8 if target_u8.shape[2] == 3 else np.repeat(target_u8, 3, axis=2)
    result = InversionResult(w_plus=w_plus.to("cpu", torch.float32).contiguous(), image=image,
                             psnr=psnr_uint8(image, target_rgb), history=history, target=target_rgb,
                             seconds=time.perf_counter() - t_start, cancelled=cancelled, generator=tuned)
    ev = InversionEvent(step=step, total=total, phase="done", loss=final_loss, psnr=result.psnr,
                        image=image, done=True, result=result)
    yield ev


def invert(G, image, config: InversionConfig | None = None,
           progress: Callable[[InversionEvent], None] | None = None,
           should_stop: Callable[[], bool] | None = None, **settings) -> InversionResult:
    """Blocking inversion: runs `invert_iter` to the end and returns its InversionResult.

    progress(event) is called for every event; should_stop() is polled between steps (a stop returns
    the best latent so far with result.cancelled = True).
    """
    result = None
    for ev in invert_iter(G, image, config, should_stop=should_stop, **settings):
        if progress is not None:
            progress(ev)
        if ev.done:
            result = ev.result
    assert result is not None
    return result


__all__ = ["InversionConfig", "InversionError", "InversionEvent", "InversionResult", "invert", "invert_iter",
           "load_image", "prepare_target", "psnr_uint8", "w_statistics", "MAX_FILE_BYTES", "MAX_PIXELS", "MAX_SIDE"]
