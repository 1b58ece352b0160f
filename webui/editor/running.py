"""Running a drag for the web UI (no gradio here): run settings, the streamed run with its history
step, Stop. A mixin of `webui.editor.state.EditorState`."""
from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from draggan_core.edit.engine import EndEvent, FrameEvent, StartEvent, StepEvent
from draggan_core.edit.session import DragSession
from draggan_core.edit.settings import DragConfig

from .. import services
from ..services import UIError, env_max_steps, parse_setting
from . import render
from .history import MAX_RUN_FRAMES, SNAPSHOT_BUDGET, HistoryStep, drop_old_snapshots, snapshot, thin, trim_frames

FRAME_INTERVAL = 0.1          # at most 10 streamed frames per second
STATUS_INTERVAL = 0.5         # without a new frame, the status still updates this often
JPEG_FROM_RESOLUTION = 256    # larger models stream JPEG frames (2 ms to encode at 512 px, PNG ~60 ms)
JPEG_QUALITY = 92


class RunMixin:
    """Runs of an EditorState (see there for the fields used)."""

    def configure(self, max_steps=None, lr=None, r1=None, r2=None, lambda_mask=None, stop_distance=None,
                  tracking=None, w_mode=None) -> int:
        """Apply run settings (None / blank = model default). Returns the number of steps to run."""
        steps = parse_setting(max_steps, "max steps", 1, 100_000, integer=True) or 300
        bound = env_max_steps()
        if bound is not None:
            steps = min(steps, bound)
        cfg = self.session.config
        lam = parse_setting(lambda_mask, "lambda", 0, 1e4)
        tracking = (tracking or "").lower() or None
        if tracking not in (None, "l1", "l2"):
            raise UIError("tracking must be L1 or L2")
        w_mode = (w_mode or "").lower()
        w_mode = None if w_mode in ("", "model default") else w_mode  # None: the model's recommendation
        if w_mode not in (None, "w", "w+"):
            raise UIError("latent space must be W or W+")
        new = DragConfig(
            lr=parse_setting(lr, "learning rate", 1e-6, 0.5), r1=parse_setting(r1, "r1", 0.5, 64),
            r2=parse_setting(r2, "r2", 1, 64, integer=True), lambda_mask=lam,
            feature_res=cfg.feature_res, num_optimized_ws=cfg.num_optimized_ws, w_mode=w_mode,
            tracking=tracking, stop_distance=parse_setting(stop_distance, "stop distance", 0, 64), max_steps=steps,
            noise_mode=cfg.noise_mode, display_every=0, compat=cfg.compat, windowed=cfg.windowed)
        try:
            new.resolve(self.G, max(1, len(self.session.pairs)), self.session.model_defaults)
        except ValueError as e:
            raise UIError(str(e)) from None
        self.session.config = new
        return steps

    def record_frame(self, img: np.ndarray):
        """The image now shown; also a frame of the current run's trajectory (thinned in place: the
        list is the run's history step's)."""
        self.image = img
        if len(self.frames) >= MAX_RUN_FRAMES:
            thin(self.frames, keep_last=False)
        self.frames.append(render.trajectory_frame(img))

    def status_text(self, result, run_steps: int, first_step: int, state: str) -> str:
        """'step 82 (this run: 3 / 300) - distances: 4.1 px - running': totals and this run's count."""
        d = ", ".join(f"{v:.1f}" for v in result.distances)
        return (f"step {result.step} (this run: {result.step - first_step} / {run_steps}) - "
                f"distances: {d} px - {state}")

    def frame_output(self, image: np.ndarray | None = None):
        """The display image as the canvas gets it: an array (PNG) or, from JPEG_FROM_RESOLUTION up,
        the path of a JPEG written here (2 ms instead of ~60 ms of PNG encoding per 512 px frame,
        time the optimisation would otherwise wait)."""
        shown = self.display(image)
        if self.resolution < JPEG_FROM_RESOLUTION:
            return shown
        self._frame_counter = getattr(self, "_frame_counter", 0) + 1
        # gradio copies a frame right after it is taken; 8 names outlast the newest-only hand-over
        path = self.workdir() / f"frame-{self._frame_counter % 8}.jpg"
        Image.fromarray(shown).save(path, "JPEG", quality=JPEG_QUALITY)
        return str(path)

    def run_stream(self, steps: int, display_every: int = 1):
        """Run the drag in a thread of its own and yield its newest `RunUpdate` whenever the caller
        (gradio, sending the previous one to the browser) asks: neither the previews nor the sending
        of updates hold the optimisation back, and a slow browser gets the newest update, never a
        queue of stale ones. Final updates are always delivered. Closing this generator (gradio's
        cancel) stops the run at its next step; like Stop, it leaves the final image to `stop_view`.
        Every run that took a step becomes a step of the history."""
        slot = UpdateSlot()
        self._cancel_run = False
        self.running, self.stop_requested = True, False

        def drive():
            try:
                for update in self._run_updates(steps, display_every):
                    slot.put(update)
            except BaseException as e:  # handed to the caller's thread, raised there
                slot.finish(e)
            else:
                slot.finish()

        worker = threading.Thread(target=drive, name="draggan-run", daemon=True)
        worker.start()
        try:
            while True:
                updates, error = slot.take()
                yield from updates
                if error is not None:
                    raise error
                if not updates:  # finished and emptied
                    return
        finally:
            self._cancel_run = True
            worker.join()

    def _run_updates(self, steps: int, display_every: int = 1):
        """The run itself (in `run_stream`'s thread): a frame whenever the background renderer has a
        newer one (at most every FRAME_INTERVAL), else the status every STATUS_INTERVAL; the last
        update shows `render(final latent)` exactly; Stop leaves that to `stop_view`."""
        s = self.session
        first_step = s.step_count
        self.pending = None
        before, snap_before = self.marks(), snapshot(s, self.recorder)
        self.frames = []  # this run's; its history step keeps the same list
        result = end = newest = None
        shown_step = first_step
        last_yield = time.perf_counter()
        # the engine keeps `s` at the newest state it has streamed (a remote engine that goes away
        # mid-run leaves it at the last step seen here)
        run = services.ENGINE.run_session(s, self.model_path, steps, display_every)
        try:
            for event in run:
                if isinstance(event, FrameEvent):
                    if event.step > shown_step:
                        newest = event
                    now = time.perf_counter()
                    # shown as it comes when no step is due soon (a big model's steps are slow, and the
                    # preview drawn while the final frame renders comes after the last step)
                    if (newest is None or result is None or self.stop_requested or self._cancel_run
                            or now - last_yield < FRAME_INTERVAL):
                        continue
                    self.record_frame(newest.image)
                    shown_step, newest, last_yield = newest.step, None, now
                    yield self._running_update(self.frame_output(), result, steps, first_step)
                    continue
                if isinstance(event, EndEvent):
                    end = event
                    break
                if isinstance(event, StartEvent):
                    self.last_engine = dict(event.engine)
                    continue
                if not isinstance(event, StepEvent):
                    continue
                result = event.result
                self.last_distances = result.distances
                if self.stop_requested or self._cancel_run:
                    break
                if result.done:
                    continue  # the end event follows
                now = time.perf_counter()
                first = result.step == first_step + 1
                if newest is not None and now - last_yield >= FRAME_INTERVAL:
                    self.record_frame(newest.image)
                    shown_step, newest = newest.step, None
                    image = self.frame_output()
                elif first or now - last_yield >= STATUS_INTERVAL:
                    image = self.frame_output() if first else None  # first answer: moved markers
                else:
                    continue
                # the interval counts from this decision, not from when gradio has sent the update, so
                # frames come every FRAME_INTERVAL (8 per second) when renders keep up
                last_yield = now
                yield self._running_update(image, result, steps, first_step)
        finally:
            run.close()
            try:
                stopped = self.stop_requested or self._cancel_run
                outcome = ("stopped" if stopped else "engine lost" if end is not None and end.reason in ("lost", "error")
                           else _outcome(result))
                self._record_run(before, snap_before, first_step, outcome, stopped or outcome == "engine lost")
            finally:
                self.running = False
        if end is not None and end.engine:
            self.last_engine = dict(end.engine)
        stopped = self.stop_requested or self._cancel_run  # the stop handler shows the exact image
        if end is not None and end.reason in ("lost", "error") and not stopped:
            self.record_frame(s.render())  # the last state streamed back, exactly
            self.last_status = end.message
            yield RunUpdate(self.frame_output(), self.points_text(), end.message, final=True, warning=True)
            return
        if result is None:
            yield RunUpdate(None, self.points_text(), "nothing to do", final=True)
            return
        if stopped:
            return
        self.record_frame(result.image if result.image is not None else s.render())
        if result.message:  # how the run ended, in the engine's words (a divergence rolled back, ...)
            self.last_status = result.message
            yield RunUpdate(self.frame_output(), self.points_text(), result.message, final=True,
                            warning=not result.reached)
            return
        how = ("done: every handle reached its target" if result.reached
               else "max steps reached: press Start to continue")
        self.last_status = self.status_text(result, steps, first_step, how)
        yield RunUpdate(self.frame_output(), self.points_text(), self.last_status, final=True)

    def _running_update(self, image, result, steps: int, first_step: int) -> RunUpdate:
        # a step that has every handle there but goes on is a mask's hold step (mask_hold_steps)
        how = "handles there, the fixed region settles" if result.reached else "running"
        return RunUpdate(image, self.points_text(), self.status_text(result, steps, first_step, how))

    def _record_run(self, before, snap_before, first_step: int, outcome: str, stopped: bool):
        """A run that took steps becomes the newest history step (runs undone before it are dropped)
        and a run of the recipe."""
        s = self.session
        taken = s.step_count - first_step
        if taken <= 0:
            return
        try:
            self.recorder.record_run(s, stopped_after=taken if stopped else None)
        except Exception as e:  # the edit goes on; only its recipe is incomplete
            print(f"webui: run not recorded for the recipe: {type(e).__name__}: {e}", file=sys.stderr)
        del self.history[self.cursor:]
        self.history.append(HistoryStep(latent=s.latent.detach().cpu(), before=before, after=self.marks(),
                                        steps=taken, outcome=outcome, snap_before=snap_before,
                                        snap_after=snapshot(s, self.recorder), frames=self.frames))
        self.cursor = len(self.history)
        trim_frames(self.history)
        drop_old_snapshots(self.history, SNAPSHOT_BUDGET)
        self.version += 1

    def warm_up(self, steps: int = 2):
        """A throwaway drag of a few steps, so the first user's Start does not pay one-time costs
        (torch imports its compiler stack when the first optimiser is built, ~2 s; kernel set-up)."""
        res = self.resolution
        session = DragSession(self.G, self.session.w_initial, model_defaults=self.session.model_defaults)
        session.add_pair((res // 2, res // 2), (res // 2 + max(2, res // 16), res // 2))
        for _ in session.run(max_steps=steps):
            pass

    def stop_view(self) -> str:
        """After a stop: the exact image of the latent the run stopped at, and the status to show."""
        self.record_frame(self.session.render())
        self.version += 1
        d = ", ".join(f"{math.dist(p.handle, p.target):.1f}" for p in self.session.pairs)
        return f"stopped at step {self.session.step_count} - distances: {d} px - press Start to resume"


RUN_END_WORDS = {"arrived": "done", "max_steps": "max steps", "lost_handle": "handle lost", "limit": "at the limit",
                 "stalled": "stalled", "diverged": "rolled back"}


def _outcome(result) -> str:
    """How a run ended, in a word or two for the history strip."""
    if result is None:
        return "no step"
    end = getattr(result, "end", None)
    if end in RUN_END_WORDS:
        return RUN_END_WORDS[end]
    if result.message and not result.reached:
        return "rolled back"
    return "done" if result.reached else "max steps"


class UpdateSlot:
    """Hands a running drag's updates to the thread that sends them: the newest pending progress
    update replaces an older one; final updates are kept in order."""

    def __init__(self):
        self._cv = threading.Condition()
        self._progress: RunUpdate | None = None
        self._finals: list[RunUpdate] = []
        self._done = False
        self._error: BaseException | None = None

    def put(self, update: "RunUpdate") -> None:
        with self._cv:
            if update.final:
                self._finals.append(update)
            else:
                self._progress = update
            self._cv.notify()

    def finish(self, error: BaseException | None = None) -> None:
        with self._cv:
            self._done, self._error = True, error
            self._cv.notify()

    def take(self) -> tuple[list["RunUpdate"], BaseException | None]:
        """Wait for news: (updates, error); ([], None) once the run has finished and all was taken."""
        with self._cv:
            while self._progress is None and not self._finals and not self._done:
                self._cv.wait()
            updates = ([self._progress] if self._progress is not None else []) + self._finals
            self._progress, self._finals = None, []
            error, self._error = self._error, None
            return updates, error


@dataclass
class RunUpdate:
    """One streamed update of a run: image None means 'keep the one shown'."""
    image: object              # HxWx3 uint8 array, a JPEG path, or None
    points: str
    status: str
    final: bool = False
    warning: bool = False      # the status is a problem to show as a warning
