"""Drag speed quiet and beside a competing load, for several thread policies, in one run.

    python scripts/load_bench.py [--runs 5] [--steps 30] [--variants default,passive,one,policy]
                                 [--load engine|engine-ours|browser|engine+browser]

Each run is a fresh `python -m draggan_core bench --config embedded --steps S --json` process (the
default model; the default drag formulation's median step is what is reported). For every variant
the runs alternate quiet / loaded (scripts/cpu_load.py starts the load before a loaded run and stops
it after), so slow drifts of the machine hit both alike. Prints the machine, per-run steps/s, and
per variant the medians, the loaded/quiet ratio and the competing engine's own steps/s, then one
JSON line. Run it on an otherwise quiet machine.

Variants (environment of the bench process):
  default   torch's choice (all cores), OpenMP's default wait policy, our thread policy off
  passive   the same with OMP_WAIT_POLICY=PASSIVE (idle threads sleep instead of spinning)
  one       1 thread
  policy    this project's thread policy (draggan_core/model/devices.py; what the app and CLI use)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_load import CpuLoad  # noqa: E402

_CLEAN = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "DRAGGAN_THREAD_POLICY", "DRAGGAN_TORCH_THREADS", "OMP_NUM_THREADS")
VARIANTS = {
    "default": ({"DRAGGAN_THREAD_POLICY": "fixed"}, []),
    "passive": ({"DRAGGAN_THREAD_POLICY": "fixed", "OMP_WAIT_POLICY": "PASSIVE"}, []),
    "one": ({"DRAGGAN_THREAD_POLICY": "fixed"}, ["--threads", "1"]),
    "policy": ({}, []),
}
LOADS = {"engine": dict(engines=1), "engine-ours": dict(engines=1, engine_policy="ours"),
         "browser": dict(engines=0, browser=True), "engine+browser": dict(engines=1, browser=True),
         "two-engines": dict(engines=2)}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def bench_once(variant: str, steps: int) -> dict:
    extra_env, extra_args = VARIANTS[variant]
    env = {k: v for k, v in os.environ.items() if k not in _CLEAN}
    env.update(extra_env)
    cmd = [sys.executable, "-m", "draggan_core", "bench", "--config", "embedded", "--steps", str(steps),
           "--json", "--quiet", *extra_args]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"steps_per_s": 1 / r["ours_default_step_s"], "threads": r["threads"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="runs per variant and condition (default 5)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per bench phase (default 30)")
    p.add_argument("--variants", default="default,passive,one,policy")
    p.add_argument("--load", choices=sorted(LOADS), default="engine")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; load: {CpuLoad(**LOADS[args.load]).describe()}", flush=True)
    print(f"command per run: python -m draggan_core bench --config embedded --steps {args.steps} --json", flush=True)
    rows: dict = {v: {"quiet": [], "loaded": [], "neighbour": [], "threads": set()} for v in variants}
    t0 = time.time()
    for i in range(args.runs):
        for v in variants:
            q = bench_once(v, args.steps)
            with CpuLoad(**LOADS[args.load], seconds=600) as load:
                lo = bench_once(v, args.steps)
            rows[v]["quiet"].append(q["steps_per_s"])
            rows[v]["loaded"].append(lo["steps_per_s"])
            rows[v]["threads"].update({q["threads"], lo["threads"]})
            rows[v]["neighbour"] += [r["steps_per_s"] for r in load.results if r.get("kind") == "engine" and r.get("steps_per_s")]
            print(f"run {i + 1} {v:8s} quiet {q['steps_per_s']:6.1f}  loaded {lo['steps_per_s']:6.1f} steps/s "
                  f"(threads {q['threads']}/{lo['threads']})", flush=True)
    summary = {}
    print(f"\n| variant | quiet steps/s (median) | loaded (median) | loaded / quiet | competing engine steps/s (median) | runs |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        r = rows[v]
        q, lo = statistics.median(r["quiet"]), statistics.median(r["loaded"])
        nb = statistics.median(r["neighbour"]) if r["neighbour"] else None
        summary[v] = {"quiet": r["quiet"], "loaded": r["loaded"], "quiet_median": q, "loaded_median": lo,
                      "ratio": lo / q, "neighbour_median": nb}
        print(f"| {v} | {q:.1f} (range {min(r['quiet']):.1f}-{max(r['quiet']):.1f}) | {lo:.1f} "
              f"(range {min(r['loaded']):.1f}-{max(r['loaded']):.1f}) | {lo / q:.0%} | "
              f"{nb:.1f} | {args.runs} |" if nb else f"| {v} | {q:.1f} | {lo:.1f} | {lo / q:.0%} | - | {args.runs} |")
    print(json.dumps({"machine": cpu_name(), "cores": os.cpu_count(), "load": args.load, "steps": args.steps,
                      "wall_s": round(time.time() - t0), "variants": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
