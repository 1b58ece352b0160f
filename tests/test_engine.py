"""The engine protocol without Ray: a run's state exported and restored anywhere continues exactly,
engines stream steps, frames and states, cancel between steps, and a caller following a run keeps
the last state it received when the engine goes away."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from draggan_core.edit.engine import (EndEvent, Engine, EngineError, FrameEvent, LocalEngine, RunHandle, RunState,
                                      StartEvent, StateEvent, StepEvent, export_run_state, latent_of,
                                      session_from_state)
from draggan_core.edit.frames import FrameRenderer
from draggan_core.edit.session import DragSession
from draggan_core.edit.settings import DragConfig
from draggan_core.model.latents import seed_to_w
from draggan_core.model.store import ModelStore, default_model_path

STEPS = 10


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: oversubscribed threads make steps many times slower
    yield ModelStore().get(default_model_path())
    torch.set_num_threads(threads)


def _session(model, w_mode="w+", masked=False, compat="ours", seed=5, defaults=None):
    # r1/r2 given: the official rules round them to 0 and 2 at 64 px
    cfg = DragConfig(display_every=0, stop_distance=0.1, w_mode=w_mode, compat=compat, r1=2.5, r2=4)
    s = DragSession(model.G, seed_to_w(model.G, seed), cfg, model_defaults={**model.drag_defaults, **(defaults or {})})
    s.add_pair((20, 40), (27, 44))
    s.add_pair((44, 30), (40, 26))
    if masked:
        m = np.zeros((64, 64), np.float32)
        m[10:54, 12:56] = 1
        s.set_mask(m)
    return s


def _uninterrupted(model, **kw):
    s = _session(model, **kw)
    for _ in s.run(max_steps=STEPS):
        pass
    return s


def _split(model, k, via_bytes=False, **kw):
    """Run k of STEPS steps, export, restore into a new session, run the rest."""
    s = _session(model, **kw)
    gen = s.run(max_steps=STEPS)
    for _, _r in zip(range(k), gen):
        pass
    gen.close()
    state = export_run_state(s, str(default_model_path()))
    if via_bytes:
        state = RunState.from_bytes(state.to_bytes())
    del s
    restored = session_from_state(model.G, state)
    for _ in restored.run(max_steps=STEPS - k):
        pass
    return restored


def _same_edit(a: DragSession, b: DragSession, tol=1e-6):
    assert a.step_count == b.step_count
    assert [p.handle for p in a.pairs] == [p.handle for p in b.pairs]
    assert float((a.latent - b.latent).abs().max()) <= tol


@pytest.mark.parametrize("kw, k, via_bytes", [
    ({}, 1, False),
    ({}, 7, True),
    ({"w_mode": "w"}, 4, False),
    ({"masked": True}, 4, True),
    ({"compat": "official"}, 4, False),
    # the initial features the motion anchor and the local term hold on to travel with the state
    ({"defaults": {"motion_anchor": 0.5, "lambda_local": 1.0}}, 4, True),
])
def test_a_run_split_anywhere_ends_where_the_uninterrupted_run_ends(model, kw, k, via_bytes):
    whole = _uninterrupted(model, **kw)
    assert whole.step_count == STEPS  # the edit really moved (the comparison is not between two no-ops)
    assert float((whole.latent - whole.w_initial).abs().max()) > 1e-3
    _same_edit(whole, _split(model, k, via_bytes=via_bytes, **kw))


def test_state_carries_adam_moments_and_references(model):
    s = _session(model, masked=True)
    for _, _r in zip(range(3), s.run(max_steps=STEPS)):
        pass
    state = export_run_state(s, "m.safetensors")
    assert state.adam.step == 3 and state.adam.exp_avg.shape == state.param.shape
    assert np.array_equal(latent_of(state), s.latent.numpy())
    w = _session(model, w_mode="w")
    for _, _r in zip(range(2), w.run(max_steps=STEPS)):
        pass
    assert np.array_equal(latent_of(export_run_state(w, "m")), w.latent.numpy())
    assert all(p.reference is not None for p in state.pairs) and state.mask_reference is not None
    # the mask's hold steps pin each handle's first features: those travel too
    again = RunState.from_bytes(state.to_bytes())
    assert all(p.anchor is not None and np.array_equal(p.anchor, q.anchor) for p, q in zip(again.pairs, state.pairs))
    assert all(torch.equal(p.anchor, q.anchor) for p, q in zip(session_from_state(model.G, again).pairs, s.pairs))
    assert state.resolved["lr"] is not None and state.config["lr"] is None  # as set, and as resolved
    # dropping Adam's moments changes the continuation: they are part of what must travel
    broken = RunState.from_bytes(state.to_bytes())
    broken.adam.exp_avg = np.zeros_like(broken.adam.exp_avg)
    a, b = session_from_state(model.G, state), session_from_state(model.G, broken)
    for s_ in (a, b):
        for _ in s_.run(max_steps=2):
            pass
    assert float((a.latent - b.latent).abs().max()) > 1e-7


def test_bad_states_are_refused_in_one_line(model):
    with pytest.raises(EngineError):
        RunState.from_bytes(b"not a state")
    state = export_run_state(_session(model), "m")
    state.w_initial = np.zeros((1, 3, 7), np.float32)
    with pytest.raises(EngineError, match="does not fit"):
        session_from_state(model.G, state)
    state = export_run_state(_session(model), "m")
    state.resolved = {**state.resolved, "r1": 99.0}  # another checkpoint would resolve other defaults
    with pytest.raises(EngineError, match="differently"):
        session_from_state(model.G, state)


def test_local_engine_streams_states_steps_frames_and_the_end(model):
    engine = LocalEngine(renderer=FrameRenderer(threads=1), store=ModelStore())
    state = export_run_state(_session(model), str(default_model_path()))
    events = list(engine.run(state, 30, display_every=1, state_every=1))
    kinds = [type(e).__name__ for e in events]
    assert isinstance(events[0], StartEvent) and events[0].engine == {"engine": "local"}
    events = events[1:]
    assert isinstance(events[0], StateEvent) and events[0].state is not None  # full state first
    assert isinstance(events[-1], EndEvent) and events[-1].reason in ("done", "max_steps")
    steps = [e.result for e in events if isinstance(e, StepEvent)]
    assert [r.step for r in steps] == list(range(1, len(steps) + 1)) or steps[-1].done
    assert steps[-1].done and steps[-1].image is not None  # the exact final render comes with the last step
    # every step is preceded by the state it leaves (progress after the first full state)
    progress = [e.progress for e in events if isinstance(e, StateEvent) and e.progress is not None]
    assert len(progress) >= len(steps) - 1
    frames = [e for e in events if isinstance(e, FrameEvent)]
    assert kinds.count("FrameEvent") == len(frames) and [f.step for f in frames] == sorted({f.step for f in frames})
    # the stream is the same edit as running the session here
    whole = _session(model)
    for _ in whole.run(max_steps=30):
        pass
    followed = session_from_state(model.G, events[0].state)
    from draggan_core.edit.engine import apply_run_state
    apply_run_state(followed, events[0].state.with_progress(progress[-1]))
    _same_edit(whole, followed)


def test_frames_show_their_steps_latent(model):
    engine = LocalEngine(renderer=FrameRenderer(threads=1), store=ModelStore())
    s = _session(model)
    latents = {}
    frames = []
    run = engine.run_session(s, "m", 40, display_every=1)
    for e in run:
        if isinstance(e, StepEvent):
            latents[e.result.step] = s.latent
        elif isinstance(e, FrameEvent):
            frames.append(e)
    assert frames, "no preview frame in 40 steps"
    for f in frames:
        assert np.array_equal(f.image, s.render(latents[f.step]))


def test_cancel_stops_between_steps_and_keeps_the_state(model):
    engine = LocalEngine(store=ModelStore())
    s = _session(model)
    run = engine.run_session(s, "m", STEPS)
    seen = []
    for e in run:
        if isinstance(e, StepEvent):
            seen.append(e.result.step)
            if len(seen) == 3:
                run.cancel()
    assert seen == [1, 2, 3] and isinstance(e, EndEvent) and e.reason == "cancelled"
    assert s.step_count == 3
    for _ in s.run(max_steps=STEPS - 3):  # resuming the cancelled session: the uninterrupted edit
        pass
    _same_edit(_uninterrupted(model), s)


def test_cancel_from_another_thread(model):
    engine = LocalEngine(store=ModelStore())
    state = export_run_state(_session(model), str(default_model_path()))
    run = engine.run(state, 10_000)
    timer = threading.Timer(0.3, run.cancel)
    timer.start()
    events = list(run)
    assert isinstance(events[-1], EndEvent) and events[-1].reason == "cancelled"
    assert 0 < events[-1].step < 10_000


class _CopyingEngine(LocalEngine):
    """The remote engines' contract in one process: state in, states out, the session follows them.
    `fail_after`: the stream breaks after that many steps, like a lost engine process."""

    def __init__(self, fail_after=None, **kw):
        super().__init__(**kw)
        self.fail_after = fail_after

    run_session = Engine.run_session

    def run(self, state, steps, display_every=1, state_every=1):
        inner = super().run(state, steps, display_every, state_every)

        def events():
            n = 0
            for e in inner:
                yield e
                if isinstance(e, StepEvent):
                    n += 1
                    if self.fail_after is not None and n >= self.fail_after:  # as RayEngine reports it
                        yield EndEvent("lost", e.result.step, f"the engine serving this run was lost at step "
                                       f"{e.result.step}: the edit is kept at that step - press Start to continue")
                        return
        return RunHandle(events(), on_cancel=inner.cancel)


def test_a_session_following_a_remote_run_ends_at_the_same_edit(model):
    s = _session(model)
    for _ in _CopyingEngine(store=ModelStore()).run_session(s, str(default_model_path()), STEPS):
        pass
    _same_edit(_uninterrupted(model), s)


def test_a_lost_engine_leaves_the_session_at_the_last_step_received(model):
    s = _session(model)
    steps_seen = []
    for e in _CopyingEngine(fail_after=4, store=ModelStore()).run_session(s, str(default_model_path()), STEPS):
        if isinstance(e, StepEvent):
            steps_seen.append(e.result.step)
    assert isinstance(e, EndEvent) and e.reason == "lost"
    assert steps_seen[-1] == 4 and s.step_count == 4
    for _ in s.run(max_steps=STEPS - 4):  # nothing lost: resuming gives the uninterrupted edit
        pass
    _same_edit(_uninterrupted(model), s)


def test_the_default_app_does_not_import_ray():
    """`python app.py` (in-process engine) stays free of Ray: the engine protocol, the UI, the launcher."""
    import subprocess
    import sys
    code = ("import sys, draggan_core.edit.engine, webui.launcher, webui.app; "
            "webui.launcher.parse_args([]); print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_editor_says_in_one_line_when_its_engine_is_lost_and_resumes(model):
    """EditorState.run_stream on an engine that disappears after 4 steps: one-line warning, the edit
    kept at step 4, and the next Start (on a working engine) ends on the uninterrupted edit."""
    from webui import services
    from webui.editor.state import EditorState
    st = EditorState.create(default_model_path(), seed=5)
    st.add_pair(20, 40, 27, 44)
    st.configure(max_steps=STEPS, stop_distance=0.1)
    previous = services.ENGINE
    try:
        services.set_engine(_CopyingEngine(fail_after=4, store=ModelStore()))
        updates = list(st.run_stream(STEPS))
        last = updates[-1]
        assert last.final and last.warning and "\n" not in last.status and "lost at step 4" in last.status
        assert st.session.step_count == 4 and not st.running
        services.set_engine(_CopyingEngine(store=ModelStore()))
        updates = list(st.run_stream(STEPS - 4))
        assert updates[-1].final and not updates[-1].warning
    finally:
        services.set_engine(previous)
    alone = EditorState.create(default_model_path(), seed=5)  # the same edit in one go, in-process
    alone.add_pair(20, 40, 27, 44)
    alone.configure(max_steps=STEPS, stop_distance=0.1)
    list(alone.run_stream(STEPS))
    _same_edit(alone.session, st.session)
