"""Preview frames of running edits, rendered in the background so the optimisation never waits.

At 512 px a full render costs about ten drag steps on the CPU. Rendering inline (as the official
code does) caps the editor at the render rate; here one worker thread per process renders while the
steps go on. Each running edit owns a `FrameStream` holding at most one pending latent: a newer
submission replaces an older one, so a slow render never builds a queue of stale frames, and the
frame a stream publishes only ever moves forward in steps. Pending latents of the same generator are
rendered as one batch (several users at once cost one forward on a GPU).

Cheaper previews of large models: from `HALF_PREVIEW_FROM` px up, an intermediate frame is the skip
generator's running RGB image after block R/2 (the last, most expensive block is not run), up-sampled
to R (bicubic) plus the last ToRGB layer's bias (`preview_image`). Smaller models and resnet
generators (no such image) render in full. `DRAGGAN_PREVIEW=full|half|auto` (default auto) overrides
the rule. Only previews change: `render_batch` without `image_res` stays the exact render.
Measured quality and the choice of the threshold: docs/benchmarks.md, "Preview frames".

The first frame of a run is "urgent": the run waits for it (`FrameStream.wait`) and the renderer
draws it with every thread the run would have used (`urgent_threads`), so the first new image after
Start comes one fast render after the first step instead of one half-width render.

The frame shown when a run ends is not a preview: it is the exact render of the final latent, drawn
by the renderer as an urgent "exact" job once the steps are over (all threads; a preview still being
drawn comes out first, so the wait for the final image is one render, not two).
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..model.networks import to_uint8_image

PREVIEW_ENV = "DRAGGAN_PREVIEW"
PREVIEW_MODES = ("auto", "full", "half")
HALF_PREVIEW_FROM = 512  # px: auto previews show the R/2 skip image from this resolution up

log = logging.getLogger(__name__)
_warned_modes: set[str] = set()


def preview_mode() -> str:
    """DRAGGAN_PREVIEW: auto (default), full or half; an unknown value counts as auto (logged once)."""
    mode = os.environ.get(PREVIEW_ENV, "").strip().lower() or "auto"
    if mode not in PREVIEW_MODES:
        if mode not in _warned_modes:
            _warned_modes.add(mode)
            log.warning("%s=%r is not one of %s: using auto", PREVIEW_ENV, mode, "|".join(PREVIEW_MODES))
        mode = "auto"
    return mode


def preview_res(G, mode: str | None = None) -> int | None:
    """The block whose skip image an intermediate frame of G shows, or None for the full render.

    mode: auto | full | half (None: DRAGGAN_PREVIEW). Half needs a skip-architecture generator."""
    mode = preview_mode() if mode is None else mode
    if mode not in PREVIEW_MODES:
        raise ValueError(f"preview mode must be one of {PREVIEW_MODES}, got {mode!r}")
    synthesis = getattr(G, "synthesis", None)
    cfg = getattr(synthesis, "cfg", None)
    if mode == "full" or cfg is None or not getattr(synthesis, "has_skip_images", False) or cfg.img_resolution < 8:
        return None
    if mode == "auto" and cfg.img_resolution < HALF_PREVIEW_FROM:
        return None
    return cfg.img_resolution // 2


@dataclass(frozen=True)
class Frame:
    step: int               # the session step whose latent this is
    image: np.ndarray       # HxWx3 uint8
    render_seconds: float   # wall time of the (batched) render that produced it
    exact: bool = False     # the exact render (a run's final frame), not a preview


@dataclass
class _Job:
    stream: "FrameStream"
    G: torch.nn.Module
    latent: torch.Tensor    # [1, num_ws, w_dim], detached
    step: int
    noise_mode: str
    urgent: bool = False    # the run waits for this frame: render it with `urgent_threads`
    exact: bool = False     # the final frame: the exact render, never a preview


class FrameStream:
    """One running edit's frames: `submit` the newest latent, take `newest` frames as they come."""

    def __init__(self, renderer: "FrameRenderer", key: int):
        self._renderer, self.key = renderer, key
        self._frame: Frame | None = None
        self._submitted_step = -1
        self._published = threading.Condition()
        self._awaited: tuple[int, bool] | None = None  # (step, exact) of the frame a caller waits for
        self.closed = False

    def submit(self, G, latent: torch.Tensor, step: int, noise_mode: str = "const", urgent: bool = False,
               exact: bool = False) -> None:
        """Queue `latent` (replacing any not yet rendered) unless a newer step was submitted.
        urgent: the caller will `wait` for it (the renderer then uses its urgent thread count).
        exact: the run's final frame: urgent, the exact render, and it may repeat the last step."""
        if self.closed or step < self._submitted_step or (step == self._submitted_step and not exact):
            return
        self._submitted_step = step
        if urgent or exact:
            with self._published:
                self._awaited = (step, exact)
        self._renderer._put(_Job(self, G, latent.detach(), step, noise_mode, urgent or exact, exact))

    def wait(self, after_step: int, timeout: float, cancelled: Callable[[], bool] = lambda: False) -> Frame | None:
        """Block while an awaited frame is on its way and nothing newer than `after_step` has come
        (at most `timeout` s; a cancel, a close or a failed render end it too); then `newest`."""
        deadline = time.perf_counter() + timeout
        with self._published:
            while self._awaited is not None and self.newest(after_step) is None and not cancelled():
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._published.wait(min(left, 0.1))
        return self.newest(after_step)

    def newest(self, after_step: int) -> Frame | None:
        """The newest rendered frame if it is newer than `after_step` or is the exact final frame."""
        frame = self._frame
        return frame if frame is not None and (frame.step > after_step or frame.exact) else None

    def _publish(self, frame: Frame) -> None:
        with self._published:
            if not self.closed and (self._frame is None or frame.step > self._frame.step
                                    or (frame.exact and frame.step >= self._frame.step)):
                self._frame = frame
            if self._awaited is not None and frame.step >= self._awaited[0] and (frame.exact or not self._awaited[1]):
                self._awaited = None
            self._published.notify_all()

    def _failed(self, job: "_Job") -> None:
        """A render failed: a caller waiting for it goes on without it."""
        with self._published:
            if job.urgent:
                self._awaited = None
            self._published.notify_all()

    def close(self) -> None:
        self.closed = True
        self._renderer._drop(self)
        with self._published:
            self._awaited = None
            self._published.notify_all()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class FrameRenderer:
    """A background thread rendering the pending latent of every open stream, newest only."""

    def __init__(self, threads: Callable[[], int] | int | None = None, max_batch: int = 8,
                 urgent_threads: Callable[[], int] | int | None = None):
        self._threads = threads
        self._urgent_threads = urgent_threads if urgent_threads is not None else threads
        self.max_batch = max_batch
        self._pending: dict[int, _Job] = {}
        self._cv = threading.Condition()
        self._keys = itertools.count()
        self._worker: threading.Thread | None = None
        self.frames_rendered = 0
        self.batches_rendered = 0

    def open_stream(self) -> FrameStream:
        return FrameStream(self, next(self._keys))

    # -- internal: called by streams
    def _put(self, job: _Job) -> None:
        with self._cv:
            self._pending[job.stream.key] = job  # replaces a stale latent of the same stream
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._loop, name="draggan-frame-renderer", daemon=True)
                self._worker.start()
            self._cv.notify()

    def _drop(self, stream: FrameStream) -> None:
        with self._cv:
            self._pending.pop(stream.key, None)

    def _take_batch(self) -> list[_Job]:
        with self._cv:
            while not self._pending:
                if not self._cv.wait(timeout=30.0):
                    if not self._pending:  # idle: let the thread end; the next submit starts one
                        self._worker = None
                        return []
            first = next(iter(self._pending.values()))
            batch = [j for j in self._pending.values()
                     if j.G is first.G and j.noise_mode == first.noise_mode and j.exact == first.exact][:self.max_batch]
            for job in batch:
                del self._pending[job.stream.key]
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            source = self._urgent_threads if any(j.urgent for j in batch) else self._threads
            threads = source() if callable(source) else source
            if threads:
                torch.set_num_threads(threads)
            try:
                G = batch[0].G
                exact = batch[0].exact
                images, seconds = render_batch(G, [j.latent for j in batch], batch[0].noise_mode,
                                               image_res=None if exact else preview_res(G))
            except Exception:  # a failed preview must not kill the worker; the run's final render reports errors
                for job in batch:
                    job.stream._failed(job)
                continue
            self.batches_rendered += 1
            for job, image in zip(batch, images):
                self.frames_rendered += 1
                job.stream._publish(Frame(job.step, image, seconds, exact))


