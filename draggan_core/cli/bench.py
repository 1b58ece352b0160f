"""Benchmark: an official-style drag step against ours, same weights, same run.

    python -m draggan_core bench [--config ffhq512|embedded|PATH] [--steps 20] [--mask] [--json]

Baseline ("official-style"): what the official code does every step: the whole generator forward
(image included) with gradients enabled on the weights, the b128 (6th block) features bilinearly
up-sampled to image size, L2 tracking and the motion loss on that map, backward through everything.
Ours: the same math (`--compat official`: same disc, same up-sampled-map sampling, same tracking), but
the forward stops at the feature block, features are computed only in windows around the handles
when there is no mask (exact), and no weight gradients are computed. Same settings in both
(lr 1e-3, r1 3, r2 12), so the handle trajectories must agree; `max_dev_px` checks it.
Our default formulation (native-grid sampling, exact disc, L1 tracking) is timed too
(`ours_default_step_s`); its trajectory differs by design. No image is rendered in timed steps.

Progress goes to stderr (a line per phase, a bar on a terminal; neither with --quiet); with --json
stdout holds only the JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..edit.session import DragSession
from ..edit.settings import DragConfig
from ..model.devices import add_device_argument, describe
from ..model.networks import Generator, GeneratorConfig
from .program import add_quiet_argument


def _ffhq512() -> GeneratorConfig:
    # stylegan2-ada-pytorch FFHQ 512 shape (paper config with cbase 32768, 8 mapping layers)
    return GeneratorConfig(z_dim=512, w_dim=512, img_resolution=512, mapping_layers=8, channel_base=32768,
                           channel_max=512, conv_clamp=256)


def _load(config: str, device="cpu") -> tuple[Generator, str]:
    if config == "ffhq512":
        torch.manual_seed(0)
        return Generator(_ffhq512()).to(device), "FFHQ-512-shaped StyleGAN2, random weights (seed 0)"
    if config == "embedded":
        from ..model.store import default_model_path
        config = str(default_model_path())
        if not Path(config).is_file():
            raise FileNotFoundError(f"{config}: the embedded model is missing")
    from ..model.checkpoints import load_generator
    return load_generator(config, device=device), config


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _OfficialStyleStep:
    """Times what one official step costs: full forward + image, grads on weights, upsampled features."""

    def __init__(self, G: Generator, session: DragSession):
        self.G, self.s = G, session

    def __enter__(self):
        self.G.requires_grad_(True)
        original = self.s.G.synthesis.forward
        synthesis = self.s.G.synthesis

        def full_forward(ws, noise_mode="const", fused=None, feature_res=None, stop_at_feature=False):
            if feature_res is None:  # display rendering, not part of a step
                return original(ws, noise_mode=noise_mode, fused=fused)
            # NVIDIA's networks use the fused (grouped) modulated conv at batch 1 in eval mode
            img, feat = original(ws, noise_mode=noise_mode, feature_res=feature_res)
            self.last_image = img  # the official step always produces the image
            return img, feat

        synthesis.forward = full_forward
        self._restore = lambda: setattr(synthesis, "forward", original)
        return self

    def __exit__(self, *exc):
        self._restore()
        self.G.requires_grad_(False)
        self.G.zero_grad(set_to_none=True)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


PHASE_LABELS = {"ours": "ours (same math)", "default": "ours (default formulation)", "baseline": "official-style"}


def run_bench(config="ffhq512", steps=20, mask=False, threads=None, log=print,
              progress: Callable[[str], None] | None = _stderr, device="cpu") -> dict:
    """`log` receives the results, `progress` what is being done (None: silent)."""
    say = progress or (lambda message: None)
    if threads:
        torch.set_num_threads(threads)
    say(f"loading {config} ...")
    G, desc = _load(config, device)
    res = G.img_resolution
    rng = np.random.RandomState(0)
    z = torch.from_numpy(rng.randn(1, G.z_dim)).float().to(device)
    with torch.no_grad():
        w = G.mapping(z, truncation_psi=0.7)
    handle = (round(res * 0.45), round(res * 0.55))
    target = (round(res * 0.52), round(res * 0.62))
    feature_res = G.synthesis.block_resolutions[min(5, len(G.synthesis.block_resolutions) - 1)]
    settings = dict(lr=1e-3, r1=3, r2=12, feature_res=feature_res, display_every=0, stop_distance=0.5)
    flex = None
    if mask:
        flex = np.zeros((res, res), np.float32)
        flex[res // 4: 3 * res // 4, res // 4: 3 * res // 4] = 1

    def session(compat, windowed=True):
        s = DragSession(G, w, DragConfig(compat=compat, tracking="l2" if compat == "official" else "l1",
                                         windowed=windowed, **settings))
        s.add_pair(handle, target)
        s.set_mask(flex)
        return s

    log(f"machine: {_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"device {describe(torch.device(device))}")
    log(f"model: {desc}; {res}px, feature block b{feature_res}, {steps} steps, mask={'yes' if mask else 'no'}")
    results = {}
    for name in ("ours", "default", "baseline"):
        s = session("ours" if name == "default" else "official", windowed=name != "baseline")
        if name == "baseline":
            ctx = _OfficialStyleStep(G, s)
        else:
            ctx = contextlib.nullcontext()
        say(f"timing {PHASE_LABELS[name]}: {steps} steps ...")
        with ctx, tqdm(total=steps, desc=PHASE_LABELS[name], unit="step", file=sys.stderr, leave=False,
                       disable=progress is None or not sys.stderr.isatty()) as bar:
            handles, times = [], []
            gen = s.run(max_steps=steps)
            for r in gen:
                handles.append(r.handles[0])
                times.append(r.seconds)
                bar.n = min(r.step, steps)
                bar.refresh()
            # the first step includes one-time setup (reference features, kernel selection)
            step_s = float(np.median(times[1:steps])) if steps > 1 else times[0]
        results[name] = dict(step_s=step_s, handles=handles, peak_rss_mb=_peak_rss_mb())
        label = PHASE_LABELS[name]
        log(f"{label:27s}: {step_s * 1000:8.1f} ms/step ({1 / step_s:6.2f} steps/s), peak RSS so far "
            f"{results[name]['peak_rss_mb']:.0f} MB, handle {handles[0]} -> {handles[-1]}")
    n = min(len(results["ours"]["handles"]), len(results["baseline"]["handles"]))
    dev = max(float(np.hypot(a[0] - b[0], a[1] - b[1]))
              for a, b in zip(results["ours"]["handles"][:n], results["baseline"]["handles"][:n]))
    summary = dict(config=config, mask=mask, steps=steps, baseline_step_s=results["baseline"]["step_s"],
                   ours_step_s=results["ours"]["step_s"], ours_default_step_s=results["default"]["step_s"],
                   speedup=results["baseline"]["step_s"] / results["ours"]["step_s"],
                   peak_rss_mb=results["ours"]["peak_rss_mb"], baseline_peak_rss_mb=results["baseline"]["peak_rss_mb"],
                   max_dev_px=dev, cpu=_cpu_name(), threads=torch.get_num_threads(),
                   device=describe(torch.device(device)))
    log(f"speedup {summary['speedup']:.1f}x, max handle deviation {dev:.2f} px, "
        f"peak RSS ours {summary['peak_rss_mb']:.0f} MB (process incl. baseline {summary['baseline_peak_rss_mb']:.0f} MB)")
    return summary


def add_parser(subparsers):
    p = subparsers.add_parser("bench", help="benchmark our drag step against an official-style step",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="ffhq512", help="ffhq512 (random weights), embedded, or a checkpoint path")
    p.add_argument("--steps", type=int, default=20, help="timed steps per phase (the median is reported)")
    p.add_argument("--mask", action="store_true", help="benchmark the masked case (full feature map)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads, kept for the whole run (default: all cores, one fewer while other processes keep the CPU busy; see DRAGGAN_THREAD_POLICY)")
    add_device_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    add_quiet_argument(p)
    p.set_defaults(func=_main)


def _main(args) -> int:
    summary = run_bench(args.config, args.steps, args.mask, args.threads, device=args.device,
                        progress=None if args.quiet else _stderr,
                        log=lambda m: print(m, file=sys.stderr if args.json else sys.stdout))
    if args.json:
        print(json.dumps(summary))
    return 0
