"""The drag engine as a Ray Serve deployment: many engine processes, on many machines, behind one editor.

    pip install -r requirements-serve.txt
    python app.py --engine ray [--ray-address ADDR] [--replicas N] [--gpus-per-replica G]
    serve deploy serve_config.yaml           # on a running cluster; the app then finds it by name

Each replica (`DragEngine`) holds one shared generator per model and serves any number of runs at
once. A run is a `RunState` (draggan_core/edit/engine.py) plus a step count: the replica rebuilds the session, streams
events back as a Serve streaming response, and forgets it when the run ends. Nothing about an edit
lives in a replica between runs, so any replica can serve any run and a replica that dies loses only
the step it was computing: the caller keeps the last state streamed to it.

Frames: each run offers its newest latent every `display_every` steps; the replica renders the
pending latents of all its runs together (`@serve.batch`): one forward for several users.

Cancel: the caller cancels the streaming response; the replica's run stops after its current step.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ray import serve

from ..edit.engine import (EndEvent, Engine, EngineError, FrameEvent, LocalEngine, RunHandle, RunState, StartEvent,
                           StateEvent, StepEvent, latent_of)
from ..edit.frames import preview_res, render_batch

APP_NAME = "draggan"
DEPLOYMENT_NAME = "DragEngine"
MAX_FRAME_BATCH = 8
WORKER_NICENESS_ENV = "RAY_worker_niceness"  # Ray's own setting (its default: 15 for every worker)


@dataclass
class _FrameJob:
    model: str
    latent: np.ndarray        # [1, num_ws, w_dim]
    noise_mode: str


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=16, ray_actor_options={"num_cpus": 1})
class DragEngine:
    """One engine process. threads: torch CPU threads per piece of work (run or render)."""

    def __init__(self, device: str = "auto", batch_frames: bool = True, threads: int = 1,
                 max_frame_batch: int = MAX_FRAME_BATCH):
        from ..model.devices import resolve_device
        from ..model.store import ModelStore
        self.threads = max(1, int(threads))
        torch.set_num_threads(self.threads)
        self.device = resolve_device(device)
        self.store = ModelStore(device=self.device)
        self.local = LocalEngine(store=self.store)  # runs the steps; frames are rendered here, batched
        self.batch_frames = bool(batch_frames)
        self._render_batched.set_max_batch_size(max(1, int(max_frame_batch)))
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (tests)
            self.replica = f"local-{os.getpid()}"
        self.stats_ = {"runs": 0, "active": 0, "steps": 0, "frames": 0, "render_batches": 0,
                       "cancelled": 0, "pid": os.getpid(), "replica": self.replica, "device": str(self.device),
                       "niceness": _normal_priority()}

    # -- frames
    @serve.batch(max_batch_size=MAX_FRAME_BATCH, batch_wait_timeout_s=0.005)
    async def _render_batched(self, jobs: list[_FrameJob]) -> list[tuple]:
        return await asyncio.to_thread(self._render_now, jobs)

    async def _render_single(self, job: _FrameJob) -> tuple:
        return (await asyncio.to_thread(self._render_now, [job]))[0]

    def _render_now(self, jobs: list[_FrameJob]) -> list[tuple]:
        """(image, seconds, batch size) per job; same model and noise mode render as one forward."""
        torch.set_num_threads(self.threads)
        out: list[tuple | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.model, job.noise_mode), []).append(i)
        for (model, noise_mode), idx in groups.items():
            G = self.local._generator(model)
            images, seconds = render_batch(G, [torch.from_numpy(jobs[i].latent) for i in idx], noise_mode,
                                           image_res=preview_res(G))  # previews: the same rule as in-process
            self.stats_["render_batches"] += 1
            for i, image in zip(idx, images):
                out[i] = (image, seconds, len(idx))
        self.stats_["frames"] += len(jobs)
        return out

    # -- runs
    async def run(self, state: RunState, steps: int, display_every: int = 1):
        """Stream the events of one run (draggan_core/edit/engine.py). Cancelling the response stops it between steps."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        info = {"engine": "ray", "replica": self.replica, "pid": os.getpid(), "device": str(self.device)}
        self.stats_["runs"] += 1
        self.stats_["active"] += 1
        handle_box: list[RunHandle] = []
        stop = threading.Event()

        def worker():
            torch.set_num_threads(self.threads)
            put = lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)  # noqa: E731
            try:
                handle = self.local.run(state, steps, display_every=display_every, state_every=1)
                handle_box.append(handle)
                for ev in handle:
                    if stop.is_set():
                        handle.cancel()
                    if isinstance(ev, StepEvent):
                        self.stats_["steps"] += 1
                    if isinstance(ev, (StartEvent, EndEvent)):
                        ev.engine = info
                    put(ev)
            except EngineError as e:
                put(EndEvent("error", state.step_count, str(e), info))
            except Exception as e:  # one line back to the caller; the replica keeps serving
                put(EndEvent("error", state.step_count,
                             f"engine error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", info))

        pending: dict = {}
        wake = asyncio.Event()

        async def frames():
            while True:
                await wake.wait()
                wake.clear()
                job, step = pending.pop("job", None), pending.pop("step", None)
                if job is None:
                    continue
                if self.batch_frames:
                    image, seconds, n = await self._render_batched(job)
                else:
                    image, seconds, n = await self._render_single(job)
                queue.put_nowait(FrameEvent(step, image, seconds, n))

        thread = threading.Thread(target=worker, name="draggan-serve-run", daemon=True)
        frame_task = asyncio.create_task(frames())
        thread.start()
        base: RunState | None = None
        submitted = state.step_count
        try:
            while True:
                ev = await queue.get()
                if isinstance(ev, StateEvent) and display_every > 0:
                    base = ev.state if ev.state is not None else (
                        base.with_progress(ev.progress) if base is not None else None)
                    if base is not None and base.step_count - submitted >= display_every:
                        pending["job"] = _FrameJob(base.model, latent_of(base), base.config.get("noise_mode", "const"))
                        pending["step"] = base.step_count
                        submitted = base.step_count
                        wake.set()
                yield ev
                if isinstance(ev, EndEvent):
                    return
        except asyncio.CancelledError:
            self.stats_["cancelled"] += 1
            raise
        finally:
            stop.set()
            for h in handle_box:
                h.cancel()
            frame_task.cancel()
            self.stats_["active"] -= 1

    async def stats(self) -> dict:
        return dict(self.stats_)

    async def __call__(self, request=None) -> dict:
        """HTTP health check (when Serve's proxy is on): who this replica is and what it did."""
        return dict(self.stats_)


