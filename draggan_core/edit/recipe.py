"""Edit recipes: a JSON description of a drag edit that the CLI replays and the web UI exports.

One run (the flat form; what `drag --save-recipe` writes for a single drag):

    {"model": "embedded-faces128-parts.safetensors", "seed": 3, "psi": 0.7,
     "drags": [[hx, hy, tx, ty], ...], "steps": 300, "lr": 0.008, ..., "mask": "data:image/png;base64,iVBO..."}

Several runs (an edit made in steps: drag, look, drag again from the result, as in the web UI):

    {"model": ..., "seed": 3, "psi": 0.7,
     "history": [{"drags": [[20, 30, 24, 33]], "steps": 40, "lr": 0.008, ...},
                 {"drags": [[20, 30, 24, 33], [40, 30, 37, 33]], "kept_pairs": 1, "steps": 12, ...}]}

The start, given once: `seed` (with `psi`) or `latent` (a .npy path, relative to the recipe file),
and `model`. Each run:
  - `drags`: every handle/target pair of the run, the handle where it was placed (model pixels);
  - `steps`: the run's step budget, its maximum (a replay ends where the original ended: on arriving,
    at the budget, or by another of the session's own rules); for a run ended by Stop, the steps it took;
  - `mask` (optional): the flexible region, white = may change. Written as a PNG embedded in the
    JSON (a `data:image/png;base64,...` URI), so that one file replays the edit; the path of an image
    file, relative to the recipe (what older recipes hold), is read too;
  - any DragConfig field (`lr`, `r1`, `w_mode`, ...), every one spelled out when written by us, so that
    a model's recommendations changing later does not change the replay;
  - `stopped` (default false): the run was stopped (web UI Stop) right after its last step, so its
    handles were not tracked once more;
  - runs after the first only: `kept_pairs` N (default 0): the first N pairs are the previous run's
    first N, continued (their handles start where that run left them, and keep the features they
    were placed on); `mask_set_again` (default false): the mask, unchanged, was applied again before
    this run, so the fixed region is held as it looks at this run's start (a mask whose pixels
    changed always is).

`replay_runs` runs them in order in one DragSession on the starting latent, as the web UI's Start
button does: the latent, the optimiser's moments and the kept handles carry over from run to run.
`EditRecorder` builds such a recipe from a live session (the web UI's export, `drag --save-recipe`).
`Recipe.to_json` is the one writer; `Recipe.save` also embeds a mask given as a file path.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .session import DragSession
from .settings import DragConfig, StepResult

Drag = tuple[float, float, float, float]

MAX_RECIPE_BYTES = 8 << 20          # embedded masks make recipes bigger than the 1 MiB of old
MAX_EMBEDDED_MASK_BYTES = 4 << 20   # the PNG; a mask that needs more is noise, not a region
MAX_MASK_PIXELS = 64 * 1024 * 1024
MAX_DRAGS = 128
MAX_RUNS = 10_000
MAX_STEPS = 100_000
DEFAULT_STEPS = 300
MASK_URI_PREFIX = "data:image/png;base64,"

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(DragConfig)} - {"max_steps"}
_RUN_KEYS = {"drags", "mask", "steps", "stopped", "kept_pairs", "mask_set_again"}
_START_KEYS = {"model", "seed", "latent", "psi"}


class MaskError(ValueError):
    """A mask that cannot be read or embedded (the message is one line and names the mask)."""


# --------------------------------------------------------------------------------------------------
# runs and recipes
# --------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One press of Start: the pairs it dragged, its mask and settings, the steps it took."""
    drags: list[Drag]
    steps: int = DEFAULT_STEPS       # the budget; with `stopped`, the steps taken before Stop
    mask: str | None = None          # data URI (embedded PNG) or an image file path
    settings: dict = field(default_factory=dict)  # DragConfig fields
    kept_pairs: int = 0
    mask_set_again: bool = False
    stopped: bool = False

    def config(self, **overrides) -> DragConfig:
        return DragConfig(max_steps=self.steps, **{**self.settings, **overrides})

    def to_dict(self) -> dict:
        """JSON-ready; flags only when set, the (long) mask last."""
        d = {"drags": [[_num(v) for v in drag] for drag in self.drags], "steps": self.steps}
        d.update(self.settings)
        d.update({k: v for k, v in (("kept_pairs", self.kept_pairs), ("mask_set_again", self.mask_set_again),
                                    ("stopped", self.stopped)) if v})
        if self.mask is not None:
            d["mask"] = self.mask
        return d

    @classmethod
    def from_dict(cls, d: dict, previous: "Run | None" = None, where: str = "recipe") -> "Run":
        """Parse and check one run; `previous` is the run before it (None for the first)."""
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be a JSON object")
        unknown = set(d) - _RUN_KEYS - _CONFIG_FIELDS
        if unknown:
            raise ValueError(f"{where} has unknown keys: {sorted(unknown)}")
        drags = _parse_drags(d.get("drags"), where)
        steps = d.get("steps", DEFAULT_STEPS)
        if not _is_int(steps) or not 0 <= steps <= MAX_STEPS:
            raise ValueError(f"{where}: 'steps' must be an integer in [0, {MAX_STEPS}]")
        mask = d.get("mask")
        if mask is not None and (not isinstance(mask, str) or not mask):
            raise ValueError(f"{where}: 'mask' must be an embedded PNG (data URI) or an image file path")
        kept = d.get("kept_pairs", 0)
        if not _is_int(kept) or kept < 0:
            raise ValueError(f"{where}: 'kept_pairs' must be an integer >= 0")
        flags = {name: d.get(name, False) for name in ("stopped", "mask_set_again")}
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise ValueError(f"{where}: '{name}' must be true or false")
        if previous is None and (kept or flags["mask_set_again"]):
            raise ValueError(f"{where}: 'kept_pairs' and 'mask_set_again' need a run before this one")
        if previous is not None:
            if kept > min(len(drags), len(previous.drags)) or drags[:kept] != previous.drags[:kept]:
                raise ValueError(f"{where}: 'kept_pairs' {kept}: the first {kept} drags must be the previous "
                                 "run's first ones, unchanged")
        settings = {k: v for k, v in d.items() if k in _CONFIG_FIELDS}
        return cls(drags=drags, steps=steps, mask=mask, settings=settings, kept_pairs=kept, **flags)


