"""The user-edit benchmark: the edits people make on a face, judged as a person judges them.

The landmark protocol (protocol.py) moves landmarks to another face's; people instead grab a
feature and move it a little: the mouth corners up for a smile, a brow up, the pupils aside. Each
named edit below gives landmarks and their moves in pixels of a 128 px image (scaled with the
model's resolution). For every edit and seed:
  1. render the seed, detect its landmarks (model/landmark_net.py); the seed is used only when the face
     passes the parts check and every grabbed landmark is confidently visible;
  2. click: handle = the detected landmark rounded to a pixel, target = handle + move (rounded);
  3. drag with the model's defaults through DragSession.run(), the loop the web UI and CLI run;
  4. judge the final image:
     reached  every grabbed landmark, RE-DETECTED, lies within max(1, min(3, 0.4 |move|)) px (at
              128 px) of where the move puts it (its first detection + the move): the tracked
              handle is what the engine believes, not what the image shows
     intact   every part (eyes, brows, nose, mouth) still passes the parts check (face_checks.py)
     drift    mean displacement of the landmarks far (>= FAR_PX) from every handle and target
     claimed  the run said every handle arrived; `false_claims` counts claims the re-detection
              does not confirm (a status that calls a lost handle "arrived")
Stress edits ask for moves the face world cannot make (10-15 px); their only right outcome is an
intact face and no false claim.

Seeds come from the landmark protocol's splits: "val" [0, 10000) for screens, "test" [10000, 20000)
for reported numbers.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..edit.session import DragSession
from ..edit.settings import DragConfig
from ..model.latents import seed_to_w
from .face_checks import PARTS, part_checks
from .protocol import SPLITS, VISIBLE_THRESHOLD

BASE_RES = 128         # the moves below are pixels of a 128 px image
FAR_PX = 20.0          # at 128 px: landmarks this far from every handle and target should not move
EDGE_PX = 3.0          # at 128 px: targets closer than this to the border are not used


@dataclass(frozen=True)
class UserEdit:
    name: str
    moves: tuple[tuple[str, float, float], ...]   # (landmark, dx, dy) at 128 px; x = column, y = row
    stress: bool = False                          # beyond what the face world allows

    def __post_init__(self):
        if not self.moves:
            raise ValueError(f"edit {self.name!r} moves nothing")


def _edit(name, *moves, stress=False) -> UserEdit:
    return UserEdit(name, tuple(moves), stress)


# "left" / "right" are the landmark detector's names (image left / right)
EVERYDAY_EDITS: tuple[UserEdit, ...] = (
    _edit("smile", ("mouth_left", -5, -4), ("mouth_right", 5, -4)),
    _edit("broad smile", ("mouth_left", -7, -6), ("mouth_right", 7, -6)),
    _edit("frown", ("mouth_left", -2, 4), ("mouth_right", 2, 4)),
    _edit("open mouth", ("lip_lower", 0, 6)),
    _edit("raise brows", ("brow_left_inner", 0, -5), ("brow_right_inner", 0, -5)),
    _edit("raise one brow", ("brow_right_outer", 0, -4)),
    _edit("look left", ("pupil_left", -2, 0), ("pupil_right", -2, 0)),
    _edit("look right", ("pupil_left", 2, 0), ("pupil_right", 2, 0)),
    _edit("longer nose", ("nose_tip", 0, 5)),
    _edit("wider mouth", ("mouth_left", -5, 0), ("mouth_right", 5, 0)),
    _edit("one-sided smile", ("mouth_right", 5, -5)),
    _edit("longer chin", ("chin", 0, 6)),
    _edit("narrower face", ("jaw_left_mouth", 5, 0), ("jaw_right_mouth", -5, 0)),
    _edit("wider face", ("jaw_left_mouth", -4, 0), ("jaw_right_mouth", 4, 0)),
    _edit("move head right", ("nose_tip", 7, 0), ("chin", 7, 0)),
    _edit("lower the mouth", ("lip_upper", 0, 3), ("lip_lower", 0, 3)),
)

STRESS_EDITS: tuple[UserEdit, ...] = (
    _edit("huge smile", ("mouth_left", -10, -8), ("mouth_right", 10, -8), stress=True),
    _edit("nose to the chin", ("nose_tip", 0, 14), stress=True),
    _edit("brows to the hair", ("brow_left_inner", 0, -12), ("brow_right_inner", 0, -12), stress=True),
    _edit("head far right", ("nose_tip", 15, 0), ("chin", 15, 0), stress=True),
    _edit("eyes apart", ("pupil_left", -12, 0), ("pupil_right", 12, 0), stress=True),
    _edit("mouth to the ear", ("mouth_right", 14, -4), stress=True),
)

EDIT_SETS = {"everyday": EVERYDAY_EDITS, "stress": STRESS_EDITS, "all": EVERYDAY_EDITS + STRESS_EDITS}


def reach_radius(move_px: float, resolution: int) -> float:
    """Re-detected landmark within this many px of where the move puts it counts as reached."""
    scale = resolution / BASE_RES
    return max(1.0, min(3.0, 0.4 * move_px / scale)) * scale


def render(G, w) -> np.ndarray:
    return DragSession(G, w).render()


def faces_intact(images: np.ndarray, detector) -> np.ndarray:
    """Per image: every part passes the parts check. images: [N, H, W, 3] uint8."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return part_checks(x, detector)["all_parts"]


