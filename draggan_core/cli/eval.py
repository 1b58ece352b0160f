"""`python -m draggan_core eval`: the paper's landmark-transfer evaluation (see draggan_core/evaluation/protocol.py).

    python -m draggan_core eval --pairs 20 --points 1 --json
    python -m draggan_core eval --pairs 20 --points 5 --split val --mask

Moves the detected landmarks of face A onto those of face B for N seeded pairs and reports the mean
distance to the targets before / after (MD, px), the reduction, seconds per edit and the image change
(KID on the landmark detector's features). `--split test` (default) uses seeds from 10000 up for
reported numbers, `--split val` seeds below 10000 for tuning. With --json the last stdout line is one
JSON object (keys md_before, md_after, reduction, seconds_per_edit, points, pairs, ...).

    python -m draggan_core eval --edits everyday --pairs 4 --split test
    python -m draggan_core eval --edits all --pairs 4 --compat official

`--edits` runs the user-edit benchmark instead (draggan_core/evaluation/user_edits.py): named everyday edits
(smile, raise brows, look aside, ...) and stress edits beyond the face world's limits, each on
`--pairs` seeds, judged by re-detected landmarks (reached), the parts check (intact) and the drift of
landmarks far from the points.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..model.devices import add_device_argument
from ..model.landmark_net import DEFAULT_DETECTOR_PATH
from .program import CliError, add_model_argument, add_quiet_argument, check_outputs, progress_bar, resolve_model_path


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
    p.add_argument("--edits", choices=("everyday", "stress", "all"), default=None,
                   help="run the user-edit benchmark instead (named edits judged by re-detected landmarks and the "
                        "parts check, draggan_core/evaluation/user_edits.py); --pairs is then the number of seeds per edit")
    p.add_argument("--compat", choices=("ours", "official", "both"), default="ours",
                   help="drag engine for --edits: ours (the model's defaults), the official implementation's "
                        "choices, or both in one run (the same seeds)")
    p.add_argument("--detector", metavar="PATH", default=None,
                   help="landmark detector weights (default: landmarks64.safetensors in the bundled models folder)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
    p.add_argument("--out", metavar="OUT.json", help="also write the full result (with per-pair records)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads, kept for the whole run (default: all cores, one fewer while other processes keep the CPU busy; see DRAGGAN_THREAD_POLICY)")
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
                  f"{r['outside_change_mask']:.2f} with mask (0..255)",
                  f"  fixed region   landmarks in it moved {r['fixed_drift_nomask']:.2f} px without mask, "
                  f"{r['fixed_drift_mask']:.2f} px with mask (re-detected)",
                  f"                 with every fixed pixel restored (the detector's floor): "
                  f"{r['fixed_drift_floor_nomask']:.2f} / {r['fixed_drift_floor_mask']:.2f} px; "
                  f"the fixed pixels' own change: {r['fixed_drift_own_nomask']:.2f} / {r['fixed_drift_own_mask']:.2f} px"]
    return "\n".join(lines)


def format_edit_report(r: dict) -> str:
    lines = [f"user edits ({r['split']} split, {r['seeds_per_edit']} seeds per edit, engine {r['compat']})"]
    for group in ("everyday", "stress"):
        if group not in r:
            continue
        g = r[group]
        lines.append(f"  {group:8s} {g['edits']:3d} edits: reached {100 * g['reached']:5.1f} %, intact "
                     f"{100 * g['intact']:5.1f} %, both {100 * g['success']:5.1f} %; false 'arrived' "
                     f"{100 * g['false_claims']:4.1f} %; far landmarks moved {g['drift_px']:.2f} px; "
                     f"{g['seconds_per_edit']:.2f} s per edit ({g['steps']:.0f} steps)")
    for name, e in r["per_edit"].items():
        lines.append(f"    {name:20s} reached {100 * e['reached']:5.1f} %  intact {100 * e['intact']:5.1f} %")
    return "\n".join(lines)


def run_edits(args, G, detector, defaults: dict) -> int:
    from ..edit.settings import DragConfig
    from ..evaluation.user_edits import EDIT_SETS, evaluate_edits

    edits = EDIT_SETS[args.edits]
    engines = ("ours", "official") if args.compat == "both" else (args.compat,)
    bar = progress_bar(args, total=len(edits) * args.pairs * len(engines), desc="edits", unit="edit",
                       dynamic_ncols=True)

    def progress(i, rec):
        bar.update(1)
        bar.set_postfix_str(f"{rec['edit']}: {'reached' if rec['reached'] else 'missed'}, "
                            f"{'intact' if rec['intact'] else 'parts lost'}")

    results = []
    try:
        for compat in engines:
            result = evaluate_edits(G, detector, edits, args.pairs, args.split, args.seed, model_defaults=defaults,
                                    config=DragConfig(max_steps=args.steps, display_every=0, compat=compat),
                                    progress=progress, psi=args.psi)
            result.update(compat=compat, model=str(args.model_path), edit_set=args.edits)
            results.append(result)
    finally:
        bar.close()
    if args.out:
        Path(args.out).write_text(json.dumps(results if len(results) > 1 else results[0], indent=1))
    print("\n".join(format_edit_report(r) for r in results))
    if args.json:
        summary = [{k: v for k, v in r.items() if k != "records"} for r in results]
        print(json.dumps(summary if len(summary) > 1 else summary[0]))
    return 0


def run(args) -> int:
    import torch

    from ..model.checkpoints import load_generator
    from ..evaluation.protocol import EvalConfig, evaluate, load_detector
    from ..model.store import drag_defaults_of

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
    if args.edits:
        if not 1 <= args.pairs <= 1000:
            raise CliError("--pairs (seeds per edit) must be in [1, 1000]")
        args.model_path = model_path
        return run_edits(args, G, detector, defaults)

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
