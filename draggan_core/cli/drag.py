"""`python -m draggan_core drag`: run one drag edit from the command line (or replay a recipe).

    python -m draggan_core drag --seed 3 --drag 20,44:24,40 --out edited.png --gif edit.gif --log edit.json
    python -m draggan_core drag --seed 3 --drag 20,44:24,40 --out edited.png --save-recipe edit.json
    python -m draggan_core drag --recipe edit.json --out replayed.png

A recipe holds its mask (embedded) and may hold several runs, made one after the other from the same
start (as in the web UI: drag, then drag again from the result); --recipe replays them all, in order.
Coordinates are model pixels: x = column, y = row, 0 .. R-1 for a model of resolution R (128 for the
default model), whatever --scale enlarges the written images to.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..edit.recipe import (MAX_MASK_PIXELS, EditRecorder, MaskError, Recipe, embed_mask, parse_drag, read_mask,
                           replay_runs)
from ..edit.settings import MANY_POINTS_FROM
from ..model.devices import add_device_argument
from .program import (CliError, add_model_argument, add_quiet_argument, check_outputs, check_scale, enlarge, load_model,
                      positive_int, progress_bar, resolve_model_path)

__all__ = ["CliError", "MAX_MASK_PIXELS", "add_parser", "check_distinct_drags", "load_mask", "run", "save_gif"]

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
    ("--lost-match", "lost_match", "end the run (keeping its best state) when a handle's best match differs from "
     "its feature by more than this (relative L1; 0: never)", "0"),
    ("--patience", "patience", "end the run (keeping its best state) after this many steps without progress "
     "(0: never)", "0"),
    ("--lambda-local", "lambda_local", "without a mask, weight of keeping the features far from the points", "0"),
]
# every flag that changes a run's settings: argparse destination -> DragConfig field
SETTING_FLAGS = {flag[2:].replace("-", "_"): field for flag, field, _, _ in MODEL_DEFAULTED} | {"compat": "compat"}


def _default_model_defaults() -> dict:
    from ..model.store import drag_defaults_of
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
    many = recommended.get("many_points")
    if isinstance(many, dict) and field in many:
        shown += f" ({many[field]} from {many.get('from', MANY_POINTS_FROM)} points)"
    return f"{what} (default: the model's recommended value{shown}; {generic} for a model without one)"


def add_parser(subparsers):
    p = subparsers.add_parser("drag", help="drag handle points to targets and save the edited image",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("--recipe", metavar="RECIPE.json", help="replay a JSON recipe, every run in it in order "
                   "(options given here override a one-run recipe; a recipe of several runs takes only --seed, "
                   "--latent, --psi and --model)")
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
            kind = float if field in ("lr", "r1", "lambda_mask", "stop_distance", "lost_match", "lambda_local") else int
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
                   help="write this edit as a recipe that `drag --recipe` replays (the mask embedded in it)")
    p.add_argument("--log", metavar="OUT.json", help="steps, timing and handle trajectory as JSON")
    add_device_argument(p)
    add_quiet_argument(p)
    p.set_defaults(func=run)


def _build_recipe(args) -> Recipe:
    recipe = Recipe.load(args.recipe) if args.recipe else None
    drags = [parse_drag(d) for d in args.drag]
    if recipe is None:
        if not drags:
            raise CliError("give at least one --drag HX,HY:TX,TY (or --recipe)")
        recipe = Recipe(drags=drags)
    elif len(recipe.history) > 1:
        run_flags = [f"--{name.replace('_', '-')}" for name in ("drag", "mask", "steps", *SETTING_FLAGS)
                     if getattr(args, name) not in (None, [])]
        if run_flags:
            raise CliError(f"{args.recipe} has {len(recipe.history)} runs: {', '.join(run_flags)} would change "
                           "only one of them; edit the recipe instead")
    elif drags:
        recipe.drags = drags
    for recipe_run in recipe.history:
        check_distinct_drags(recipe_run.drags)
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
    for flag, key in SETTING_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            recipe.settings[key] = value
    if args.model is not None:
        recipe.model = args.model
    return recipe


def check_distinct_drags(drags) -> None:
    """A pair given twice, or one handle with two targets, is a mistake: say so instead of running it."""
    from ..edit.settings import as_point  # the session stores points rounded like this
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
    """Mask image (any mode, any size) or a recipe's embedded mask -> float32 HxW in [0, 1]; white = flexible."""
    try:
        return read_mask(path)
    except MaskError as e:
        raise CliError(str(e)) from None


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


def save_gif(path, frames, scale: int, markers: bool = True) -> None:
    """frames: [(HxWx3 uint8, handles at that frame, their targets)]; the last frame is held longer."""
    images = []
    for image, handles, targets in frames:
        pil = enlarge(image, scale)
        images.append(draw_markers(pil, handles, targets, scale) if markers else pil)
    durations = [GIF_FRAME_MS] * len(images)
    durations[-1] = GIF_LAST_FRAME_MS
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)


