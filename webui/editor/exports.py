"""Files out of the web UI (no gradio here): the image at a chosen scale, the latent, the GIF of the
runs and the recipe that replays them. A mixin of `webui.editor.state.EditorState`.

`download_files` keeps one ready file of each kind for the download buttons: a browser download is
one click, so the file must exist before the click. Files are rewritten only when what they show
changed (the image, the history, the scale).
"""
from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from draggan_core.model.latents import save_latent

from ..services import UIError
from . import render

PNG_SCALES = (1, 2, 4, 8)
MAX_GIF_FRAMES = 80           # a GIF samples the runs' frames down to this many
GIF_FRAME_MS = 80


class ExportMixin:
    """Exports of an EditorState (see there for the fields used)."""

    # ------------------------------------------------------------------ the files
    def save_current_latent(self, path: Path | None = None) -> Path:
        path = path or self.workdir() / "latent.npy"
        save_latent(path, self.session.latent)
        return path

    def export_png(self, scale: int = 1, pixels: bool | None = None, path: Path | None = None) -> Path:
        """The image without markers, `scale` times the model's size (Lanczos; nearest for pixels)."""
        scale = _scale(scale)
        img = render.enlarge(self.image, scale, self.pixels if pixels is None else pixels)
        path = path or self.workdir() / "draggan.png"
        Image.fromarray(img).save(path)
        return path

    def gif_frames(self) -> list:
        """The new image, then the frames of every run up to the one shown."""
        frames = [self.start_frame] if self.start_frame is not None else []
        for step in self.history[:self.cursor]:
            frames.extend(step.frames)
        return frames

    def export_gif(self, path: Path | None = None, pixels: bool | None = None) -> Path:
        frames = self.gif_frames() or [render.trajectory_frame(self.image)]
        if len(frames) > MAX_GIF_FRAMES:  # evenly sampled, first and last kept
            idx = np.linspace(0, len(frames) - 1, MAX_GIF_FRAMES).round().astype(int)
            frames = [frames[i] for i in idx]
        scale = max(1, render.GIF_SIZE // frames[0].shape[0])
        pixels = self.pixels if pixels is None else pixels
        imgs = [Image.fromarray(render.upscale(f, scale, pixels)) for f in frames]
        path = path or self.workdir() / "trajectory.gif"
        durations = [GIF_FRAME_MS] * len(imgs)
        durations[-1] = 1000
        imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=durations, loop=0)
        return path

    def recipe_json(self) -> str:
        """The recipe of the runs up to the one shown (each run as it was made, Stop included)."""
        try:
            return self.recorder.recipe().to_json() + "\n"
        except ValueError:
            raise UIError("a recipe replays runs: press Start first") from None

    def export_recipe(self, folder: Path | None = None) -> list[Path]:
        """recipe.json, and the starting latent next to it when the edit did not start from a seed."""
        d = folder or self.workdir()
        path = d / "recipe.json"
        path.write_text(self.recipe_json())
        files = [path]
        if self.recorder.latent:
            files.append(save_latent(d / self.recorder.latent, self.start_w))
        return files

    # ------------------------------------------------------------------ for the download buttons
    def download_name(self, kind: str, scale: int = 1) -> str:
        if self.latent_source == "seed":
            stem = f"seed{self.seed}"
        else:
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.latent_source.removeprefix("image ")).stem)[:40] or "upload"
        run = f"-run{self.cursor}" if self.cursor else ""
        return {"png": f"draggan-{stem}{run}-x{scale}.png", "latent": f"draggan-{stem}{run}.npy",
                "gif": f"draggan-{stem}{run}.gif", "recipe": f"draggan-{stem}-recipe.json"}[kind]

    def download_files(self, scale: int = 4, pixels: bool | None = None) -> dict:
        """{kind: path or None} for png, latent, gif and recipe: None when there is nothing to give
        (no run yet: no GIF, no recipe). Each file is made again only when it would change."""
        scale = _scale(scale)
        pixels = self.pixels if pixels is None else bool(pixels)
        runs = self.cursor > 0
        wanted = {"png": (self.version, scale, pixels), "latent": (self.version,),
                  "gif": (self.version, pixels) if runs else None, "recipe": (self.version,) if runs else None}
        cache = getattr(self, "_downloads", None)
        if cache is None:
            cache = self._downloads = {}
        out = {}
        for kind, key in wanted.items():
            if key is None:
                out[kind] = None
                continue
            if kind in cache and cache[kind][0] == key and cache[kind][1].is_file():
                out[kind] = cache[kind][1]
                continue
            folder = self.workdir() / "downloads" / f"{kind}-{self.version}-{len(cache)}-{abs(hash(key)) % 10**8}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / self.download_name(kind, scale)
            if kind == "png":
                self.export_png(scale, pixels, path)
            elif kind == "latent":
                self.save_current_latent(path)
            elif kind == "gif":
                self.export_gif(path, pixels)
            else:
                path = self._recipe_download(folder, path)
            if kind in cache:
                shutil.rmtree(cache[kind][1].parent, ignore_errors=True)
            cache[kind] = (key, path)
            out[kind] = path
        return out

    def _recipe_download(self, folder: Path, path: Path) -> Path:
        """One file: the recipe JSON, or (an edit that started from a latent) a zip of it and the latent."""
        files = self.export_recipe(folder)
        if len(files) == 1:
            return files[0].rename(path)
        zpath = path.with_suffix(".zip")
        with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
            for f in files:
                z.write(f, f.name)
        return zpath


def _scale(scale) -> int:
    try:
        s = int(str(scale).lower().removesuffix("x").removeprefix("x"))
    except ValueError:
        raise UIError(f"PNG scale must be one of {', '.join(f'{v}x' for v in PNG_SCALES)}") from None
    if s not in PNG_SCALES:
        raise UIError(f"PNG scale must be one of {', '.join(f'{v}x' for v in PNG_SCALES)}")
    return s
