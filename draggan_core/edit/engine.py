"""The engine protocol: a drag run as a request that carries all its state, and the engines that run it.

A run needs nothing from the process that asks for it except a `RunState`: the model id, the latents,
the optimised parameter and Adam's moments, the point pairs with their reference features, the mask
with its reference, the settings and the step count. `export_run_state(session)` takes it from a
`DragSession`, `session_from_state(G, state)` rebuilds one, and a run split anywhere (export after k
steps, restore, continue) ends exactly where the uninterrupted run ends. Because the state travels
with each run, any engine process can serve any run, and one that disappears loses nothing the caller
has already received.

`Engine.run(state, steps)` streams events: `StartEvent` (who serves the run), `StepEvent` (one per step, the `StepResult`), `FrameEvent`
(preview images of the newest latent), `StateEvent` (the full state once the run has taken its
references, then a small `RunProgress` -- what a step changes -- every `state_every` steps) and a
final `EndEvent`. `RunHandle.cancel()` stops it between steps.

`LocalEngine` runs in this process and previews through the background `FrameRenderer`; the web UI
uses it by default through `run_session`, on its live session (no copies). The Ray Serve engine in
`draggan_core/serving/ray_engine.py` speaks the same protocol across processes and machines. This module never imports
ray.
"""
from __future__ import annotations

import dataclasses
import io
import json
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .frames import FrameRenderer
from .session import DragSession
from .settings import DragConfig, PointPair, StepResult

STATE_VERSION = 1
FIRST_FRAME_WAIT_S = 10.0  # longest a run waits for its first preview (a slow or failed render must not stall it)
FINAL_FRAME_WAIT_S = 120.0  # longest a run waits for the renderer's final frame before rendering it itself


class EngineError(RuntimeError):
    """A run could not be served (bad state, unknown model, the engine went away); one line for users."""


# ------------------------------------------------------------------------------------------------
# the state that travels with a run
# ------------------------------------------------------------------------------------------------

@dataclass
class PairState:
    handle: tuple
    target: tuple
    origin: tuple
    reference: np.ndarray | None = None   # [K, C] features at the handle when the run took them
    anchor: np.ndarray | None = None      # the same on the motion-supervision block (mask hold steps)
    disc_reference: np.ndarray | None = None  # the motion disc's features when placed (motion_anchor)


@dataclass
class AdamState:
    step: float                # Adam's step counter (its bias correction depends on it)
    exp_avg: np.ndarray
    exp_avg_sq: np.ndarray
    hyper: dict                # the param group's settings (lr, betas, eps, ...)


@dataclass
class RunProgress:
    """What one step changes: a few kilobytes, whatever the model's size."""
    step_count: int
    handles: list
    param: np.ndarray | None
    adam: AdamState | None


