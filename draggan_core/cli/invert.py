"""`python -m draggan_core invert`: find the W+ latent of an image (so it can be dragged).

    python -m draggan_core invert --image photo.jpg --out photo_w.npy --png photo_recon.png
    python -m draggan_core drag --latent photo_w.npy --drag 20,44:24,40 --out edited.png

The image may have any size and mode; it is centre-cropped to a square and resized to the model's
resolution. Prints the reconstruction PSNR (dB, against that resized target).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..model.devices import add_device_argument
from .program import CliError, add_model_argument, add_quiet_argument, check_outputs, load_model, progress_bar


def add_parser(subparsers):
    p = subparsers.add_parser("invert", help="find the latent (W+) of an image, for dragging",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("--image", "-i", required=True, metavar="IMG", help="input image (PNG, JPEG, ...; any size)")
    p.add_argument("--out", "-o", required=True, metavar="W.npy", help="output W+ latent (float32 (1,num_ws,w_dim))")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default 150)")
    p.add_argument("--w-steps", type=int, default=None, help="of which in the single-W phase (default a quarter)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate in w_std units (default 0.1)")
    p.add_argument("--init", choices=("best_of", "avg"), default=None,
                   help="start from the best of 16 random samples (default) or from w_avg")
    p.add_argument("--pti-steps", type=int, default=0,
                   help="pivotal tuning steps (>0 also writes the tuned generator with --tuned-model)")
    p.add_argument("--tuned-model", metavar="OUT.safetensors", help="with --pti-steps: write the tuned copy of G")
    p.add_argument("--png", metavar="OUT.png", help="also write the reconstruction")
    p.add_argument("--seed", type=int, default=0, help="seed of the random start samples (default 0)")
    add_device_argument(p)
    add_quiet_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..edit.inversion import InversionConfig, invert_iter
    from ..model.latents import save_latent

    if args.steps is not None and args.steps < 0:
        raise CliError("--steps must be >= 0")
    if args.pti_steps < 0:
        raise CliError("--pti-steps must be >= 0")
    if args.tuned_model and args.pti_steps == 0:
        raise CliError("--tuned-model needs --pti-steps N (N > 0)")
    if not Path(args.image).is_file():
        raise CliError(f"{args.image}: image file not found")
    check_outputs(("--out", args.out, "file"), ("--png", args.png, "image"),
                  ("--tuned-model", args.tuned_model, "file"))
    settings = {k: v for k, v in {"steps": args.steps, "w_steps": args.w_steps, "lr": args.lr,
                                  "init": args.init, "pti_steps": args.pti_steps, "seed": args.seed}.items()
                if v is not None}
    G = load_model(args.model, device=args.device)
    events = invert_iter(G, args.image, InversionConfig(preview_every=0), **settings)  # validates first
    result = None
    with progress_bar(args, total=None, desc="invert", unit="step", leave=False) as bar:
        for ev in events:
            if bar.total is None:
                bar.reset(total=ev.total)
            bar.n = ev.step
            bar.set_postfix_str(f"{ev.phase} psnr {ev.psnr:.2f} dB")
            bar.refresh()
            if ev.done:
                result = ev.result
    written = [str(save_latent(args.out, result.w_plus))]
    if args.png:
        from PIL import Image
        out = Path(args.png)
        try:
            Image.fromarray(result.image).save(out)
        except ValueError as e:
            raise CliError(f"{out}: cannot write image ({e})") from None
        written.append(str(out))
    if args.tuned_model and result.generator is not None:
        from ..model.checkpoints import save_native
        save_native(result.generator, args.tuned_model, dtype=torch.float32)
        written.append(args.tuned_model)
    print(f"PSNR {result.psnr:.2f} dB after {len(result.history)} steps ({result.seconds:.1f} s)")
    print("wrote " + ", ".join(written))
    return 0
