"""Which torch device runs the generator, and how many CPU threads each piece of work gets.

`--device auto|cpu|cuda|mps` (or DRAGGAN_DEVICE) picks the device for the app and every CLI
command; auto prefers cuda, then mps, then the CPU. Asking for an accelerator that is not there is
a `DeviceError` (one line for the user), never a silent fallback.

Threads: torch's intra-op thread count is per calling thread (checked with torch 2.13: a
`set_num_threads` in one thread leaves the others' unchanged), so each drag run and the frame
renderer set their own. Together they must not exceed the cores: oversubscribed OpenMP threads made
steps many times slower on a busy 2-core machine.
"""
from __future__ import annotations

import argparse
import math
import os
import threading
import time

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DEVICE_ENV = "DRAGGAN_DEVICE"
THREADS_ENV = "DRAGGAN_TORCH_THREADS"


class DeviceError(ValueError):
    """The requested device is unknown or not available here (message meant for users)."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | None = None) -> torch.device:
    """'auto' (default, or DRAGGAN_DEVICE) -> cuda, else mps, else cpu; an explicit name must exist."""
    name = (name or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    base = name.split(":", 1)[0]
    if base not in DEVICE_CHOICES:
        raise DeviceError(f"unknown device {name!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available on this machine "
                          f"(torch {torch.__version__}{'' if torch.version.cuda else ', a CPU-only build'}); "
                          "use --device cpu or auto")
    if base == "mps" and not _mps_available():
        raise DeviceError(f"--device {name}: Apple MPS is not available on this machine; use --device cpu or auto")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"invalid device {name!r}: {e}") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, metavar="{auto,cpu,cuda,mps}",
                        help=f"where the generator runs (default: ${DEVICE_ENV} or auto = cuda, then mps, then cpu)")


def describe(device: torch.device) -> str:
    """'cpu (2 cores)' / 'cuda:0 (NVIDIA H100 80GB HBM3)' for start-up messages and benchmarks."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({os.cpu_count()} cores)"
    return str(device)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock timings on an accelerator mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ------------------------------------------------------------------ fused vs non-fused modulated conv
# On the CPU, scaling activations (non-fused) beat building per-sample weights (fused) in the drag
# step, 135 vs 250 ms per windowed FFHQ-512 step (docs/benchmarks.md): with frozen weights the
# backward then needs no weight gradient. Accelerators are measured once per generator on first use.
_FUSED_CHOICE: dict[tuple[int, str], bool] = {}
_FUSED_LOCK = threading.Lock()


def measure_fused_modconv(G, repeats: int = 3) -> dict:
    """Time one feature-block forward + backward (the drag step's shape) both ways on G's device."""
    device = next(G.parameters()).device
    res = G.synthesis.block_resolutions
    feature_res = res[5] if len(res) > 5 else res[-1]
    ws = G.mapping.w_avg.detach().reshape(1, 1, -1).expand(1, G.num_ws, -1).clone().requires_grad_(True)
    seconds = {}
    for fused in (False, True):
        best = float("inf")
        for _ in range(repeats + 1):  # the first call warms up kernels and allocators
            synchronize(device)
            t0 = time.perf_counter()
            _, feat = G.synthesis(ws, feature_res=feature_res, stop_at_feature=True, fused=fused)
            feat.square().mean().backward()
            synchronize(device)
            best = min(best, time.perf_counter() - t0)
            ws.grad = None
        seconds["fused" if fused else "non_fused"] = best
    return {"fused": seconds["fused"] < seconds["non_fused"], "seconds": seconds, "device": str(device)}


def fused_modconv_for(G) -> bool:
    """The modulated-conv variant the drag step uses on G's device (measured once per accelerator)."""
    device = next(G.parameters()).device
    if device.type == "cpu":
        return False
    key = (id(G), str(device))
    with _FUSED_LOCK:
        if key not in _FUSED_CHOICE:
            _FUSED_CHOICE[key] = measure_fused_modconv(G)["fused"]
        return _FUSED_CHOICE[key]


# ------------------------------------------------------------------ CPU thread shares
POLICY_ENV = "DRAGGAN_THREAD_POLICY"   # "adaptive" (default) or "fixed" (always the configured threads)
# a neighbour keeping more than this much of a core busy takes one of our threads (see `threads_for_load`)
NEIGHBOUR_SLACK = 0.35
LOAD_INTERVAL_S = 0.5                  # how often the load is sampled (two small /proc reads)


def adaptive_policy() -> bool:
    return os.environ.get(POLICY_ENV, "adaptive").strip().lower() != "fixed"