def parts_lost(image: np.ndarray, detector) -> list[str]:
    x = torch.from_numpy(np.ascontiguousarray(image[None])).permute(0, 3, 1, 2).float() / 127.5 - 1
    checks = part_checks(x, detector)
    return [p for p in PARTS if not checks[p][0]]


class SeedPool:
    """Seeds of a split whose face is intact, with their first detection, drawn in a fixed order
    (a pure function of split and seed), computed once and shared by all edits."""

    def __init__(self, G, detector, split: str, seed: int = 0, psi: float = 0.7):
        lo, hi = SPLITS[split]
        self.G, self.detector, self.psi = G, detector, psi
        self.order = np.random.default_rng([seed, lo, 11]).permutation(np.arange(lo, hi))
        self.next, self.faces = 0, []   # faces: (seed, image, points [K, 2], visible [K])

    def get(self, i: int):
        while len(self.faces) <= i:
            if self.next >= len(self.order):
                raise RuntimeError("no more seeds with an intact face in this split")
            s = int(self.order[self.next])
            self.next += 1
            img = render(self.G, seed_to_w(self.G, s, psi=self.psi))
            if not faces_intact(img[None], self.detector)[0]:
                continue
            d = self.detector(img[None])
            self.faces.append((s, img, d.points[0].numpy().astype(np.float64), d.visible[0].numpy()))
        return self.faces[i]


def plan(edit: UserEdit, names: list[str], points: np.ndarray, visible: np.ndarray, resolution: int):
    """(handles, targets, landmark indices, intended positions) for one face, or None when a grabbed
    landmark is not confidently visible or a target would leave the image."""
    scale = resolution / BASE_RES
    idx, handles, targets, intended = [], [], [], []
    for name, dx, dy in edit.moves:
        k = names.index(name)
        if visible[k] <= VISIBLE_THRESHOLD:
            return None
        p = points[k]
        goal = p + np.array([dx, dy]) * scale
        if not (EDGE_PX * scale <= goal.min() and goal.max() <= resolution - 1 - EDGE_PX * scale):
            return None
        h = np.clip(np.rint(p), 0, resolution - 1)
        idx.append(k)
        handles.append(tuple(int(v) for v in h))
        targets.append(tuple(int(v) for v in np.clip(np.rint(h + np.array([dx, dy]) * scale), 0, resolution - 1)))
        intended.append(goal)
    return handles, targets, idx, np.array(intended)


def run_edit(G, w, handles, targets, model_defaults: dict | None, config: DragConfig) -> dict:
    """One drag through the session loop the UI and CLI use; the session's final state is the result."""
    session = DragSession(G, w, config, model_defaults=model_defaults)
    for h, t in zip(handles, targets):
        session.add_pair(h, t)
    last = None
    t0 = time.perf_counter()
    for last in session.run():
        pass
    shift = float((session.latent - session.w_initial).square().mean().sqrt())  # RMS latent change
    return {"image": session.render(), "seconds": time.perf_counter() - t0, "steps": session.step_count,
            "claimed": bool(last.reached), "message": last.message, "end": last.end, "handles": last.handles,
            "w_shift": shift}


