#!/usr/bin/env python
"""Load / reliability probe for the DragGAN web UI, driven through gradio_client over loopback.

    python scripts/load_test.py [--url URL | --start-server] [--sessions 8] [--steps 40] [--json]
                                [--consecutive 100] [--stop-trials 3] [--no-disconnect]
                                [--engine ray [--replicas 2] [--ray-address ADDR] [--no-fault] [--no-batching]]

By default it starts `python app.py` itself on a free 127.0.0.1 port (DRAGGAN_TORCH_THREADS=1 unless
set), then runs these phases, each bounded in count and time:

1. concurrent: N gradio_client sessions, each with its own seed, drag(s) and latent space, run
   /run for --steps steps at the same time. Every session's final latent (/download_latent) is
   compared with the same edit run alone in this process through `DragSession` (same model, same
   settings as the UI's `EditorState.configure`, same number of steps): that is the cross-talk check.
   Step latency is *client-observed*: for consecutive streamed frames, (arrival interval) / (steps
   advanced, read from the status text). The UI streams at most ~8 frames/s, so one sample covers
   several steps. Throughput = all sessions' steps / wall time of the phase. The solo in-process
   per-step time (StepResult.seconds) is reported next to it as the unloaded reference.
2. stop: a far drag is started, then stopped by the client's job.cancel() (time until /debug_state
   says the run has left its loop) and by the /stop endpoint (its round trip: the handler returns only
   once the run loop has stopped).
3. disconnect: a child process starts a run with gradio_client and is killed (SIGKILL, like a closed
   tab); the run must stop on the server (its step counter freezes, `running` becomes false).
4. --consecutive N: N edits (new seed, pair, run, export) in one session; server RSS sampled after
   each edit.

With --engine ray the server is `python app.py --engine ray --replicas N` (a local Ray on 127.0.0.1)
and two more phases run:

5. fault: two far runs on different sessions; the replica serving the first is killed (ray.kill, no
   restart: its process ends like a crashed machine's). That session must end its run with a one-line
   warning, keep the step it had streamed, and, started again for the remaining steps, end on the
   same latent as the whole edit run alone; the next Start must be served by a live replica.
6. batching: after the server has stopped, 8 runs at once straight on the engine deployment (no web
   UI), alternating a deployment that renders concurrent frames in one batch (`@serve.batch`) and one
   that renders each frame alone: total steps/s and frames/s of each, in the same run.

Server RSS comes from /proc/<pid>/status, so it is only reported for a server on this machine
(started here, or found by its listening port). Loopback only: --url must point at 127.0.0.1 /
localhost. Exit status: 0 when there were no errors and every latent matched, else 1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402

STEP_RE = re.compile(r"step (\d+)")  # the session total; "(this run: k / n)" follows
TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------------------
# process helpers (Linux /proc; no psutil)
# ------------------------------------------------------------------------------------------------

def log(msg: str):
    print(f"[load_test {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_mb(pid: int | None, key: str = "VmRSS") -> float | None:
    """Resident memory of a process now (VmRSS) or at its peak (VmHWM), in MB."""
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process (all threads), seconds."""
    if not pid:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def pid_listening_on(port: int) -> int | None:
    """The pid of the local process listening on 127.0.0.1:port (only processes we may inspect)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    if not inodes:
        return None
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for fd in (pid_dir / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid_dir.name)
        except OSError:
            continue
    return None


def check_loopback(url: str):
    host = urllib.parse.urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"error: --url must be a loopback address (got {host}); this tool never loads remote servers")


class Server:
    """`python app.py` on a free loopback port; stdout+stderr go to a log file."""

    def __init__(self, model: str | None = None, threads: int = 1, max_steps: int | None = None,
                 timeout: float = 180.0, engine_args: list | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = Path(tempfile.mkdtemp(prefix="draggan-load-")) / "server.log"
        env = {**os.environ, "PORT": str(self.port), "GRADIO_ANALYTICS_ENABLED": "False",
               "DRAGGAN_TORCH_THREADS": os.environ.get("DRAGGAN_TORCH_THREADS", str(threads))}
        env.pop("DRAGGAN_MAX_STEPS", None)
        if max_steps:
            env["DRAGGAN_MAX_STEPS"] = str(max_steps)
        cmd = [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(self.port)]
        if model:
            cmd += ["--model", model]
        cmd += list(engine_args or [])
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=2)
                break
            except Exception:
                if self.proc.poll() is not None or time.time() - t0 > timeout:
                    self.stop()
                    raise RuntimeError(f"app did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.25)
        self.pid = self.proc.pid

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback")

    def ray_address(self) -> str | None:
        """The GCS address of the local Ray the app started (from its start-up line)."""
        m = re.search(r"a local Ray at (\S+?),", self.log.read_text(errors="replace"))
        return m.group(1) if m else None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ------------------------------------------------------------------------------------------------
# gradio_client helpers
# ------------------------------------------------------------------------------------------------

def new_client(url: str):
    from gradio_client import Client
    return Client(url, verbose=False)


def debug(c) -> dict:
    return c.predict(api_name="/debug_state")


def edit_plan(i: int, res: int = 64) -> dict:
    """A different, deterministic edit for session i: seed, 1-2 point pairs, W or W+."""
    k = res / 64.0
    hx, hy = 18 + 5 * (i % 6), 22 + 4 * (i % 5)
    dx, dy = (9, -4, 6, -7, 3, 8, -9, 5)[i % 8], (-5, 7, 8, 3, -9, -4, 2, -8)[i % 8]
    pairs = [(hx, hy, hx + dx, hy + dy)]
    if i % 3 == 2:  # a second pair for some sessions
        pairs.append((44 - (i % 4), 40, 44 - (i % 4) - 4, 46))
    pairs = [tuple(int(round(v * k)) for v in p) for p in pairs]
    return {"seed": 100 + 17 * i, "psi": 0.7, "pairs": pairs, "w_mode": "W" if i % 2 else "W+"}


def run_args(steps: int, w_mode: str, stop_distance: str = "") -> tuple:
    # n_steps, lr, r1, r2, lambda, stop distance, tracking, latent space, frame every k steps
    return (steps, "", "", "", 20, stop_distance, "default", w_mode, 1)


def prepare(c, plan: dict):
    c.predict(plan["seed"], plan["psi"], api_name="/set_seed")
    c.predict(api_name="/clear_points")
    for p in plan["pairs"]:
        c.predict(*p, api_name="/add_pair")


def streamed_run(c, steps: int, w_mode: str, timeout: float, stop_distance: str = "", allow_warning: bool = False) -> dict:
    """Submit /run and follow its stream. Returns frame timings and the final status (a warning
    raises, unless `allow_warning`)."""
    t_submit = time.perf_counter()
    job = c.submit(*run_args(steps, w_mode, stop_distance), api_name="/run")
    frames = []  # (arrival time, step)
    status = ""
    deadline = t_submit + timeout
    for out in job:
        now = time.perf_counter()
        status = out[2] if isinstance(out, (list, tuple)) and len(out) > 2 else str(out)
        m = STEP_RE.search(status or "")
        if m:
            frames.append((now, int(m.group(1))))
        if now > deadline:
            job.cancel()
            raise TimeoutError(f"run did not finish in {timeout:.0f} s")
    t_end = time.perf_counter()
    if status.startswith("⚠") and not allow_warning:
        raise RuntimeError(f"run refused: {status}")
    return {"t_submit": t_submit, "t_end": t_end, "frames": frames, "status": status}


def per_step_samples(frames: list) -> list[float]:
    """Client-observed seconds per step from consecutive frames (weighted by steps advanced)."""
    samples = []
    for (t0, s0), (t1, s1) in zip(frames, frames[1:]):
        if s1 > s0:
            samples += [(t1 - t0) / (s1 - s0)] * (s1 - s0)
    return samples


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


# ------------------------------------------------------------------------------------------------
# phase 1: concurrent sessions + cross-talk check
# ------------------------------------------------------------------------------------------------

def reference_edit(model_path: str, plan: dict, steps: int, stop_distance="") -> dict:
    """The same edit alone, in this process: EditorState settings, DragSession.run, same steps."""
    import torch
    from webui.editor.state import EditorState
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("DRAGGAN_TORCH_THREADS", "1") or 1))  # like the server
    st = EditorState.create(model_path, seed=plan["seed"], psi=plan["psi"])
    try:
        for p in plan["pairs"]:
            st.add_pair(*p)
        n = st.configure(max_steps=steps, lr="", r1="", r2="", lambda_mask=20, stop_distance=stop_distance,
                         tracking=None, w_mode=plan["w_mode"])
        seconds = [r.seconds for r in st.session.run(max_steps=n)]
        return {"latent": st.session.latent.numpy(), "step": st.session.step_count, "seconds": seconds}
    finally:
        st.cleanup()
        torch.set_num_threads(threads)


def _model_file(name: str) -> Path | None:
    try:
        from webui.services import resolve_model_path
        return resolve_model_path(name)
    except Exception:
        return None


def _digest(path: Path | None) -> str | None:
    import hashlib
    if path is None or not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def concurrent_phase(url: str, sessions: int, steps: int, timeout: float, verify: bool = True,
                     pid: int | None = None) -> dict:
    results: list[dict | None] = [None] * sessions
    errors: list[str] = []
    barrier = threading.Barrier(sessions)
    res_probe = debug(new_client(url))
    model_name, res = res_probe["model"], int(res_probe["resolution"])

    def worker(i):
        plan = edit_plan(i, res)
        try:
            c = new_client(url)
            prepare(c, plan)
        except Exception as e:
            errors.append(f"session {i}: setup: {type(e).__name__}: {e}")
            barrier.abort()
            return
        try:
            barrier.wait(timeout=120)
        except threading.BrokenBarrierError:
            return
        try:
            run = streamed_run(c, steps, plan["w_mode"], timeout)
            info = debug(c)
            latent_path = c.predict(api_name="/download_latent")
            latent_path = latent_path[0] if isinstance(latent_path, (list, tuple)) else latent_path
            if isinstance(latent_path, (list, tuple)):
                latent_path = latent_path[0]
            run.update(plan=plan, step=info["step"], latent=np.load(latent_path), debug=info)
            results[i] = run
        except Exception as e:
            errors.append(f"session {i}: {type(e).__name__}: {e}")

    model_file = _model_file(model_name)
    digest_before = _digest(model_file)
    rss_before = rss_mb(pid)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 180)
    done = [r for r in results if r is not None]
    if any(t.is_alive() for t in threads):
        errors.append("some sessions did not finish in time")
    rss_after = rss_mb(pid)
    if done:
        t_start = min(r["t_submit"] for r in done)
        wall = max(r["t_end"] for r in done) - t_start
    else:
        wall = time.perf_counter() - t0
    total_steps = sum(r["step"] for r in done)
    samples = [s for r in done for s in per_step_samples(r["frames"])]
    first_frame = [r["frames"][0][0] - r["t_submit"] for r in done if r["frames"]]

    # cross-talk: each final latent equals the same edit alone (same number of steps)
    checks = []
    ref_seconds = []
    if verify and done:
        from webui.services import resolve_model_path
        model_path = str(resolve_model_path(model_name))
        for i, r in enumerate(results):
            if r is None:
                continue
            ref = reference_edit(model_path, r["plan"], steps)
            ref_seconds += ref["seconds"][1:]  # the first step includes warm-up
            ok_steps = ref["step"] == r["step"]
            diff = float(np.abs(ref["latent"].reshape(r["latent"].shape) - r["latent"]).max()) \
                if ref["latent"].size == r["latent"].size else float("inf")
            checks.append({"session": i, "seed": r["plan"]["seed"], "pairs": r["plan"]["pairs"],
                           "w_mode": r["plan"]["w_mode"], "ui_steps": r["step"], "alone_steps": ref["step"],
                           "max_abs_diff": diff, "match": ok_steps and diff <= TOLERANCE})
    if digest_before != _digest(model_file):
        # seen once: another process re-exported the checkpoint mid-run, so the server and the
        # reference used different weights; the comparison says nothing about cross-talk then
        errors.append(f"the model file {model_file} changed during the run: rerun for a valid cross-talk check")
    return {
        "sessions": sessions, "steps_requested": steps, "completed": len(done), "errors": errors,
        "wall_s": wall, "total_steps": total_steps,
        "throughput_steps_per_s": total_steps / wall if wall > 0 else None,
        "step_latency_client_s": {"p50": pct(samples, 50), "p95": pct(samples, 95), "n": len(samples),
                                  "how": "client-observed: frame arrival interval / steps advanced"},
        "first_frame_s": {"p50": pct(first_frame, 50), "max": max(first_frame) if first_frame else None,
                          "note": "submit -> first streamed frame (includes queueing: concurrency limit)"},
        "solo_step_s": {"p50": pct(ref_seconds, 50), "p95": pct(ref_seconds, 95), "n": len(ref_seconds),
                        "how": "in-process DragSession StepResult.seconds, run alone (reference)"},
        "crosstalk": {"all_match": bool(checks) and all(c["match"] for c in checks), "tolerance": TOLERANCE,
                      "checks": checks},
        "served_by": sorted({(r["debug"].get("engine") or {}).get("replica") or (r["debug"].get("engine") or {}).get("engine", "?")
                             for r in done}),
        "server_rss_mb": {"before": rss_before, "after": rss_after},
    }


# ------------------------------------------------------------------------------------------------
# phase 2: stop latency
# ------------------------------------------------------------------------------------------------

FAR_STEPS = 300  # within the UI's step bound (DRAGGAN_MAX_STEPS of the test server); never reached here


def _start_far_run(c, steps=FAR_STEPS, min_step=3, timeout=60.0):
    c.predict(2, 0.7, api_name="/set_seed")
    c.predict(api_name="/clear_points")
    c.predict(10, 10, 54, 54, api_name="/add_pair")
    c.predict(54, 10, 10, 54, api_name="/add_pair")
    job = c.submit(*run_args(steps, "W+", stop_distance="0"), api_name="/run")
    t0 = time.time()
    while True:
        d = debug(c)
        if d["running"] and d["step"] >= min_step:
            return job, d["step"]
        if time.time() - t0 > timeout or job.done():
            job.cancel()
            raise RuntimeError(f"the run did not start (state {d})")
        time.sleep(0.05)


def _wait_not_running(c, timeout=10.0) -> tuple[float, dict]:
    t0 = time.perf_counter()
    while True:
        d = debug(c)
        if not d["running"]:
            return time.perf_counter() - t0, d
        if time.perf_counter() - t0 > timeout:
            return float("inf"), d
        time.sleep(0.01)


def round_trip_s(c, n: int = 5) -> float:
    """Median time of an idle /debug_state call: the request overhead inside every measurement."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        debug(c)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def stop_phase(url: str, trials: int = 3) -> dict:
    c = new_client(url)
    out = {"cancel_s": [], "stop_endpoint_s": [], "errors": [], "idle_round_trip_s": round_trip_s(c)}
    for _ in range(trials):
        try:
            job, _ = _start_far_run(c)
            t0 = time.perf_counter()
            job.cancel()
            _, d = _wait_not_running(c)
            out["cancel_s"].append(time.perf_counter() - t0)
            if d["running"]:
                out["errors"].append("job.cancel(): the run kept going")
            job, _ = _start_far_run(c)
            t0 = time.perf_counter()
            status = c.predict(api_name="/stop")[2]
            dt = time.perf_counter() - t0
            job.cancel()
            out["stop_endpoint_s"].append(dt)
            if "stopped at step" not in status:
                out["errors"].append(f"/stop said {status!r}")
            _, d = _wait_not_running(c)
            if d["running"]:
                out["errors"].append("/stop: the run kept going")
        except Exception as e:
            out["errors"].append(f"{type(e).__name__}: {e}")
    for k in ("cancel_s", "stop_endpoint_s"):
        v = out[k]
        out[k + "_max"] = max(v) if v else None
        out[k + "_median"] = statistics.median(v) if v else None
    c.close()
    out["how"] = ("cancel: job.cancel() until /debug_state reports running=false (includes one /debug_state "
                  "round trip); stop: round trip of /stop, which returns once the run loop has left")
    return out


