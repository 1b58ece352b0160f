"""Train the landmark detector used by the evaluation protocol (draggan_core/model/landmark_net.py).

    python -m training.landmarks --out checkpoints/landmarks64.safetensors --minutes 35

Every step renders a fresh batch of procedural faces (training.faces) with their exact landmarks and
augments it so that the detector transfers to generated images: random Gaussian blur (sigma up to
1.6 px), down/up-sampling, additive noise, brightness/contrast jitter. Loss per landmark inside the
image: L1 of the soft-argmax point + a small weight on the heatmap's expected squared distance to the
truth (keeps heatmaps peaked, so their spread is a usable confidence) + BCE on visibility.
Training faces come from seeds TRAIN_SEED_BASE + step (disjoint from the generator's training seeds,
0, 1, 2, ..., and from the held-out seeds used for evaluation). Not resumable (it is short).
At the end the held-out error on 500 renders is printed and stored in the file's metadata.
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

from draggan_core.model.landmark_net import LandmarkDetector, LandmarkNet, LandmarkNetConfig, save_detector
from training import faces

TRAIN_SEED_BASE = 20_000_000
HELD_OUT_SEED = 30_000_001
TEST_TIME_AUGMENTATION = ("mirror (left/right landmarks swapped) and 1-px shifts in the 8 directions, "
                          "points averaged over the 18 views")


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 4) -> torch.Tensor:
    """Per-sample separable Gaussian blur; sigma [N] in px (0 = identity), kernel cut at `radius` px
    (scale it with sigma to blur a larger image exactly like a smaller one)."""
    n, c, h, w = x.shape
    r = radius
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    s = sigma.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (t[None] / s) ** 2)
    k = k / k.sum(dim=1, keepdim=True)                           # [N, 2r+1]
    k = k.repeat_interleave(c, dim=0)                            # [N*C, 2r+1]
    y = x.reshape(1, n * c, h, w)
    y = F.pad(y, (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = images.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    x = images
    # down/up-sampling (generator-like softness) for a quarter of the batch
    pick = u(n) < 0.25
    if pick.any():
        small = F.interpolate(x[pick], scale_factor=0.5, mode="area")
        x = x.clone()
        x[pick] = F.interpolate(small, scale_factor=2, mode="bilinear", align_corners=False)
    sigma = torch.where(u(n) < 0.7, u(n) * 1.6, torch.zeros(n))
    x = gaussian_blur(x, sigma)
    a = 0.8 + 0.3 * u(n, 1, 1, 1)
    b = (u(n, 1, 1, 1) - 0.5) * 0.2
    x = x * a + b
    x = x + torch.randn(x.shape, generator=gen) * (u(n, 1, 1, 1) * 0.06)
    return x.clamp(-1, 1)


def losses(net, out, target, inside, visible, heat_weight=0.02):
    err = (out["points"] - target).abs().sum(-1)                    # [N, K]
    w = inside.float()
    point = (err * w).sum() / w.sum().clamp_min(1)
    gx, gy = net.grid_x, net.grid_y
    d2 = (gx - target[..., :1]).square() + (gy - target[..., 1:]).square()  # [N, K, G]
    heat = ((out["prob"] * d2).sum(-1) * w).sum() / w.sum().clamp_min(1)
    vis = F.binary_cross_entropy_with_logits(out["vis_logit"], visible.float())
    return point + heat_weight * heat + 0.1 * vis, point


@torch.no_grad()
def held_out_error(net: LandmarkNet, n: int = 500, seed: int = HELD_OUT_SEED, blur: float = 0.0,
                   flip: bool = True, shift: bool = True, resolution: int = 64) -> dict:
    """Mean / median / p95 error (px) over visible landmarks of n held-out renders (optionally blurred),
    detected with the given test-time augmentation (default: the detector's, mirror + shifts).
    resolution: render at this size (the detector down-samples to its own and scales the points
    back); errors are in pixels of the rendered size."""
    net.eval()
    batch = faces.render(faces.sample_z(n, seed), resolution=resolution)
    x = torch.from_numpy(batch.images)
    if blur > 0:
        x = gaussian_blur(x, torch.full((n,), float(blur)), radius=4 * resolution // 64)
    det = LandmarkDetector(net, flip=flip, shift=shift)(x)
    err = (det.points - torch.from_numpy(batch.landmarks)).norm(dim=-1)
    vis = torch.from_numpy(batch.visible)
    e = err[vis]
    per_lm = [(err[:, k][vis[:, k]].mean().item() if vis[:, k].any() else float("nan")) for k in range(err.shape[1])]
    vis_acc = ((det.visible > 0.5) == vis).float().mean().item()
    # the floor of the landmark-transfer protocol: were an edit perfect (landmark exactly on face B's),
    # MD after would still be |error on the edited face - error on face B|; estimated on render pairs
    vec = det.points - torch.from_numpy(batch.landmarks)
    half = n // 2
    both = vis[:half] & vis[half:2 * half]
    floor = (vec[:half] - vec[half:2 * half]).norm(dim=-1)[both].mean().item()
    return {"mean_px": e.mean().item(), "median_px": e.median().item(), "p95_px": e.quantile(0.95).item(),
            "perfect_edit_floor_px": floor,
            "max_landmark_mean_px": float(np.nanmax(per_lm)), "visibility_accuracy": vis_acc,
            "per_landmark_px": {nm: round(v, 3) for nm, v in zip(faces.LANDMARK_NAMES, per_lm)}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/landmarks64.safetensors")
    p.add_argument("--minutes", type=float, default=35.0, help="training wall-time budget")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-n", type=int, default=500)
    p.add_argument("--remeasure", default=None, metavar="PATH",
                   help="do not train: re-measure the held-out numbers of this detector file with the current "
                        "test-time augmentation and rewrite its metadata (weights unchanged)")
    p.add_argument("--measure", default=None, metavar="PATH",
                   help="do not train: print this detector's held-out numbers on renders of --resolution px "
                        "(e.g. the 64 px detector on 128 px renders, which it sees down-sampled); writes nothing")
    p.add_argument("--resolution", type=int, default=64, help="render size for --measure")
    args = p.parse_args(argv)
    if args.measure:
        torch.set_num_threads(args.threads)
        net = LandmarkDetector.load(args.measure).net
        clean = held_out_error(net, args.eval_n, resolution=args.resolution)
        blurred = held_out_error(net, args.eval_n, blur=args.resolution / 64, resolution=args.resolution)
        print(json.dumps({"resolution": args.resolution, "n": args.eval_n, "held_out_seed": HELD_OUT_SEED,
                          "blur_sigma_px": args.resolution / 64,
                          **{k: round(v, 4) for k, v in clean.items() if isinstance(v, float)},
                          "blurred_mean_px": round(blurred["mean_px"], 4)}))
        return 0
    if args.remeasure:
        return remeasure(Path(args.remeasure), args.eval_n, args.threads)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    net = LandmarkNet(LandmarkNetConfig())
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    budget = args.minutes * 60
    t_start = time.time()
    step = 0
    ema = None
    names = faces.LANDMARK_NAMES
    assert tuple(net.cfg.landmark_names) == tuple(names), "landmark order differs from training.faces"
    while True:
        elapsed = time.time() - t_start
        if elapsed >= budget or (args.max_steps is not None and step >= args.max_steps):
            break
        frac = elapsed / budget if args.max_steps is None else step / max(args.max_steps, 1)
        lr = args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        net.train()
        batch = faces.render(faces.sample_z(args.batch, TRAIN_SEED_BASE + args.seed * 1_000_000 + step))
        x = augment(torch.from_numpy(batch.images), gen)
        target = torch.from_numpy(batch.landmarks)
        inside = ((target > -0.5) & (target < 63.5)).all(-1)
        out = net(x)
        loss, point = losses(net, out, target, inside, torch.from_numpy(batch.visible))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        ema = point.item() / 2 if ema is None else 0.98 * ema + 0.02 * point.item() / 2
        if step % 50 == 0:
            print(f"step {step} {elapsed / 60:.1f} min lr {lr:.2e} loss {loss.item():.3f} "
                  f"L1/coord {ema:.3f} px", file=sys.stderr, flush=True)
    train_minutes = (time.time() - t_start) / 60
    clean = held_out_error(net, args.eval_n)
    blurred = held_out_error(net, args.eval_n, blur=1.0)
    summary = {"steps": step, "batch": args.batch, "minutes": round(train_minutes, 2), "seed": args.seed,
               **held_out_summary(clean, blurred, args.eval_n)}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_detector(net, out_path, {"training": summary, "per_landmark_px": clean["per_landmark_px"],
                                  "features": "KID-lm: mean-pooled block-4 + last trunk features (128-d)"})
    print(json.dumps(summary))
    print(f"held-out error on {args.eval_n} renders: mean {clean['mean_px']:.3f} px, median "
          f"{clean['median_px']:.3f}, p95 {clean['p95_px']:.3f}, worst landmark {clean['max_landmark_mean_px']:.3f}; "
          f"blurred (sigma 1): {blurred['mean_px']:.3f} px; wrote {out_path}", file=sys.stderr)
    return 0


def held_out_summary(clean: dict, blurred: dict, n: int) -> dict:
    return {"held_out_seed": HELD_OUT_SEED, "held_out_n": n,
            "held_out_mean_px": round(clean["mean_px"], 4), "held_out_median_px": round(clean["median_px"], 4),
            "held_out_p95_px": round(clean["p95_px"], 4),
            "perfect_edit_floor_px": round(clean["perfect_edit_floor_px"], 4),
            "held_out_blur1_mean_px": round(blurred["mean_px"], 4),
            "visibility_accuracy": round(clean["visibility_accuracy"], 4),
            "test_time_augmentation": TEST_TIME_AUGMENTATION}


def remeasure(path: Path, n: int, threads: int) -> int:
    """Rewrite a detector file's held-out numbers for the current test-time augmentation, keeping
    the weights and the training record, plus the numbers without shifts and without any augmentation."""
    torch.set_num_threads(threads)
    det = LandmarkDetector.load(path)
    training = json.loads(det.meta["training"])
    clean = held_out_error(det.net, n)
    blurred = held_out_error(det.net, n, blur=1.0)
    mirror_only = held_out_error(det.net, n, shift=False)
    single = held_out_error(det.net, n, flip=False, shift=False)
    training.update(held_out_summary(clean, blurred, n))
    training.update({"mirror_only_mean_px": round(mirror_only["mean_px"], 4),
                     "mirror_only_perfect_edit_floor_px": round(mirror_only["perfect_edit_floor_px"], 4),
                     "single_view_mean_px": round(single["mean_px"], 4),
                     "single_view_perfect_edit_floor_px": round(single["perfect_edit_floor_px"], 4)})
    extra = {k: v for k, v in det.meta.items() if k not in ("format", "config")}
    extra.update(training=training, per_landmark_px=clean["per_landmark_px"])
    save_detector(det.net, path, extra)  # the loaded fp32 weights, written back unchanged
    print(json.dumps({k: training[k] for k in ("held_out_mean_px", "perfect_edit_floor_px", "mirror_only_mean_px",
                                               "mirror_only_perfect_edit_floor_px", "single_view_mean_px")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
