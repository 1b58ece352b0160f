"""Command line interface: `python -m draggan_core <command> ...`.

Commands are registered, not hard-wired: each one is an `add_parser(subparsers)` function that
creates its sub-parser and sets `func=<handler(args) -> int>` as a default. Built-in commands are
listed in COMMANDS below; other modules add theirs either by calling `register_command` or, without
touching this file, by living in `draggan_core/cli/<name>.py` and defining `add_parser(subparsers)`
(discovered automatically: drag.py, eval.py, invert.py, bench.py). Shared helpers for such modules:
`add_model_argument`, `load_model`, `resolve_model_path`, `CliError`, `add_quiet_argument` with `progress_bar`.

Expected failures (bad files, bad arguments, network) print `error: <one line>` to stderr and exit
with code 2, never a traceback. Output paths are checked before any work (`check_outputs`): a run
never spends minutes and then fails to write. Every option's help shows its default.

Installed with pip, the same commands are the `draggan` console command (pyproject.toml).
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from pathlib import Path
from typing import Callable

import torch

from ..model.devices import DeviceError, ThreadBudget, add_device_argument, resolve_device
from ..model.store import CHECKPOINTS_DIR as DEFAULT_CHECKPOINTS_DIR
from ..model.store import default_model_path

DEFAULT_MODEL = default_model_path()
EXIT_ERROR = 2

MAX_OUTPUT_SIDE = 8192  # --scale may enlarge images up to this many pixels a side

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

class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends '(default: ...)' to every option's help that does not state its default itself.

    Flags read '(default: off)' and options without a value '(default: none)'. Options whose default
    depends on the model say so in their own help text.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.required or action.default is argparse.SUPPRESS
                or "default" in text.lower()):
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            default = "on" if action.default else "off"
        elif action.default is None or action.default == []:
            default = "none"
        else:
            default = "%(default)s"
        return f"{text} (default: {default})".lstrip()


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bar or progress messages on stderr (a bar is only ever shown when "
                             "stderr is a terminal; results and errors are printed either way)")


def progress_bar(args: argparse.Namespace, **tqdm_options):
    """A tqdm bar on stderr, drawn only when stderr is a terminal and --quiet was not given: output
    piped or redirected to a file stays free of carriage returns. Stdout is never touched."""
    from tqdm import tqdm
    shown = not getattr(args, "quiet", False) and sys.stderr.isatty()
    return tqdm(file=sys.stderr, disable=not shown, **tqdm_options)


def add_model_argument(parser: argparse.ArgumentParser, **kwargs) -> None:
    parser.add_argument("--model", "-m", default=None, metavar="PATH",
                        help=kwargs.get("help", f"generator checkpoint (NVIDIA .pkl, rosinality .pt or "
                                                f".safetensors; a bare file name is also looked up in the "
                                                f"bundled models folder); default: {_display(DEFAULT_MODEL)}"))


def resolve_model_path(arg: str | os.PathLike | None) -> Path:
    if arg is None:
        if not DEFAULT_MODEL.is_file():
            raise CliError(f"default model {_display(DEFAULT_MODEL)} does not exist yet; "
                           "pass --model PATH (or fetch one with `python -m draggan_core download NAME`)")
        return DEFAULT_MODEL
    path = Path(arg)
    if not path.is_file():
        # a bare name such as the web UI's recipes write ("model": "embedded-faces64.safetensors")
        bundled = DEFAULT_MODEL.parent / path.name
        if str(path) == path.name and bundled.is_file():
            return bundled
        raise CliError(f"{path}: model file not found")
    return path


def check_outputs(*outputs: tuple[str, str | os.PathLike | None, str]) -> None:
    """Refuse unusable output paths before any work is done.

    Each output is (flag, path or None, kind) with kind "file", "image" (a format Pillow can write)
    or "animation" (one Pillow can write with several frames). The folder must already exist and be
    writable: creating folders from a mistyped path would hide the typo.
    """
    seen: dict[Path, str] = {}
    for flag, path, kind in outputs:
        if path is None:
            continue
        path = Path(path)
        where = f"{flag} {path}"
        if path.is_dir():
            raise CliError(f"{where}: is a folder; give a file name")
        folder = path.parent
        if not folder.is_dir():
            state = "is not a folder" if folder.exists() else "does not exist"
            raise CliError(f"{where}: folder {folder} {state}")
        if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise CliError(f"{where}: not writable")
        if kind in ("image", "animation"):
            _check_image_format(where, path, animated=kind == "animation")
        key = path.resolve()
        if key in seen:
            raise CliError(f"{seen[key]} and {flag} both name {path}")
        seen[key] = flag


def _check_image_format(where: str, path: Path, animated: bool) -> None:
    from PIL import Image
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise CliError(f"{where}: cannot write '{path.suffix}' images (use .png, .jpg, .webp, ...)")
    if animated and fmt not in Image.SAVE_ALL:
        raise CliError(f"{where}: cannot write an animation as '{path.suffix}' (use .gif, .webp or .png)")


def check_scale(scale: int, resolution: int) -> None:
    if resolution * scale > MAX_OUTPUT_SIDE:
        raise CliError(f"--scale {scale} would write {resolution * scale} px images; "
                       f"at most {MAX_OUTPUT_SIDE // resolution} for this {resolution} px model")


def enlarge(image, scale: int):
    """HxW(xC) uint8 array -> PIL image enlarged `scale` times, nearest neighbour (pixels stay sharp)."""
    from PIL import Image
    pil = Image.fromarray(image)
    return pil if scale == 1 else pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def load_model(arg: str | os.PathLike | None, device: str = "cpu"):
    from ..model.checkpoints import load_generator
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
    p.add_argument("--psi", type=float, default=0.7, help="truncation psi for --seed")
    p.add_argument("--cutoff", type=int, default=None, help="truncate only the first N layers (default: all)")
    p.add_argument("--class", dest="class_idx", type=int, default=None,
                   help="class index for conditional models (one-hot label)")
    p.add_argument("--noise-mode", choices=("const", "random", "none"), default="const", help="noise inputs")
    p.add_argument("--out", "-o", required=True, metavar="OUT.png", help="output image")
    p.add_argument("--scale", type=positive_int, default=1, metavar="N",
                   help="enlarge the output image N times (nearest neighbour: pixels stay sharp)")
    p.add_argument("--raw", metavar="OUT.npy", help="also write the float32 (C,H,W) unclamped generator output")
    p.add_argument("--save-latent", metavar="W.npy", help="also write the W+ latent used (float32 (1,num_ws,w_dim))")
    add_device_argument(p)
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

    from ..model.latents import load_latent, save_latent, seed_to_w
    from ..model.networks import to_uint8_image

    check_outputs(("--out", args.out, "image"), ("--raw", args.raw, "file"),
                  ("--save-latent", args.save_latent, "file"))
    G = load_model(args.model, device=args.device)
    check_scale(args.scale, G.img_resolution)
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
    arr = to_uint8_image(img)
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    try:
        enlarge(arr, args.scale).save(out)
    except ValueError as e:  # e.g. a format that cannot hold this image mode
        raise CliError(f"{out}: cannot write image ({_one_line(e)})") from None
    written = [str(out)]
    if args.raw:
        raw = Path(args.raw)
        with open(raw, "wb") as f:
            np.save(f, img[0].detach().to("cpu", torch.float32).numpy(), allow_pickle=False)
        written.append(str(raw))
    if args.save_latent:
        written.append(str(save_latent(args.save_latent, ws)))
    print("wrote " + ", ".join(written))
    return 0


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

    from ..model.checkpoints import save_native
    out = Path(args.output)
    if out.resolve() == Path(args.input).resolve():
        raise CliError("output would overwrite the input file")
    check_outputs(("OUT", out, "file"))
    G = load_model(args.input)
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
    from ..model.checkpoints import detect_format
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
    p.add_argument("--dir", default=str(DEFAULT_CHECKPOINTS_DIR),
                   help="destination folder, created if missing (default: the bundled models folder, "
                        f"{_display(DEFAULT_CHECKPOINTS_DIR)})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_download)


def _cmd_download(args) -> int:
    from ..model.registry import download
    path = download(args.name, args.dir, progress=not args.no_progress)
    print(f"saved {path}")
    return 0


@register_command("models")
def _add_models(subparsers):
    p = subparsers.add_parser("models", help="list the local models and the known public checkpoints",
                              description="List the models in the models folder, then the download registry.")
    p.add_argument("--dir", default=str(DEFAULT_CHECKPOINTS_DIR),
                   help=f"models folder to list (default: the bundled models folder, {_display(DEFAULT_CHECKPOINTS_DIR)})")
    p.set_defaults(func=_cmd_models)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size < 10e6 else f"{size / 1e6:.0f} MB"


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the last column is not padded (it may be long)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for r in [header, *rows]:
        print("  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]).rstrip())


def _native_resolution(path: Path) -> str:
    import json

    from ..model.checkpoints import read_native_metadata
    try:
        return str(json.loads(read_native_metadata(path)["config"])["img_resolution"])
    except Exception:  # another format: the file would have to be loaded to know
        return "?"


def _cmd_models(args) -> int:
    from ..model.store import list_local_models
    from ..model.registry import list_models

    folder = Path(args.dir)
    local = list_local_models(folder)
    print(f"local models in {_display(folder)}:")
    if local:
        _print_table(("name", "res", "size", ""),
                     [(p.name, _native_resolution(p), _megabytes(p.stat().st_size),
                       "default" if p.resolve() == DEFAULT_MODEL.resolve() else "") for p in local])
    else:
        print("  (none)")
    print()
    print("downloadable (`download NAME`):")
    entries = list_models()
    sizes = []
    for e in entries:  # the registry's size when verified, else that of a downloaded copy
        copy = e.local_path(folder)
        size = e.size_bytes or (copy.stat().st_size if copy.is_file() else None)
        sizes.append(_megabytes(size) if size else "?")
    rows = [(e.name, str(e.resolution or "?"), size, "yes" if e.local_path(folder).is_file() else "-",
             e.licence or "?") for e, size in zip(entries, sizes)]
    header = ("name", "res", "size", "local", "licence")
    if all(size == "?" for size in sizes):  # nothing known: a column of '?' says nothing
        header, rows = header[:2] + header[3:], [r[:2] + r[3:] for r in rows]
    _print_table(header, rows)
    return 0


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------

def _discover_command_modules() -> None:
    """Import the command modules `draggan_core/cli/<name>.py` (every module of this package but this
    one); each may define add_parser(subparsers) for the command <name>."""
    package_dir = Path(__file__).resolve().parent
    this = __name__.rpartition(".")[2]
    for mod in sorted(pkgutil.iter_modules([str(package_dir)]), key=lambda m: m.name):
        if mod.name == this or mod.name.startswith("_"):
            continue
        name = f"{__package__ or 'draggan_core.cli'}.{mod.name}"
        try:
            module = importlib.import_module(name)
        except Exception as e:  # a broken add-on command must not take the whole CLI down
            print(f"warning: command module {name} failed to import ({_one_line(e)})", file=sys.stderr)
            continue
        add = getattr(module, "add_parser", None)
        if callable(add) and add not in COMMANDS.values():
            COMMANDS[mod.name] = add


def _program_name() -> str:
    """`draggan` when run as the installed console command, else the module form."""
    return "draggan" if Path(sys.argv[0]).name == "draggan" else "python -m draggan_core"


def build_parser() -> argparse.ArgumentParser:
    _discover_command_modules()
    parser = argparse.ArgumentParser(prog=_program_name(),
                                     description="DragGAN editor tools (StyleGAN2 generator, checkpoints, latents).")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    subparsers.required = True
    for add in COMMANDS.values():
        add(subparsers)
    for command_parser in subparsers.choices.values():  # every command shows its defaults, add-ons too
        command_parser.formatter_class = DefaultsHelpFormatter
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..model.checkpoints import CheckpointError
    from ..model.latents import LatentError
    from ..model.registry import DownloadError
    return (CliError, CheckpointError, LatentError, DownloadError, DeviceError, ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with code 2 on usage errors
    errors = _user_errors()
    try:
        if hasattr(args, "device"):  # every command that computes: auto / cpu / cuda / mps, checked up front
            args.device = resolve_device(args.device)
        if getattr(args, "threads", None):  # an explicit --threads is kept as given
            torch.set_num_threads(args.threads)
            return int(args.func(args) or 0)
        with ThreadBudget(renderer=False).run():  # all cores, fewer while other processes keep them busy
            return int(args.func(args) or 0)
    except BrokenPipeError:  # `draggan models | head`: the reader has gone, nothing to report
        try:  # so that the flush at exit does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (captured)
            pass
        return 1
    except errors as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