@dataclass(init=False)
class Recipe:
    """Where an edit starts (model, seed or latent) and its runs, in order (`history`).

    One-run recipes keep the old constructor and attributes: `Recipe(drags=..., seed=3, mask=...,
    steps=..., settings=...)`, `recipe.drags`, `recipe.mask`, `recipe.steps`, `recipe.settings` (these
    four raise ValueError on a recipe with several runs). Several runs: `Recipe(seed=3, history=[Run,
    ...])`.
    """
    seed: int | None
    latent: str | None
    psi: float
    model: str | None
    history: list[Run]

    def __init__(self, drags: list[Drag] | None = None, seed: int | None = None, latent: str | None = None,
                 psi: float = 0.7, model: str | None = None, mask: str | None = None, steps: int = DEFAULT_STEPS,
                 settings: dict | None = None, history: list[Run] | None = None):
        if history is not None and (drags is not None or mask is not None or settings):
            raise ValueError("give a recipe either drags/mask/settings (one run) or history (runs), not both")
        self.seed, self.latent, self.psi, self.model = seed, latent, psi, model
        self.history = list(history) if history is not None else [
            Run(drags=list(drags or []), steps=steps, mask=mask, settings=dict(settings or {}))]

    # one-run shorthands ---------------------------------------------------------------------------
    @property
    def only_run(self) -> Run:
        if len(self.history) != 1:
            raise ValueError(f"this recipe has {len(self.history)} runs, not one")
        return self.history[0]

    drags = property(lambda self: self.only_run.drags, lambda self, v: setattr(self.only_run, "drags", v))
    mask = property(lambda self: self.only_run.mask, lambda self, v: setattr(self.only_run, "mask", v))
    steps = property(lambda self: self.only_run.steps, lambda self, v: setattr(self.only_run, "steps", v))
    settings = property(lambda self: self.only_run.settings, lambda self, v: setattr(self.only_run, "settings", v))

    def config(self, **overrides) -> DragConfig:
        return self.only_run.config(**overrides)

    # JSON -----------------------------------------------------------------------------------------
    def to_json(self) -> str:
        """One run: the flat form (as recipes always were); several: the start, then `history`."""
        start = {"model": self.model, "seed": self.seed, "latent": self.latent, "psi": self.psi}
        if len(self.history) == 1:
            d = {**start, **self.history[0].to_dict()}
        else:
            d = {**start, "history": [run.to_dict() for run in self.history]}
        return json.dumps({k: v for k, v in d.items() if v is not None}, indent=2)

    def save(self, path: str | Path) -> Path:
        """Write to `path`. Masks given as file paths are embedded (the file alone replays the edit);
        a latent path (as given, relative to the current folder) is rewritten relative to the recipe's
        folder, which is how `load` reads it."""
        path = Path(path)
        folder = path.resolve().parent
        runs = [dataclasses.replace(run, mask=embed_mask(run.mask) if run.mask else None) for run in self.history]
        moved = dataclasses.replace(self, latent=_relative_to(self.latent, folder), history=runs)
        path.write_text(moved.to_json() + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict):
            raise ValueError("recipe must be a JSON object")
        if "history" in d:
            misplaced = set(d) - _START_KEYS - {"history"}
            if misplaced:
                raise ValueError(f"recipe with 'history' has keys that belong in its runs or nowhere: "
                                 f"{sorted(misplaced)}")
            runs_data = d["history"]
            if not isinstance(runs_data, list) or not 1 <= len(runs_data) <= MAX_RUNS:
                raise ValueError(f"recipe 'history' must be a list of 1-{MAX_RUNS} runs")
            history: list[Run] = []
            for i, run_data in enumerate(runs_data):
                history.append(Run.from_dict(run_data, history[-1] if history else None,
                                             where=f"recipe run {i + 1}"))
        else:
            unknown = set(d) - _START_KEYS - _RUN_KEYS - _CONFIG_FIELDS
            if unknown:
                raise ValueError(f"recipe has unknown keys: {sorted(unknown)}")
            history = [Run.from_dict({k: v for k, v in d.items() if k not in _START_KEYS})]
        seed = d.get("seed")
        if seed is not None and not _is_int(seed):
            raise ValueError("recipe 'seed' must be an integer")
        latent, model = d.get("latent"), d.get("model")
        for name, value in (("latent", latent), ("model", model)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"recipe '{name}' must be a file name")
        psi = d.get("psi", 0.7)
        if isinstance(psi, bool) or not isinstance(psi, (int, float)) or not math.isfinite(psi):
            raise ValueError("recipe 'psi' must be a number")
        return cls(seed=seed, latent=latent, psi=float(psi), model=model, history=history)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """Read a recipe file; latent and mask file paths in it are taken relative to its folder."""
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
        for run in recipe.history:
            if run.mask and not is_embedded(run.mask) and not Path(run.mask).is_absolute():
                run.mask = str(base / run.mask)
        return recipe


