"""Model-card metrics of a face generator trained on the procedural renderer (the embedded model).

    python -m training.model_metrics [--model M] [--n 500] [--json metrics.json] [--baseline OLD.safetensors]

Held-out latents: z = faces.sample_z(n, seed) with seeds >= 10**6 (the generator trains on seeds
0, 1, 2, ... = step indices): G samples and PSNR use HELD_OUT_SEED, the reference renders for KID
use REFERENCE_SEED, so the two KID sets are independent.

  psnr_db         mean PSNR of G(z) vs render(z) (images in [0, 1], no truncation)
  parts           fraction of G samples in which each part passes `part_checks` (eyes with pupils,
                  brows, nose, mouth) and `all_parts` (all four). A part passes only if the landmark
                  detector finds its landmarks confidently (heatmap spread below SPREAD_MAX px,
                  visibility > 0.5 where applicable) AND a local contrast check holds: pupils much
                  darker than the sclera beside them, brows differ in colour from the cheek, nostrils
                  darker than the cheek, lips redder than the cheek, a mouth line darker than
                  it or teeth brighter than it (open mouths). The same check is reported for
                  reference on clean renders (should be ~1), renders blurred with sigma 2.5 px, and an
                  untrained generator (both should be ~0).
  landmark_px_vs_render  mean distance (px) between landmarks detected on G(z) and the exact
                  landmarks of render(z) (geometry fidelity of G, plus the detector's own error, which
                  is given as landmark_px_detector_on_renders)
  kid_lm          KID x1000 (landmark-detector features, draggan_core/model/landmark_net.py) between G
                  samples and renders; kid_lm_blur15 the same for renders blurred by a Gaussian of
                  sigma 1.5 px (a weaker "generator"); with --baseline also for that checkpoint.
  drag            of `--drag-edits` random 1-point edits (handle on a detected landmark, target
                  3-13 px away in a random direction, inside the image, seeds from DRAG_SEED_BASE),
                  the fraction within 2 px of the target after <= 300 steps with the engine's
                  defaults, measured with the session's tracked handle and with the re-detected
                  landmark (its displacement between the detections before and after the edit,
                  added to the handle, so the detector's per-face offset cancels).

Pixel quantities are defined at 64 px and scaled with the generator's resolution (at 128 px: blur
sigmas, target distances and the 2 px success radius double; distances are reported in the image's
own pixels). The parts check always runs at the detector's 64 px (images area down-sampled, as the
detector sees them), where its thresholds were calibrated; PSNR is at the generator's resolution.
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

from draggan_core.evaluation.face_checks import PARTS, SPREAD_MAX, TEETH_RATIO, part_checks, part_scores  # noqa: F401 (their old home)
from draggan_core.evaluation.protocol import drag_edit, kid
from draggan_core.model.landmark_net import LandmarkDetector
from training import faces
from training.landmarks import gaussian_blur

HELD_OUT_SEED = 1_000_003      # same held-out seed as training/train_embedded.py's evaluation
REFERENCE_SEED = 1_000_005
DRAG_SEED_BASE = 50_000        # latent seeds for the drag-success edits (eval splits use < 20000)
SUCCESS_PX = 2.0               # at 64 px; scaled with the resolution
BASE_RES = 64                  # the resolution the pixel constants here are defined at


# ------------------------------------------------------------------------------------------ helpers
def visibility_summary(checks: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(v.mean()) for k, v in checks.items()}


@torch.no_grad()
def generate(G, z: np.ndarray, batch: int = 50, clamp: bool = True) -> torch.Tensor:
    zt = torch.from_numpy(np.asarray(z, np.float32))
    images = torch.cat([G(c) for c in zt.split(batch)])
    return images.clamp(-1, 1) if clamp else images


def psnr(fake: torch.Tensor, real: torch.Tensor) -> float:
    mse = ((fake.clamp(-1, 1) - real) / 2).square().mean(dim=[1, 2, 3])
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


def features(detector: LandmarkDetector, images: torch.Tensor) -> np.ndarray:
    return detector(images).features.numpy()


# ------------------------------------------------------------------------------------------ drag success
def drag_success(G, detector: LandmarkDetector, n: int, model_defaults: dict | None = None, steps: int = 300,
                 seed: int = 0, psi: float = 0.7, progress=None) -> dict:
    from draggan_core.model.latents import seed_to_w
    from draggan_core.model.networks import to_uint8_image
    res = G.img_resolution
    success_px, min_px = SUCCESS_PX * res / BASE_RES, 3.0 * res / BASE_RES
    rng = np.random.default_rng([seed, DRAG_SEED_BASE])
    tracked, detected, seconds, steps_used, records = [], [], [], [], []
    for i in range(n):
        s = DRAG_SEED_BASE + int(rng.integers(0, 1_000_000))
        w = seed_to_w(G, s, psi=psi)
        with torch.no_grad():
            img = to_uint8_image(G.synthesis(w, noise_mode="const"))
        det = detector(img[None])
        visible = np.flatnonzero(det.visible[0].numpy() > 0.5)
        k = int(rng.choice(visible if len(visible) else np.arange(det.points.shape[1])))
        handle = np.clip(np.rint(det.points[0, k].numpy()), 0, res - 1)
        for _ in range(100):
            dist = rng.uniform(0.05, 0.20) * res
            ang = rng.uniform(0, 2 * math.pi)
            target = np.rint(handle + dist * np.array([math.cos(ang), math.sin(ang)]))
            if (target >= 0).all() and (target <= res - 1).all() and np.linalg.norm(target - handle) >= min_px:
                break
        out = drag_edit(G, w, [handle], [target], steps, model_defaults)
        d_tr = float(np.linalg.norm(out["handles"][0] - target))
        # where the detector finds the landmark now, corrected by its offset on the same face before
        # the edit (the detector's error on generated images is ~1 px and mostly constant per face)
        moved = detector(out["image"][None]).points[0, k].numpy() - det.points[0, k].numpy()
        d_det = float(np.linalg.norm(handle + moved - target))
        tracked.append(d_tr)
        detected.append(d_det)
        seconds.append(out["seconds"])
        steps_used.append(out["steps"])
        records.append({"seed": s, "landmark": detector.names[k], "handle": handle.tolist(),
                        "target": target.tolist(), "tracked_px": d_tr, "redetected_px": d_det,
                        "steps": out["steps"], "seconds": out["seconds"]})
        if progress:
            progress(i, records[-1])
    tracked, detected = np.array(tracked), np.array(detected)
    return {"edits": n, "success_px": success_px, "success_tracked": float((tracked <= success_px).mean()),
            "success_redetected": float((detected <= success_px).mean()),
            "final_px_tracked_mean": float(tracked.mean()), "final_px_redetected_mean": float(detected.mean()),
            "steps_mean": float(np.mean(steps_used)), "seconds_per_edit": float(np.mean(seconds)),
            "records": records}


# ------------------------------------------------------------------------------------------ main
def compute_metrics(G, detector: LandmarkDetector, n: int = 500, baseline_G=None, drag_edits: int = 50,
                    model_defaults: dict | None = None, log=print) -> dict:
    from draggan_core.model.networks import Generator
    from draggan_core.model.ops import make_fir_filter, upsample2d
    t0 = time.time()
    res = G.img_resolution
    px = res / BASE_RES  # image pixels per 64-px pixel
    z = faces.sample_z(n, HELD_OUT_SEED)
    rendered = faces.render(z, resolution=res)
    target = torch.from_numpy(rendered.images)
    reference = torch.from_numpy(faces.render(faces.sample_z(n, REFERENCE_SEED), resolution=res).images)
    fake = generate(G, z)
    ref_feat = features(detector, reference)
    m: dict = {"n": n, "resolution": res, "held_out_seed": HELD_OUT_SEED, "reference_seed": REFERENCE_SEED}
    m["psnr_db"] = psnr(fake, target)
    fake_checks, render_checks = part_checks(fake, detector), part_checks(target, detector)
    m["parts"] = visibility_summary(fake_checks)
    # the check fails some clean renders (faint brows, skin-coloured lips): also report G's pass rate on
    # the samples whose own render passes, i.e. how often G drops a part that the world did draw
    m["parts_where_render_passes"] = {k: float(fake_checks[k][render_checks[k]].mean()) if render_checks[k].any()
                                      else float("nan") for k in fake_checks}
    # geometry: landmarks detected on G(z) vs the exact landmarks of render(z) (G fidelity + detector transfer)
    vis = torch.from_numpy(rendered.visible)
    err = (detector(fake).points - torch.from_numpy(rendered.landmarks)).norm(dim=-1)
    m["landmark_px_vs_render"] = float(err[vis].mean())
    m["landmark_px_detector_on_renders"] = float(
        (detector(target).points - torch.from_numpy(rendered.landmarks)).norm(dim=-1)[vis].mean())
    log(f"PSNR {m['psnr_db']:.2f} dB; parts {m['parts']} (where the render passes: {m['parts_where_render_passes']}); landmarks on G(z) vs render(z) "
        f"{m['landmark_px_vs_render']:.2f} px (detector on renders {m['landmark_px_detector_on_renders']:.2f} px)")
    # references for the visibility check: it must pass on renders and fail on blank/blurry faces
    blurred = gaussian_blur(target, torch.full((n,), 2.5 * px), radius=round(4 * px))
    torch.manual_seed(0)
    untrained = Generator(G.cfg).eval()
    m["parts_reference"] = {"renders": visibility_summary(render_checks),
                            "renders_blur2.5": visibility_summary(part_checks(blurred, detector)),
                            "untrained_generator": visibility_summary(part_checks(generate(untrained, z), detector))}
    log(f"parts reference {m['parts_reference']}")
    m["kid_lm"], m["kid_lm_std"] = (1000 * v for v in kid(features(detector, fake), ref_feat))
    blur15 = gaussian_blur(target, torch.full((n,), 1.5 * px), radius=round(4 * px))
    m["kid_lm_blur15"], _ = (1000 * v for v in kid(features(detector, blur15), ref_feat))
    m["kid_lm_renders"], _ = (1000 * v for v in kid(features(detector, target), ref_feat))  # floor
    if baseline_G is not None:
        base = generate(baseline_G, z, clamp=False)
        while base.shape[-1] < res:  # a smaller model (the one a grown model started from): its image
            base = upsample2d(base, make_fir_filter(baseline_G.cfg.resample_filter))  # up-sampled as the skip path does
        base = base.clamp(-1, 1)
        m["baseline_psnr_db"] = psnr(base, target)
        m["kid_lm_baseline"], _ = (1000 * v for v in kid(features(detector, base), ref_feat))
        m["baseline_parts"] = visibility_summary(part_checks(base, detector))
    log(f"KID-lm x1e3: G {m['kid_lm']:.2f}, renders blurred 1.5 px {m['kid_lm_blur15']:.2f}, "
        f"renders (floor) {m['kid_lm_renders']:.2f}" + (f", baseline {m['kid_lm_baseline']:.2f}" if baseline_G else ""))
    if drag_edits > 0:
        from tqdm import tqdm
        bar = tqdm(total=drag_edits, desc="drag", unit="edit", file=sys.stderr, dynamic_ncols=True)
        m["drag"] = drag_success(G, detector, drag_edits, model_defaults, progress=lambda i, r: bar.update(1))
        bar.close()
        d = m["drag"]
        log(f"drag success (<= {d['success_px']:g} px in <= 300 steps, {d['edits']} edits): tracked "
            f"{100 * d['success_tracked']:.0f}%, re-detected {100 * d['success_redetected']:.0f}%; "
            f"{d['seconds_per_edit']:.1f} s/edit")
    m["seconds"] = time.time() - t0
    return m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="generator checkpoint (default: the embedded model)")
    p.add_argument("--n", type=int, default=500, help="held-out samples")
    p.add_argument("--baseline", default=None, metavar="PATH", help="earlier checkpoint to compare KID with")
    p.add_argument("--drag-edits", type=int, default=50, help="random 1-point edits for drag success (0: skip)")
    p.add_argument("--detector", default=None)
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the metrics here")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from draggan_core.model.checkpoints import load_generator
    from draggan_core.model.store import default_model_path, drag_defaults_of
    model = Path(args.model) if args.model else default_model_path()
    G = load_generator(model)
    detector = LandmarkDetector.load(args.detector)
    base = load_generator(args.baseline) if args.baseline else None
    m = compute_metrics(G, detector, args.n, base, args.drag_edits, drag_defaults_of(model),
                        log=lambda s: print(s, flush=True))
    m["model"] = str(model)
    summary = {k: v for k, v in m.items() if k != "drag"}
    if "drag" in m:
        summary["drag"] = {k: v for k, v in m["drag"].items() if k != "records"}
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(m, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
