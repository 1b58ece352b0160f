"""One drag step, as the session runs it: `OursStep` (our formulation: features sampled on their
native grid, computed only in windows around the handles when that is exact) and `OfficialStep`
(the official implementation, step for step), with what they share: feature windows sampled at
image coordinates (`FeatureWindow`, `windowed_features`), the motion disc, the keep weights of the
mask terms, and the Adam step with its report.

The steps are the session's internals: they read and update its latent parameter and optimiser
(`DragSession._param`, `_opt`). Tracking, motion supervision and the mask terms are described in
session.py.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..model.devices import fused_modconv_for
from ..model.networks import Generator
from ..model.windowed import features_in_window
from .settings import DragConfig, StepResult, as_point

if TYPE_CHECKING:
    from .session import DragSession


def _pixel_to_feature(coord: torch.Tensor, image_res: int, feature_res: int) -> torch.Tensor:
    """Image pixel-centre coordinates -> feature-map coordinates (align_corners=False convention)."""
    return (coord + 0.5) * (feature_res / image_res) - 0.5


def keep_weights(mask: torch.Tensor, feather: float) -> torch.Tensor:
    """Weight of the keep terms per pixel of an [S, S] mask (1 = flexible): 1 - mask, or with
    `feather` = n > 0 a ramp outside the flexible region, k / (n + 1) at k px from its edge
    (Chebyshev distance), 1 from n + 1 px on.

    A generator changes images smoothly, so a hard edge makes the pixels just outside the region
    fight every move of the content inside it; the ramp lets them follow a little.
    """
    n = int(round(feather))
    if n <= 0:
        return 1 - mask
    grown, covered = mask[None, None], mask.clone()
    for _ in range(n):  # the mask grown by 1, 2, ... n px: a pixel k px away is covered n - k + 1 times
        grown = F.max_pool2d(grown, 3, stride=1, padding=1)
        covered = covered + grown[0, 0]
    return (1 - covered / (n + 1)).clamp(0, 1)


def local_keep_weights(pairs, resolution: int, margin: float, feature_shape) -> torch.Tensor:
    """Keep weights of the local term on the feature grid [1, 1, h, w]: 0 within |t - o| / 2 + margin
    of each pair's midpoint (o: where the handle was placed), ramping to 1 over another margin px."""
    yy, xx = torch.meshgrid(torch.arange(resolution, dtype=torch.float32),
                            torch.arange(resolution, dtype=torch.float32), indexing="ij")
    free = torch.full((resolution, resolution), math.inf)
    for p in pairs:  # distance outside each pair's free disc
        (ox, oy), (tx, ty) = p.origin, p.target
        cx, cy, r = (ox + tx) / 2, (oy + ty) / 2, math.dist((ox, oy), (tx, ty)) / 2 + margin
        free = torch.minimum(free, ((xx - cx).square() + (yy - cy).square()).sqrt() - r)
    keep = (free / max(margin, 1e-6)).clamp(0, 1)
    device = pairs[0].reference.device if pairs and pairs[0].reference is not None else "cpu"
    return F.interpolate(keep[None, None], size=tuple(feature_shape), mode="area").to(device)


def disc_offsets(r1: float) -> torch.Tensor:
    """Integer (dx, dy) with dx^2 + dy^2 < r1^2: the disc on pixel centres around a handle."""
    r = int(math.ceil(r1))
    d = torch.arange(-r, r + 1, dtype=torch.float32)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    keep = dx.square() + dy.square() < r1 * r1
    return torch.stack([dx[keep], dy[keep]], dim=1)  # [K, 2] as (x, y)


def _optimise_and_report(s: DragSession, cfg: DragConfig, distances, done: bool, loss_motion: torch.Tensor,
                         loss_mask: torch.Tensor, optimise: bool, loss_image: torch.Tensor | None = None,
                         arrived: bool | None = None) -> StepResult:
    """The part of a step both engines share: the Adam step on the latent, then the step's result."""
    loss = loss_motion + cfg.lambda_mask * loss_mask
    if loss_image is not None:
        loss = loss + cfg.lambda_image * loss_image
    if cfg.lambda_w0 > 0:  # stay near the face the edit started from
        loss = loss + cfg.lambda_w0 * (s._param - s._start_param()).square().mean()
    if optimise and not done:
        s._opt.zero_grad(set_to_none=True)
        loss.backward()
        s._opt.step()
        s.step_count += 1
    return StepResult(step=s.step_count, handles=[p.handle for p in s.pairs], targets=[p.target for p in s.pairs],
                      distances=distances, loss=loss.detach().item(), loss_motion=loss_motion.detach().item(),
                      loss_mask=loss_mask.detach().item(), done=done or not optimise,
                      reached=done if arrived is None else arrived, seconds=0.0,
                      loss_image=0.0 if loss_image is None else loss_image.detach().item(),
                      matches=[p.match for p in s.pairs])