# ------------------------------------------------------------------------------------------------
# phase 3: a client that disappears mid-run (closed tab)
# ------------------------------------------------------------------------------------------------

CHILD = r"""
import sys, time
from gradio_client import Client
c = Client(sys.argv[1], verbose=False)
c.predict(2, 0.7, api_name="/set_seed")
c.predict(10, 10, 54, 54, api_name="/add_pair")
c.predict(54, 10, 10, 54, api_name="/add_pair")
job = c.submit(int(sys.argv[2]), "", "", "", 20, "0", "default", "W+", 1, api_name="/run")
for out in job:
    if "step" in str(out[2]) and not str(out[2]).startswith("\u26a0"):
        print(c.session_hash, str(out[2]).split()[1], flush=True)
        time.sleep(600)
print("FAILED", flush=True)
"""


def disconnect_phase(url: str, pid: int | None = None, timeout: float = 60.0, settle: float = 2.0) -> dict:
    """Kill a gradio_client process mid-run; the server's run must stop (not only the stream)."""
    import select
    proc = subprocess.Popen([sys.executable, "-c", CHILD, url, str(FAR_STEPS)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    out = {"stopped": False, "errors": []}
    try:
        line = ""
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if ready:
            line = proc.stdout.readline().strip()
        if not line or line == "FAILED":
            out["errors"].append("the child client never streamed a frame")
            return out
        session_hash, step_seen = line.split()[0], int(line.split()[1])
        os.kill(proc.pid, signal.SIGKILL)  # the tab closes: its connections drop without a goodbye
        proc.wait(10)
        t_kill = time.perf_counter()
        # only now attach to the dead client's session (two live streams on one session hash interfere)
        c = new_client(url)
        c.session_hash = session_hash
        while True:
            d = debug(c)
            if not d["running"]:
                break
            if time.perf_counter() - t_kill > timeout:
                break
            time.sleep(0.05)
        out["stop_after_kill_s"] = time.perf_counter() - t_kill
        before = {"step": step_seen}
        step_a = d["step"]
        cpu_a = cpu_seconds(pid)
        time.sleep(settle)
        d2 = debug(c)
        cpu_b = cpu_seconds(pid)
        out.update(step_at_kill=before["step"], step_after=step_a, step_later=d2["step"],
                   state_kept=d2["seed"] == 2 and len(d2["pairs"]) == 2)
        if cpu_a is not None and cpu_b is not None:
            out["server_cpu_s_per_s_after"] = (cpu_b - cpu_a) / settle
        out["stopped"] = (not d["running"]) and (not d2["running"]) and d2["step"] == step_a < FAR_STEPS
        if not out["state_kept"]:
            out["errors"].append(f"session state lost after the disconnect: {d2}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    return out


# ------------------------------------------------------------------------------------------------
# phase 4: many consecutive edits in one session (memory)
# ------------------------------------------------------------------------------------------------

def consecutive_phase(url: str, edits: int, steps: int, pid: int | None, timeout: float = 1200.0) -> dict:
    c = new_client(url)
    res = int(debug(c)["resolution"])
    rss, errors, step_counts = [], [], []
    t0 = time.perf_counter()
    for i in range(edits):
        if time.perf_counter() - t0 > timeout:
            errors.append(f"stopped after {i} edits: time limit")
            break
        plan = edit_plan(i, res)
        try:
            prepare(c, plan)
            streamed_run(c, steps, plan["w_mode"], timeout=120)
            c.predict(api_name="/export_png")
            if i % 10 == 9:
                c.predict(api_name="/export_gif")
            step_counts.append(debug(c)["step"])
        except Exception as e:
            errors.append(f"edit {i}: {type(e).__name__}: {e}")
        rss.append(rss_mb(pid))
    out = {"edits": len(rss), "steps_per_edit": steps, "errors": errors, "wall_s": time.perf_counter() - t0,
           "steps_done": sum(step_counts)}
    if rss and rss[0] is not None:
        warm = min(10, len(rss) - 1)
        tail = rss[warm:]
        x = np.arange(len(tail), dtype=float)
        slope = float(np.polyfit(x, np.asarray(tail), 1)[0]) if len(tail) >= 3 else 0.0
        out["server_rss_mb"] = {"first": rss[0], "after_warmup": rss[warm], "last": rss[-1], "max": max(rss),
                                "growth_after_warmup": rss[-1] - rss[warm], "slope_mb_per_edit": slope,
                                "samples": [round(v, 1) for v in rss]}
    return out


# ------------------------------------------------------------------------------------------------
# phase 5 (--engine ray): a replica dies mid-run
# ------------------------------------------------------------------------------------------------

KILLER = r"""
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
def replicas():
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == "serve" and a["name"].startswith("SERVE_REPLICA::draggan#"))
print("ready", flush=True)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "kill":
        names = [n for n in replicas() if n.endswith("#" + arg)]
        for n in names:
            ray.kill(ray.get_actor(n, namespace="serve"), no_restart=True)
        print(json.dumps(names), flush=True)
    elif cmd == "list":
        print(json.dumps(replicas()), flush=True)
"""

FAULT_PLANS = ({"seed": 2, "psi": 0.7, "pairs": [(10, 10, 54, 54), (54, 10, 10, 54)], "w_mode": "W+"},
               {"seed": 7, "psi": 0.7, "pairs": [(12, 50, 50, 14)], "w_mode": "W"},
               {"seed": 11, "psi": 0.7, "pairs": [(50, 50, 14, 12)], "w_mode": "W+"})


class _Killer:
    """A Ray driver on the app's cluster, connected before the test so that a kill is immediate."""

    def __init__(self, address: str, timeout: float = 120.0):
        import select
        # a driver on the app's loopback-only node, with this machine's token (Ray enables token auth
        # by itself only for address="auto")
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
        self.log = Path(tempfile.mkdtemp(prefix="draggan-load-")) / "ray-driver.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", KILLER, address], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        deadline = time.time() + timeout
        while True:  # Ray may print its own lines first
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.time()))
            line = self.proc.stdout.readline() if ready else ""
            if line.strip() == "ready":
                break
            if not line:
                self.close()
                raise RuntimeError(f"could not connect to Ray at {address}: "
                                   f"{self.log.read_text(errors='replace')[-500:]}")

    def _answer(self):
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the Ray driver of the fault test exited")
            if line.startswith("["):
                return json.loads(line)

    def ask(self, line: str):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def fault_phase(url: str, ray_address: str, steps: int = 200, timeout: float = 300.0) -> dict:
    out = {"errors": [], "steps": steps}
    killer = None
    try:
        killer = _Killer(ray_address)
        out["replicas_before"] = killer.ask("list")
        clients = [new_client(url) for _ in FAULT_PLANS]
        for c, plan in zip(clients, FAULT_PLANS):
            prepare(c, plan)
        runs: list[dict | None] = [None] * len(clients)

        def follow(i):
            try:
                runs[i] = streamed_run(clients[i], steps, FAULT_PLANS[i]["w_mode"], timeout, stop_distance="0",
                                       allow_warning=True)
            except Exception as e:
                runs[i] = {"error": f"{type(e).__name__}: {e}"}
        threads = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(len(clients))]
        for t in threads:
            t.start()
        t0 = time.time()
        while True:  # the first run going on a known replica (the others are usually going too)
            states = [debug(c) for c in clients]
            if states[0]["running"] and states[0]["step"] >= 5 and (states[0].get("engine") or {}).get("replica"):
                break
            if time.time() - t0 > 120 or runs[0] is not None:
                raise RuntimeError(f"the first run did not start, or ended before the kill: {states[0]}")
            time.sleep(0.05)
        victim = states[0]["engine"]["replica"]
        on_victim = [i for i, d in enumerate(states)
                     if d["running"] and (d.get("engine") or {}).get("replica") == victim]
        t_kill = time.perf_counter()
        out["killed"] = killer.ask(f"kill {victim}")
        out["steps_at_kill"] = [d["step"] for d in states]
        out["sessions_on_killed_replica"] = on_victim
        for t in threads:
            t.join(timeout)
        out["message_after_kill_s"] = None
        for i, r in enumerate(runs):
            if r is None or "error" in r:
                out["errors"].append(f"session {i}: {r}")
        checks, model_path = [], None
        from webui.services import resolve_model_path
        model_path = str(resolve_model_path(debug(clients[0])["model"]))
        for i, (c, plan, r) in enumerate(zip(clients, FAULT_PLANS, runs)):
            if r is None or "error" in r:
                continue
            d = debug(c)
            check = {"session": i, "on_killed_replica": i in on_victim, "status": r["status"], "step_after": d["step"]}
            if i in on_victim:
                check["one_line_warning"] = r["status"].startswith("⚠") and "\n" not in r["status"] and "lost" in r["status"]
                check["message_after_kill_s"] = r["t_end"] - t_kill
                if not check["one_line_warning"]:
                    out["errors"].append(f"session {i}: no one-line 'lost' warning: {r['status']!r}")
                rest = steps - d["step"]
                t_resume = time.perf_counter()
                again = streamed_run(c, rest, plan["w_mode"], timeout, stop_distance="0")
                check["resumed_steps"] = rest
                check["resume_first_frame_s"] = again["frames"][0][0] - t_resume if again["frames"] else None
                d = debug(c)
                check["resumed_on"] = (d.get("engine") or {}).get("replica")
                if check["resumed_on"] == victim:
                    out["errors"].append(f"session {i}: resumed on the killed replica")
            latent = c.predict(api_name="/download_latent")
            latent = np.load(latent[0] if isinstance(latent, (list, tuple)) else latent)
            ref = reference_edit(model_path, plan, steps, stop_distance="0")
            diff = float(np.abs(ref["latent"].reshape(latent.shape) - latent).max())
            check.update(final_step=d["step"], alone_steps=ref["step"], max_abs_diff=diff,
                         match=d["step"] == ref["step"] and diff <= TOLERANCE)
            if not check["match"]:
                out["errors"].append(f"session {i}: final latent differs from the edit alone ({diff:.2e}, "
                                     f"steps {d['step']} vs {ref['step']})")
            checks.append(check)
        out["checks"] = checks
        if not on_victim:
            out["errors"].append("no session was on the killed replica")
        t0 = time.time()
        while len(killer.ask("list")) < len(out["replicas_before"]) and time.time() - t0 < 120:
            time.sleep(1)
        out["replicas_after"] = killer.ask("list")
        out["replica_replaced_s"] = time.time() - t0
    except Exception as e:
        out["errors"].append(f"{type(e).__name__}: {e}")
    finally:
        if killer is not None:
            killer.close()
    return out


