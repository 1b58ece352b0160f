"""Sample grid and latent interpolation strip of a generator, for the README and the model card.

    python -m training.make_samples [--model checkpoints/embedded-faces64-parts.safetensors] [--out docs] [--suffix -128]

Writes OUT/samples{SUFFIX}.png (seeds 0..31, truncation psi 0.7, as the editor shows them) and
OUT/interpolation{SUFFIX}.png (rows: linear interpolation in W between two seeds, 10 steps).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from draggan_core.model.checkpoints import load_generator
from draggan_core.model.latents import seed_to_w
from draggan_core.model.networks import to_uint8_image
from draggan_core.model.store import default_model_path


def tile(images: list[np.ndarray], cols: int, scale: int, pad: int = 2) -> Image.Image:
    h, w, _ = images[0].shape
    rows = (len(images) + cols - 1) // cols
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    out = Image.fromarray(canvas)
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST)


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(default_model_path()))
    p.add_argument("--out", default="docs")
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--suffix", default="", help="added to the file names (e.g. -128)")
    args = p.parse_args(argv)
    G = load_generator(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = [to_uint8_image(G.synthesis(seed_to_w(G, s))) for s in range(32)]
    samples_path, strip_path = out / f"samples{args.suffix}.png", out / f"interpolation{args.suffix}.png"
    tile(samples, 8, args.scale).save(samples_path)
    strip = []
    for a, b in [(1, 2), (3, 4), (5, 6)]:
        wa, wb = seed_to_w(G, a), seed_to_w(G, b)
        for t in np.linspace(0, 1, 10):
            strip.append(to_uint8_image(G.synthesis(torch.lerp(wa, wb, float(t)))))
    tile(strip, 10, args.scale).save(strip_path)
    print(f"wrote {samples_path}, {strip_path}")


if __name__ == "__main__":
    main()
