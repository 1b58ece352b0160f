"""What the web UI draws (no gradio, no session logic): the display image (smooth or pixel up-scale,
translucent mask, point markers), the mask canvas's layer, thumbnails and trajectory frames."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

DISPLAY_TARGET = 512          # the main image is upscaled by an integer factor to about this size
EDITOR_SIZE = 256             # mask canvas size (editor pixels)
GIF_SIZE = 256                # trajectory frames (and the GIF) are at most this size, at least upscaled to it
THUMB_SIZE = 96               # history strip
HANDLE_RGB = (230, 40, 40)
TARGET_RGB = (40, 90, 235)
# the mask as painted: green where the brush says "may change", red where it says "keep fixed"
PAINT_RGB = {False: (60, 220, 120), True: (235, 70, 60)}
PAINT_ALPHA = 128             # the brush and the shown layer are half transparent
OVERLAY_OPACITY = 0.45        # the painted region's tint on the display image


def paint_css(paint_fixed: bool) -> str:
    r, g, b = PAINT_RGB[bool(paint_fixed)]
    return f"rgba({r},{g},{b},{PAINT_ALPHA / 255:.2f})"


def upscale_factor(res: int) -> int:
    return max(1, DISPLAY_TARGET // res)


def resize_nearest(img: np.ndarray, factor: int) -> np.ndarray:
    return img if factor == 1 else np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def upscale(img: np.ndarray, factor: int, pixels: bool = False) -> np.ndarray:
    """Enlarge by an integer factor: Lanczos (smooth, for viewing) or nearest (every model pixel a
    square). Model pixel i covers display pixels [i*f, (i+1)*f) either way."""
    if factor == 1:
        return img
    if pixels:
        return resize_nearest(img, factor)
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((w * factor, h * factor), Image.LANCZOS))


def painted_region(mask: np.ndarray | None, paint_fixed: bool) -> np.ndarray | None:
    """What the brush painted: the flexible region, or (brush = fixed) the rest."""
    if mask is None:
        return None
    return ~mask if paint_fixed else mask


def compose(img: np.ndarray, factor: int, pairs, pending, painted: np.ndarray | None = None,
            paint_fixed: bool = False, pixels: bool = False) -> np.ndarray:
    """The display image: `img` upscaled, the painted mask region tinted in the brush's colour,
    then arrows and markers (pairs: objects with .origin/.handle/.target in model pixels)."""
    f = factor
    big = upscale(img, f, pixels)
    if painted is not None and painted.any():
        a = painted.astype(np.float32)
        if f > 1:  # soft edges on a smooth image, model-pixel squares on a pixel one
            a = (resize_nearest(a, f) if pixels else
                 np.asarray(Image.fromarray(a).resize((a.shape[1] * f, a.shape[0] * f), Image.BILINEAR)))
        a = np.clip(a, 0, 1)[..., None] * OVERLAY_OPACITY
        colour = np.array(PAINT_RGB[bool(paint_fixed)], np.float32)
        big = (big.astype(np.float32) * (1 - a) + colour * a).round().astype(np.uint8)
    canvas = Image.fromarray(np.ascontiguousarray(big))
    draw = ImageDraw.Draw(canvas)
    c = lambda p: (p[0] * f + f / 2, p[1] * f + f / 2)  # noqa: E731  pixel centre in display px
    r = max(3.0, min(f * 0.75, 8.0))
    width = max(2, round(min(f, 8) / 3))
    for pair in pairs:
        h, t = c(pair.handle), c(pair.target)
        if pair.origin != pair.handle:  # where the handle started, and the path it took
            o = c(pair.origin)
            draw.line([o, h], fill=HANDLE_RGB, width=max(1, width // 2))
            draw.ellipse([o[0] - r * 0.6, o[1] - r * 0.6, o[0] + r * 0.6, o[1] + r * 0.6],
                         outline=HANDLE_RGB, width=2)
        _arrow(draw, h, t, fill=(255, 255, 255), width=width, head=max(6.0, 2 * r))
        _dot(draw, t, r * 1.3, TARGET_RGB)
        _dot(draw, h, r, HANDLE_RGB)
    if pending is not None:
        _dot(draw, c(pending), r, HANDLE_RGB)
    return np.asarray(canvas)


def editor_layer(painted: np.ndarray, paint_fixed: bool) -> np.ndarray:
    """The mask canvas's paint layer (EDITOR_SIZE, RGBA): `painted` (any size, bool) in the brush colour."""
    alpha = Image.fromarray(painted.astype(np.uint8) * 255)
    if alpha.size != (EDITOR_SIZE, EDITOR_SIZE):
        alpha = alpha.resize((EDITOR_SIZE, EDITOR_SIZE), Image.NEAREST)
    layer = np.zeros((EDITOR_SIZE, EDITOR_SIZE, 4), dtype=np.uint8)
    on = np.asarray(alpha) > 0
    layer[on] = (*PAINT_RGB[bool(paint_fixed)], PAINT_ALPHA)
    return layer


def editor_background(display: np.ndarray) -> np.ndarray:
    """The display image (markers, no mask tint) at the mask canvas's size, RGBA."""
    img = Image.fromarray(display)
    if img.size != (EDITOR_SIZE, EDITOR_SIZE):
        big = img.size[0] > EDITOR_SIZE
        img = img.resize((EDITOR_SIZE, EDITOR_SIZE), Image.BOX if big else Image.LANCZOS)
    return np.asarray(img.convert("RGBA"))


def thumbnail(img: np.ndarray, size: int = THUMB_SIZE) -> np.ndarray:
    if img.shape[0] == size:
        return img
    resample = Image.BOX if img.shape[0] > size else Image.LANCZOS
    return np.asarray(Image.fromarray(img).resize((size, size), resample))


def trajectory_frame(img: np.ndarray) -> np.ndarray:
    """Trajectory frames are kept at most GIF_SIZE px: 300 full 1024 px frames would hold 900 MB."""
    if img.shape[0] <= GIF_SIZE:
        return img
    return np.asarray(Image.fromarray(img).resize((GIF_SIZE, GIF_SIZE), Image.BOX))


def enlarge(img: np.ndarray, scale: int, pixels: bool = False) -> np.ndarray:
    """An export at `scale` times the model's size (Lanczos, or nearest for pixels)."""
    return upscale(img, int(scale), pixels)


def bbox(m):
    if m is None or not m.any():
        return None
    ys, xs = np.nonzero(m)
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def fmt_point(p) -> str:
    """(12, 40) for pixel points, (12.4, 40.1) for sub-pixel ones."""
    return "(" + ", ".join(f"{round(v, 1):g}" for v in p) + ")"


def _dot(draw, c, r, fill):
    draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=fill, outline=(255, 255, 255), width=2)


def _arrow(draw, a, b, fill, width, head):
    dx, dy = b[0] - a[0], b[1] - a[1]
    length = math.hypot(dx, dy)
    if length < 1e-6:
        return
    ux, uy = dx / length, dy / length
    draw.line([a, b], fill=(0, 0, 0), width=width + 2)
    draw.line([a, b], fill=fill, width=width)
    if length > head:
        bx, by = b[0] - ux * head * 0.3, b[1] - uy * head * 0.3
        left = (bx - ux * head - uy * head * 0.5, by - uy * head + ux * head * 0.5)
        right = (bx - ux * head + uy * head * 0.5, by - uy * head - ux * head * 0.5)
        draw.polygon([(bx, by), left, right], fill=fill, outline=(0, 0, 0))