@dataclass
class RunState:
    """Everything the optimiser needs to resume an edit. Plain numpy and JSON-able values only."""
    model: str                             # model id: a checkpoint path, or a file name in checkpoints/
    w_initial: np.ndarray                  # [1, num_ws, w_dim]: where the edit started
    w_full: np.ndarray                     # [1, num_ws, w_dim]: the latent outside the optimised head
    param: np.ndarray | None               # the optimised head ([1, n, w_dim] in W+, [1, 1, w_dim] in W)
    param_layout: tuple | None             # (n, "w" | "w+")
    adam: AdamState | None
    pairs: list[PairState]
    mask: np.ndarray | None                # [S, S], 1 = may change
    mask_reference: np.ndarray | None      # feature block at the mask's first step
    mask_reference_image: np.ndarray | None
    reference_key: tuple | None            # (compat, track_res, track_patch) the references were taken with
    config: dict                           # DragConfig as set (None = the model's default)
    resolved: dict | None                  # what `config` resolves to for this model (checked on restore)
    model_defaults: dict
    step_count: int
    version: int = STATE_VERSION

    def progress(self) -> RunProgress:
        return RunProgress(self.step_count, [p.handle for p in self.pairs], self.param, self.adam)

    def with_progress(self, progress: RunProgress) -> "RunState":
        """This state advanced by a streamed `RunProgress` (the large, constant parts are shared)."""
        if len(progress.handles) != len(self.pairs):
            raise EngineError("progress does not match the run's point pairs")
        pairs = [dataclasses.replace(p, handle=tuple(h)) for p, h in zip(self.pairs, progress.handles)]
        return dataclasses.replace(self, step_count=progress.step_count, pairs=pairs, param=progress.param,
                                   adam=progress.adam)

    # -- a safe byte format (npz without pickles + JSON), for storing or sending outside Ray
    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {}

        def put(name, value):
            if value is None:
                return None
            arrays[name] = np.asarray(value)
            return name

        meta = {
            "version": self.version, "model": self.model, "param_layout": self.param_layout,
            "reference_key": self.reference_key, "config": self.config, "resolved": self.resolved,
            "model_defaults": self.model_defaults, "step_count": self.step_count,
            "w_initial": put("w_initial", self.w_initial), "w_full": put("w_full", self.w_full),
            "param": put("param", self.param), "mask": put("mask", self.mask),
            "mask_reference": put("mask_reference", self.mask_reference),
            "mask_reference_image": put("mask_reference_image", self.mask_reference_image),
            "adam": None if self.adam is None else {
                "step": self.adam.step, "hyper": self.adam.hyper,
                "exp_avg": put("adam_exp_avg", self.adam.exp_avg),
                "exp_avg_sq": put("adam_exp_avg_sq", self.adam.exp_avg_sq)},
            "pairs": [{"handle": p.handle, "target": p.target, "origin": p.origin,
                       "reference": put(f"reference_{i}", p.reference),
                       "anchor": put(f"anchor_{i}", p.anchor),
                       "disc_reference": put(f"disc_reference_{i}", p.disc_reference)}
                      for i, p in enumerate(self.pairs)],
        }
        buf = io.BytesIO()
        np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "RunState":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(arrays.pop("__meta__").tobytes().decode())
        except Exception as e:
            raise EngineError(f"not a run state: {type(e).__name__}: {e}") from None
        if meta.get("version") != STATE_VERSION:
            raise EngineError(f"run state version {meta.get('version')} is not {STATE_VERSION}")
        get = lambda name: None if name is None else arrays[name]  # noqa: E731
        adam = meta["adam"]
        tup = lambda v: None if v is None else tuple(v)  # noqa: E731
        return cls(
            model=meta["model"], w_initial=get(meta["w_initial"]), w_full=get(meta["w_full"]),
            param=get(meta["param"]), param_layout=tup(meta["param_layout"]),
            adam=None if adam is None else AdamState(adam["step"], get(adam["exp_avg"]), get(adam["exp_avg_sq"]),
                                                      adam["hyper"]),
            pairs=[PairState(tuple(p["handle"]), tuple(p["target"]), tuple(p["origin"]), get(p["reference"]),
                             get(p.get("anchor")), get(p.get("disc_reference"))) for p in meta["pairs"]],
            mask=get(meta["mask"]), mask_reference=get(meta["mask_reference"]),
            mask_reference_image=get(meta["mask_reference_image"]), reference_key=tup(meta["reference_key"]),
            config=meta["config"], resolved=meta["resolved"], model_defaults=meta["model_defaults"],
            step_count=meta["step_count"])


def latent_of(state: RunState) -> np.ndarray:
    """The W+ latent [1, num_ws, w_dim] a state stands for (what `DragSession.latent` would return)."""
    if state.param is None:
        return np.asarray(state.w_full, np.float32)
    n, mode = state.param_layout
    head = np.repeat(state.param, n, axis=1) if mode == "w" else state.param
    return np.concatenate([head, state.w_full[:, n:]], axis=1).astype(np.float32)


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy().copy()


def _adam_state(opt: torch.optim.Optimizer | None) -> AdamState | None:
    if opt is None:
        return None
    state = opt.state_dict()
    group = {k: v for k, v in state["param_groups"][0].items() if k != "params"}
    moments = state["state"].get(0)
    if not moments:  # built, but no step taken yet
        return AdamState(0.0, None, None, group)
    return AdamState(float(moments["step"]), _np(moments["exp_avg"]), _np(moments["exp_avg_sq"]), group)


def _resolved_config(session: DragSession) -> dict | None:
    try:
        cfg = session.config.resolve(session.G, len(session.pairs), session.model_defaults,
                                     masked=session.mask_active)
    except ValueError:
        return None
    return dataclasses.asdict(cfg)


def run_progress(session: DragSession) -> RunProgress:
    """The part of the session one step changes (cheap: the latent head and Adam's moments)."""
    return RunProgress(session.step_count, [p.handle for p in session.pairs], _np(session._param),
                       _adam_state(session._opt))


