"""Inversion quality: PSNR / SSIM of reconstructions, time per image, and drag success after inversion.

    python -m training.inversion_metrics [--model M] [--n 20] [--drag-n 10] [--steps 150] [--json]

  (a) generated: images G(seed_to_w(seed, psi 0.7)), seeds 10**6 .. 10**6 + n - 1 (known latents;
      also reports the W+ distance to the true latent in w_std units);
  (b) renderer: held-out renderer images render(sample_z(n, seed=10**6 + 7)) (the embedded model's
      "real photos": never seen in training, which uses seeds = step indices);
  (c) drag after inversion: invert a renderer image, drag one ground-truth landmark (from
      faces.render) 5-8 px in a random direction with DragSession defaults (model's drag_defaults),
      <= 300 steps; success = the tracked handle ends within 2 px of the target. Pixel lengths are
      at 64 px and scale with the model's resolution (128 px: 10-16 px, within 4 px).
Targets: generated PSNR >= 30 dB, renderer PSNR >= 24 dB, < 60 s per image.
SSIM: Gaussian window 11, sigma 1.5, on [0, 255] per RGB channel, K1 = 0.01, K2 = 0.03, valid region
(no padding), mean over pixels and channels (Wang et al. 2004).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TARGETS = {"generated_psnr": 30.0, "renderer_psnr": 24.0, "seconds": 60.0}
GEN_SEED0 = 10 ** 6
RENDER_SEED = 10 ** 6 + 7
DRAG_SEED = 10 ** 6 + 11


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM of two HxWxC (or HxW) images in 0..255 (uint8 or float), mean over channels."""
    x = torch.as_tensor(np.asarray(a, dtype=np.float64))
    y = torch.as_tensor(np.asarray(b, dtype=np.float64))
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    x, y = x.permute(2, 0, 1)[:, None], y.permute(2, 0, 1)[:, None]  # [C,1,H,W]
    if min(x.shape[-2:]) < size:
        raise ValueError(f"images must be at least {size}x{size}")
    w = _gaussian_window(size, sigma)[None, None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mu_x ** 2
    syy = F.conv2d(y * y, w) - mu_y ** 2
    sxy = F.conv2d(x * y, w) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * math.log10(255.0 ** 2 / max(mse, 1e-12)))


def _stats(values):
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def evaluate_reconstruction(G, images, settings: dict, true_w=None, log=None) -> dict:
    from draggan_core.edit.inversion import invert, w_statistics
    _, w_std = w_statistics(G)
    ps, ss, secs, cpu, wdist = [], [], [], [], []
    for i, img in enumerate(images):
        t0, c0 = time.perf_counter(), time.process_time()
        res = invert(G, img, **settings)
        secs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # wall time is inflated when the CPU is shared
        ps.append(psnr(res.image, res.target))
        ss.append(ssim(res.image, res.target))
        if true_w is not None:
            wdist.append(float((res.w_plus - true_w[i]).square().mean().sqrt()) / w_std)
        if log:
            log(f"  {i + 1}/{len(images)}: PSNR {ps[-1]:.2f} dB, SSIM {ss[-1]:.4f}, {secs[-1]:.1f} s "
                f"({cpu[-1]:.1f} s CPU)")
    out = {"n": len(images), "psnr": _stats(ps), "ssim": _stats(ss), "seconds": _stats(secs), "cpu_seconds": _stats(cpu)}
    if wdist:
        out["w_rms_distance_in_w_std"] = _stats(wdist)
    return out


