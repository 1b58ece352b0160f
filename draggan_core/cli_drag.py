"""`python -m draggan_core drag`: run one drag edit from the command line (or replay a recipe).

    python -m draggan_core drag --seed 3 --drag 20,44:24,40 --out edited.png --gif edit.gif --log edit.json
    python -m draggan_core drag --seed 3 --drag 20,44:24,40 --out edited.png --save-recipe edit.json
    python -m draggan_core drag --recipe edit.json --out replayed.png

Coordinates are model pixels: x = column, y = row, 0 .. R-1 for a model of resolution R (128 for the
default model), whatever --scale enlarges the written images to.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from .cli import (CliError, add_model_argument, check_outputs, check_scale, enlarge, load_model, positive_int,
                  resolve_model_path)
from .devices import add_device_argument
from .recipe import Recipe, parse_drag

MAX_MASK_PIXELS = 64 * 1024 * 1024
GIF_FRAME_MS = 60
GIF_LAST_FRAME_MS = 1500  # hold the result so it can be seen before the loop restarts
GIF_MIN_SIDE = 256        # without --scale the GIF is enlarged to at least this many pixels
HANDLE_RGB, TARGET_RGB, LINE_RGB = (230, 30, 30), (40, 90, 240), (255, 255, 255)

# Settings the model may recommend (drag_defaults in its metadata): flag, DragConfig field, what it
# is, the rule used when the model recommends nothing.
MODEL_DEFAULTED = [
    ("--lr", "lr", "Adam learning rate of the latent", "0.002"),
    ("--r1", "r1", "motion-supervision radius in model pixels", "max(3 * R / 512, 2)"),
    ("--r2", "r2", "point-tracking half window in model pixels", "max(round(12 * R / 512), 4)"),
    ("--lambda-mask", "lambda_mask", "weight of the keep-outside-the-mask term", "20"),
    ("--tracking", "tracking", "point-tracking distance", "l1"),
    ("--w-mode", "w_mode", "optimise one vector per layer (w+) or one shared vector (w)", "w+"),
    ("--feature-block", "feature_res", "synthesis block (by resolution) whose features are supervised",
     "the 6th block"),
    ("--stop-distance", "stop_distance", "a handle within this many pixels has arrived",
     "1, or 2 with more than 5 points"),
    ("--track-block", "track_res", "synthesis block whose features track the handles", "the feature block"),
    ("--track-patch", "track_patch", "track (2K+1)^2 feature patches (0: single pixels)", "0"),
    ("--subpixel", "subpixel", "refine tracked handles below a pixel", "off"),
]


def _default_model_defaults() -> dict:
    from .models import drag_defaults_of
    try:
        return drag_defaults_of(resolve_model_path(None))
    except CliError:  # no default model: the help still works
        return {}


def _model_default_help(field: str, what: str, generic: str, recommended: dict) -> str:
    value = recommended.get(field)
    if isinstance(value, bool):
        value = "on" if value else "off"
    shown = f"; {value} for the default model" if value is not None else ""
    if f"{field}_multi_point" in recommended:
        shown += f" ({recommended[f'{field}_multi_point']} with several points)"
    return f"{what} (default: the model's recommended value{shown}; {generic} for a model without one)"


def add_parser(subparsers):
    p = subparsers.add_parser("drag", help="drag handle points to targets and save the edited image",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("--recipe", metavar="RECIPE.json", help="read seed/latent/drags/settings from a JSON recipe "
                   "(command-line flags override it)")
    p.add_argument("--seed", type=int, help="random seed of the image to edit (give --seed or --latent)")
    p.add_argument("--latent", metavar="W.npy", help="W or W+ latent of the image to edit")
    p.add_argument("--psi", type=float, default=None, help="truncation psi for --seed (default: 0.7)")
    p.add_argument("--drag", action="append", default=[], metavar="HX,HY:TX,TY",
                   help="a handle and its target in model pixels (x = column, y = row; 0..127 for the default "
                        "128 px model); repeat for more points, each handle once (default: none; give at "
                        "least one, or --recipe)")
    p.add_argument("--mask", metavar="MASK.png", help="flexible region: white may change, black stays; any size")
    p.add_argument("--steps", type=int, default=None, help="maximum optimisation steps (default: 300)")
    recommended = _default_model_defaults()
    for flag, field, what, generic in MODEL_DEFAULTED:
        help_text = _model_default_help(field, what, generic, recommended)
        if field == "subpixel":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif field in ("tracking", "w_mode"):
            p.add_argument(flag, choices=("l1", "l2") if field == "tracking" else ("w", "w+"), help=help_text)
        else:
            kind = float if field in ("lr", "r1", "lambda_mask", "stop_distance") else int
            metavar = {"feature_res": "RES", "track_res": "RES", "track_patch": "K"}.get(field)
            p.add_argument(flag, type=kind, metavar=metavar, help=help_text)
    p.add_argument("--compat", choices=("ours", "official"),
                   help="'official' reproduces the official code's choices for every setting above "
                        "(default: ours)")
    p.add_argument("--out", "-o", required=True, metavar="OUT.png", help="edited image")
    p.add_argument("--scale", type=positive_int, default=None, metavar="N",
                   help="enlarge the written PNG and GIF N times, nearest neighbour; coordinates stay model "
                        f"pixels (default: 1 for the PNG; the GIF is enlarged to at least {GIF_MIN_SIDE} px)")
    p.add_argument("--gif", metavar="OUT.gif", help="animated trajectory, handles red, targets blue")
    p.add_argument("--gif-every", type=positive_int, default=1, metavar="K", help="one GIF frame every K steps")
    p.add_argument("--gif-markers", action=argparse.BooleanOptionalAction, default=True,
                   help="draw handle and target markers on the GIF (default: on)")
    p.add_argument("--save-latent", metavar="OUT.npy", help="final W+ latent")
    p.add_argument("--save-recipe", metavar="RECIPE.json",
                   help="write this edit as a recipe that `drag --recipe` replays")
    p.add_argument("--log", metavar="OUT.json", help="steps, timing and handle trajectory as JSON")
    add_device_argument(p)
    p.set_defaults(func=run)


def _build_recipe(args) -> Recipe:
    recipe = Recipe.load(args.recipe) if args.recipe else None
    drags = [parse_drag(d) for d in args.drag]
    if recipe is None:
        if not drags:
            raise CliError("give at least one --drag HX,HY:TX,TY (or --recipe)")
        recipe = Recipe(drags=drags)
    elif drags:
        recipe.drags = drags
    check_distinct_drags(recipe.drags)
    if args.seed is not None or args.latent is not None:
        recipe.seed, recipe.latent = args.seed, args.latent
    if recipe.seed is None and recipe.latent is None:
        raise CliError("give --seed N or --latent W.npy (or a recipe with one of them)")
    if args.seed is not None and args.latent is not None:
        raise CliError("--seed and --latent are mutually exclusive")
    if args.psi is not None:
        recipe.psi = args.psi
    if args.mask is not None:
        recipe.mask = args.mask
    if args.steps is not None:
        if args.steps < 0:
            raise CliError("--steps must be >= 0")
        recipe.steps = args.steps
    for flag, key in [("lr", "lr"), ("r1", "r1"), ("r2", "r2"), ("lambda_mask", "lambda_mask"),
                      ("tracking", "tracking"), ("w_mode", "w_mode"), ("feature_block", "feature_res"),
                      ("stop_distance", "stop_distance"), ("compat", "compat"), ("track_block", "track_res"),
                      ("track_patch", "track_patch"), ("subpixel", "subpixel")]:
        value = getattr(args, flag)
        if value is not None:
            recipe.settings[key] = value
    if args.model is not None:
        recipe.model = args.model
    return recipe


def check_distinct_drags(drags) -> None:
    """A pair given twice, or one handle with two targets, is a mistake: say so instead of running it."""
    from .drag import as_point  # the session stores points rounded like this
    pairs, targets_of = set(), {}
    for hx, hy, tx, ty in drags:
        handle, target = as_point(hx, hy), as_point(tx, ty)
        text = f"{handle[0]},{handle[1]}:{target[0]},{target[1]}"
        if (handle, target) in pairs:
            raise CliError(f"drag pair {text} is given twice")
        if handle in targets_of:
            other = targets_of[handle]
            raise CliError(f"handle {handle[0]},{handle[1]} has two targets ({other[0]},{other[1]} and "
                           f"{target[0]},{target[1]}); give each handle once")
        pairs.add((handle, target))
        targets_of[handle] = target


def load_mask(path: str | Path) -> np.ndarray:
    """PNG (any mode, any size) -> float32 HxW in [0, 1]; white = flexible."""
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = MAX_MASK_PIXELS
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_MASK_PIXELS:
                raise CliError(f"{path}: mask is {im.width}x{im.height}, too large")
            if "A" in im.getbands() and im.mode != "LA":
                alpha = np.asarray(im.getchannel("A"), dtype=np.float32) / 255
                gray = np.asarray(im.convert("L"), dtype=np.float32) / 255
                return gray * alpha
            return np.asarray(im.convert("L"), dtype=np.float32) / 255
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CliError(f"{path}: mask image is too large (decompression bomb?)") from None
    except (OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CliError(f"{path}: not a readable image ({e})") from None


MARKER_COLOURS = (HANDLE_RGB, TARGET_RGB, LINE_RGB)


def draw_markers(image, handles, targets, scale: int):
    """Draw each handle (red), its target (blue) and the line between them on an enlarged frame.

    The frame becomes a palette image whose last entries are the marker colours: a GIF encoder
    choosing the palette itself would merge the few marker pixels into nearby face colours.
    """
    from PIL import ImageDraw
    framed = image.convert("RGB").quantize(colors=256 - len(MARKER_COLOURS))
    palette = framed.getpalette()[:3 * (256 - len(MARKER_COLOURS))]
    palette += [0] * (3 * (256 - len(MARKER_COLOURS)) - len(palette))
    framed.putpalette(palette + [c for rgb in MARKER_COLOURS for c in rgb])
    handle_ink, target_ink, line_ink = range(256 - len(MARKER_COLOURS), 256)
    draw = ImageDraw.Draw(framed)
    radius = max(2.5, 1.1 * scale)

    def centre(p):  # model pixel centres are at integers; model pixel x covers [x, x + 1) * scale
        return ((p[0] + 0.5) * scale, (p[1] + 0.5) * scale)

    for handle, target in zip(handles, targets):
        draw.line([centre(handle), centre(target)], fill=line_ink, width=max(1, round(scale / 2)))
    for points, ink in ((targets, target_ink), (handles, handle_ink)):
        for p in points:
            x, y = centre(p)
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=ink, outline=line_ink,
                         width=max(1, scale // 4))
    return framed


def save_gif(path, frames, targets, scale: int, markers: bool = True) -> None:
    """frames: [(HxWx3 uint8, handles at that frame)]; the last frame is held longer."""
    images = []
    for image, handles in frames:
        pil = enlarge(image, scale)
        images.append(draw_markers(pil, handles, targets, scale) if markers else pil)
    durations = [GIF_FRAME_MS] * len(images)
    durations[-1] = GIF_LAST_FRAME_MS
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)


def recipe_to_save(recipe: Recipe, model_path: Path, resolved_config) -> Recipe:
    """The edit as run, every setting spelled out (the model's recommendations may change later).

    A model from the bundled models folder is named by file name (found there on replay, from any
    folder); another model by its absolute path.
    """
    from .cli import DEFAULT_MODEL
    from .drag import DragConfig
    model_path = model_path.resolve()
    bundled = model_path.parent == DEFAULT_MODEL.parent.resolve()
    plain = DragConfig()
    settings = {}
    for f in dataclasses.fields(DragConfig):
        if f.name in ("max_steps", "display_every"):  # steps is its own key; frames do not change the edit
            continue
        value = getattr(resolved_config, f.name)
        if value is not None and (getattr(plain, f.name) is None or value != getattr(plain, f.name)):
            settings[f.name] = value
    return dataclasses.replace(recipe, model=model_path.name if bundled else str(model_path), settings=settings)


def run(args) -> int:
    from tqdm import tqdm

    from .drag import DragSession
    from .latents import load_latent, save_latent, seed_to_w
    from .models import drag_defaults_of

    check_outputs(("--out", args.out, "image"), ("--gif", args.gif, "animation"),
                  ("--save-latent", args.save_latent, "file"), ("--save-recipe", args.save_recipe, "file"),
                  ("--log", args.log, "file"))
    recipe = _build_recipe(args)
    mask = load_mask(recipe.mask) if recipe.mask else None
    model_path = resolve_model_path(recipe.model)
    G = load_model(model_path, device=args.device)
    resolution = G.img_resolution
    png_scale = args.scale or 1
    gif_scale = args.scale or max(1, GIF_MIN_SIDE // resolution)
    check_scale(max(png_scale, gif_scale if args.gif else 1), resolution)
    w = load_latent(recipe.latent, G) if recipe.latent else seed_to_w(G, recipe.seed, psi=recipe.psi)
    defaults = drag_defaults_of(model_path)
    config = recipe.config(display_every=args.gif_every if args.gif else 0)
    session = DragSession(G, w, config, model_defaults=defaults)
    for hx, hy, tx, ty in recipe.drags:
        session.add_pair((hx, hy), (tx, ty))
    if mask is not None:
        session.set_mask(mask)
    resolved = config.resolve(G, len(session.pairs), defaults)  # also rejects bad settings before the run

    frames = [(session.render(), [p.handle for p in session.pairs])] if args.gif else []
    history = []
    t0 = time.perf_counter()
    last = None
    with tqdm(total=recipe.steps, desc="drag", unit="step", file=sys.stderr, leave=False,
              disable=not sys.stderr.isatty()) as bar:
        for result in session.run(max_steps=recipe.steps):
            history.append({"step": result.step, "handles": [list(h) for h in result.handles],
                            "loss": result.loss})
            if result.image is not None and args.gif:
                frames.append((result.image, result.handles))
            bar.n = result.step
            bar.set_postfix_str("dist " + " ".join(f"{d:.1f}" for d in result.distances))
            last = result
    seconds = time.perf_counter() - t0
    image = last.image if last.image is not None else session.render()
    enlarge(image, png_scale).save(args.out)
    written = [args.out]
    if args.gif:
        save_gif(args.gif, frames, last.targets, gif_scale, markers=args.gif_markers)
        written.append(args.gif)
    if args.save_latent:
        written.append(str(save_latent(args.save_latent, session.latent)))
    if args.save_recipe:
        written.append(str(recipe_to_save(recipe, model_path, resolved).save(args.save_recipe)))
    if args.log:
        log = {"steps": session.step_count, "reached": bool(last.reached), "seconds": seconds,
               "handles": [list(h) for h in last.handles], "targets": [list(t) for t in last.targets],
               "distances": last.distances, "history": history}
        Path(args.log).write_text(json.dumps(log))
        written.append(args.log)
    state = "reached" if last.reached else "did not reach"
    print(f"{state} the target{'s' if len(last.handles) > 1 else ''} in {session.step_count} steps "
          f"({seconds:.2f} s); final distances " + ", ".join(f"{d:.1f}" for d in last.distances) + " px")
    print("wrote " + ", ".join(written))
    return 0


__all__ = ["CliError", "add_parser", "check_distinct_drags", "load_mask", "run", "save_gif"]