def export_run_state(session: DragSession, model: str) -> RunState:
    """Everything needed to resume `session` elsewhere. `model` names its generator for the engine."""
    return RunState(
        model=str(model), w_initial=_np(session.w_initial), w_full=_np(session._w_full), param=_np(session._param),
        param_layout=None if session._param_layout is None else tuple(session._param_layout),
        adam=_adam_state(session._opt),
        pairs=[PairState(p.handle, p.target, p.origin, _np(p.reference), _np(p.anchor), _np(p.disc_reference))
               for p in session.pairs],
        mask=_np(session.mask), mask_reference=_np(session._mask_reference),
        mask_reference_image=_np(session._mask_reference_image),
        reference_key=None if session._reference_key is None else tuple(session._reference_key),
        config=dataclasses.asdict(session.config), resolved=_resolved_config(session),
        model_defaults=dict(session.model_defaults), step_count=session.step_count)


def apply_run_state(session: DragSession, state: RunState) -> DragSession:
    """Make `session` (same generator) continue from `state`; returns it."""
    device = session.device
    t = lambda a: None if a is None else torch.tensor(np.asarray(a)).to(device)  # noqa: E731  (a copy: arrays may be read-only)
    session.model_defaults = dict(state.model_defaults)
    session.config = DragConfig(**state.config)
    session.w_initial = t(state.w_initial).float()
    session._w_full = t(state.w_full).float()
    session.pairs = [PointPair(handle=tuple(p.handle), target=tuple(p.target), origin=tuple(p.origin),
                               reference=t(p.reference), anchor=t(p.anchor), disc_reference=t(p.disc_reference))
                      for p in state.pairs]
    session.mask = t(state.mask)
    session._mask_reference = t(state.mask_reference)
    session._mask_reference_image = t(state.mask_reference_image)
    session._reference_key = None if state.reference_key is None else tuple(state.reference_key)
    session.step_count = int(state.step_count)
    if state.param is None:
        session._param = session._opt = session._param_layout = None
    else:
        session._param = t(state.param).float().requires_grad_(True)
        session._param_layout = tuple(state.param_layout)
        session._opt = _restore_adam(session._param, state.adam)
    return session


def _restore_adam(param: torch.Tensor, adam: AdamState | None) -> torch.optim.Adam:
    hyper = dict(adam.hyper) if adam is not None else {}
    opt = torch.optim.Adam([param], lr=hyper.get("lr", 1e-3))
    if adam is None:
        return opt
    group = {**opt.state_dict()["param_groups"][0], **hyper, "params": [0]}
    if isinstance(group.get("betas"), list):
        group["betas"] = tuple(group["betas"])
    state = {}
    if adam.exp_avg is not None:
        state[0] = {"step": torch.tensor(float(adam.step), dtype=torch.float32),
                    "exp_avg": torch.tensor(np.asarray(adam.exp_avg)).to(param.device),
                    "exp_avg_sq": torch.tensor(np.asarray(adam.exp_avg_sq)).to(param.device)}
    opt.load_state_dict({"state": state, "param_groups": [group]})
    return opt


def session_from_state(G, state: RunState) -> DragSession:
    """A new `DragSession` on generator G continuing from `state`.

    Raises EngineError when the state does not fit G (shape, or the settings resolve differently:
    another checkpoint behind the same name)."""
    if state.version != STATE_VERSION:
        raise EngineError(f"run state version {state.version} is not {STATE_VERSION}")
    try:
        session = DragSession(G, torch.as_tensor(np.asarray(state.w_initial)), config=DragConfig(**state.config),
                              model_defaults=state.model_defaults)
    except (ValueError, TypeError) as e:
        raise EngineError(f"the run state does not fit model {state.model}: {e}") from None
    apply_run_state(session, state)
    if state.resolved is not None and _resolved_config(session) != state.resolved:
        raise EngineError(f"model {state.model} resolves the drag settings differently here: "
                          "the engine has another checkpoint under that name")
    return session


def resolve_model_id(model: str) -> Path:
    """An engine's file for a model id: the path itself when it exists here, else that file name in
    this installation's checkpoints/ folder (so clusters need the same checkpoints, not the same paths)."""
    from ..model.paths import CHECKPOINTS_DIR
    p = Path(model).expanduser()
    if p.is_file():
        return p.resolve()
    local = CHECKPOINTS_DIR / Path(model).name
    if local.is_file():
        return local.resolve()
    raise EngineError(f"model {Path(model).name} is not available to this engine (no such file in {CHECKPOINTS_DIR})")


# ------------------------------------------------------------------------------------------------
# events
# ------------------------------------------------------------------------------------------------

