"""Where a face generator's error lies: by image row, by frequency band, and by face parameter.

    python -m training.error_breakdown [--model M] [--n 200] [--json OUT.json]

On held-out z (model_metrics.HELD_OUT_SEED), G(z) is compared with render(z) at the model's resolution:
  psnr_db                 mean PSNR, as in model_metrics
  row_share               share of the squared error in each eighth of the image rows (top to bottom)
  psnr_if_rows_exact      the PSNR with the bottom 1/16 of the rows replaced by the render's
  psnr_low_band_only      the PSNR if only G's coarse image were wrong: 2x-down-sampled G up-sampled,
                          plus the render's own fine detail; psnr_high_band_only the reverse
  response                per face parameter: mean |G(z + 0.5 e_i) - G(z)| and the same for the
                          renderer (0..255, over the whole image and over the bottom strip). A
                          parameter that moves the render but not G is one G has not learned.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training import faces
from training.model_metrics import HELD_OUT_SEED, generate, psnr

STEP = 0.5        # z units: about a sixth of a parameter's range near its centre


def _down_up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)


def _bottom_strip(res: int) -> slice:
    return slice(res - res // 16, res)


def parameter_response(G, z: np.ndarray, names, base_g: torch.Tensor, base_r: torch.Tensor) -> dict[str, dict[str, float]]:
    """For each named parameter: how much G's image and the render change when it moves by STEP
    (base_g, base_r: G(z) and render(z), already computed by the caller)."""
    res = base_r.shape[-1]
    strip = _bottom_strip(res)
    out = {}
    for name in names:
        moved = z.copy()
        moved[:, faces.PARAM_NAMES.index(name)] += STEP
        dg = (generate(G, moved) - base_g).abs() * 127.5
        dr = (torch.from_numpy(faces.render(moved, resolution=res).images) - base_r).abs() * 127.5
        out[name] = {"G": float(dg.mean()), "render": float(dr.mean()),
                     "G_bottom": float(dg[:, :, strip].mean()), "render_bottom": float(dr[:, :, strip].mean())}
    return out


def breakdown(G, n: int = 200, names=None) -> dict:
    z = faces.sample_z(n, HELD_OUT_SEED)
    res = G.img_resolution
    real = torch.from_numpy(faces.render(z, resolution=res).images)
    fake = generate(G, z)
    err = ((fake - real) / 2).square().mean(dim=[0, 1, 3])                 # per row
    eighths = err.reshape(8, -1).sum(dim=1) / err.sum()
    strip = _bottom_strip(res)
    exact_bottom = fake.clone()
    exact_bottom[:, :, strip] = real[:, :, strip]
    coarse_fake, coarse_real = _down_up(fake), _down_up(real)
    k = min(n, 64)
    return {
        "resolution": res, "n": n,
        "psnr_db": psnr(fake, real),
        "row_share": [round(float(v), 4) for v in eighths],
        "psnr_if_rows_exact": {"bottom_sixteenth": psnr(exact_bottom, real)},
        "psnr_low_band_only": psnr(coarse_fake + real - coarse_real, real),
        "psnr_high_band_only": psnr(coarse_real + fake - coarse_fake, real),
        "response": parameter_response(G, z[:k], names or faces.PARAM_NAMES, fake[:k], real[:k]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="generator checkpoint (default: the embedded model)")
    p.add_argument("--n", type=int, default=200, help="held-out samples")
    p.add_argument("--json", default=None, metavar="OUT.json")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from draggan_core.model.checkpoints import load_generator
    from draggan_core.model.store import default_model_path
    model = Path(args.model) if args.model else default_model_path()
    b = breakdown(load_generator(model), args.n)
    b["model"] = str(model)
    print(f"{model}: PSNR {b['psnr_db']:.2f} dB at {b['resolution']} px; squared error by eighths of the rows "
          f"(top to bottom) {b['row_share']}; bottom 1/16 exact: {b['psnr_if_rows_exact']['bottom_sixteenth']:.2f} dB; "
          f"only the coarse image wrong: {b['psnr_low_band_only']:.2f} dB, only the fine detail wrong: "
          f"{b['psnr_high_band_only']:.2f} dB")
    print(f"{'parameter':16s} {'G':>6s} {'render':>7s} {'G bottom':>9s} {'render bottom':>14s}  (mean change, 0..255)")
    for name, r in b["response"].items():
        print(f"{name:16s} {r['G']:6.2f} {r['render']:7.2f} {r['G_bottom']:9.2f} {r['render_bottom']:14.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(b, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