# ------------------------------------------------------------------------------------------------
# phase 6 (--engine ray): frames batched across runs, or not
# ------------------------------------------------------------------------------------------------

def batching_phase(sessions: int = 8, steps: int = 30, replicas: int = 2, rounds: int = 2,
                   model: str | None = None) -> dict:
    """8 runs at once on the engine deployment, frames batched vs one by one, alternating (A B B A)."""
    import torch
    from draggan_core.edit.settings import DragConfig
    from draggan_core.edit.session import DragSession
    from draggan_core.edit.engine import EndEvent, FrameEvent, StepEvent, export_run_state
    from draggan_core.model.latents import seed_to_w
    from draggan_core.model.store import ModelStore
    from draggan_core.serving.ray_engine import deploy, start_engine
    from webui.services import resolve_model_path

    torch.set_num_threads(1)
    path = resolve_model_path(model)
    m = ModelStore().get(path)
    states = []
    for i in range(sessions):
        plan = edit_plan(i, m.G.img_resolution)
        cfg = DragConfig(display_every=0, stop_distance=0, w_mode=plan["w_mode"].lower())
        s = DragSession(m.G, seed_to_w(m.G, plan["seed"], psi=plan["psi"]), cfg, model_defaults=m.drag_defaults)
        for hx, hy, tx, ty in plan["pairs"]:
            s.add_pair((hx, hy), (tx, ty))
        states.append(export_run_state(s, str(path)))
    engines = {"batched": start_engine(replicas=replicas, batch_frames=True, app_name="lt-batched",
                                       num_cpus=2 * replicas, log=log)}
    engines["unbatched"] = deploy(replicas=replicas, batch_frames=False, app_name="lt-unbatched")
    totals = {k: {"steps": 0, "frames": 0, "wall_s": 0.0, "batch_sizes": [], "rounds": []} for k in engines}
    try:
        order = []
        for r in range(rounds):
            order += ["batched", "unbatched"] if r % 2 == 0 else ["unbatched", "batched"]
        for name in order:
            counts = [[0, 0, []] for _ in range(sessions)]
            errors = []

            def one(i):
                try:
                    for ev in engines[name].run(states[i], steps, display_every=1):
                        if isinstance(ev, StepEvent):  # optimisation steps (the last event only tracks)
                            counts[i][0] = ev.result.step - states[i].step_count
                        elif isinstance(ev, FrameEvent):
                            counts[i][1] += 1
                            counts[i][2].append(ev.batch_size)
                        elif isinstance(ev, EndEvent) and ev.reason in ("lost", "error"):
                            errors.append(ev.message)
                except Exception as e:
                    errors.append(f"{type(e).__name__}: {e}")
            threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(sessions)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            wall = time.perf_counter() - t0
            n_steps, n_frames = sum(c[0] for c in counts), sum(c[1] for c in counts)
            tot = totals[name]
            tot["steps"] += n_steps
            tot["frames"] += n_frames
            tot["wall_s"] += wall
            tot["batch_sizes"] += [b for c in counts for b in c[2]]
            tot["rounds"].append({"steps_per_s": n_steps / wall, "frames_per_s": n_frames / wall, "errors": errors})
            log(f"batching phase: {name}: {n_steps} steps, {n_frames} frames in {wall:.1f} s")
    finally:
        engines["batched"].close()
    out = {"sessions": sessions, "steps_per_run": steps, "replicas": replicas, "order": order}
    for name, tot in totals.items():
        sizes = tot.pop("batch_sizes")
        out[name] = {**tot, "steps_per_s": tot["steps"] / tot["wall_s"], "frames_per_s": tot["frames"] / tot["wall_s"],
                     "mean_frame_batch": float(np.mean(sizes)) if sizes else None}
    out["errors"] = [e for tot in totals.values() for r in tot["rounds"] for e in r["errors"]]
    return out


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

