"""How much does a cheap preview frame differ from the exact render? (docs/benchmarks.md, "Preview frames")

    OMP_NUM_THREADS=1 python scripts/preview_quality.py [--seeds 200] [--drag-seeds 4] [--drag-steps 80] [--bf16 20]

The skip generator's running RGB image after block R/2 (`G.synthesis(ws, image_res=R // 2)`) is what
intermediate preview frames of large models show (draggan_core/edit/frames.py). For each trained
embedded model (or --model PATH) this prints the PSNR (uint8 images, peak 255; mean and worst over seeds, psi 0.7,
seeds >= 10000) of
  - the R/2 image up-sampled to R against the full render: `preview` is what the frames show
    (frames.preview_image: bicubic plus the last ToRGB bias), then plain FIR (the generator's own
    filter), bilinear, bicubic (antialias) and nearest;
  - the R/2 image (as it is, and plus the last ToRGB bias) against the full render down-sampled to
    R/2 (area): "does the preview look like the final image shown small";
  - the full render taken to R/2 (area) and back up (bilinear) against itself: the most any
    half-resolution preview could reach (what the last block's detail is worth);
the same for the latents of real drag runs (model defaults, one handle/target pair per seed, latents
at several steps), and the multiply-accumulates (torch's FlopCounterMode, no timing) of a full render
and of one stopped at R/2, for the trained models and the FFHQ-512/1024 shapes (random weights).
`--bf16 N`: also the PSNR of N full renders under CPU bf16 autocast (quality only; never timed here).
`--render-time`: one forward each (after a warm-up) of the FFHQ shapes, full and stopped at R/2, 1
thread: a rough single-run ratio, not a benchmark.
Prints the machine, the command and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from draggan_core.edit.frames import preview_image  # noqa: E402
from draggan_core.edit.session import DragSession  # noqa: E402
from draggan_core.edit.settings import DragConfig  # noqa: E402
from draggan_core.model.latents import seed_to_w  # noqa: E402
from draggan_core.model.networks import Generator, GeneratorConfig  # noqa: E402
from draggan_core.model.ops import upsample2d  # noqa: E402
from draggan_core.model.paths import CHECKPOINTS_DIR  # noqa: E402
from draggan_core.model.store import ModelStore, default_model_path  # noqa: E402

MODELS = {"faces128-parts (default)": default_model_path(),
          "faces64-parts": CHECKPOINTS_DIR / "embedded-faces64-parts.safetensors",
          "faces64 (L1)": CHECKPOINTS_DIR / "embedded-faces64.safetensors"}
UPSAMPLERS = ("preview", "fir", "bilinear", "bicubic", "nearest")


def machine() -> dict:
    name, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("?", "", "x86_64"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    bf16 = sorted(f for f in flags if f in ("amx_bf16", "amx_tile", "avx512_bf16"))
    return {"cpu": name, "cores": os.cpu_count(), "bf16_flags": bf16,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def to_u8(img: torch.Tensor) -> torch.Tensor:
    """As networks.to_uint8_image, batched: [N, C, H, W] in [-1, 1] -> uint8 values as float64."""
    return (img * 127.5 + 128).clamp(0, 255).to(torch.uint8).to(torch.float64)


def psnr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per image PSNR (dB) of two [N, C, H, W] uint8-valued tensors."""
    mse = (a - b).square().flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(255.0 ** 2 / mse)).numpy()


def upsample(img: torch.Tensor, size: int, how: str, G) -> torch.Tensor:
    if how == "preview":  # what intermediate frames show: bicubic + the last ToRGB bias
        return preview_image(G, img)
    if how == "fir":  # the filter the last block itself up-samples the running image with
        return upsample2d(img, G.synthesis.block(G.img_resolution).resample_filter)
    if how == "nearest":
        return F.interpolate(img, size=(size, size), mode="nearest")
    return F.interpolate(img, size=(size, size), mode=how, align_corners=False, antialias=how == "bicubic")


