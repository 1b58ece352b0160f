"""Replace a shipped model's drag defaults (metadata only; the weights stay bit for bit).

    python -m training.set_drag_defaults --model checkpoints/embedded-faces64-parts.safetensors \
        --drag-defaults training/embedded_parts_drag_defaults.json

The drag defaults (including their `mask` settings) are chosen on validation edits after a model is
trained; this writes the JSON file's text into the file's `drag_defaults` metadata, as
`finalize_model` does at export, and checks that every tensor is byte-identical afterwards.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training.train_embedded import read_drag_defaults


def tensor_digest(path) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def set_drag_defaults(path, drag_defaults: str) -> tuple[str, str]:
    """Rewrite `path` with new drag_defaults metadata; returns the tensor digests before and after."""
    json.loads(drag_defaults)  # refuse to write text the engine could not read
    path = Path(path)
    before = tensor_digest(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["drag_defaults"] = drag_defaults
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    after = tensor_digest(tmp)
    if after != before:
        tmp.unlink()
        raise RuntimeError(f"{path}: tensors changed while rewriting the metadata; file left as it was")
    os.replace(tmp, path)
    return before, after


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--drag-defaults", required=True, help="JSON file whose text becomes the drag_defaults metadata")
    args = p.parse_args(argv)
    before, after = set_drag_defaults(args.model, read_drag_defaults(args.drag_defaults, p))
    print(f"{args.model}: drag_defaults <- {args.drag_defaults}; tensors sha256 {before} (unchanged)")


if __name__ == "__main__":
    main()