def evaluate_drag(G, n: int, settings: dict, model_defaults: dict, steps: int = 300, log=None) -> dict:
    from draggan_core.edit.settings import DragConfig
    from draggan_core.edit.session import DragSession
    from draggan_core.edit.inversion import invert
    from training import faces
    z = faces.sample_z(n, seed=DRAG_SEED)
    batch = faces.render(z, resolution=G.img_resolution)
    images = faces.to_uint8(batch.images)
    rng = np.random.default_rng(DRAG_SEED)
    res_px = G.img_resolution
    px = res_px / 64  # image pixels per 64-px pixel: the protocol's lengths are defined at 64 px
    hits, dists, steps_used, secs, psnrs = [], [], [], [], []
    for i in range(n):
        inv = invert(G, images[i], **settings)
        psnrs.append(inv.psnr)
        vis = np.flatnonzero(batch.visible[i])
        k = int(rng.choice(vis))
        handle = batch.landmarks[i, k].astype(np.float64)
        for _ in range(100):
            angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(5 * px, 8 * px)
            target = handle + length * np.array([math.cos(angle), math.sin(angle)])
            if np.all(target >= 2 * px) and np.all(target <= res_px - 1 - 2 * px):
                break
        session = DragSession(G, inv.w_plus, DragConfig(max_steps=steps, display_every=0),
                              model_defaults=model_defaults)
        session.add_pair(tuple(handle), tuple(target))
        t0 = time.perf_counter()
        last = None
        for last in session.run(max_steps=steps):
            pass
        secs.append(time.perf_counter() - t0)
        d = float(last.distances[0])
        dists.append(d)
        steps_used.append(session.step_count)
        hits.append(d <= 2.0 * px)
        if log:
            log(f"  drag {i + 1}/{n}: {faces.LANDMARK_NAMES[k]} inv PSNR {inv.psnr:.2f} dB, final distance "
                f"{d:.2f} px after {session.step_count} steps ({secs[-1]:.1f} s)")
    return {"n": n, "success_px": 2.0 * px, "success_rate": float(np.mean(hits)), "final_distance": _stats(dists),
            "steps": _stats(steps_used), "drag_seconds": _stats(secs), "inversion_psnr": _stats(psnrs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded faces model)")
    p.add_argument("--n", type=int, default=20, help="images per set (default 20)")
    p.add_argument("--drag-n", type=int, default=None, help="drag trials (default: n)")
    p.add_argument("--steps", type=int, default=None, help="inversion steps (default: the module default)")
    p.add_argument("--pti-steps", type=int, default=0)
    p.add_argument("--skip", action="append", default=[], choices=("generated", "renderer", "drag"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from draggan_core.model.checkpoints import load_generator
    from draggan_core.model.latents import seed_to_w
    from draggan_core.model.store import default_model_path, drag_defaults_of
    from draggan_core.model.networks import to_uint8_image
    from training import faces

    path = Path(args.model) if args.model else default_model_path()
    G = load_generator(path)
    settings = {"pti_steps": args.pti_steps}
    if args.steps is not None:
        settings["steps"] = args.steps
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    report = {"model": str(path), "settings": settings, "targets": TARGETS, "torch_threads": args.threads}

    if "generated" not in args.skip:
        log("generated images (seeds >= 10**6, psi 0.7)")
        ws = [seed_to_w(G, GEN_SEED0 + i, psi=0.7) for i in range(args.n)]
        with torch.no_grad():
            imgs = [to_uint8_image(G.synthesis(w, noise_mode="const")) for w in ws]
        report["generated"] = evaluate_reconstruction(G, imgs, settings, true_w=ws, log=log)
    if "renderer" not in args.skip:
        if G.img_resolution not in (64, 128) or G.cfg.img_channels != 3:
            log("renderer set skipped: the model is not a 64 or 128 px RGB model")
        else:
            log("held-out renderer images")
            imgs = list(faces.to_uint8(faces.render(faces.sample_z(args.n, seed=RENDER_SEED),
                                                    resolution=G.img_resolution).images))
            report["renderer"] = evaluate_reconstruction(G, imgs, settings, log=log)
    if "drag" not in args.skip and G.img_resolution in (64, 128):
        log("drag after inversion")
        report["drag"] = evaluate_drag(G, args.drag_n if args.drag_n is not None else args.n, settings,
                                       drag_defaults_of(path), log=log)

    met = {}
    if "generated" in report:
        met["generated_psnr"] = report["generated"]["psnr"]["mean"] >= TARGETS["generated_psnr"]
    if "renderer" in report:
        met["renderer_psnr"] = report["renderer"]["psnr"]["mean"] >= TARGETS["renderer_psnr"]
    times = [report[k]["seconds"]["max"] for k in ("generated", "renderer") if k in report]
    if times:
        met["seconds"] = max(times) < TARGETS["seconds"]
    report["targets_met"] = met

    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"model {path}")
    for key in ("generated", "renderer"):
        if key in report:
            r = report[key]
            extra = (f", W+ distance to truth {r['w_rms_distance_in_w_std']['mean']:.3f} w_std"
                     if "w_rms_distance_in_w_std" in r else "")
            print(f"{key:9s}: PSNR {r['psnr']['mean']:.2f} dB (min {r['psnr']['min']:.2f}), SSIM "
                  f"{r['ssim']['mean']:.4f}, {r['seconds']['mean']:.1f} s/image (max {r['seconds']['max']:.1f}; "
                  f"{r['cpu_seconds']['mean']:.1f} s CPU){extra}")
    if "drag" in report:
        d = report["drag"]
        print(f"drag     : {100 * d['success_rate']:.0f}% of {d['n']} reach <= {d['success_px']:g} px in <= 300 steps; "
              f"final distance mean {d['final_distance']['mean']:.2f} px, {d['drag_seconds']['mean']:.1f} s/drag")
    print("targets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
