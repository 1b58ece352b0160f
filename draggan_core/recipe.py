"""Edit recipes: a JSON description of one drag edit that the CLI replays and the web UI exports.

    {"seed": 3, "psi": 0.7, "drags": [[hx, hy, tx, ty], ...], "steps": 300, "lr": 0.002, ...}

`latent` (a .npy path, relative to the recipe file) may replace `seed`; `mask` is a PNG path
(white = may change, relative to the recipe file too). Any DragConfig field may be given; unknown
keys are rejected. `to_json` is the one writer: the web UI's export and `drag --save-recipe` use it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .drag import DragConfig

MAX_RECIPE_BYTES = 1 << 20
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(DragConfig)} - {"max_steps"}


@dataclass
class Recipe:
    drags: list[tuple[float, float, float, float]]
    seed: int | None = None
    latent: str | None = None
    psi: float = 0.7
    model: str | None = None
    mask: str | None = None
    steps: int = 300
    settings: dict = field(default_factory=dict)  # DragConfig fields

    def config(self, **overrides) -> DragConfig:
        return DragConfig(max_steps=self.steps, **{**self.settings, **overrides})

    def to_json(self) -> str:
        d = {"model": self.model, "seed": self.seed, "latent": self.latent, "psi": self.psi,
             "drags": [list(map(_num, d)) for d in self.drags], "mask": self.mask, "steps": self.steps}
        d.update(self.settings)
        return json.dumps({k: v for k, v in d.items() if v is not None}, indent=2)

    def save(self, path: str | Path) -> Path:
        """Write to `path`; latent and mask paths (as given, relative to the current folder) are
        rewritten relative to the recipe's folder, which is how `load` reads them."""
        path = Path(path)
        folder = path.resolve().parent
        moved = dataclasses.replace(self, latent=_relative_to(self.latent, folder),
                                    mask=_relative_to(self.mask, folder))
        path.write_text(moved.to_json() + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict):
            raise ValueError("recipe must be a JSON object")
        d = dict(d)
        known = {"model", "seed", "latent", "psi", "drags", "mask", "steps"}
        unknown = set(d) - known - _CONFIG_FIELDS
        if unknown:
            raise ValueError(f"recipe has unknown keys: {sorted(unknown)}")
        drags = d.pop("drags", None)
        if not isinstance(drags, list) or not drags or len(drags) > 128:
            raise ValueError("recipe needs 'drags': a list of 1-128 [hx, hy, tx, ty] entries")
        parsed = []
        for entry in drags:
            if not isinstance(entry, (list, tuple)) or len(entry) != 4 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in entry):
                raise ValueError(f"bad drag entry {entry!r}: expected [hx, hy, tx, ty] numbers")
            parsed.append(tuple(float(v) for v in entry))
        settings = {k: d.pop(k) for k in list(d) if k in _CONFIG_FIELDS}
        seed = d.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError("recipe 'seed' must be an integer")
        steps = d.get("steps", 300)
        if not isinstance(steps, int) or not 0 <= steps <= 100_000:
            raise ValueError("recipe 'steps' must be an integer in [0, 100000]")
        return cls(drags=parsed, seed=seed, latent=d.get("latent"), psi=float(d.get("psi", 0.7)),
                   model=d.get("model"), mask=d.get("mask"), steps=steps, settings=settings)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise ValueError(f"{path}: recipe larger than {MAX_RECIPE_BYTES} bytes")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        recipe = cls.from_dict(data)
        base = path.parent
        if recipe.latent and not Path(recipe.latent).is_absolute():
            recipe.latent = str(base / recipe.latent)
        if recipe.mask and not Path(recipe.mask).is_absolute():
            recipe.mask = str(base / recipe.mask)
        return recipe


def _relative_to(file: str | None, folder: Path) -> str | None:
    return None if file is None else os.path.relpath(Path(file).resolve(), folder)


def _num(v: float):
    return int(v) if float(v).is_integer() else float(v)


def parse_drag(text: str) -> tuple[float, float, float, float]:
    """'HX,HY:TX,TY' -> (hx, hy, tx, ty)."""
    try:
        handle, target = text.split(":")
        hx, hy = (float(v) for v in handle.split(","))
        tx, ty = (float(v) for v in target.split(","))
    except ValueError:
        raise ValueError(f"--drag {text!r}: expected HX,HY:TX,TY (pixels, x = column)") from None
    if not all(math.isfinite(v) for v in (hx, hy, tx, ty)):
        raise ValueError(f"--drag {text!r}: coordinates must be finite")
    return hx, hy, tx, ty