class FeatureWindow:
    """Features of a window of the feature map, sampled at image pixel coordinates."""

    def __init__(self, feat: torch.Tensor, window, image_res: int, feature_res: int):
        self.feat, self.window = feat, window  # feat [1, C, h, w] covers window (y0, y1, x0, x1)
        self.image_res, self.feature_res = image_res, feature_res

    def sample(self, xy: torch.Tensor) -> torch.Tensor:
        """Bilinear features at image coordinates xy [K, 2] (x, y) -> [K, C]; border-clamped."""
        y0, y1, x0, x1 = self.window
        uv = _pixel_to_feature(xy, self.image_res, self.feature_res).clamp(0, self.feature_res - 1)
        u = uv[:, 0] - x0
        v = uv[:, 1] - y0
        w, h = x1 - x0, y1 - y0
        assert (u >= 0).all() and (u <= w - 1).all() and (v >= 0).all() and (v <= h - 1).all(), \
            "sample outside the computed feature window"
        gx = 2 * u / max(w - 1, 1) - 1
        gy = 2 * v / max(h - 1, 1) - 1
        grid = torch.stack([gx, gy], dim=1).reshape(1, 1, -1, 2).to(self.feat.dtype)
        return F.grid_sample(self.feat, grid, mode="bilinear", align_corners=True)[0, :, 0].t()


def merged_windows(centres, margin: int, size: int):
    """Square image windows of half-size `margin` around centres, clipped, overlapping ones merged.

    Returns (windows, members): windows as [y0, y1, x0, x1]; members[j] lists the centres in window j.
    """
    windows: list[list[int]] = []
    members: list[list[int]] = []
    for i, (x, y) in enumerate(centres):
        b = [max(math.floor(y) - margin, 0), min(math.ceil(y) + margin + 1, size),
             max(math.floor(x) - margin, 0), min(math.ceil(x) + margin + 1, size)]
        for j, m in enumerate(windows):
            if b[0] < m[1] and m[0] < b[1] and b[2] < m[3] and m[2] < b[3]:
                windows[j] = [min(b[0], m[0]), max(b[1], m[1]), min(b[2], m[2]), max(b[3], m[3])]
                members[j].append(i)
                break
        else:
            windows.append(b)
            members.append([i])
    return windows, members


def feature_window_for(image_window, image_res: int, feature_res: int):
    """Feature-map window holding every bilinear neighbour of the image window's pixel centres."""
    y0, y1, x0, x1 = image_window
    lo = lambda v: max(math.floor((v + 0.5) * feature_res / image_res - 0.5), 0)  # noqa: E731
    hi = lambda v: min(math.ceil((v + 0.5) * feature_res / image_res - 0.5) + 2, feature_res)  # noqa: E731
    return lo(y0), hi(y1 - 1), lo(x0), hi(x1 - 1)


def windowed_features(G: Generator, cfg: DragConfig, ws, centres, margin: int, full: bool):
    """One FeatureWindow per centre covering image pixels within `margin` of it (None: full map).

    With `full` (a mask needs the whole map), when windows would cover most of the map, or when the
    network cannot be cropped exactly, the whole feature map is computed instead.
    Returns (per-centre feature windows, per-centre image windows, full feature map or None).
    """
    fr, res = cfg.feature_res, G.img_resolution
    if not full and cfg.windowed and G.cfg.architecture == "skip" and cfg.noise_mode != "random":
        image_wins, members = merged_windows(centres, margin, res)
        feat_wins = [feature_window_for(w, res, fr) for w in image_wins]
        area = sum((b[1] - b[0]) * (b[3] - b[2]) for b in feat_wins)
        if area < 0.6 * fr * fr:
            out_f, out_i = [None] * len(centres), [None] * len(centres)
            for fwin, iwin, idx in zip(feat_wins, image_wins, members):
                feat = features_in_window(G.synthesis, ws, fr, fwin, cfg.noise_mode, fused=fused_modconv_for(G))
                fw = FeatureWindow(feat, fwin, res, fr)
                for i in idx:
                    out_f[i], out_i[i] = fw, tuple(iwin)
            return out_f, out_i, None
    _, feat = G.synthesis(ws, noise_mode=cfg.noise_mode, feature_res=fr, stop_at_feature=True, fused=fused_modconv_for(G))
    fw = FeatureWindow(feat, (0, fr, 0, fr), res, fr)
    return [fw] * len(centres), [(0, res, 0, res)] * len(centres), feat