def render_batch(G, latents: list[torch.Tensor], noise_mode: str = "const",
                 image_res: int | None = None) -> tuple[list[np.ndarray], float]:
    """Render same-shape latents [1, num_ws, w_dim] in one forward; returns uint8 images and seconds.

    image_res: None renders exactly; a block resolution (`preview_res`) renders that block's skip
    image as a preview of full size (`preview_image`)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        ws = torch.cat([w.to(next(G.parameters()).device, torch.float32) for w in latents], dim=0)
        if image_res is None:
            img = G.synthesis(ws, noise_mode=noise_mode)
        else:
            img = preview_image(G, G.synthesis(ws, noise_mode=noise_mode, image_res=image_res))
        images = [to_uint8_image(img[i]) for i in range(img.shape[0])]
    return images, time.perf_counter() - t0


def preview_image(G, img: torch.Tensor) -> torch.Tensor:
    """A skip image [N, C, r, r] of G taken to full size: bicubic up-sampling (of those measured, the
    closest to the full render) plus the ToRGB biases of the blocks not run (what they add where their
    convolution term is zero: +3 dB on the default model, for nothing). A full-size image (a resnet
    generator's fallback) is returned as it is."""
    synthesis = G.synthesis
    full = synthesis.cfg.img_resolution
    channels = synthesis.cfg.img_channels
    assert img.ndim == 4 and img.shape[1] == channels and img.shape[2] == img.shape[3], tuple(img.shape)
    if img.shape[-1] == full:
        return img
    assert img.shape[-1] in synthesis.block_resolutions, tuple(img.shape)
    out = torch.nn.functional.interpolate(img, size=(full, full), mode="bicubic", align_corners=False)
    for res in synthesis.block_resolutions:
        block = synthesis.block(res)
        if res > img.shape[-1] and block.num_torgb:
            out = out + block.torgb.bias.view(1, -1, 1, 1)
    assert out.shape[1:] == (channels, full, full), tuple(out.shape)
    return out


__all__ = ["Frame", "FrameRenderer", "FrameStream", "HALF_PREVIEW_FROM", "PREVIEW_ENV", "preview_image",
           "preview_mode", "preview_res", "render_batch"]
