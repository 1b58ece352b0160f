"""Export the shipped embedded model from the training state (w_avg, fp16, metadata).

    python -m training.finalize_model [--state runs/cpu6h/last.pt] [--out checkpoints/embedded-faces64-parts.safetensors]
                                      [--drag-defaults training/embedded_parts_drag_defaults.json]
    python -m training.finalize_model --state runs/grow128/last.pt --compact-state training/state/grow128-last.pt

The drag defaults stored in the file's metadata are read from --drag-defaults (each model's are chosen
on validation edits: training/embedded_parts_drag_defaults.json for the default (parts) model,
training/embedded_drag_defaults.json for the opt-in L1 model embedded-faces64.safetensors,
training/grow128_drag_defaults.json for the 128 px model). Without --out and --drag-defaults, a 64 px
state is exported as the default model and a 128 px state as checkpoints/embedded-faces128-parts.safetensors
with the 128 px defaults, so a 128 px state never replaces the 64 px default by accident.
--compact-state writes a small resumable copy of the state instead (fp16 weights, bf16 Adam moments:
what training/state/ holds; train_embedded --resume-state continues from it).
"""
from __future__ import annotations

import argparse

import torch

from draggan_core.model.networks import Generator, GeneratorConfig
from draggan_core.model.paths import CHECKPOINTS_DIR
from draggan_core.model.store import PARTS_64_MODEL_NAME, PARTS_128_MODEL_NAME
from training.train_embedded import (GROW128_DRAG_DEFAULTS_FILE, PARTS_DRAG_DEFAULTS_FILE, base_info, compact_state,
                                     export_model, mapping_frozen, read_drag_defaults)

MODEL_64_PATH, MODEL_128_PATH = CHECKPOINTS_DIR / PARTS_64_MODEL_NAME, CHECKPOINTS_DIR / PARTS_128_MODEL_NAME


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", default="runs/cpu6h/last.pt")
    p.add_argument("--out", default=None, help=f"default: {MODEL_64_PATH} for a 64 px state, {MODEL_128_PATH} "
                                               "for a 128 px one")
    p.add_argument("--drag-defaults", default=None, help="JSON drag defaults for the metadata (default: "
                                                         f"{PARTS_DRAG_DEFAULTS_FILE.name}, at 128 px {GROW128_DRAG_DEFAULTS_FILE.name})")
    p.add_argument("--base-model", default=None,
                   help="for a fine-tune whose state predates its record of the model it started from")
    p.add_argument("--compact-state", default=None, metavar="PATH",
                   help="write a compact resumable copy of --state here instead of exporting a model")
    args = p.parse_args(argv)
    state = torch.load(args.state, weights_only=True)
    if args.compact_state:
        torch.save(compact_state(state), args.compact_state)
        print(f"wrote {args.compact_state} (step {state['step']}, {state['seconds'] / 60:.1f} min of training)")
        return
    cfg = GeneratorConfig.from_json(state["config"])
    large = cfg.img_resolution > 64
    drag_defaults = read_drag_defaults(
        args.drag_defaults or (GROW128_DRAG_DEFAULTS_FILE if large else PARTS_DRAG_DEFAULTS_FILE), p)
    out = args.out or (MODEL_128_PATH if large else MODEL_64_PATH)
    G_ema = Generator(cfg)
    G_ema.load_state_dict(state["G_ema"])
    train_only = state.get("train_only") or None
    base = state.get("base") or (base_info(args.base_model) if args.base_model else None)
    export_model(G_ema, out, int(state["step"]), float(state["seconds"]), images=state.get("images"),
                 drag_defaults=drag_defaults, keep_w_avg=mapping_frozen(train_only),
                 extra={"fine_tuned_only": train_only} if train_only else None, base=base)
    print(f"wrote {out} (step {state['step']}, {state['seconds'] / 60:.1f} min of training)")


if __name__ == "__main__":
    main()