@dataclass
class StartEvent:
    step: int                          # the session's step count when the run started
    engine: dict = field(default_factory=dict)  # who serves the run (e.g. {"engine": "ray", "replica": ...})


@dataclass
class StepEvent:
    result: StepResult                 # image set only on the last step (the exact final render)


@dataclass
class FrameEvent:
    step: int                          # the step whose latent the image shows
    image: np.ndarray                  # HxWx3 uint8
    render_seconds: float = 0.0
    batch_size: int = 1                # frames rendered in the same forward


@dataclass
class StateEvent:
    state: RunState | None = None      # the full state (first after the references were taken)
    progress: RunProgress | None = None  # or what the steps since changed


@dataclass
class EndEvent:
    reason: str                        # "done", "max_steps", "cancelled", "diverged", "lost" (the engine), "error",
                                       # or a run's own end (drag.RUN_ENDS): "lost_handle", "stalled"
    step: int
    message: str | None = None
    engine: dict = field(default_factory=dict)  # who served the run (e.g. the replica)


class RunHandle:
    """An iterator of events with `cancel()` (honoured between steps) and `close()`."""

    def __init__(self, events: Iterator, cancel_event: threading.Event | None = None, on_cancel=None):
        self._events = events
        self._cancel = cancel_event or threading.Event()
        self._on_cancel = on_cancel  # e.g. cancels a remote request

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._events)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()
        if self._on_cancel is not None:
            self._on_cancel()

    def close(self) -> None:
        self.cancel()
        close = getattr(self._events, "close", None)
        if close is not None:
            close()


class Engine(ABC):
    """Runs drags. `run` takes a state and streams events; `run_session` drives a live session."""

    name = "engine"
    concurrent_runs: int | None = None  # runs a front end may send at once (None: its own default)

    @abstractmethod
    def run(self, state: RunState, steps: int, display_every: int = 1, state_every: int = 1) -> RunHandle:
        """Run up to `steps` steps from `state`. Events: StartEvent first, StepEvent per step, FrameEvent when a preview
        is ready (about every `display_every` steps), StateEvent (full, then RunProgress every
        `state_every` steps; 0: only at the end), EndEvent last."""

    def run_session(self, session: DragSession, model: str, steps: int, display_every: int = 1) -> RunHandle:
        """Run from `session`'s state and keep `session` at the newest state streamed back, so a run
        that ends early (cancelled, engine lost) leaves it at the last step the caller saw."""
        handle = self.run(export_run_state(session, model), steps, display_every=display_every, state_every=1)
        return RunHandle(_follow(session, handle), on_cancel=handle.cancel)

    def close(self) -> None:
        """Release what the engine holds (processes, connections)."""

    def describe(self) -> str:
        return self.name


def _follow(session: DragSession, handle: RunHandle) -> Iterator:
    """Pass events on; apply each streamed state to the session before the step it belongs to."""
    full = False
    try:
        for event in handle:
            if isinstance(event, StateEvent):
                if event.state is not None:
                    apply_run_state(session, event.state)
                    full = True
                elif event.progress is not None and full:
                    apply_run_progress(session, event.progress)
            yield event
    finally:
        handle.close()


def apply_run_progress(session: DragSession, progress: RunProgress) -> DragSession:
    """Advance a session that holds its run's full state by one streamed `RunProgress` (cheap: the
    references and the mask's stay as they are)."""
    if len(progress.handles) != len(session.pairs):
        raise EngineError("progress does not match the run's point pairs")
    for p, h in zip(session.pairs, progress.handles):
        p.handle = tuple(h)
    session.step_count = int(progress.step_count)
    if progress.param is not None:
        session._param = torch.tensor(np.asarray(progress.param)).to(session.device).float().requires_grad_(True)
        session._opt = _restore_adam(session._param, progress.adam)
    return session


# ------------------------------------------------------------------------------------------------
# in-process engine
# ------------------------------------------------------------------------------------------------