class CpuLoadMonitor:
    """How many cores *other* processes keep busy: the machine's busy time (/proc/stat) minus this
    process's own CPU time, over the last sampling interval. None where /proc/stat is missing (not
    Linux) or before the first interval has passed."""

    def __init__(self, interval: float = LOAD_INTERVAL_S, sample=None, clock=time.monotonic):
        """sample: () -> (monotonic seconds, machine busy ticks or None, own CPU seconds) and clock: tests
        inject them."""
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        if sample is not None:
            self._sample = sample
        self._last = self._sample()
        self.others: float | None = None

    @staticmethod
    def _machine_busy_ticks() -> int | None:
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()
        except OSError:
            return None
        if not fields or fields[0] != "cpu":
            return None
        v = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
        return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]

    def _sample(self) -> tuple:
        busy = self._machine_busy_ticks()
        t = os.times()
        return (time.monotonic(), busy, t.user + t.system)

    def update(self) -> float | None:
        """Cores busy with other processes (re-sampled when the interval has passed)."""
        with self._lock:
            if self._clock() - self._last[0] < self.interval:  # cheap: most steps stop here
                return self.others
            sample = self._sample()
            (t0, busy0, own0), (t1, busy1, own1) = self._last, sample
            self._last = sample
            if busy0 is None or busy1 is None:
                return None
            self.others = max(0.0, ((busy1 - busy0) / self._hz - (own1 - own0)) / (t1 - t0))
            return self.others


_MONITOR: CpuLoadMonitor | None = None
_MONITOR_LOCK = threading.Lock()


def load_monitor() -> CpuLoadMonitor:
    global _MONITOR
    with _MONITOR_LOCK:
        if _MONITOR is None:
            _MONITOR = CpuLoadMonitor()
        return _MONITOR


def threads_for_load(total: int, cores: int, others: float | None, current: int | None = None) -> int:
    """Threads to use when other processes keep `others` cores busy.

    OpenMP threads wait for each other at every parallel region: a thread whose core another process
    holds makes all of them wait (measured in docs/benchmarks.md#sharing-the-cpu: one neighbour
    engine cut a 2-thread step rate to a fraction, while 1 thread kept its speed). So every core's
    worth of neighbour load beyond NEIGHBOUR_SLACK costs one thread; coming back up needs the load to
    fall a further 0.2 core below that (no flapping around the edge).
    """
    if others is None:
        return total
    n = cores - math.ceil(others - NEIGHBOUR_SLACK)
    if current is not None and n > current:
        n_down = cores - math.ceil(others - NEIGHBOUR_SLACK + 0.2)
        n = max(current, n_down)
    return max(1, min(total, n))


class ThreadBudget:
    """Splits the CPU threads between the running drags and (in the web UI) the frame renderer.

    With a renderer, a lone run gets half the threads and the renderer the other half (the two work
    at the same time); with k runs each gets threads // (k + 1), at least one. Without one (the CLI),
    k runs split all of them. DRAGGAN_TORCH_THREADS caps the total; with the adaptive policy (the
    default; DRAGGAN_THREAD_POLICY=fixed turns it off) the total shrinks while other processes keep
    cores busy (`threads_for_load`), re-checked before every drag step.
    """

    def __init__(self, total: int | None = None, renderer: bool = True, adaptive: bool | None = None):
        self._total = total
        self._runs = 0
        self._renderer = renderer
        self._adaptive = adaptive
        self._available: int | None = None
        self._lock = threading.Lock()
        if self.adaptive:
            load_monitor()  # start sampling now, so the first run already has a reading

    @property
    def adaptive(self) -> bool:
        return adaptive_policy() if self._adaptive is None else self._adaptive

    @property
    def total(self) -> int:
        if self._total is not None:
            return self._total
        value = os.environ.get(THREADS_ENV, "").strip()
        return int(value) if value.isdigit() and int(value) > 0 else max(1, os.cpu_count() or 1)

    def available(self) -> int:
        """The total, less what other processes' load takes (adaptive policy)."""
        total = self.total
        if not self.adaptive:
            return total
        self._available = threads_for_load(total, os.cpu_count() or 1, load_monitor().update(), self._available)
        return self._available

    @property
    def runs(self) -> int:
        return self._runs

    def share(self) -> int:
        """Threads for one run or for the renderer, given the runs active now."""
        parts = max(self._runs, 1) + (1 if self._renderer else 0)
        return max(1, self.available() // parts)

    def run(self):
        """Context manager around one drag run: counts it, sets the calling thread's threads, and
        makes `refresh_threads()` (called by `DragSession.run` before every step) follow the share."""
        budget = self

        class _Run:
            def __enter__(self):
                with budget._lock:
                    budget._runs += 1
                self.threads = budget.share()
                torch.set_num_threads(self.threads)
                self._outer = getattr(_CURRENT, "run", None)
                _CURRENT.run = self
                return self

            def refresh(self):
                """Follow the share when other runs or processes start or end (cheap when unchanged)."""
                share = budget.share()
                if share != self.threads:
                    self.threads = share
                    torch.set_num_threads(share)

            def __exit__(self, *exc):
                _CURRENT.run = self._outer
                with budget._lock:
                    budget._runs -= 1
                return False

        return _Run()


_CURRENT = threading.local()


def refresh_threads() -> None:
    """Before a drag step: the calling thread's run (if inside `ThreadBudget.run()`) follows its share."""
    run = getattr(_CURRENT, "run", None)
    if run is not None:
        run.refresh()


__all__ = ["DEVICE_CHOICES", "CpuLoadMonitor", "DeviceError", "ThreadBudget", "adaptive_policy", "load_monitor",
           "refresh_threads", "threads_for_load", "add_device_argument", "describe",
           "fused_modconv_for", "measure_fused_modconv", "resolve_device", "synchronize"]