# --------------------------------------------------------------------------------------------------
# masks: read, and embed as PNG data URIs
# --------------------------------------------------------------------------------------------------

def is_embedded(mask: str) -> bool:
    return mask.startswith(MASK_URI_PREFIX)


def read_mask(mask: str | os.PathLike) -> np.ndarray:
    """A mask (embedded data URI or image file path; any mode, any size) -> float32 HxW in [0, 1],
    white = flexible. An alpha channel multiplies (transparent = fixed), except in an LA image.
    Raises MaskError (one line, naming the mask) or FileNotFoundError."""
    gray, alpha = _mask_planes(mask)
    flexible = gray.astype(np.float32) / 255
    return flexible if alpha is None else flexible * (alpha.astype(np.float32) / 255)


def embed_mask(mask: str | os.PathLike | np.ndarray) -> str:
    """A mask as a recipe stores it: a PNG in a data URI.

    `mask`: an image file path (its pixels are kept, full size: `read_mask` of the result equals
    `read_mask` of the file, bit for bit), an embedded mask (returned as is), or a 2-D array (bool;
    uint8 0..255; float 0..1, stored to 1/255, so exactly for 0/1 masks such as the web UI paints).
    """
    from PIL import Image
    if isinstance(mask, str) and is_embedded(mask):
        return mask
    if isinstance(mask, (str, os.PathLike)):
        gray, alpha = _mask_planes(mask)
        # gray in R, G and B converts back to exactly that gray; alpha where the file had one
        image = Image.fromarray(gray) if alpha is None else Image.fromarray(np.dstack([gray, gray, gray, alpha]))
    else:
        array = np.asarray(mask)
        if array.ndim != 2 or min(array.shape) < 1:
            raise MaskError(f"mask must be a 2-D array, got shape {array.shape}")
        if array.dtype != np.uint8:
            array = np.round(np.clip(np.asarray(array, dtype=np.float64), 0, 1) * 255).astype(np.uint8)
        image = Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    if buffer.tell() > MAX_EMBEDDED_MASK_BYTES:
        raise MaskError(f"{_mask_name(mask)}: mask is {buffer.tell() / 1e6:.1f} MB as PNG, too detailed to embed "
                        f"in a recipe (at most {MAX_EMBEDDED_MASK_BYTES / 1e6:.1f} MB); use a smaller mask image")
    return MASK_URI_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")


