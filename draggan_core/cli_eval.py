"""`python -m draggan_core eval`: the paper's landmark-transfer evaluation (see draggan_core/evaluation.py).

    python -m draggan_core eval --pairs 20 --points 1 --json
    python -m draggan_core eval --pairs 20 --points 5 --split val --mask

Moves the detected landmarks of face A onto those of face B for N seeded pairs and reports the mean
distance to the targets before / after (MD, px), the reduction, seconds per edit and the image change
(KID on the landmark detector's features). `--split test` (default) uses seeds from 10000 up for
reported numbers, `--split val` seeds below 10000 for tuning. With --json the last stdout line is one
JSON object (keys md_before, md_after, reduction, seconds_per_edit, points, pairs, ...).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli import CliError, add_model_argument, add_quiet_argument, check_outputs, progress_bar, resolve_model_path
from .devices import add_device_argument
from .landmark_net import DEFAULT_DETECTOR_PATH


def add_parser(subparsers):
    p = subparsers.add_parser("eval", help="landmark-transfer evaluation (MD before/after, time, image change)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("--pairs", type=int, default=20, help="number of (A, B) seed pairs (default 20)")
    p.add_argument("--points", choices=("1", "5", "all"), default="1", help="landmarks dragged per edit")
    p.add_argument("--steps", type=int, default=300, help="maximum drag steps per edit (default 300)")
    p.add_argument("--seed", type=int, default=0, help="picks the pairs and random landmarks")
    p.add_argument("--split", choices=("val", "test"), default="test",
                   help="seed range: val = [0, 10000) for sweeps, test = [10000, 20000) for reports")
    p.add_argument("--psi", type=float, default=0.7, help="truncation psi of the seeds")
    p.add_argument("--mask", action="store_true",
                   help="also drag with a flexible-region mask and compare the change outside it")
    p.add_argument("--round-points", action="store_true",
                   help="round handles and targets to pixel centres (as clicks are) instead of sub-pixel")
    p.add_argument("--detector", metavar="PATH", default=None,
                   help="landmark detector weights (default: landmarks64.safetensors in the bundled models folder)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
    p.add_argument("--out", metavar="OUT.json", help="also write the full result (with per-pair records)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_device_argument(p)
    add_quiet_argument(p)
    p.set_defaults(func=run)


def format_report(r: dict) -> str:
    lines = [f"landmark transfer, {r['pairs']} pairs ({r['split']} split, seed {r['seed']}), points={r['points']} "
             f"(mean {r['num_points_mean']:.1f} per edit), max {r['max_steps']} steps",
             f"  MD before      {r['md_before']:7.2f} px",
             f"  MD after       {r['md_after']:7.2f} px   (re-detected; tracked handles {r['md_tracked']:.2f} px)",
             f"  reduction      {r['reduction']:7.1f} %",
             f"  time per edit  {r['seconds_per_edit']:7.2f} s    (mean {r['steps']:.0f} steps, "
             f"{100 * r['reached']:.0f}% reached)",
             f"  image change   KID-lm {r.get('kid_lm', float('nan')):.2f} x1e-3, "
             f"mean |pixel change| {r['pixel_change']:.2f}/255"]
    if "outside_change_mask" in r:
        lines += [f"  with mask      MD after {r['md_after_mask']:.2f} px ({r['reduction_mask']:.1f} %), "
                  f"{r['seconds_per_edit_mask']:.2f} s per edit",
                  f"  outside mask   mean |pixel change| {r['outside_change_nomask']:.2f} without mask, "
                  f"{r['outside_change_mask']:.2f} with mask (0..255)"]
    return "\n".join(lines)


def run(args) -> int:
    import torch

    from .checkpoints import load_generator
    from .evaluation import EvalConfig, evaluate, load_detector
    from .models import drag_defaults_of

    check_outputs(("--out", args.out, "file"))
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = EvalConfig(pairs=args.pairs, points=args.points, steps=args.steps, seed=args.seed,
                     split=args.split, psi=args.psi, mask=args.mask, round_points=args.round_points)
    try:
        cfg.check()
    except ValueError as e:
        raise CliError(str(e)) from None
    model_path = resolve_model_path(args.model)
    G = load_generator(model_path, device=args.device)
    try:
        detector = load_detector(args.detector, device=args.device)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    defaults = drag_defaults_of(Path(model_path))

    bar = progress_bar(args, total=cfg.pairs, desc="eval", unit="edit", dynamic_ncols=True)
    sums = {"b": 0.0, "a": 0.0, "n": 0}

    def progress(i, rec):
        sums["b"] += rec["md_before"]
        sums["a"] += rec["md_after"]
        sums["n"] += 1
        bar.update(1)
        bar.set_postfix_str(f"MD {sums['b'] / sums['n']:.2f}->{sums['a'] / sums['n']:.2f} px, "
                            f"last {rec['seconds']:.1f}s/{rec['steps']} steps")

    try:
        result = evaluate(G, detector, cfg, model_defaults=defaults, progress=progress)
    finally:
        bar.close()
    result["model"] = str(model_path)
    result["detector"] = str(args.detector or DEFAULT_DETECTOR_PATH)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(format_report(result))
    if args.json:
        summary = {k: v for k, v in result.items() if k not in ("per_pair", "config")}
        print(json.dumps(summary))
    return 0