class OursStep:
    """Our formulation: native-grid bilinear features, windowed computation when possible."""

    def __init__(self, session: DragSession, cfg: DragConfig):
        self.s, self.cfg = session, cfg
        self.G = session.G
        self.res = session.resolution
        self.offsets = disc_offsets(cfg.r1).to(session.device)
        r2 = int(cfg.r2)
        d = torch.arange(-r2, r2 + 1, dtype=torch.float32, device=session.device)
        gy, gx = torch.meshgrid(d, d, indexing="ij")
        self.square = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)  # row-major (y, then x)
        k = int(cfg.track_patch)
        d = torch.arange(-k, k + 1, dtype=torch.float32, device=session.device)
        py, px = torch.meshgrid(d, d, indexing="ij")
        self.patch = torch.stack([px.reshape(-1), py.reshape(-1)], dim=1)  # [K, 2]; K = 1 for the paper
        f = torch.linspace(-0.5, 0.5, 5, device=session.device)
        fy, fx = torch.meshgrid(f, f, indexing="ij")
        self.fine = torch.stack([fx.reshape(-1), fy.reshape(-1)], dim=1)  # quarter-pixel offsets, [25, 2]
        # tracking square (and its patches), then the disc (plus one step) around any pixel of it
        self.margin = int(cfg.r2) + max(math.ceil(cfg.r1) + 1, k)
        self.held = 0  # steps taken after every handle arrived (mask_hold_steps)
        self._keep = None  # (mask, its keep weights): the mask cannot change during a run
        self._local_keep = None  # keep weights of the local term, on the feature grid

    def features(self, ws, centres, full: bool, image: bool = False):
        """(feature windows per centre, full feature map or None, image or None).

        The image is computed only when the mask is also compared on it (`lambda_image`): that needs
        the whole generator every step instead of stopping at the feature block.
        """
        if full and image and self.cfg.lambda_image > 0:
            fr = self.cfg.feature_res
            img, feat = self.G.synthesis(ws, noise_mode=self.cfg.noise_mode, feature_res=fr, fused=False)
            return [FeatureWindow(feat, (0, fr, 0, fr), self.res, fr)] * len(centres), feat, img
        wins, _, feat = windowed_features(self.G, self.cfg, ws, centres, self.margin, full)
        return wins, feat, None

    @torch.no_grad()
    def tracking_features(self, ws, centres, wins):
        """Feature windows for point tracking: the motion-supervision ones unless track_res differs."""
        if self.cfg.track_res == self.cfg.feature_res:
            return wins
        cfg = dataclasses.replace(self.cfg, feature_res=self.cfg.track_res)
        return windowed_features(self.G, cfg, ws.detach(), centres, self.margin, full=False)[0]

    def _nearest(self, fw: "FeatureWindow", reference: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The candidate point [2] whose (patch) features are nearest to the reference, and how far
        they are from it relative to the reference's own size (0: the feature itself)."""
        cand = cand[((cand >= 0) & (cand <= self.res - 1)).all(dim=1)]
        feats = fw.sample((cand[:, None] + self.patch[None]).reshape(-1, 2)).reshape(len(cand), len(self.patch), -1)
        diff = feats - reference[None]
        if self.cfg.tracking == "l1":
            dist, size = diff.abs().sum(dim=(1, 2)), reference.abs().sum()
        else:
            dist, size = diff.square().sum(dim=(1, 2)), reference.square().sum()
        best = int(torch.argmin(dist))
        return cand[best], float(dist[best] / size.clamp_min(1e-12))

    # --- one step
    def step(self, optimise: bool) -> StepResult:
        s, cfg, device = self.s, self.cfg, self.s.device
        pairs = s.pairs
        masked = s.mask_active and (cfg.lambda_mask > 0 or cfg.lambda_image > 0)
        local = not masked and cfg.lambda_local > 0  # the automatic region around the points
        ws = s._ws()
        # references for newly placed handles and for the mask term, from the current latent (new
        # points start a new edit: the local term then keeps the image as it is now)
        need_ref = [p for p in pairs if p.reference is None]
        need_mask_ref = (masked and (s._mask_reference is None
                                     or (cfg.lambda_image > 0 and s._mask_reference_image is None))
                         or local and (s._mask_reference is None or bool(need_ref)))
        if need_ref or need_mask_ref:
            with torch.no_grad():
                centres = [p.handle for p in need_ref] or [(0, 0)]
                wins, full_feat, image = self.features(ws.detach(), centres, full=masked or local, image=masked)
                for p, fw, mw in zip(need_ref, self.tracking_features(ws, centres, wins), wins):
                    at = torch.tensor(p.handle, dtype=torch.float32, device=device) + self.patch
                    p.reference = fw.sample(at)
                    p.anchor = mw.sample(at)
                    p.disc_reference = mw.sample(torch.tensor(p.handle, dtype=torch.float32, device=device) + self.offsets)
                if masked or local:
                    s._mask_reference = full_feat.detach()
                    s._mask_reference_image = None if image is None else image.detach()
        wins, full_feat, image = self.features(ws, [p.handle for p in pairs], full=masked or local, image=masked)

        # 1. point tracking on this step's features
        with torch.no_grad():
            for p, fw in zip(pairs, self.tracking_features(ws, [p.handle for p in pairs], wins)):
                centre = torch.tensor(p.handle, dtype=torch.float32, device=device)
                best, p.match = self._nearest(fw, p.reference, centre + self.square)
                if cfg.subpixel:  # two finer searches around the best pixel: 1/4 px, then 1/16 px
                    best, p.match = self._nearest(fw, p.reference, best + self.fine)
                    best, p.match = self._nearest(fw, p.reference, best + self.fine / 4)
                p.handle = as_point(best[0], best[1])

        distances = [math.dist(p.handle, p.target) for p in pairs]
        active = [d > cfg.stop_distance for d in distances]
        arrived = done = not any(active)
        holding = done and masked and self.held < cfg.mask_hold_steps
        loss_motion = torch.zeros((), device=device)
        if holding:
            # every handle is there: the keep terms pull the rest of the image back, while the
            # anchor holds each handle's first features at its target (a handle that drifts off
            # its target is pulled again by motion supervision)
            self.held += 1
            done = False
            if cfg.mask_hold_anchor > 0:
                for p, fw in zip(pairs, wins):
                    if p.anchor is None:  # a state from before anchors were kept: hold without one
                        continue
                    here = fw.sample(torch.tensor(p.target, dtype=torch.float32, device=device) + self.patch)
                    loss_motion = loss_motion + cfg.mask_hold_anchor * (here - p.anchor).abs().mean()
        for p, fw, act, dist in zip(pairs, wins, active, distances):
            if not act:
                continue
            centre = torch.tensor(p.handle, dtype=torch.float32, device=device)
            q = centre + self.offsets
            inside = ((q >= 0) & (q <= self.res - 1)).all(dim=1)
            q = q[inside]
            step = min(dist, 1.0) if cfg.adaptive_step else 1.0  # a full pixel overshoots a closer target
            direction = (torch.tensor(p.target, dtype=torch.float32, device=device) - centre) * (step / dist)
            goal = fw.sample(q).detach()
            # (a disc of another size, r1 having changed since the handle was placed: the paper's target)
            if cfg.motion_anchor > 0 and p.disc_reference is not None and len(p.disc_reference) == len(inside):
                goal = (1 - cfg.motion_anchor) * goal + cfg.motion_anchor * p.disc_reference[inside]
            loss_motion = loss_motion + (goal - fw.sample(q + direction)).abs().mean()
        loss_mask = torch.zeros((), device=device)
        loss_image = None
        if masked:
            if self._keep is None or self._keep[0] is not s.mask:
                self._keep = (s.mask, keep_weights(s.mask, cfg.mask_feather))
            keep = self._keep[1]
            keep_feat = F.interpolate(keep[None, None], size=full_feat.shape[-2:], mode="area")
            loss_mask = ((full_feat - s._mask_reference).abs() * keep_feat).mean()
            if image is not None:
                loss_image = ((image - s._mask_reference_image).abs() * keep).mean()
        if local:
            if self._local_keep is None:  # the points cannot change during a run
                self._local_keep = local_keep_weights(pairs, self.res, cfg.local_margin, full_feat.shape[-2:])
            loss_motion = loss_motion + cfg.lambda_local * ((full_feat - s._mask_reference).abs() * self._local_keep).mean()
        return _optimise_and_report(s, cfg, distances, done, loss_motion, loss_mask, optimise, loss_image, arrived)


class OfficialStep:
    """The official implementation's choices: features bilinearly up-sampled to image size, L2
    tracking on integer pixels, disc from a linspace grid, mean-L1 losses, its stop rule.

    Without a mask the up-sampled map is only built in tiles around the handles (from windowed
    features); the numbers are those of the full map, up to float rounding.
    """

    def __init__(self, session: DragSession, cfg: DragConfig):
        self.s, self.cfg = session, cfg
        for p in session.pairs:  # the official code works on integer pixels
            p.handle, p.target, p.origin = (tuple(round(v) for v in q) for q in (p.handle, p.target, p.origin))
        res = session.resolution
        grid = torch.linspace(0, res, res, device=session.device)  # sic: spacing res/(res-1)
        self.rows, self.cols = torch.meshgrid(grid, grid, indexing="ij")
        # tracking square + drifted disc (< r1 + 1) + one step + bilinear neighbour
        self.margin = int(cfg.r2) + math.ceil(cfg.r1) + 3

    def _tiles(self, ws, centres, full: bool):
        """Per centre: (up-sampled features [C, h, w], image window (y0, y1, x0, x1)); and the full map."""
        res = self.s.resolution
        wins, image_wins, feat = windowed_features(self.s.G, self.cfg, ws, centres, self.margin, full)
        if feat is not None:
            up = F.interpolate(feat, size=(res, res), mode="bilinear", align_corners=False)
            return [(up[0], (0, res, 0, res))] * len(centres), up
        tiles, built = [], {}
        for fw, (y0, y1, x0, x1) in zip(wins, image_wins):
            if id(fw) not in built:
                ys, xs = torch.meshgrid(torch.arange(y0, y1, dtype=torch.float32, device=ws.device),
                                        torch.arange(x0, x1, dtype=torch.float32, device=ws.device), indexing="ij")
                xy = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)
                built[id(fw)] = fw.sample(xy).t().reshape(-1, y1 - y0, x1 - x0)
            tiles.append((built[id(fw)], (y0, y1, x0, x1)))
        return tiles, None

    def step(self, optimise: bool) -> StepResult:
        s, cfg, res = self.s, self.cfg, self.s.resolution
        pairs = s.pairs
        masked = s.mask_active and (cfg.lambda_mask > 0 or cfg.lambda_image > 0)
        need_ref = [p for p in pairs if p.reference is None]
        if need_ref or (masked and s._mask_reference is None):
            with torch.no_grad():
                tiles, full = self._tiles(s._ws().detach(), [p.handle for p in need_ref] or [(0, 0)], masked)
                for p, (tile, (y0, _, x0, _)) in zip(need_ref, tiles):
                    p.reference = tile[:, p.handle[1] - y0, p.handle[0] - x0].clone()
                if masked:
                    s._mask_reference = full
        tiles, full = self._tiles(s._ws(), [p.handle for p in pairs], masked)
        r2 = int(cfg.r2)
        with torch.no_grad():
            for p, (tile, (y0, _, x0, _)) in zip(pairs, tiles):
                x, y = p.handle
                top, bottom, left, right = max(y - r2, 0), min(y + r2 + 1, res), max(x - r2, 0), min(x + r2 + 1, res)
                patch = tile[:, top - y0:bottom - y0, left - x0:right - x0]
                dist = torch.linalg.norm(patch - p.reference[:, None, None], dim=0)
                idx = int(torch.argmin(dist.reshape(-1)))
                w = right - left
                p.handle = (idx % w + left, idx // w + top)
        distances = [math.dist(p.handle, p.target) for p in pairs]
        done = all(d <= cfg.stop_distance for d in distances)
        loss_motion = torch.zeros((), device=s.device)
        for p, dist, (tile, (y0, y1, x0, x1)) in zip(pairs, distances, tiles):
            if dist <= 1:
                continue
            x, y = p.handle
            dx, dy = (p.target[0] - x) / (dist + 1e-7), (p.target[1] - y) / (dist + 1e-7)
            rows, cols = torch.where(((self.rows - y) ** 2 + (self.cols - x) ** 2).sqrt() < cfg.r1)
            rows, cols = rows - y0, cols - x0  # tile coordinates
            gy = (rows + dy) / (y1 - y0 - 1) * 2 - 1
            gx = (cols + dx) / (x1 - x0 - 1) * 2 - 1
            grid = torch.stack([gx, gy], dim=-1).reshape(1, 1, -1, 2)
            moved = F.grid_sample(tile[None], grid, align_corners=True)[0, :, 0]  # zero outside the image
            loss_motion = loss_motion + F.l1_loss(tile[:, rows, cols].detach(), moved)
        loss_mask = torch.zeros((), device=s.device)
        if masked:
            keep = 1 - s.mask
            loss_mask = F.l1_loss(full * keep, s._mask_reference * keep)
        return _optimise_and_report(s, cfg, distances, done, loss_motion, loss_mask, optimise)