def human(report: dict) -> str:
    lines = []
    if "concurrent" in report:
        r = report["concurrent"]
        lat, solo = r["step_latency_client_s"], r["solo_step_s"]
        f = lambda v: "n/a" if v is None else f"{v * 1000:.0f} ms"  # noqa: E731
        lines += [f"concurrent: {r['completed']}/{r['sessions']} sessions x {r['steps_requested']} steps, "
                  f"{r['total_steps']} steps in {r['wall_s']:.1f} s -> {r['throughput_steps_per_s']:.2f} steps/s total",
                  f"  step latency (client-observed frame interval / steps): p50 {f(lat['p50'])}, p95 {f(lat['p95'])} "
                  f"(n={lat['n']}); solo in-process step: p50 {f(solo['p50'])}, p95 {f(solo['p95'])}",
                  f"  submit -> first frame: p50 {f(r['first_frame_s']['p50'])}, max {f(r['first_frame_s']['max'])}",
                  f"  cross-talk: {'all latents match' if r['crosstalk']['all_match'] else 'MISMATCH'} "
                  f"(max |diff| {max([c['max_abs_diff'] for c in r['crosstalk']['checks']] or [float('nan')]):.2e}, "
                  f"tolerance {TOLERANCE:g})",
                  f"  server RSS: {r['server_rss_mb']['before']} -> {r['server_rss_mb']['after']} MB; served by {r.get('served_by')}",
                  f"  errors: {r['errors'] or 'none'}"]
    if "stop" in report:
        s = report["stop"]
        lines.append(f"stop (idle request round trip {s['idle_round_trip_s']:.3f} s): "
                     f"job.cancel() -> run left: {[round(v, 3) for v in s['cancel_s']]} s; "
                     f"/stop round trip: {[round(v, 3) for v in s['stop_endpoint_s']]} s; errors: {s['errors'] or 'none'}")
    if "disconnect" in report:
        d = report["disconnect"]
        lines.append(f"disconnect (client killed mid-run): run stopped={d['stopped']} after "
                     f"{d.get('stop_after_kill_s', float('nan')):.2f} s, steps {d.get('step_at_kill')} -> "
                     f"{d.get('step_after')} -> {d.get('step_later')}, server CPU afterwards "
                     f"{d.get('server_cpu_s_per_s_after', 'n/a')} s/s; errors: {d['errors'] or 'none'}")
    if "consecutive" in report:
        c = report["consecutive"]
        m = c.get("server_rss_mb", {})
        lines.append(f"consecutive: {c['edits']} edits x {c['steps_per_edit']} steps in {c['wall_s']:.0f} s; RSS "
                     f"{m.get('first', 0):.0f} -> {m.get('after_warmup', 0):.0f} (after 10) -> {m.get('last', 0):.0f} MB, "
                     f"max {m.get('max', 0):.0f}, slope {m.get('slope_mb_per_edit', 0):+.3f} MB/edit; "
                     f"errors: {c['errors'] or 'none'}")
    if "fault" in report:
        f = report["fault"]
        for c in f.get("checks", []):
            extra = (f", warning after {c['message_after_kill_s']:.2f} s: {c['status']!r}, resumed {c['resumed_steps']} steps "
                     f"on replica {c['resumed_on']} (first frame {c['resume_first_frame_s'] or float('nan'):.2f} s)"
                     if c["on_killed_replica"] else "")
            lines.append(f"fault: session {c['session']} {'ON the killed replica' if c['on_killed_replica'] else 'elsewhere'}"
                         f"{extra}; final step {c['final_step']} (alone {c['alone_steps']}), max |diff| {c['max_abs_diff']:.2e} "
                         f"-> {'match' if c['match'] else 'MISMATCH'}")
        lines.append(f"fault: killed {f.get('killed')} at steps {f.get('steps_at_kill')}; replicas "
                     f"{len(f.get('replicas_before', []))} -> {len(f.get('replicas_after', []))} "
                     f"(replaced within {f.get('replica_replaced_s', float('nan')):.1f} s); errors: {f['errors'] or 'none'}")
    if "batching" in report:
        b = report["batching"]
        for name in ("batched", "unbatched"):
            if name in b:
                r = b[name]
                lines.append(f"frames {name:9s}: {b['sessions']} runs x {b['steps_per_run']} steps on {b['replicas']} replicas: "
                             f"{r['steps_per_s']:.2f} steps/s, {r['frames_per_s']:.2f} frames/s total "
                             f"(mean frame batch {r['mean_frame_batch'] or 0:.2f}; per round "
                             f"{[(round(x['steps_per_s'], 2), round(x['frames_per_s'], 2)) for x in r['rounds']]})")
        lines.append(f"batching: order {b['order']}; errors: {b['errors'] or 'none'}")
    if report.get("server"):
        lines.append(f"server: {report['server']}")
    return "\n".join(lines)