def model_for_recipe(model_path: Path) -> str:
    """A model from the bundled models folder is named by file name (found there on replay, from any
    folder); another model by its absolute path."""
    from .program import DEFAULT_MODEL
    model_path = model_path.resolve()
    return model_path.name if model_path.parent == DEFAULT_MODEL.parent.resolve() else str(model_path)


def run(args) -> int:
    from ..edit.session import DragSession
    from ..edit.settings import as_point
    from ..model.latents import load_latent, save_latent, seed_to_w
    from ..model.store import drag_defaults_of

    check_outputs(("--out", args.out, "image"), ("--gif", args.gif, "animation"),
                  ("--save-latent", args.save_latent, "file"), ("--save-recipe", args.save_recipe, "file"),
                  ("--log", args.log, "file"))
    recipe = _build_recipe(args)
    runs = recipe.history
    # read (and checked) before the model loads: a bad mask costs a second
    masks = [load_mask(recipe_run.mask) if recipe_run.mask else None for recipe_run in runs]
    if args.save_recipe:  # embedded now: a mask too detailed to embed fails before the run, not after it
        for recipe_run in runs:
            try:
                recipe_run.mask = embed_mask(recipe_run.mask) if recipe_run.mask else None
            except MaskError as e:
                raise CliError(str(e)) from None
    model_path = resolve_model_path(recipe.model)
    G = load_model(model_path, device=args.device)
    resolution = G.img_resolution
    png_scale = args.scale or 1
    gif_scale = args.scale or max(1, GIF_MIN_SIDE // resolution)
    check_scale(max(png_scale, gif_scale if args.gif else 1), resolution)
    w = load_latent(recipe.latent, G) if recipe.latent else seed_to_w(G, recipe.seed, psi=recipe.psi)
    session = DragSession(G, w, model_defaults=drag_defaults_of(model_path))
    recorder = EditRecorder(model=model_for_recipe(model_path), seed=recipe.seed, latent=recipe.latent,
                            psi=recipe.psi) if args.save_recipe else None
    replay = replay_runs(session, runs, display_every=args.gif_every if args.gif else 0, recorder=recorder,
                         masks=masks)

    frames = []
    if args.gif:  # the start, with the first run's points
        first = [(as_point(hx, hy), as_point(tx, ty)) for hx, hy, tx, ty in runs[0].drags]
        frames.append((session.render(), [h for h, _ in first], [t for _, t in first]))
    history = []
    t0 = time.perf_counter()
    last = None
    budget = sum(recipe_run.steps for recipe_run in runs)
    with progress_bar(args, total=budget, desc="drag", unit="step", leave=False) as bar:
        for run_index, result in replay:  # every run's points and settings are checked before the first step
            entry = {"step": result.step, "handles": [list(h) for h in result.handles], "loss": result.loss}
            if len(runs) > 1:
                entry["run"] = run_index + 1
            history.append(entry)
            if result.image is not None and args.gif:
                frames.append((result.image, result.handles, result.targets))
            bar.n = result.step
            bar.set_postfix_str("dist " + " ".join(f"{d:.1f}" for d in result.distances))
            last = result
    seconds = time.perf_counter() - t0
    if last is None:
        raise CliError("nothing to replay: every run of the recipe was stopped before its first step")
    image = last.image if last.image is not None else session.render()
    enlarge(image, png_scale).save(args.out)
    written = [args.out]
    if args.gif:
        save_gif(args.gif, frames, gif_scale, markers=args.gif_markers)
        written.append(args.gif)
    if args.save_latent:
        written.append(str(save_latent(args.save_latent, session.latent)))
    if args.save_recipe:
        written.append(str(recorder.recipe().save(args.save_recipe)))
    if args.log:
        log = {"steps": session.step_count, "reached": bool(last.reached), "end": last.end, "message": last.message,
               "seconds": seconds,
               "handles": [list(h) for h in last.handles], "targets": [list(t) for t in last.targets],
               "distances": last.distances, "history": history}
        Path(args.log).write_text(json.dumps(log))
        written.append(args.log)
    if last.message:  # the run ended by itself (a handle lost its feature, no progress, divergence)
        print(f"did not reach the target{'s' if len(last.handles) > 1 else ''}: {last.message} ({seconds:.2f} s)")
    else:
        state = "reached" if last.reached else "did not reach"
        print(f"{state} the target{'s' if len(last.handles) > 1 else ''} in {session.step_count} steps "
              f"({seconds:.2f} s); final distances " + ", ".join(f"{d:.1f}" for d in last.distances) + " px")
    print("wrote " + ", ".join(written))
    return 0