def compare(G, ws: torch.Tensor) -> dict[str, np.ndarray]:
    """PSNRs per latent of ws [N, num_ws, w_dim]."""
    R = G.img_resolution
    with torch.no_grad():
        full = G.synthesis(ws)
        half = G.synthesis(ws, image_res=R // 2)
    assert half.shape[-1] == R // 2, "not a skip generator"
    ref = to_u8(full)
    out = {f"up_{how}": psnr(to_u8(upsample(half, R, how, G)), ref) for how in UPSAMPLERS}
    small = F.interpolate(full, size=(R // 2, R // 2), mode="area")
    out["half_vs_full_area"] = psnr(to_u8(half), to_u8(small))
    bias = G.synthesis.block(R).torgb.bias.view(1, -1, 1, 1)
    out["half+bias_vs_full_area"] = psnr(to_u8(half + bias), to_u8(small))
    out["bound_full_area_bilinear"] = psnr(to_u8(F.interpolate(small, size=(R, R), mode="bilinear",
                                                               align_corners=False)), ref)
    return out


def summarise(values: dict[str, np.ndarray]) -> dict[str, dict]:
    return {k: {"mean": round(float(v.mean()), 2), "min": round(float(v.min()), 2), "n": int(v.size)}
            for k, v in values.items()}


def seed_latents(G, seeds) -> torch.Tensor:
    return torch.cat([seed_to_w(G, s, psi=0.7) for s in seeds], dim=0)


def drag_latents(model, seeds, steps, record_at) -> tuple[torch.Tensor, list[int]]:
    """Latents of real drags (the model's defaults, one pair per seed), at the steps in record_at."""
    G, R = model.G, model.G.img_resolution
    rng = np.random.RandomState(0)
    latents, at = [], []
    for seed in seeds:
        s = DragSession(G, seed_to_w(G, seed, psi=0.7), DragConfig(display_every=0),
                        model_defaults=model.drag_defaults)
        hx, hy = rng.uniform(0.3 * R, 0.7 * R, size=2)
        angle = rng.uniform(0, 2 * math.pi)
        s.add_pair((hx, hy), (hx + 0.12 * R * math.cos(angle), hy + 0.12 * R * math.sin(angle)))
        seen = {}
        for r in s.run(max_steps=max(record_at)):
            if r.step in record_at or r.done:
                seen[r.step] = s.latent  # the last one (done) is the run's end, wherever it stopped
            if r.done:
                break
        latents += seen.values()
        at += seen.keys()
    return torch.cat(latents, dim=0), at


def macs(G, image_res=None) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    ws = torch.zeros(1, G.num_ws, G.w_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        G.synthesis(ws, image_res=image_res)
    return counter.get_total_flops() // 2


def ffhq(res: int) -> Generator:
    # the shapes of scripts/ui_bench.py --config ffhq512|ffhq1024 (random weights; only counted)
    return Generator(GeneratorConfig(z_dim=512, w_dim=512, img_resolution=res, mapping_layers=8,
                                     channel_base=32768, channel_max=512, conv_clamp=256))


def bf16_quality(G, seeds) -> np.ndarray:
    ws = seed_latents(G, seeds)
    with torch.no_grad():
        full = G.synthesis(ws)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = G.synthesis(ws).float()
    return psnr(to_u8(low), to_u8(full))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=200, help="seeds 10000.. per model (default: 200)")
    p.add_argument("--drag-seeds", type=int, default=4, help="drag runs per model (default: 4)")
    p.add_argument("--drag-steps", type=int, default=80, help="steps of each drag run (default: 80)")
    p.add_argument("--bf16", type=int, default=0, help="also bf16-autocast quality over this many seeds")
    p.add_argument("--render-time", action="store_true",
                   help="also time ONE forward (after a warm-up) of the FFHQ shapes, full and stopped at R/2, "
                        "1 thread: a rough ratio only")
    p.add_argument("--model", action="append", help="a checkpoint instead of the embedded models (repeatable)")
    p.add_argument("--no-flops", action="store_true", help="skip counting the FFHQ-shaped generators")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, bf16 flags: {info['bf16_flags'] or 'none'}, "
          f"torch {info['torch']}, {info['threads']} thread")
    print("command:", shlex.join(["python", "scripts/preview_quality.py", *(sys.argv[1:] if argv is None else argv)]))
    result = {"machine": info, "models": {}, "macs": {}}
    store = ModelStore()
    record_at = sorted({s for s in (1, 5, 10, 20, 40) if s < args.drag_steps} | {args.drag_steps})
    models = {Path(m).name: Path(m) for m in args.model} if args.model else MODELS
    for name, path in models.items():
        model = store.get(path)
        G, R = model.G, model.G.img_resolution
        seeds = range(10000, 10000 + args.seeds)
        row = {"resolution": R, "seeds": summarise(compare(G, seed_latents(G, seeds)))}
        if args.drag_seeds:
            ws, at = drag_latents(model, range(10000, 10000 + args.drag_seeds), args.drag_steps, record_at)
            row["drag"] = summarise(compare(G, ws))
            row["drag_steps"] = at
        if args.bf16:
            row["bf16_full"] = summarise({"bf16_vs_fp32": bf16_quality(G, range(10000, 10000 + args.bf16))})
        result["models"][name] = row
        full, half = macs(G), macs(G, R // 2)
        result["macs"][name] = {"full": full, "half": half, "ratio": round(full / half, 2)}
        print(f"\n{name} ({R} px; half image {R // 2} px)")
        for part in ("seeds", "drag", "bf16_full"):
            if part not in row:
                continue
            steps = row.get("drag_steps", [])
            label = {"seeds": f"{args.seeds} seeds, psi 0.7",
                     "drag": f"{len(steps)} drag latents (steps {sorted(set(steps))})",
                     "bf16_full": f"bf16 autocast, {args.bf16} seeds"}[part]
            print(f"  {label}:")
            for k, v in row[part].items():
                print(f"    {k:28s} mean {v['mean']:6.2f} dB   min {v['min']:6.2f} dB")
    if not args.no_flops:
        for res in (512, 1024):
            torch.manual_seed(0)
            G = ffhq(res)
            full, half = macs(G), macs(G, res // 2)
            result["macs"][f"ffhq{res} shape"] = {"full": full, "half": half, "ratio": round(full / half, 2)}
            del G
    if args.render_time:
        # one warm-up and ONE timed forward each, 1 thread: a rough ratio, not a benchmark
        import time
        for res in (512, 1024):
            torch.manual_seed(0)
            G = ffhq(res)
            ws = G.mapping(torch.randn(1, G.z_dim), truncation_psi=0.7).detach()
            seconds = {}
            for label, image_res in (("full", None), ("half", res // 2)):
                with torch.no_grad():
                    G.synthesis(ws, image_res=image_res)
                    t0 = time.perf_counter()
                    G.synthesis(ws, image_res=image_res)
                    seconds[label] = round(time.perf_counter() - t0, 3)
            seconds["ratio"] = round(seconds["full"] / seconds["half"], 2)
            result.setdefault("render_seconds_single_run_1_thread", {})[f"ffhq{res} shape"] = seconds
            print(f"ffhq{res} shape, ONE forward each, 1 thread (rough): full {seconds['full']:.2f} s, "
                  f"stopped at {res // 2}: {seconds['half']:.2f} s = {seconds['ratio']:.2f}x")
            del G
    print("\nsynthesis multiply-accumulates (FlopCounterMode; full render / stopped at R/2):")
    for name, m in result["macs"].items():
        print(f"  {name:28s} {m['full'] / 1e9:8.2f} G / {m['half'] / 1e9:8.2f} G  = {m['ratio']:.2f}x")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