class LocalEngine(Engine):
    """Runs in this process: steps in the caller's thread, previews from a background `FrameRenderer`.

    threads: a `devices.ThreadBudget` (each run sets its thread share), or None to leave torch's.
    store: a `models.ModelStore` for `run(state)` (model ids -> generators); `run_session` needs none.
    """

    name = "local"

    def __init__(self, renderer: FrameRenderer | None = None, threads=None, store=None):
        self.renderer = renderer
        self.threads = threads
        self.store = store

    def _generator(self, model: str):
        if self.store is None:
            from ..model.store import ModelStore
            self.store = ModelStore()
        try:
            return self.store.get(resolve_model_id(model)).G
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"cannot load model {Path(model).name}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None

    def run(self, state: RunState, steps: int, display_every: int = 1, state_every: int = 1) -> RunHandle:
        session = session_from_state(self._generator(state.model), state)
        cancel = threading.Event()
        return RunHandle(self._events(session, state.model, steps, display_every, state_every, cancel), cancel)

    def run_session(self, session: DragSession, model: str, steps: int, display_every: int = 1) -> RunHandle:
        """On the live session itself: nothing is copied (the web UI's default path)."""
        cancel = threading.Event()
        return RunHandle(self._events(session, model, steps, display_every, 0, cancel, export=False), cancel)

    def _events(self, session: DragSession, model: str, steps: int, display_every: int, state_every: int,
                cancel: threading.Event, export: bool = True) -> Iterator:
        # with a renderer, the final frame is its exact job (previews still drawing come out first)
        gen = session.run(max_steps=steps, render_final=self.renderer is None)
        result = None
        full_sent = False
        shown_step = submitted_step = session.step_count
        first_frame = True
        budget = self.threads.run() if self.threads is not None else _NoBudget()
        stream = self.renderer.open_stream() if self.renderer is not None else None
        reason = "cancelled"
        yield StartEvent(session.step_count, {"engine": self.name})
        try:
            with budget as threads:
                for result in gen:
                    if export and not full_sent:
                        # the first step took the references: from now on only progress travels
                        yield StateEvent(state=export_run_state(session, model))
                        full_sent = True
                    elif export and (result.done or (state_every and result.step % state_every == 0)):
                        yield StateEvent(progress=run_progress(session))
                    if stream is not None and not result.done and not cancel.is_set():
                        threads.refresh()
                        if result.step - submitted_step >= display_every:
                            # the first new image is what tells the user the drag works: while this run
                            # is the only one, it waits for it and lends its threads to the renderer
                            urgent = first_frame and (self.threads is None or self.threads.runs <= 1)
                            stream.submit(session.G, session.latent, result.step, session.config.noise_mode, urgent)
                            submitted_step, first_frame = result.step, False
                            if urgent:
                                stream.wait(shown_step, FIRST_FRAME_WAIT_S, cancel.is_set)
                        frame = stream.newest(after_step=shown_step)
                        if frame is not None:  # before its step's result: the caller sees it as it decides
                            shown_step = frame.step
                            yield FrameEvent(frame.step, frame.image, frame.render_seconds)
                    elif not result.done:
                        threads.refresh()
                    if stream is not None and result.done:
                        yield from _final_frame(session, stream, result, shown_step)
                    yield StepEvent(result)
                    if result.done:
                        reason = {"arrived": "done", None: "done" if result.reached else "max_steps"}.get(result.end, result.end)
                        break
                    if cancel.is_set():
                        break
        finally:
            gen.close()
            if stream is not None:
                stream.close()
        if export and result is not None and not result.done:  # cancelled: where it stopped, exactly
            yield StateEvent(progress=run_progress(session))
        yield EndEvent(reason if result is not None else "done", session.step_count,
                       result.message if result is not None else "nothing to do", {"engine": self.name})


def _final_frame(session: DragSession, stream, result: StepResult, shown_step: int) -> Iterator[FrameEvent]:
    """Set `result.image` to the renderer's exact render of the final latent; a preview still being
    drawn when the steps ended comes out (as a FrameEvent) while it waits."""
    stream.submit(session.G, session.latent, result.step, session.config.noise_mode, exact=True)
    deadline = time.perf_counter() + FINAL_FRAME_WAIT_S
    while result.image is None:
        frame = stream.wait(shown_step, max(0.0, deadline - time.perf_counter()))
        if frame is None:  # the renderer failed or is stuck: render here
            result.image = session.render()
        elif frame.exact:
            result.image = frame.image
        else:
            shown_step = frame.step
            yield FrameEvent(frame.step, frame.image, frame.render_seconds)


class _NoBudget:
    def __enter__(self):
        return self

    def refresh(self):
        pass

    def __exit__(self, *exc):
        return False


__all__ = ["AdamState", "StartEvent", "EndEvent", "Engine", "EngineError", "FrameEvent", "LocalEngine", "PairState", "RunHandle",
           "RunProgress", "RunState", "StateEvent", "StepEvent", "apply_run_state", "export_run_state",
           "apply_run_progress", "latent_of", "resolve_model_id", "run_progress", "session_from_state"]
