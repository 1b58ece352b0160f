"""An editing session's history (no gradio): the points and mask as placed (`Marks`), and one
`HistoryStep` per finished or stopped run, so that any run can be undone and redone and a recipe
can replay them all."""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

MAX_FRAMES = 300              # trajectory frames kept for the GIF, all runs together
MAX_RUN_FRAMES = 120          # one run's frames before thinning
SNAPSHOT_BUDGET = 128 << 20   # bytes of session copies one editor keeps for undo / redo


@dataclass
class Marks:
    """Points and mask of a session: pairs (origin, handle, target) in model pixels, a pending
    handle, the flexible region (bool, model pixels) and how the brush painted it."""
    resolution: int
    pairs: list = field(default_factory=list)
    pending: tuple | None = None
    mask: np.ndarray | None = None
    paint_fixed: bool = False
    layer: np.ndarray | None = None   # the mask as the brush painted it (editor pixels), when it was

    def empty(self) -> bool:
        return not self.pairs and self.pending is None and self.mask is None

    def describe(self) -> str:
        """'2 point pairs and the mask', 'a handle', ..."""
        parts = []
        n = len(self.pairs)
        if n:
            parts.append(f"{n} point pair{'s' if n > 1 else ''}")
        if self.pending is not None:
            parts.append("a handle")
        if self.mask is not None:
            parts.append("the mask")
        if not parts:
            return "nothing"
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    def same(self, other: "Marks") -> bool:
        """The same points (as placed and as tracked), pending handle and mask."""
        masks_equal = (self.mask is None and other.mask is None) or (
            self.mask is not None and other.mask is not None and np.array_equal(self.mask, other.mask))
        return (self.pairs == other.pairs and self.pending == other.pending and masks_equal
                and (self.mask is None or self.paint_fixed == other.paint_fixed))

    def scaled(self, resolution: int, at_origin: bool = False) -> "Marks":
        """The same marks on an image of another resolution (points scaled, clamped onto it);
        at_origin: handles back where they were placed (a new image: nothing has moved yet)."""
        k = resolution / self.resolution

        def pt(p):
            return tuple(min(max(round(v * k, 3) if k != 1 else v, 0), resolution - 1) for v in p)

        pairs = [(pt(o), pt(o if at_origin else h), pt(t)) for o, h, t in self.pairs]
        pending = None if self.pending is None else tuple(int(v) for v in pt(self.pending))
        return Marks(resolution, pairs, pending, self.mask, self.paint_fixed,
                     self.layer if k == 1 else None)



@dataclass
class HistoryStep:
    """One finished or stopped run: the latent it ended at, and the session (with the recipe recorder)
    exactly as the run started and as it ended, so that undo, redo and the next Start continue as if
    nothing had been undone (optimiser moments, tracked handles, reference features)."""
    latent: torch.Tensor          # [1, num_ws, w_dim] on the CPU, after the run
    before: Marks                 # points and mask as the run started
    after: Marks                  # ... and as it ended
    steps: int                    # steps this run took
    outcome: str                  # "done", "max steps", "stopped", ...
    snap_before: tuple | None = None  # (DragSession, EditRecorder) copies; None once dropped for memory
    snap_after: tuple | None = None
    frames: list = field(default_factory=list)  # its trajectory frames (shared with the editor while it runs)

    def label(self, index: int) -> str:
        return f"run {index}: {self.steps} step{'s' if self.steps != 1 else ''}, {self.outcome}"

    def caption(self, index: int) -> str:
        """Short, for a thumbnail: 'run 2: 40'."""
        return f"run {index}: {self.steps}"

    @property
    def nbytes(self) -> int:
        return sum(session_bytes(snap[0]) for snap in (self.snap_before, self.snap_after) if snap is not None)


def snapshot(session, recorder) -> tuple:
    """A copy of (session, recorder) that shares the generator: everything else (latents, optimiser,
    point pairs and their features, the mask) is copied, the pairs' identities as the recorder sees
    them included. Restore with `snapshot(*snap)` again, which leaves the stored one untouched."""
    G = session.G
    memo = {id(x): x for x in itertools.chain([G], G.modules(), G.parameters(), G.buffers())}
    return copy.deepcopy((session, recorder), memo)


def session_bytes(session) -> int:
    """Tensor bytes a session holds besides the generator (what a snapshot costs)."""
    total = 0
    for value in vars(session).values():
        if torch.is_tensor(value):
            total += value.numel() * value.element_size()
        elif isinstance(value, torch.optim.Optimizer):
            total += sum(t.numel() * t.element_size() for st in value.state.values() for t in st.values()
                         if torch.is_tensor(t))
    for pair in getattr(session, "pairs", []):
        for value in vars(pair).values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def drop_old_snapshots(steps: list, budget: int) -> None:
    """Keep the snapshots' memory under `budget` bytes: the oldest steps lose theirs first (they stay
    in the strip and the recipe, but can no longer be returned to); the newest keeps its own."""
    total = sum(s.nbytes for s in steps)
    for step in steps[:-1]:
        if total <= budget:
            return
        total -= step.nbytes
        step.snap_before = step.snap_after = None


def thin(frames: list, keep_last: bool = True) -> None:
    """Halve a frame list in place, keeping the first and (keep_last) the last frame."""
    last = frames[-1] if frames else None
    frames[:] = frames[::2]
    if keep_last and last is not None and frames[-1] is not last:
        frames.append(last)


def trim_frames(steps: list) -> None:
    """Keep all runs' frames under MAX_FRAMES: thin the runs holding the most."""
    while sum(len(s.frames) for s in steps) > MAX_FRAMES:
        biggest = max(steps, key=lambda s: len(s.frames))
        if len(biggest.frames) <= 2:
            return
        thin(biggest.frames)
