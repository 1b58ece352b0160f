"""A standard competing CPU load, bounded in time: what an editor meets on a laptop or a shared box.

    python scripts/cpu_load.py [--engines 1] [--engine-threads 2] [--browser] [--seconds 120]

--engines N     N other drag engines: each a process running drag steps on the default model in a
                loop (the settings of `draggan bench`), with --engine-threads torch threads and the
                OpenMP defaults of a plain torch program (busy-waiting threads): another user's
                edit, another program, or an older version of this one. --engine-policy ours runs
                them with this project's thread policy instead (a second editor of ours).
--browser       a browser-like loop: a Python process that works 30 ms and sleeps 20 ms, again
                and again (about 60 % of one core, in bursts, like a page being drawn).
--seconds S     every load process ends by itself after S seconds (default 120), even if this
                script is killed.

Used by scripts/load_bench.py and `scripts/ui_bench.py --load` through `CpuLoad`; on its own it
runs until the time is up and prints each engine's steps per second.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# what a plain torch program has: no policy of ours, OpenMP's default wait (spinning) policy
_POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "DRAGGAN_THREAD_POLICY", "DRAGGAN_TORCH_THREADS",
                "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _engine_loop(seconds: float, threads: int, ours: bool, result: dict) -> dict:
    if not ours:
        os.environ["DRAGGAN_THREAD_POLICY"] = "fixed"
    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch

    from draggan_core.edit.session import DragSession
    from draggan_core.edit.settings import DragConfig
    from draggan_core.model.store import ModelStore, default_model_path
    if not ours:
        torch.set_num_threads(threads)
    G = ModelStore().get(default_model_path()).G
    res = G.img_resolution
    end = time.monotonic() + seconds
    steps, seed = 0, 0
    t0 = time.monotonic()
    while time.monotonic() < end:
        with torch.no_grad():
            w = G.mapping(torch.from_numpy(np.random.RandomState(seed).randn(1, G.z_dim)).float(), truncation_psi=0.7)
        s = DragSession(G, w, DragConfig(display_every=0, stop_distance=0.01))
        s.add_pair((round(res * 0.45), round(res * 0.55)), (round(res * 0.55), round(res * 0.62)))
        for _ in s.run(max_steps=300):
            steps += 1
            wall = time.monotonic() - t0
            result.update(kind="engine", threads=threads if not ours else "ours", steps=steps,
                          steps_per_s=round(steps / wall, 2))
            if time.monotonic() >= end:
                break
        seed += 1
    return result


def _browser_loop(seconds: float, result: dict, work_s: float = 0.030, idle_s: float = 0.020) -> dict:
    end = time.monotonic() + seconds
    bursts = 0
    result.update(kind="browser", bursts=0)
    while time.monotonic() < end:
        t = time.perf_counter() + work_s
        x = 0
        while time.perf_counter() < t:  # pure-Python work, as a page's scripts and layout are
            x += sum(i * i for i in range(200))
        bursts += 1
        result["bursts"] = bursts
        time.sleep(idle_s)
    return result


class CpuLoad:
    """Start the load processes on enter, stop them on exit (they also stop by themselves)."""

    def __init__(self, engines: int = 1, engine_threads: int = 2, browser: bool = False, seconds: float = 120,
                 engine_policy: str = "plain"):
        self.engines, self.engine_threads, self.browser = engines, engine_threads, browser
        self.seconds, self.engine_policy = seconds, engine_policy
        self.procs: list[subprocess.Popen] = []
        self.results: list[dict] = []

    def describe(self) -> str:
        parts = []
        if self.engines:
            who = "this project's thread policy" if self.engine_policy == "ours" else f"{self.engine_threads} threads, OpenMP defaults"
            parts.append(f"{self.engines} drag engine process{'es' if self.engines > 1 else ''} ({who})")
        if self.browser:
            parts.append("a browser-like loop (30 ms work / 20 ms idle)")
        return " + ".join(parts) or "none"

    def _spawn(self, kind: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in _POLICY_VARS or self.engine_policy == "ours"}
        cmd = [sys.executable, __file__, "--child", kind, "--seconds", str(self.seconds),
               "--engine-threads", str(self.engine_threads), "--engine-policy", self.engine_policy]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def __enter__(self) -> "CpuLoad":
        self.procs = [self._spawn("engine") for _ in range(self.engines)]
        if self.browser:
            self.procs.append(self._spawn("browser"))
        time.sleep(3.0 if self.engines else 0.5)  # engines load the model before they load the CPU
        return self

    def __exit__(self, *exc) -> bool:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                out, _ = p.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                out = ""
            lines = [ln for ln in (out or "").splitlines() if ln.startswith("{")]
            if lines:
                self.results.append(json.loads(lines[-1]))
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=int, default=1)
    p.add_argument("--engine-threads", type=int, default=2)
    p.add_argument("--engine-policy", choices=["plain", "ours"], default="plain")
    p.add_argument("--browser", action="store_true")
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--child", choices=["engine", "browser"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        import signal
        result: dict = {}

        def report(*_):  # terminated early by the parent: report what was done so far
            print(json.dumps(result or {"kind": args.child, "stopped": True}), flush=True)
            os._exit(0)
        signal.signal(signal.SIGTERM, report)
        if args.child == "engine":
            _engine_loop(args.seconds, args.engine_threads, args.engine_policy == "ours", result)
        else:
            _browser_loop(args.seconds, result)
        print(json.dumps(result), flush=True)
        return 0
    load = CpuLoad(args.engines, args.engine_threads, args.browser, args.seconds, args.engine_policy)
    print(f"load: {load.describe()} for {args.seconds:.0f} s", flush=True)
    with load:
        try:
            for p_ in load.procs:
                p_.wait()
        except KeyboardInterrupt:
            pass
    for r in load.results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
