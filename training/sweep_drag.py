"""Choose the embedded model's drag defaults by measurement (validation edits, not the reported ones).

    python -m training.sweep_drag [--model M] [--edits 30] [--out runs/sweep.json]
    python -m training.sweep_drag --protocol landmarks --points 1 --edits 40 --quick

`--protocol random` (default): each configuration runs the same random 1-point edits (handle on a
detected landmark, target 5-20 % of the image away; seeds disjoint from the model card's) scored by
where the landmark detector finds the dragged landmark afterwards (not by the engine's own tracked
handle, which can claim success on a blurry model while the content stays put).
`--protocol landmarks`: the paper's landmark-transfer protocol (draggan_core.evaluation.protocol) on the
*validation* split of pairs, disjoint from the test split docs/evaluation.md reports; scored by MD after.
`--set key=value` fixes a setting for every row (e.g. --set subpixel=true); `--mask-set key=value`
one of the settings used only while a mask is set (the `mask` dict of the drag defaults, docs/masks.md).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from draggan_core.evaluation.protocol import EvalConfig, evaluate, load_detector
from draggan_core.model.checkpoints import load_generator
from draggan_core.model.store import default_model_path, drag_defaults_of
from training.model_metrics import drag_success
from training.train_embedded import DRAG_DEFAULTS_FILE

VALIDATION_SEED = 1  # the model card's drag success uses seed 0

GRID = {
    "subpixel": [True, False],
    "adaptive_step": [False, True],
    "tracking": ["l1", "l2"],
    "w_mode": ["w", "w+"],
    "num_optimized_ws": [10, 6],
    "feature_res": [16, 32, 64],
    "track_res": [16, 32],
    "track_patch": [1, 0],
    "r2": [3, 5],
    "stop_distance": [0.5, 0.25, 0.1, 1.0],
    "r1": [2.0, 3.0],
    "lr": [2e-3, 4e-3],
    "lambda_mask": [20.0, 5.0, 1.0, 0.2],  # only matters with --mask
}


def base_drag_defaults(model, fixed: dict | None = None) -> dict:
    """The settings every row starts from: the model's own drag defaults (its file's metadata), else
    the L1 model's file (bare training snapshots carry none), then the --set values."""
    own = drag_defaults_of(Path(model)) or json.loads(DRAG_DEFAULTS_FILE.read_text())
    return {**own, **(fixed or {})}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(default_model_path()))
    p.add_argument("--edits", type=int, default=30)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="vary one setting at a time around the current defaults")
    p.add_argument("--protocol", choices=("random", "landmarks"), default="random")
    p.add_argument("--points", choices=("1", "5", "all"), default="1", help="landmarks protocol: points per edit")
    p.add_argument("--seed", type=int, default=0, help="landmarks protocol: which validation pairs (0 = the first)")
    p.add_argument("--only", default=None, help="comma-separated settings to vary (default: all of GRID)")
    p.add_argument("--mask", action="store_true", help="landmarks protocol: edit with a mask around the handles")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed setting for all rows")
    p.add_argument("--mask-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting used only when a mask is set (the 'mask' dict of the drag defaults)")
    args = p.parse_args(argv)
    fixed = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.mask_set:
        mask_fixed = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.mask_set)}
        fixed["mask"] = {**base_drag_defaults(args.model).get("mask", {}), **fixed.get("mask", {}), **mask_fixed}
    torch.set_num_threads(args.threads)
    G = load_generator(args.model)
    detector = load_detector()
    grid = {k: v for k, v in GRID.items() if args.only is None or k in args.only.split(",")}
    grid = {k: v for k, v in grid.items() if k not in fixed and (args.mask or k != "lambda_mask")}
    keys = list(grid)
    base_defaults = base_drag_defaults(args.model, fixed)
    if args.quick:  # the current defaults, then one setting changed at a time
        base = {k: base_defaults.get(k, v[0]) for k, v in grid.items()}
        configs = [base] + [{**base, k: v} for k in keys for v in grid[k] if v != base[k]]
    else:
        configs = [dict(zip(keys, values)) for values in itertools.product(*grid.values())]
    rows = []
    for cfg in configs:
        t0 = time.time()
        defaults = {**base_defaults, **cfg}
        if "lambda_mask" in cfg and "mask" in defaults:  # the model's mask settings would override it
            defaults["mask"] = {**defaults["mask"], "lambda_mask": cfg["lambda_mask"]}
        if args.protocol == "random":
            r = drag_success(G, detector, args.edits, model_defaults=defaults, steps=args.steps,
                             seed=VALIDATION_SEED)
            row = {**cfg, "success_redetected": r["success_redetected"],
                   "px_redetected": r["final_px_redetected_mean"], "success_tracked": r["success_tracked"],
                   "steps": r["steps_mean"], "seconds_per_edit": r["seconds_per_edit"]}
        else:
            r = evaluate(G, detector, EvalConfig(pairs=args.edits, points=args.points, steps=args.steps,
                                                 split="val", mask=args.mask, seed=args.seed),
                         model_defaults=defaults)
            row = {**cfg, "md_before": r["md_before"], "md_after": r["md_after"], "reduction": r["reduction"],
                   "md_tracked": r["md_tracked"], "steps": r["steps"], "seconds_per_edit": r["seconds_per_edit"]}
            row.update({k: r[k] for k in ("reached", "md_after_mask", "reduction_mask", "reached_mask", "seconds_per_edit_mask",
                                          "outside_change_nomask", "outside_change_mask") if k in r})
        row["wall_s"] = time.time() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.protocol == "random":
        best = max(rows, key=lambda r: (r["success_redetected"], -r["px_redetected"]))
    else:
        best = min(rows, key=lambda r: r["md_after_mask" if args.mask else "md_after"])
    print("best:", json.dumps(best), file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "edits": args.edits, "protocol": args.protocol, "points": args.points,
                       "fixed": fixed, "rows": rows, "best": best}, f, indent=1)


if __name__ == "__main__":
    main()