def same_mask(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Same pixels (masks read by `read_mask`; None: no mask)."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and np.array_equal(a, b)


def _mask_planes(mask: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """(gray uint8 HxW, alpha uint8 HxW or None) of a mask image; the one decoder both `read_mask`
    and `embed_mask` use, which is what makes an embedded mask replay exactly like its file."""
    from PIL import Image
    name = _mask_name(mask)
    if isinstance(mask, str) and is_embedded(mask):
        try:
            source = io.BytesIO(base64.b64decode(mask[len(MASK_URI_PREFIX):], validate=True))
        except (binascii.Error, ValueError):
            raise MaskError("embedded mask: not valid base64") from None
    else:
        source = mask
    Image.MAX_IMAGE_PIXELS = MAX_MASK_PIXELS
    try:
        with Image.open(source) as im:
            if im.width * im.height > MAX_MASK_PIXELS:
                raise MaskError(f"{name}: mask is {im.width}x{im.height}, too large")
            gray = np.asarray(im.convert("L"), dtype=np.uint8)
            if "A" in im.getbands() and im.mode != "LA":
                return gray, np.asarray(im.getchannel("A"), dtype=np.uint8)
            return gray, None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MaskError(f"{name}: mask image is too large (decompression bomb?)") from None
    except (OSError, ValueError) as e:
        if isinstance(e, (FileNotFoundError, MaskError)):
            raise
        raise MaskError(f"{name}: not a readable image ({e})") from None


def _mask_name(mask) -> str:
    if isinstance(mask, str) and is_embedded(mask):
        return "embedded mask"
    return str(mask) if isinstance(mask, (str, os.PathLike)) else "mask"


# --------------------------------------------------------------------------------------------------
# replay
# --------------------------------------------------------------------------------------------------

def replay_runs(session: DragSession, runs: list[Run], display_every: int = 0,
                recorder: "EditRecorder | None" = None,
                masks: list[np.ndarray | None] | None = None) -> Iterator[tuple[int, StepResult]]:
    """Run `runs` in order in `session` (new, on the recipe's starting latent, no pairs yet), as the
    web UI ran them; yields (run index, step result) for every step.

    Every run's points, mask and settings are checked before the first step, so a mistake in the
    last run does not cost the time of the others. `recorder`: records each run as it ends (what
    `drag --save-recipe` writes). `masks`: the runs' masks already read (`read_mask`), if they are.
    """
    if masks is None:
        masks = [read_mask(run.mask) if run.mask else None for run in runs]
    for i, run in enumerate(runs):
        where = f"run {i + 1}: " if len(runs) > 1 else ""
        if not run.drags:
            raise ValueError(f"{where}give at least one drag")
        try:
            for hx, hy, tx, ty in run.drags:
                session.check_point((hx, hy), "handle")
                session.check_point((tx, ty), "target")
            run.config().resolve(session.G, len(run.drags), session.model_defaults, masked=masks[i] is not None)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}{e}") from None
    previous: Run | None = None
    for index, (run, mask) in enumerate(zip(runs, masks)):
        del session.pairs[run.kept_pairs:]  # the kept ones continue: tracked handles, reference features
        for hx, hy, tx, ty in run.drags[run.kept_pairs:]:
            session.add_pair((hx, hy), (tx, ty))
        if previous is None or run.mask_set_again or not same_mask(mask, masks[index - 1]):
            session.set_mask(mask)  # (re)takes the fixed region's features at this run's start
        session.config = run.config(display_every=display_every)
        first_step = session.step_count
        if not (run.stopped and run.steps == 0):  # stopped before its first step: nothing ran
            steps = session.run(max_steps=run.steps)
            try:
                for result in steps:
                    yield index, result
                    if run.stopped and session.step_count - first_step >= run.steps:
                        break  # Stop came right after this step: no final tracking of the handles
            finally:
                steps.close()
        if recorder is not None:
            recorder.record_run(session, stopped_after=session.step_count - first_step if run.stopped else None,
                                mask=run.mask)
        previous = run


def resolved_settings(session: DragSession) -> dict:
    """The settings `session.run()` would use now, every one spelled out (none left to the model's
    recommendations, which may change), as a recipe stores them."""
    resolved = session.config.resolve(session.G, len(session.pairs), session.model_defaults,
                                      masked=session.mask_active)
    plain = DragConfig()
    settings = {}
    for f in dataclasses.fields(DragConfig):
        if f.name in ("max_steps", "display_every"):  # steps is a key of its own; frames do not change the edit
            continue
        value = getattr(resolved, f.name)
        if value is not None and (getattr(plain, f.name) is None or value != getattr(plain, f.name)):
            settings[f.name] = value
    return settings


class EditRecorder:
    """Builds a recipe from a live DragSession, one run at a time, for the web UI's export:

        recorder = EditRecorder(model="embedded-faces128-parts.safetensors", seed=3, psi=0.7)
        ...                                   # the user places points, paints a mask, presses Start
        session.config = DragConfig(max_steps=n, ...)     # (web UI: `EditorState.configure`)
        first = session.step_count
        for result in session.run(max_steps=n): ...      # until it ends, or Stop
        recorder.record_run(session)                     # it ended by itself, or:
        recorder.record_run(session, stopped_after=session.step_count - first)  # Stop ended it
        ...                                   # more points, another Start, another record_run
        recorder.recipe().save("export/recipe.json")  # or .to_json()

    Record after every run, Stop included, before the points or mask change again. Which pairs and
    which mask continue from the previous run is read from the session itself (the same PointPair and
    mask objects), so nothing else needs tracking. When the session goes back to a starting latent
    (Reset, a new seed, an uploaded or inverted image, another model), call `start_over` (with the new
    start, if any): the runs so far no longer lead to the image. `latent` is written as given: the
    caller saves that .npy file next to the recipe.
    """

    def __init__(self, model: str | None = None, seed: int | None = None, latent: str | None = None,
                 psi: float = 0.7):
        self.model, self.seed, self.latent, self.psi = model, seed, latent, psi
        self.runs: list[Run] = []
        self._last_pairs: list = []      # the PointPair objects of the last recorded run
        self._last_mask = None           # the session's mask tensor then (identity says "set again")

    def start_over(self, **start) -> None:
        """Forget the runs; `start` may change model, seed, latent or psi (give seed=None with a latent)."""
        for name, value in start.items():
            if name not in ("model", "seed", "latent", "psi"):
                raise TypeError(f"start_over() got an unexpected keyword argument {name!r}")
            setattr(self, name, value)
        self.runs, self._last_pairs, self._last_mask = [], [], None

    def record_run(self, session: DragSession, stopped_after: int | None = None,
                   mask: str | os.PathLike | None = None) -> Run | None:
        """Record the run that just ended, with the settings and step budget (`session.config`) it ran
        with. `stopped_after`: None when the run ended by itself (arrived, its max steps, ...); when
        Stop ended it, the optimisation steps it had taken (session.step_count after minus before).
        `mask`: the mask as the user gave it (file path or embedded), when it is not the session's
        own (e.g. a file of another size); by default the session's mask is embedded. A run stopped
        before its first step changed nothing: not recorded (None is returned)."""
        stopped = stopped_after is not None
        if stopped_after == 0:
            return None
        previous = self.runs[-1] if self.runs else None
        kept = 0
        if previous is not None:
            while (kept < min(len(session.pairs), len(self._last_pairs))
                   and session.pairs[kept] is self._last_pairs[kept]):
                kept += 1
        if mask is not None:
            embedded = embed_mask(mask)
        elif session.mask is not None:
            embedded = embed_mask(session.mask.detach().cpu().numpy())
        else:
            embedded = None
        unchanged = previous is not None and (embedded == previous.mask or (
            embedded is not None and previous.mask is not None
            and same_mask(read_mask(embedded), read_mask(previous.mask))))
        if unchanged:
            embedded = previous.mask  # one spelling per mask: the recipe reads as what happened
        set_again = unchanged and embedded is not None and session.mask is not self._last_mask
        steps = stopped_after if stopped else session.config.max_steps
        run = Run(drags=[(*p.origin, *p.target) for p in session.pairs], steps=int(steps), mask=embedded,
                  settings=resolved_settings(session), kept_pairs=kept, mask_set_again=set_again, stopped=stopped)
        self.runs.append(run)
        self._last_pairs, self._last_mask = list(session.pairs), session.mask
        return run

    def recipe(self) -> Recipe:
        if not self.runs:
            raise ValueError("no run recorded yet: press Start first")
        return Recipe(seed=self.seed if self.latent is None else None, latent=self.latent, psi=self.psi,
                      model=self.model, history=[dataclasses.replace(run) for run in self.runs])


# --------------------------------------------------------------------------------------------------
# small parsers
# --------------------------------------------------------------------------------------------------

def _parse_drags(drags, where: str) -> list[Drag]:
    if not isinstance(drags, list) or not drags or len(drags) > MAX_DRAGS:
        raise ValueError(f"{where} needs 'drags': a list of 1-{MAX_DRAGS} [hx, hy, tx, ty] entries")
    parsed = []
    for entry in drags:
        if not isinstance(entry, (list, tuple)) or len(entry) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in entry):
            raise ValueError(f"bad drag entry {entry!r}: expected [hx, hy, tx, ty] numbers")
        parsed.append(tuple(float(v) for v in entry))
    return parsed


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _relative_to(file: str | None, folder: Path) -> str | None:
    return None if file is None else os.path.relpath(Path(file).resolve(), folder)


def _num(v: float):
    return int(v) if float(v).is_integer() else float(v)


def parse_drag(text: str) -> Drag:
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
