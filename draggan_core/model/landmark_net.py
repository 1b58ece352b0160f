"""Face landmark detector for the evaluation protocol: network definition and loading (inference only).

A small fully convolutional net maps a 64x64 RGB image in [-1, 1] to one heatmap per landmark on a
16x16 grid (stride 4); the landmark is the soft-argmax (expected position under the softmax of the
heatmap), so positions are sub-pixel. Per landmark it also returns
  * `spread`: the standard deviation (px) of that softmax distribution, a confidence measure
    (a face part the net cannot find gives a diffuse heatmap: a large spread);
  * `visible`: probability that the landmark is visible (pupils of closed eyes, hidden ears).
`features` is the embedding used for KID ("KID-lm"): the concatenated global average pools of the
16x16 trunk after block 4 and of the last trunk layer (64 + 64 = 128 values per image, ReLU outputs).

Points are (x, y) pixel coordinates like everywhere in this project: x = column, pixel centres at
integers. Images of another size are resized to 64x64 and the points scaled back.

The weights are trained by `training/landmarks.py` on the procedural face renderer.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .paths import CHECKPOINTS_DIR

DEFAULT_DETECTOR_PATH = CHECKPOINTS_DIR / "landmarks64.safetensors"
DETECTOR_FORMAT = "draggan-landmarks-v1"

# The renderer's landmarks, in its output order (training.faces imports this list).
LANDMARK_NAMES: tuple[str, ...] = (
    "eye_left_outer", "eye_left_inner", "eye_right_inner", "eye_right_outer",
    "eye_left_top", "eye_left_bottom", "eye_right_top", "eye_right_bottom",
    "pupil_left", "pupil_right",
    "brow_left_outer", "brow_left_inner", "brow_right_inner", "brow_right_outer",
    "nose_tip", "nostril_left", "nostril_right",
    "mouth_left", "mouth_right", "lip_upper", "lip_lower",
    "chin", "jaw_left_mouth", "jaw_right_mouth", "jaw_left_eye", "jaw_right_eye",
    "ear_left", "ear_right",
)


@dataclass
class LandmarkNetConfig:
    num_landmarks: int = len(LANDMARK_NAMES)
    resolution: int = 64
    channels: tuple = (16, 32, 48, 64, 64, 64)
    landmark_names: list = field(default_factory=lambda: list(LANDMARK_NAMES))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LandmarkNetConfig":
        d = json.loads(text)
        d["channels"] = tuple(d.get("channels", cls.channels))
        return cls(**d)


def _conv(cin, cout, stride=1, dilation=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class LandmarkNet(nn.Module):
    """64x64 image -> landmark heatmaps on a 16x16 grid -> soft-argmax points."""

    STRIDE = 4

    def __init__(self, cfg: LandmarkNetConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or LandmarkNetConfig()
        c = cfg.channels
        self.stem = nn.Sequential(_conv(3, c[0], stride=2), _conv(c[0], c[1]))          # 32x32
        self.block4 = nn.Sequential(_conv(c[1], c[2], stride=2), _conv(c[2], c[3]))     # 16x16
        self.context = nn.Sequential(_conv(c[3], c[4], dilation=2), _conv(c[4], c[5], dilation=4))
        self.heat = nn.Conv2d(c[5] + c[3], cfg.num_landmarks, 1)
        self.vis = nn.Linear(c[5], cfg.num_landmarks)
        g = cfg.resolution // self.STRIDE
        centres = (torch.arange(g, dtype=torch.float32) + 0.5) * self.STRIDE - 0.5  # image px of cells
        self.register_buffer("grid_x", centres.repeat(g), persistent=False)
        self.register_buffer("grid_y", centres.repeat_interleave(g), persistent=False)

    @property
    def feature_dim(self) -> int:
        return self.cfg.channels[3] + self.cfg.channels[5]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images
        if x.shape[-1] != self.cfg.resolution or x.shape[-2] != self.cfg.resolution:
            raise ValueError(f"LandmarkNet expects {self.cfg.resolution}x{self.cfg.resolution} images")
        f4 = self.block4(self.stem(x))
        f6 = self.context(f4)
        logits = self.heat(torch.cat([f6, f4], dim=1)).flatten(2)       # [N, K, g*g]
        prob = logits.softmax(dim=-1)
        px = (prob * self.grid_x).sum(-1)
        py = (prob * self.grid_y).sum(-1)
        var = (prob * ((self.grid_x - px[..., None]).square() + (self.grid_y - py[..., None]).square())).sum(-1)
        pooled = f6.mean(dim=(2, 3))
        return {
            "points": torch.stack([px, py], dim=-1),          # [N, K, 2] (x, y) px
            "prob": prob,                                     # [N, K, g*g]
            "spread": var.clamp_min(1e-8).sqrt(),             # [N, K] px
            "vis_logit": self.vis(pooled),                    # [N, K]
            "features": torch.cat([f4.mean(dim=(2, 3)), pooled], dim=1),  # [N, feature_dim]
        }


def _mirror_name(name: str) -> str:
    """The landmark a horizontal mirror maps `name` to (image left <-> right)."""
    if "left" in name:
        return name.replace("left", "right")
    return name.replace("right", "left")


@dataclass
class Detection:
    points: torch.Tensor     # [N, K, 2] (x, y) pixels of the input image
    spread: torch.Tensor     # [N, K] px (in input pixels)
    visible: torch.Tensor    # [N, K] probability
    features: torch.Tensor   # [N, D] KID-lm embedding


class LandmarkDetector:
    """Inference wrapper: any square image size, uint8 HxWx3 / float [-1, 1] NCHW inputs, batching."""

    def __init__(self, net: LandmarkNet, meta: dict | None = None, flip: bool = True, shift: bool = True):
        self.net = net.eval()
        self.meta = dict(meta or {})
        self.names = list(net.cfg.landmark_names)
        # test-time augmentation: also detect on the mirrored image (left/right landmarks swapped) and
        # average; halves the random part of the error (measured in docs/evaluation.md)
        self.flip = flip
        self.mirror = [self.names.index(_mirror_name(n)) for n in self.names]
        # ... and on copies shifted by one pixel in the 8 directions: the heatmaps have stride 4, so
        # their error depends on where a landmark falls on that grid; averaging over shifts cancels
        # part of it (held-out renders: 0.220 -> 0.170 px mean error, training/landmarks.py)
        self.shifts = [(0, 0)] + ([(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dx or dy] if shift else [])

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "cpu", flip: bool = True,
             shift: bool = True) -> "LandmarkDetector":
        from safetensors import safe_open
        path = Path(path) if path is not None else DEFAULT_DETECTOR_PATH
        if not path.is_file():
            raise FileNotFoundError(f"{path}: landmark detector weights not found "
                                    "(train them with `python -m training.landmarks`)")
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != DETECTOR_FORMAT:
                raise ValueError(f"{path}: not a landmark detector file (format {meta.get('format')!r})")
            state = {k: f.get_tensor(k).to(torch.float32) for k in f.keys()}
        net = LandmarkNet(LandmarkNetConfig.from_json(meta["config"]))
        net.load_state_dict(state)
        return cls(net.to(device), meta, flip=flip, shift=shift)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def _detect_view(self, x: torch.Tensor, dx: int = 0, dy: int = 0) -> dict[str, torch.Tensor]:
        """Net outputs for images whose content was shifted by (dx, dy), points shifted back; with
        `flip`, averaged with the mirrored image's (left/right landmarks swapped)."""
        out = self.net(x)
        if self.flip:
            res = x.shape[-1]
            m = self.net(x.flip(-1))
            mx = m["points"][:, self.mirror]
            mx = torch.stack([res - 1 - mx[..., 0], mx[..., 1]], dim=-1)
            out = {"points": (out["points"] + mx) / 2,
                   "spread": (out["spread"] + m["spread"][:, self.mirror]) / 2,
                   "vis_logit": (out["vis_logit"] + m["vis_logit"][:, self.mirror]) / 2,
                   "features": out["features"]}
        out["points"] = out["points"] - torch.tensor([dx, dy], dtype=out["points"].dtype, device=x.device)
        return out

    @staticmethod
    def to_tensor(images) -> torch.Tensor:
        """uint8 [N]HW3 numpy/tensor or float [N]3HW in [-1, 1] -> float [N, 3, H, W] in [-1, 1]."""
        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = images.copy()  # torch warns on read-only buffers (e.g. a PIL image's array)
        x = torch.as_tensor(images)
        if x.dtype == torch.uint8:
            if x.ndim == 3:
                x = x[None]
            return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x = x.float()
        return x[None] if x.ndim == 3 else x

    @torch.no_grad()
    def __call__(self, images, batch_size: int = 64) -> Detection:
        x = self.to_tensor(images)
        device = next(self.net.parameters()).device
        res = self.net.cfg.resolution
        h, w = x.shape[-2:]
        if h != w:
            raise ValueError(f"square images only, got {w}x{h}")
        outs = []
        for chunk in x.split(batch_size):
            chunk = chunk.to(device).clamp(-1, 1)
            if h != res:
                chunk = F.interpolate(chunk, size=(res, res), mode="area" if h > res else "bilinear",
                                      align_corners=None if h > res else False)
            views = [self._detect_view(_shift_image(chunk, dx, dy), dx, dy) for dx, dy in self.shifts]
            out = {k: sum(v[k] for v in views) / len(views) for k in ("points", "spread", "vis_logit")}
            out["features"] = views[0]["features"]  # the KID-lm embedding stays single-view
            outs.append(out)
        scale = h / res
        points = torch.cat([o["points"] for o in outs]).cpu()
        points = (points + 0.5) * scale - 0.5
        return Detection(points=points, spread=torch.cat([o["spread"] for o in outs]).cpu() * scale,
                         visible=torch.cat([o["vis_logit"] for o in outs]).sigmoid().cpu(),
                         features=torch.cat([o["features"] for o in outs]).cpu())


def _shift_image(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Content moved by (dx, dy) in {-1, 0, 1}^2 pixels; the uncovered border repeats the edge."""
    if dx == 0 and dy == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return padded[..., 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]


def save_detector(net: LandmarkNet, path: str | Path, extra_metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
    meta = {"format": DETECTOR_FORMAT, "config": net.cfg.to_json()}
    for k, v in (extra_metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    save_file(tensors, str(path), metadata=meta)
