"""`python -m draggan_core drag`: run one drag edit from the command line (or replay a recipe).

    python -m draggan_core drag --seed 3 --drag 20,44:24,40 --out edited.png --gif edit.gif --log edit.json
    python -m draggan_core drag --recipe recipe.json --out edited.png
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .cli import CliError, add_model_argument, load_model
from .recipe import Recipe, parse_drag

MAX_MASK_PIXELS = 64 * 1024 * 1024


def add_parser(subparsers):
    p = subparsers.add_parser("drag", help="drag handle points to targets and save the edited image",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("--recipe", metavar="RECIPE.json", help="read seed/latent/drags/settings from a JSON recipe "
                   "(command-line flags override it)")
    p.add_argument("--seed", type=int, help="random seed of the image to edit")
    p.add_argument("--latent", metavar="W.npy", help="W or W+ latent of the image to edit")
    p.add_argument("--psi", type=float, default=None, help="truncation psi for --seed (default 0.7)")
    p.add_argument("--drag", action="append", default=[], metavar="HX,HY:TX,TY",
                   help="a handle and its target in image pixels (x = column); repeat for more points")
    p.add_argument("--mask", metavar="MASK.png", help="flexible region: white may change, black stays; any size")
    p.add_argument("--steps", type=int, default=None, help="maximum optimisation steps (default 300)")
    p.add_argument("--lr", type=float)
    p.add_argument("--r1", type=float, help="motion-supervision radius in image pixels")
    p.add_argument("--r2", type=int, help="point-tracking half window in image pixels")
    p.add_argument("--lambda-mask", type=float, help="weight of the keep-outside-the-mask term (default: the model's, else 20)")
    p.add_argument("--tracking", choices=("l1", "l2"))
    p.add_argument("--w-mode", choices=("w", "w+"))
    p.add_argument("--feature-block", type=int, metavar="RES", help="synthesis block (by resolution) for features")
    p.add_argument("--stop-distance", type=float, help="a handle within this many pixels has arrived")
    p.add_argument("--track-block", type=int, metavar="RES", help="synthesis block whose features track the handles")
    p.add_argument("--track-patch", type=int, metavar="K", help="track (2K+1)^2 feature patches (0: single pixels)")
    p.add_argument("--subpixel", action=argparse.BooleanOptionalAction, default=None,
                   help="refine tracked handles below a pixel")
    p.add_argument("--compat", choices=("ours", "official"), help="'official' reproduces the official code's choices")
    p.add_argument("--out", "-o", required=True, metavar="OUT.png")
    p.add_argument("--gif", metavar="OUT.gif", help="animated trajectory")
    p.add_argument("--gif-every", type=int, default=1, metavar="K", help="one GIF frame every K steps")
    p.add_argument("--save-latent", metavar="OUT.npy", help="final W+ latent")
    p.add_argument("--log", metavar="OUT.json", help="steps, timing and handle trajectory as JSON")
    p.add_argument("--device", default="cpu")
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


def run(args) -> int:
    import torch
    from PIL import Image
    from tqdm import tqdm

    from .drag import DragSession
    from .latents import load_latent, save_latent, seed_to_w
    from .models import drag_defaults_of

    recipe = _build_recipe(args)
    G = load_model(recipe.model, device=args.device)
    w = load_latent(recipe.latent, G) if recipe.latent else seed_to_w(G, recipe.seed, psi=recipe.psi)
    defaults = drag_defaults_of(Path(recipe.model)) if recipe.model else drag_defaults_of(_default_model())
    config = recipe.config(display_every=args.gif_every if args.gif else 0)
    session = DragSession(G, w, config, model_defaults=defaults)
    for hx, hy, tx, ty in recipe.drags:
        session.add_pair((hx, hy), (tx, ty))
    if recipe.mask:
        session.set_mask(load_mask(recipe.mask))

    frames = [session.render()] if args.gif else []
    history = []
    t0 = time.perf_counter()
    last = None
    with tqdm(total=recipe.steps, desc="drag", unit="step", file=sys.stderr, leave=False,
              disable=not sys.stderr.isatty()) as bar:
        for result in session.run(max_steps=recipe.steps):
            history.append({"step": result.step, "handles": [list(h) for h in result.handles],
                            "loss": result.loss})
            if result.image is not None and args.gif:
                frames.append(result.image)
            bar.n = result.step
            bar.set_postfix_str("dist " + " ".join(f"{d:.1f}" for d in result.distances))
            last = result
    seconds = time.perf_counter() - t0
    image = last.image if last.image is not None else session.render()
    Image.fromarray(image).save(args.out)
    written = [args.out]
    if args.gif:
        scale = max(1, 256 // image.shape[0])
        pil = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
        pil[0].save(args.gif, save_all=True, append_images=pil[1:], duration=60, loop=0)
        written.append(args.gif)
    if args.save_latent:
        written.append(str(save_latent(args.save_latent, session.latent)))
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


def _default_model() -> Path:
    from .models import default_model_path
    return default_model_path()
