"""Export the shipped embedded model from the training state (w_avg, fp16, metadata).

    python -m training.finalize_model [--state runs/cpu6h/last.pt] [--out checkpoints/embedded-faces64-parts.safetensors]
                                      [--drag-defaults training/embedded_parts_drag_defaults.json]

The drag defaults stored in the file's metadata are read from --drag-defaults (each model's are chosen
on validation edits: training/embedded_parts_drag_defaults.json for the default (parts) model,
training/embedded_drag_defaults.json for the opt-in L1 model embedded-faces64.safetensors).
"""
from __future__ import annotations

import argparse

import torch

from draggan_core.models import default_model_path
from draggan_core.networks import Generator, GeneratorConfig
from training.train_embedded import PARTS_DRAG_DEFAULTS_FILE, base_info, export_model, mapping_frozen, read_drag_defaults


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", default="runs/cpu6h/last.pt")
    p.add_argument("--out", default=str(default_model_path()))
    p.add_argument("--drag-defaults", default=str(PARTS_DRAG_DEFAULTS_FILE), help="JSON drag defaults for the metadata")
    p.add_argument("--base-model", default=None,
                   help="for a fine-tune whose state predates its record of the model it started from")
    args = p.parse_args(argv)
    drag_defaults = read_drag_defaults(args.drag_defaults, p)
    state = torch.load(args.state, weights_only=True)
    G_ema = Generator(GeneratorConfig.from_json(state["config"]))
    G_ema.load_state_dict(state["G_ema"])
    train_only = state.get("train_only") or None
    base = state.get("base") or (base_info(args.base_model) if args.base_model else None)
    export_model(G_ema, args.out, int(state["step"]), float(state["seconds"]), images=state.get("images"),
                 drag_defaults=drag_defaults, keep_w_avg=mapping_frozen(train_only),
                 extra={"fine_tuned_only": train_only} if train_only else None, base=base)
    print(f"wrote {args.out} (step {state['step']}, {state['seconds'] / 60:.1f} min of training)")


if __name__ == "__main__":
    main()