def judge(edit: UserEdit, detector, image0, points0, visible0, image1, idx, intended, handles, targets,
          resolution: int) -> dict:
    names = detector.names
    d1 = detector(image1[None])
    points1 = d1.points[0].numpy().astype(np.float64)
    scale = resolution / BASE_RES
    errors = np.linalg.norm(points1[idx] - intended, axis=1)
    radii = [reach_radius(math.hypot(dx, dy) * scale, resolution) for _, dx, dy in edit.moves]
    anchors = np.array(list(handles) + list(targets), np.float64)
    far = [k for k in range(len(names)) if visible0[k] > VISIBLE_THRESHOLD and k not in idx
           and np.linalg.norm(anchors - points0[k], axis=1).min() >= FAR_PX * scale]
    drift = float(np.linalg.norm(points1[far] - points0[far], axis=1).mean()) if far else 0.0
    lost = parts_lost(image1, detector)
    return {"reached": bool(all(e <= r for e, r in zip(errors, radii))), "errors": errors.round(2).tolist(),
            "intact": not lost, "parts_lost": lost, "drift": drift / scale,
            "pixel_change": float(np.abs(image1.astype(np.float64) - image0.astype(np.float64)).mean())}


def evaluate_edits(G, detector, edits=EVERYDAY_EDITS, seeds_per_edit: int = 4, split: str = "test",
                   seed: int = 0, model_defaults: dict | None = None, config: DragConfig | None = None,
                   progress: Callable[[int, dict], None] | None = None, psi: float = 0.7) -> dict:
    """Run every edit on `seeds_per_edit` faces of the split; returns a summary and per-edit records."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    if seeds_per_edit < 1:
        raise ValueError("seeds_per_edit must be >= 1")
    config = config or DragConfig(max_steps=300, display_every=0)
    res = G.img_resolution
    pool = SeedPool(G, detector, split, seed, psi)
    records = []
    for e, edit in enumerate(edits):
        found, i = 0, e * seeds_per_edit  # each edit starts at its own place in the pool
        while found < seeds_per_edit:
            s, image0, points0, visible0 = pool.get(i)
            i += 1
            p = plan(edit, detector.names, points0, visible0, res)
            if p is None:
                continue
            handles, targets, idx, intended = p
            out = run_edit(G, seed_to_w(G, s, psi=psi), handles, targets, model_defaults, config)
            rec = {"edit": edit.name, "stress": edit.stress, "seed": s, "handles": handles, "targets": targets,
                   "steps": out["steps"], "seconds": out["seconds"], "claimed": out["claimed"],
                   "message": out["message"], "end": out["end"], "w_shift": out["w_shift"]}
            rec.update(judge(edit, detector, image0, points0, visible0, out["image"], idx, intended,
                             handles, targets, res))
            rec["success"] = rec["reached"] and rec["intact"]
            rec["false_claim"] = rec["claimed"] and not rec["reached"]
            records.append(rec)
            found += 1
            if progress is not None:
                progress(len(records) - 1, rec)
    return summarize_edits(records, split=split, seed=seed, seeds_per_edit=seeds_per_edit, resolution=res)


def summarize_edits(records: list[dict], **info) -> dict:
    def rate(rows, key):
        return float(np.mean([r[key] for r in rows])) if rows else float("nan")

    out = dict(info)
    for group, rows in (("everyday", [r for r in records if not r["stress"]]),
                        ("stress", [r for r in records if r["stress"]])):
        if not rows:
            continue
        out[group] = {"edits": len(rows), "reached": rate(rows, "reached"), "intact": rate(rows, "intact"),
                      "success": rate(rows, "success"), "false_claims": rate(rows, "false_claim"),
                      "drift_px": rate(rows, "drift"), "seconds_per_edit": rate(rows, "seconds"),
                      "steps": rate(rows, "steps"), "pixel_change": rate(rows, "pixel_change")}
    names = list(dict.fromkeys(r["edit"] for r in records))
    out["per_edit"] = {n: {k: rate([r for r in records if r["edit"] == n], k)
                           for k in ("reached", "intact", "success")} for n in names}
    out["records"] = records
    return out