def run_all(url: str, sessions: int, steps: int, pid: int | None, stop_trials: int = 3, disconnect: bool = True,
            consecutive: int = 0, consecutive_steps: int = 10, verify: bool = True, timeout: float = 600.0,
            ray_address: str | None = None) -> dict:
    report = {"url": url, "server_pid": pid, "machine": f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}"}
    if sessions > 0:
        log("phase: concurrent")
        report["concurrent"] = concurrent_phase(url, sessions, steps, timeout, verify=verify, pid=pid)
    if stop_trials > 0:
        log("phase: stop")
        report["stop"] = stop_phase(url, stop_trials)
    if disconnect:
        log("phase: disconnect")
        report["disconnect"] = disconnect_phase(url, pid)
    if consecutive > 0:
        log("phase: consecutive")
        report["consecutive"] = consecutive_phase(url, consecutive, consecutive_steps, pid)
    if ray_address:
        log("phase: fault (a replica killed mid-run)")
        report["fault"] = fault_phase(url, ray_address)
    report["ok"] = ok(report)
    return report


def ok(report: dict) -> bool:
    good = True
    if "concurrent" in report:
        r = report["concurrent"]
        good &= not r["errors"] and r["completed"] == r["sessions"]
        good &= r["crosstalk"]["all_match"] or not r["crosstalk"]["checks"]
    if "stop" in report:
        good &= not report["stop"]["errors"]
    if "disconnect" in report:
        good &= report["disconnect"]["stopped"] and not report["disconnect"]["errors"]
    if "consecutive" in report:
        good &= not report["consecutive"]["errors"]
    for phase in ("fault", "batching"):
        if phase in report:
            good &= not report[phase]["errors"]
    return bool(good)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--url", help="a running app on 127.0.0.1 (default: start one)")
    g.add_argument("--start-server", action="store_true", help="start `python app.py` here (the default)")
    p.add_argument("--model", default=None, help="model for a started server (default: the app's default)")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--stop-trials", type=int, default=3)
    p.add_argument("--no-disconnect", action="store_true")
    p.add_argument("--no-verify", action="store_true", help="skip the in-process cross-talk check")
    p.add_argument("--consecutive", type=int, default=0, metavar="N", help="also run N edits in one session")
    p.add_argument("--consecutive-steps", type=int, default=10)
    p.add_argument("--timeout", type=float, default=600.0, help="per-phase time limit, seconds")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--report", default=None, metavar="PATH", help="also write the JSON report to PATH")
    ray = p.add_argument_group("Ray Serve engine (requirements-serve.txt)")
    ray.add_argument("--engine", choices=("local", "ray"), default="local",
                     help="the started server's engine: in-process (default) or `--engine ray`")
    ray.add_argument("--replicas", type=int, default=2, help="engine replicas of a started ray server")
    ray.add_argument("--ray-address", default=None, help="with --url: the app's Ray (GCS address) for the fault phase")
    ray.add_argument("--no-fault", action="store_true", help="skip killing a replica mid-run")
    ray.add_argument("--no-batching", action="store_true", help="skip the frames batched vs one-by-one comparison")
    ray.add_argument("--batching-steps", type=int, default=30, help="steps per run in the batching comparison")
    args = p.parse_args(argv)
    if not (0 <= args.sessions <= 64 and 1 <= args.steps <= 2000 and 0 <= args.consecutive <= 1000):
        p.error("sessions 0-64, steps 1-2000, consecutive 0-1000")

    server = None
    ray_address = args.ray_address
    if args.url:
        check_loopback(args.url)
        url = args.url if args.url.endswith("/") else args.url + "/"
        pid = pid_listening_on(urllib.parse.urlparse(url).port or 80)
    else:
        engine_args = ["--engine", "ray", "--replicas", str(args.replicas)] if args.engine == "ray" else []
        server = Server(model=args.model, engine_args=engine_args, timeout=300.0 if engine_args else 180.0)
        url, pid = server.url, server.pid
        if args.engine == "ray":
            ray_address = server.ray_address()
    try:
        report = run_all(url, args.sessions, args.steps, pid, stop_trials=args.stop_trials,
                         disconnect=not args.no_disconnect, consecutive=args.consecutive,
                         consecutive_steps=args.consecutive_steps, verify=not args.no_verify, timeout=args.timeout,
                         ray_address=None if args.no_fault or args.engine != "ray" and not args.ray_address
                         else ray_address)
        report["engine"] = args.engine
        if server is not None:
            report["server"] = {"log": str(server.log), "tracebacks_in_log": server.tracebacks()}
            if server.tracebacks():
                report["ok"] = False
    finally:
        if server is not None:
            server.stop()
    if args.engine == "ray" and not args.no_batching and args.sessions > 0:
        log("phase: batching (frames batched across runs vs one by one, straight on the engine)")
        try:
            report["batching"] = batching_phase(args.sessions, args.batching_steps, args.replicas, model=args.model)
        except Exception as e:
            report["batching"] = {"errors": [f"{type(e).__name__}: {e}"]}
        report["ok"] = ok(report) and report.get("ok", True)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1, default=str))
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print(human(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # gradio_client's stream threads may wait on long polls; nothing is left to clean up
