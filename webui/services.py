"""Process-wide services of the web UI (no gradio here): the shared models, the CPU thread budget, the
frame renderer and the drag engine, plus the checks every session uses.

Per-user state lives in `webui.editor.state.EditorState`; it refers to the models held here and never
copies a generator.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from draggan_core.edit.engine import LocalEngine
from draggan_core.edit.frames import FrameRenderer
from draggan_core.model.checkpoints import CheckpointError
from draggan_core.model.devices import ThreadBudget
from draggan_core.model.store import ModelStore, default_model_path, list_local_models

STORE = ModelStore()          # the app sets its device before loading anything (`configure_device`)
THREADS = ThreadBudget()      # CPU threads shared by the running drags and the frame renderer
RENDERER = FrameRenderer(threads=THREADS.share, urgent_threads=THREADS.available)  # previews in the background, newest latent only
ENGINE = LocalEngine(RENDERER, THREADS, STORE)  # runs the drags; `python app.py --engine ray` replaces it
EXAMPLES_FILE = Path(__file__).with_name("examples.json")


class UIError(Exception):
    """A user-facing problem; the message is shown as a warning, the state is unchanged."""


def set_engine(engine) -> None:
    """Run every drag of this process on `engine` (a draggan_core.edit.engine.Engine)."""
    global ENGINE
    ENGINE = engine


def configure_device(name: str | None = None):
    """Put every model of this process on `name` (auto/cpu/cuda/mps; DeviceError if unavailable)."""
    from draggan_core.model.devices import resolve_device
    STORE.set_device(resolve_device(name))
    return STORE.device


def env_max_steps() -> int | None:
    """Upper bound on steps per run from DRAGGAN_MAX_STEPS (used by tests and hosted demos)."""
    value = os.environ.get("DRAGGAN_MAX_STEPS", "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n > 0 else None


def downloads_allowed_by_default(share: bool = False) -> bool:
    """May visitors start model downloads into this server's disk? Not on a public link (--share) nor
    on a Hugging Face Space (SPACE_ID set); yes on a local server."""
    return not share and not os.environ.get("SPACE_ID")


def resolve_model_path(requested: str | os.PathLike | None = None) -> Path:
    """--model argument / DRAGGAN_MODEL env / the embedded default / the first local checkpoint."""
    requested = requested or os.environ.get("DRAGGAN_MODEL") or None
    if requested:
        p = Path(requested).expanduser()
        if not p.is_file():
            local = [m for m in list_local_models() if m.name == str(requested) or m.stem == str(requested)]
            if not local:
                raise UIError(f"model {requested}: no such checkpoint file")
            p = local[0]
        return p.resolve()
    default = default_model_path()
    if default.is_file():
        return default.resolve()
    local = list_local_models()
    if local:
        return local[0].resolve()
    raise UIError(f"no checkpoint found: {default} does not exist and checkpoints/ is empty "
                  "(pass --model PATH)")


def load_model(path):
    try:
        return STORE.get(path)
    except CheckpointError as e:
        raise UIError(f"cannot load model {Path(path).name}: {e}") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise UIError(f"cannot load model {Path(path).name}: {first_line(e)}") from None


def first_line(e: BaseException, limit: int = 200) -> str:
    return str(e).splitlines()[0][:limit] if str(e) else type(e).__name__


def model_choices() -> list[tuple[str, str]]:
    """(label, file name) of the local checkpoints, the default first and labelled as such. Values are
    names, never server paths: gradio quotes the choices when it refuses a value."""
    default = default_model_path().name
    return [(p.name + (" (default)" if p.name == default else ""), p.name) for p in list_local_models()]


def local_model_paths() -> dict[str, Path]:
    """File name -> path of the local checkpoints."""
    return {p.name: p.resolve() for p in list_local_models()}


def parse_setting(v, name, lo, hi, integer=False):
    """A run-settings field: None for blank (the model's default), else a finite number in [lo, hi]
    (rounded for integer settings); UIError says what is wrong."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise UIError(f"{name} must be a number") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise UIError(f"{name} must be between {lo:g} and {hi:g}")
    return int(round(v)) if integer else v


def load_examples(path: str | os.PathLike = EXAMPLES_FILE) -> list[dict]:
    """The example edits offered in the UI: [{"name", "model", "seed", "psi", "pairs": [[hx, hy, tx, ty],
    ...], "note"}] (model pixels, x = column; model: a checkpoint file name, absent = the default).
    A bad entry is skipped with a line on stderr; a missing or broken file gives no examples."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        print(f"webui: examples file {Path(path).name} not read: {first_line(e)}", file=sys.stderr)
        return []
    entries = data.get("examples", data) if isinstance(data, dict) else data
    out = []
    for i, e in enumerate(entries if isinstance(entries, list) else []):
        try:
            out.append(_example(e))
        except (TypeError, ValueError, KeyError) as err:
            print(f"webui: example {i + 1} in {Path(path).name} skipped: {err}", file=sys.stderr)
    return out


def _example(e: dict) -> dict:
    name = str(e["name"]).strip()
    seed = e["seed"]
    if not name or not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError("needs a name and a non-negative integer seed")
    pairs = []
    for p in e["pairs"]:
        if len(p) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  for v in p):
            raise ValueError(f"bad pair {p!r}: expected [hx, hy, tx, ty]")
        pairs.append(tuple(p))
    if not pairs:
        raise ValueError("needs at least one pair")
    psi = float(e.get("psi", 0.7))
    model = e.get("model") or default_model_path().name
    return {"name": name, "model": str(model), "seed": seed, "psi": psi, "pairs": pairs,
            "note": str(e.get("note", ""))}
