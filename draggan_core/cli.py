"""Command line interface: `python -m draggan_core <command> ...`.

Commands are registered, not hard-wired: each one is an `add_parser(subparsers)` function that
creates its sub-parser and sets `func=<handler(args) -> int>` as a default. Built-in commands are
listed in COMMANDS below; other modules add theirs either by calling `register_command` or, without
touching this file, by living in `draggan_core/cli_<name>.py` and defining `add_parser(subparsers)`
(discovered automatically). Shared helpers for such modules: `add_model_argument`, `load_model`,
`resolve_model_path`, `CliError`.

Expected failures (bad files, bad arguments, network) print `error: <one line>` to stderr and exit
with code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from pathlib import Path
from typing import Callable

from .models import CHECKPOINTS_DIR as DEFAULT_CHECKPOINTS_DIR
from .models import default_model_path

DEFAULT_MODEL = default_model_path()
EXIT_ERROR = 2

AddParser = Callable[[argparse._SubParsersAction], None]
COMMANDS: dict[str, AddParser] = {}


class CliError(Exception):
    """A user-facing command line error (printed as `error: <message>`)."""


def register_command(name: str):
    """Decorator: register `add_parser(subparsers)` for command `name` (later registrations win)."""
    def deco(fn: AddParser) -> AddParser:
        COMMANDS[name] = fn
        return fn
    return deco


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------

def add_model_argument(parser: argparse.ArgumentParser, **kwargs) -> None:
    parser.add_argument("--model", "-m", default=None, metavar="PATH",
                        help=kwargs.get("help", f"generator checkpoint (NVIDIA .pkl, rosinality .pt or "
                                                f".safetensors); default: {_display(DEFAULT_MODEL)}"))


def resolve_model_path(arg: str | os.PathLike | None) -> Path:
    if arg is None:
        if not DEFAULT_MODEL.is_file():
            raise CliError(f"default model {_display(DEFAULT_MODEL)} does not exist yet; "
                           "pass --model PATH (or fetch one with `python -m draggan_core download NAME`)")
        return DEFAULT_MODEL
    path = Path(arg)
    if not path.is_file():
        raise CliError(f"{path}: model file not found")
    return path


def load_model(arg: str | os.PathLike | None, device: str = "cpu"):
    from .checkpoints import load_generator
    return load_generator(resolve_model_path(arg), device=device)


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _one_line(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"{e.filename}: {e.strerror or 'no such file or directory'}"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename + ': ' if e.filename else ''}{e.strerror}"
    text = str(e).strip()
    if isinstance(e, KeyError) and len(e.args) == 1:
        text = str(e.args[0])
    lines = text.splitlines()
    return lines[0] if lines else type(e).__name__


# --------------------------------------------------------------------------------------------------
# render
# --------------------------------------------------------------------------------------------------

@register_command("render")
def _add_render(subparsers):
    p = subparsers.add_parser("render", help="render one image from a seed or a latent file",
                              description="Render an image from a seed (z -> W+ with truncation) or a W/W+ latent.")
    add_model_argument(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--seed", type=int, help="random seed (0 .. 2**32-1), as in the official code")
    src.add_argument("--latent", metavar="W.npy", help="W or W+ latent (.npy or torch .pt)")
    p.add_argument("--psi", type=float, default=0.7, help="truncation psi for --seed (default 0.7)")
    p.add_argument("--cutoff", type=int, default=None, help="truncate only the first N layers (default all)")
    p.add_argument("--class", dest="class_idx", type=int, default=None,
                   help="class index for conditional models (one-hot label)")
    p.add_argument("--noise-mode", choices=("const", "random", "none"), default="const")
    p.add_argument("--out", "-o", required=True, metavar="OUT.png", help="output image")
    p.add_argument("--raw", metavar="OUT.npy", help="also write the float32 (C,H,W) unclamped generator output")
    p.add_argument("--save-latent", metavar="W.npy", help="also write the W+ latent used (float32 (1,num_ws,w_dim))")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=_cmd_render)


def _class_vector(G, class_idx, device):
    import torch
    c_dim = G.cfg.c_dim
    if c_dim == 0:
        if class_idx is not None:
            raise CliError("--class given but this model is not conditional")
        return None
    if class_idx is None:
        raise CliError(f"this model is conditional: pass --class 0..{c_dim - 1}")
    if not 0 <= class_idx < c_dim:
        raise CliError(f"--class must be in 0..{c_dim - 1}, got {class_idx}")
    c = torch.zeros(1, c_dim, device=device)
    c[0, class_idx] = 1
    return c


def _cmd_render(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from .latents import load_latent, save_latent, seed_to_w
    from .networks import to_uint8_image

    G = load_model(args.model, device=args.device)
    if args.latent is not None:
        ws = load_latent(args.latent, G)
    else:
        if args.cutoff is not None and not 0 <= args.cutoff <= G.num_ws:
            raise CliError(f"--cutoff must be in 0..{G.num_ws}, got {args.cutoff}")
        ws = seed_to_w(G, args.seed, psi=args.psi, cutoff=args.cutoff,
                       c=_class_vector(G, args.class_idx, args.device))
    with torch.no_grad():
        img = G.synthesis(ws.to(args.device), noise_mode=args.noise_mode)
    out = Path(args.out)
    _ensure_parent(out)
    arr = to_uint8_image(img)
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    try:
        Image.fromarray(arr).save(out)
    except ValueError as e:  # e.g. unknown extension
        raise CliError(f"{out}: cannot write image ({_one_line(e)})") from None
    written = [str(out)]
    if args.raw:
        raw = Path(args.raw)
        _ensure_parent(raw)
        with open(raw, "wb") as f:
            np.save(f, img[0].detach().to("cpu", torch.float32).numpy(), allow_pickle=False)
        written.append(str(raw))
    if args.save_latent:
        written.append(str(save_latent(args.save_latent, ws)))
    print("wrote " + ", ".join(written))
    return 0


def _ensure_parent(path: Path):
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------------
# convert / info
# --------------------------------------------------------------------------------------------------

@register_command("convert")
def _add_convert(subparsers):
    p = subparsers.add_parser("convert", help="convert a checkpoint to our .safetensors format",
                              description="Load any supported checkpoint and write the native .safetensors file.")
    p.add_argument("input", metavar="IN", help="NVIDIA .pkl, rosinality .pt or .safetensors")
    p.add_argument("output", metavar="OUT.safetensors")
    p.add_argument("--fp16", action="store_true", help="store weights as float16 (half the size)")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args) -> int:
    import torch

    from .checkpoints import save_native
    G = load_model(args.input)
    out = Path(args.output)
    if out.resolve() == Path(args.input).resolve():
        raise CliError("output would overwrite the input file")
    _ensure_parent(out)
    tmp = out.with_name(out.name + ".tmp")
    try:
        save_native(G, tmp, dtype=torch.float16 if args.fp16 else torch.float32)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {'fp16' if args.fp16 else 'fp32'}, "
          f"{G.cfg.img_resolution}x{G.cfg.img_resolution}, {G.num_parameters():,} parameters)")
    return 0


@register_command("info")
def _add_info(subparsers):
    p = subparsers.add_parser("info", help="describe a checkpoint",
                              description="Print a generator's configuration and parameter count.")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="checkpoint (default: --model or the default model)")
    add_model_argument(p)
    p.set_defaults(func=_cmd_info)


def model_info(G) -> dict:
    cfg = G.cfg
    return {
        "family": cfg.family,
        "architecture": cfg.architecture,
        "resolution": cfg.img_resolution,
        "img_channels": cfg.img_channels,
        "num_ws": cfg.num_ws,
        "w_dim": cfg.w_dim,
        "z_dim": cfg.z_dim,
        "c_dim": cfg.c_dim,
        "mapping_layers": cfg.mapping_layers,
        "channels": dict(cfg.channels),
        "conv_clamp": cfg.conv_clamp,
        "use_noise": cfg.use_noise,
        "parameters": G.num_parameters(),
    }


def _cmd_info(args) -> int:
    from .checkpoints import detect_format
    if args.model_pos is not None and args.model is not None and args.model_pos != args.model:
        raise CliError("give the model either as MODEL or as --model, not both")
    path = resolve_model_path(args.model_pos if args.model_pos is not None else args.model)
    fmt = detect_format(path)
    G = load_model(path)
    info = model_info(G)
    channels = " ".join(f"b{r}:{c}" for r, c in sorted(info["channels"].items()))
    lines = [
        f"file:            {path}",
        f"format:          {fmt}",
        f"family:          {info['family']}",
        f"architecture:    {info['architecture']}",
        f"resolution:      {info['resolution']}x{info['resolution']} ({info['img_channels']} channels)",
        f"num_ws:          {info['num_ws']}",
        f"w_dim:           {info['w_dim']}",
        f"z_dim:           {info['z_dim']}",
        f"c_dim:           {info['c_dim']}",
        f"mapping layers:  {info['mapping_layers']}",
        f"channels:        {channels}",
        f"conv_clamp:      {info['conv_clamp']}",
        f"noise:           {'yes' if info['use_noise'] else 'no'}",
        f"parameters:      {info['parameters']:,}",
    ]
    print("\n".join(lines))
    return 0


# --------------------------------------------------------------------------------------------------
# download / models
# --------------------------------------------------------------------------------------------------

@register_command("download")
def _add_download(subparsers):
    p = subparsers.add_parser("download", help="download a known public checkpoint",
                              description="Download a model listed by `models` (resumable, verified).")
    p.add_argument("name", help="registry name (see `models`) or an http(s) URL")
    p.add_argument("--dir", default=str(DEFAULT_CHECKPOINTS_DIR), help="destination folder (default: repo checkpoints/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_download)


def _cmd_download(args) -> int:
    from .registry import download
    path = download(args.name, args.dir, progress=not args.no_progress)
    print(f"saved {path}")
    return 0


@register_command("models")
def _add_models(subparsers):
    p = subparsers.add_parser("models", help="list known public checkpoints",
                              description="List the download registry.")
    p.add_argument("--dir", default=str(DEFAULT_CHECKPOINTS_DIR), help="checkpoint folder to check for local copies")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args) -> int:
    from .registry import list_models
    rows = []
    for e in list_models():
        size = f"{e.size_bytes / 1e6:.0f} MB" if e.size_bytes else "?"
        local = "yes" if e.local_path(args.dir).is_file() else "-"
        rows.append((e.name, str(e.resolution or "?"), size, local, e.licence or "?"))
    header = ("name", "res", "size", "local", "licence")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, *rows]:
        print("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
    return 0


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------

def _discover_command_modules() -> None:
    """Import `draggan_core/cli_*.py` modules; each may define add_parser(subparsers)."""
    package_dir = Path(__file__).resolve().parent
    for mod in sorted(pkgutil.iter_modules([str(package_dir)]), key=lambda m: m.name):
        if not mod.name.startswith("cli_"):
            continue
        name = f"{__package__ or 'draggan_core'}.{mod.name}"
        try:
            module = importlib.import_module(name)
        except Exception as e:  # a broken add-on command must not take the whole CLI down
            print(f"warning: command module {name} failed to import ({_one_line(e)})", file=sys.stderr)
            continue
        add = getattr(module, "add_parser", None)
        if callable(add) and add not in COMMANDS.values():
            COMMANDS[mod.name[len("cli_"):]] = add


def build_parser() -> argparse.ArgumentParser:
    _discover_command_modules()
    parser = argparse.ArgumentParser(prog="python -m draggan_core",
                                     description="DragGAN editor tools (StyleGAN2 generator, checkpoints, latents).")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    subparsers.required = True
    for add in COMMANDS.values():
        add(subparsers)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoints import CheckpointError
    from .latents import LatentError
    from .registry import DownloadError
    return (CliError, CheckpointError, LatentError, DownloadError, ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with code 2 on usage errors
    errors = _user_errors()
    try:
        return int(args.func(args) or 0)
    except errors as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