def build_app(args: dict | None = None):
    """Serve application builder (`serve deploy` / `serve run draggan_core.serving.ray_engine:build_app`).

    args: device (auto), batch_frames (true), threads (1), max_frame_batch (8)."""
    args = dict(args or {})
    return DragEngine.bind(device=str(args.get("device", "auto")), batch_frames=_truthy(args.get("batch_frames", True)),
                           threads=int(args.get("threads", 1)), max_frame_batch=int(args.get("max_frame_batch", MAX_FRAME_BATCH)))


def _normal_priority() -> int:
    """Bring this replica back to nice 0 when allowed (a cluster started without RAY_worker_niceness=0
    runs workers at 15); returns the niceness it runs at, warning when it stays above 0."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (AttributeError, OSError):  # not Unix, or no permission to raise the priority
        pass
    try:
        nice = os.getpriority(os.PRIO_PROCESS, 0)
    except AttributeError:
        return 0
    if nice > 0:
        logging.getLogger(__name__).warning(
            "this replica runs at nice %d: beside other busy processes it gets a small share of the CPU; "
            "start the Ray cluster with %s=0", nice, WORKER_NICENESS_ENV)
    return nice


def _truthy(v) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() not in ("0", "false", "no", "off")


# ------------------------------------------------------------------------------------------------
# the caller's side
# ------------------------------------------------------------------------------------------------

def _lost_errors() -> tuple:
    import ray.exceptions as rex
    from ray.serve import exceptions as sex
    return (rex.RayActorError, rex.ActorUnavailableError, rex.ObjectLostError, rex.GetTimeoutError,
            sex.DeploymentUnavailableError, sex.ReplicaUnavailableError, ConnectionError)


class RayEngine(Engine):
    """Sends each run to the `DragEngine` deployment and streams its events back.

    A run that fails before its first event (a replica that died since routing was updated) is sent
    again, to a live replica; one that fails later ends with `EndEvent("lost")` and the caller keeps
    the last state streamed to it.
    """

    name = "ray"

    def __init__(self, handle, cleanup=None, retries: int = 3, description: str = "ray",
                 concurrent_runs: int = 16):
        self.handle = handle
        self.concurrent_runs = concurrent_runs  # runs a front end should send at once
        self._cleanup = cleanup
        self.retries = retries
        self.description = description

    def describe(self) -> str:
        return self.description

    def run(self, state: RunState, steps: int, display_every: int = 1, state_every: int = 1) -> RunHandle:
        box: dict = {}
        cancel = threading.Event()

        def cancel_remote():
            gen = box.get("gen")
            if gen is not None:
                gen.cancel()

        def events():
            last_step, received = state.step_count, 0
            attempt = 0
            while True:
                gen = self.handle.options(stream=True).run.remote(state, steps, display_every)
                box["gen"] = gen
                try:
                    for ev in gen:
                        received += 1
                        if isinstance(ev, StateEvent):  # what the caller's session holds from now on
                            last_step = (ev.state or ev.progress).step_count
                        yield ev
                        if isinstance(ev, EndEvent) or cancel.is_set():
                            return
                    return
                except GeneratorExit:
                    gen.cancel()
                    raise
                except Exception as e:
                    if cancel.is_set():
                        return
                    lost = isinstance(e, _lost_errors())
                    if lost and received == 0 and attempt < self.retries:
                        attempt += 1
                        time.sleep(0.2 * attempt)  # let routing learn that the replica is gone
                        continue
                    what = "was lost" if lost else f"failed ({type(e).__name__})"
                    yield EndEvent("lost" if lost else "error", last_step,
                                   f"the engine serving this run {what} at step {last_step}: the edit is kept "
                                   "at that step - press Start to continue", {"engine": "ray"})
                    return

        return RunHandle(events(), cancel, on_cancel=cancel_remote)

    def stats(self, timeout: float = 10.0) -> dict:
        return self.handle.stats.remote().result(timeout_s=timeout)

    def close(self) -> None:
        if self._cleanup is not None:
            cleanup, self._cleanup = self._cleanup, None
            cleanup()


def deploy(replicas: int = 2, gpus_per_replica: float = 0.0, batch_frames: bool = True, threads: int = 1,
           app_name: str = APP_NAME) -> RayEngine:
    """Deploy (or redeploy) the engine application on the connected Ray; returns its engine."""
    from ray.serve.config import ProxyLocation
    serve.start(proxy_location=ProxyLocation.Disabled)
    app = DragEngine.options(
        num_replicas=replicas, ray_actor_options={"num_cpus": 1, "num_gpus": gpus_per_replica}).bind(
            device="cuda" if gpus_per_replica else "cpu", batch_frames=batch_frames, threads=threads)
    return RayEngine(serve.run(app, name=app_name, route_prefix=None), description=f"ray (application {app_name!r})")


def start_engine(address: str | None = None, replicas: int = 2, gpus_per_replica: float = 0.0,
                 batch_frames: bool = True, threads: int = 1, app_name: str = APP_NAME,
                 num_cpus: int | None = None, log=print) -> RayEngine:
    """Connect to Ray (a cluster at `address`, or a new local instance bound to 127.0.0.1 that is
    stopped on exit, with `num_cpus` (default: one per replica)) and return an engine for the
    `DragEngine` application, deploying it unless the cluster already runs one under `app_name`
    (e.g. from `serve deploy`)."""
    import ray

    owns_ray = address is None
    t0 = time.perf_counter()
    if owns_ray:
        _loopback_only()
        # Ray starts its workers at nice 15: beside any other process at the usual priority a replica
        # then gets a few percent of a core (1.1 instead of 22 steps/s beside one more engine, docs/
        # benchmarks.md#sharing-the-cpu). Our replicas are the work, so they run at normal priority.
        os.environ.setdefault(WORKER_NICENESS_ENV, "0")
        ray.init(num_cpus=num_cpus or max(1, replicas), num_gpus=None if gpus_per_replica else 0,
                 include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
    else:
        if address.split("://")[-1].rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
            _loopback_only()  # a cluster on this machine's loopback (e.g. another app's local Ray)
            if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").is_file():
                # a local Ray made with ray.init uses this machine's token; Ray itself enables it only
                # for address="auto" (an explicit address needs RAY_AUTH_MODE=token, docs/serving.md)
                os.environ["RAY_AUTH_MODE"] = "token"
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    deployed_here = False
    try:
        handle = None
        if not owns_ray:
            try:
                if app_name in serve.status().applications:
                    handle = serve.get_app_handle(app_name)
                    log(f"using the running Serve application {app_name!r} on {address}")
            except Exception:
                handle = None
        if handle is None:
            handle = deploy(replicas, gpus_per_replica, batch_frames, threads, app_name).handle
            deployed_here = True
    except BaseException:
        if owns_ray:
            ray.shutdown()
        raise

    def cleanup():
        try:
            if owns_ray:
                serve.shutdown()
            elif deployed_here:
                serve.delete(app_name)
        finally:
            ray.shutdown()

    cleanup_once = _once(cleanup)
    atexit.register(cleanup_once)
    gcs = ray.get_runtime_context().gcs_address
    where = f"a local Ray at {gcs}" if owns_ray else f"the Ray cluster at {address} ({gcs})"
    engine = RayEngine(handle, cleanup=cleanup_once, concurrent_runs=min(64, 8 * max(1, replicas)),
                       description=f"ray ({where}, application {app_name!r}, {replicas} replicas)"
                       if deployed_here else f"ray ({where}, application {app_name!r})")
    log(f"Ray Serve engine ready in {time.perf_counter() - t0:.1f} s: {engine.describe()}")
    return engine


def _loopback_only() -> None:
    """Make a local Ray use 127.0.0.1 for every server it starts (GCS, raylet, workers), as Ray does on
    single-machine macOS/Windows installs: by default it advertises and binds the machine's network
    address, and `ray.init(_node_ip_address="127.0.0.1")` is replaced by that address. The switch is
    an environment variable (inherited by Ray's processes) that Ray reads when imported, hence both."""
    from ray._private import ray_constants
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _once(fn):
    done = []

    def wrapper():
        if not done:
            done.append(True)
            fn()
    return wrapper


def replica_actors(app_name: str = APP_NAME) -> list[str]:
    """Names of the engine's replica actors (namespace "serve"): for the fault test, which kills one
    with `ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)`."""
    import ray
    names = ray.util.list_named_actors(all_namespaces=True)
    prefix = f"SERVE_REPLICA::{app_name}#{DEPLOYMENT_NAME}#"
    return sorted(a["name"] for a in names if a.get("namespace") == "serve" and a["name"].startswith(prefix))


__all__ = ["APP_NAME", "DragEngine", "RayEngine", "build_app", "deploy", "replica_actors", "start_engine"]
