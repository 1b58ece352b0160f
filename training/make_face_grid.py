"""Save an 8x8 grid of procedural faces: python -m training.make_face_grid OUT.png"""
from __future__ import annotations

import argparse

from PIL import Image, ImageDraw

from training import faces


def face_grid(seed: int = 0, rows: int = 8, upscale: int = 4, landmarks: bool = False,
              resolution: int = 64) -> Image.Image:
    batch = faces.render(faces.sample_z(rows * rows, seed), resolution=resolution)
    tiles = faces.to_uint8(batch.images)
    h = resolution * upscale
    grid = Image.new("RGB", (rows * h, rows * h))
    for k, tile in enumerate(tiles):
        im = Image.fromarray(tile).resize((h, h), Image.NEAREST)
        if landmarks:
            draw = ImageDraw.Draw(im)
            for (x, y), vis in zip(batch.landmarks[k], batch.visible[k]):
                cx, cy = (x + 0.5) * upscale, (y + 0.5) * upscale
                color = (0, 255, 0) if vis else (255, 0, 0)
                draw.rectangle([cx - 1, cy - 1, cx + 1, cy + 1], fill=color)
        grid.paste(im, ((k % rows) * h, (k // rows) * h))
    return grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--landmarks", action="store_true", help="draw landmarks (green visible, red hidden)")
    ap.add_argument("--resolution", type=int, default=64)
    args = ap.parse_args()
    face_grid(args.seed, landmarks=args.landmarks, resolution=args.resolution).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
