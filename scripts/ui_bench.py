"""UI benchmark: drive `python app.py` as a browser does and measure what the user gets.

    python scripts/ui_bench.py --config ffhq512|ffhq1024|embedded [--steps 40] [--device cpu] [--json]
    python scripts/ui_bench.py --model PATH ...
    python scripts/ui_bench.py --config embedded --runs 5 --load engine   # quiet and loaded, medians

1. The official-style drag step (what the official code does every step: whole generator forward with
   the image, weight gradients on, features up-sampled to image size, backward through it all; the
   same measurement as `python -m draggan_core bench`) is timed in this process, on the same weights.
2. The app is started as a subprocess (`python app.py --model ... --device ...`) on a free loopback
   port, and driven through gradio_client exactly as the page does: /set_seed, /add_pair, /run.
   From the stream: steps per second (the status line's step counter over the run's wall time),
   streamed outputs and frames (an output whose image changed away from the point markers), the
   time from Start to the first output and to the first new image, the largest gap between frames,
   and the app's peak RSS (VmHWM).
`--config ffhq512|ffhq1024` writes an FFHQ-shaped StyleGAN2 with random weights (seed 0) to a
temporary checkpoint; `embedded` uses the default model. `--runs N` drives the same app N times
and reports medians; `--load engine|browser|...` alternates each quiet drive with one beside the
standard competing load of scripts/cpu_load.py. Prints the machine and one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from draggan_core.cli.bench import _cpu_name as cpu_name  # noqa: E402
from load_test import STEP_RE, free_port, rss_mb  # noqa: E402  (scripts/ is this script's folder)



def ffhq_config(res: int):
    from draggan_core.model.networks import GeneratorConfig
    # stylegan2-ada-pytorch "paper512/1024" shapes: cbase 32768, cmax 512, 8 mapping layers
    return GeneratorConfig(z_dim=512, w_dim=512, img_resolution=res, mapping_layers=8, channel_base=32768,
                           channel_max=512, conv_clamp=256)


def model_for(args, tmpdir: Path) -> tuple[Path, str]:
    if args.model:
        return Path(args.model).resolve(), str(args.model)
    if args.config == "embedded":
        from draggan_core.model.store import default_model_path
        return default_model_path(), "embedded default model"
    import torch

    from draggan_core.model.checkpoints import save_native
    from draggan_core.model.networks import Generator
    res = {"ffhq512": 512, "ffhq1024": 1024}[args.config]
    torch.manual_seed(0)
    G = Generator(ffhq_config(res))
    path = tmpdir / f"{args.config}-random.safetensors"
    save_native(G, path)
    return path, f"FFHQ-{res}-shaped StyleGAN2, random weights (seed 0)"


def official_step_seconds(path: Path, device: str, steps: int, threads: int) -> float:
    """Median official-style step time on these weights (the baseline of draggan_core/cli/bench.py), in this process."""
    import torch

    from draggan_core.model.checkpoints import load_generator
    from draggan_core.cli.bench import _OfficialStyleStep
    from draggan_core.edit.settings import DragConfig
    from draggan_core.edit.session import DragSession
    from draggan_core.model.latents import seed_to_w
    torch.set_num_threads(threads)
    G = load_generator(path, device=device)
    res = G.img_resolution
    blocks = G.synthesis.block_resolutions
    # windowed=False: the official code computes the whole feature map every step (the baseline of draggan_core/cli/bench.py)
    s = DragSession(G, seed_to_w(G, 3), DragConfig(compat="official", tracking="l2", windowed=False, lr=1e-3, r1=3,
                                                   r2=12, display_every=0, feature_res=blocks[min(5, len(blocks) - 1)],
                                                   stop_distance=0.5))
    s.add_pair(*pair_for(res))
    with _OfficialStyleStep(G, s):
        times = [r.seconds for r in s.run(max_steps=steps)]
    return float(np.median(times[1:steps])) if steps > 1 else times[0]


def pair_for(res: int):
    """Handle near the centre, target 10 % of the image away (the drag will not finish in a bench run)."""
    return (round(res * 0.45), round(res * 0.55)), (round(res * 0.55), round(res * 0.62))




def start_app(path: Path, device: str, log: Path, threads: int | None, app_dir: Path = REPO, app_args=()):
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PORT": str(port), "PYTHONPATH": str(app_dir)}
    if threads:
        env["DRAGGAN_TORCH_THREADS"] = str(threads)
    cmd = [sys.executable, "app.py", "--model", str(path), "--port", str(port), *app_args]
    if app_dir == REPO:  # another checkout (--app-dir, a baseline) may predate --device
        cmd += ["--device", device]
    t0 = time.perf_counter()
    out = open(log, "wb")
    proc = subprocess.Popen(cmd, cwd=app_dir, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    import urllib.request
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except Exception:
            if proc.poll() is not None or time.perf_counter() - t0 > 300:
                proc.kill()
                raise RuntimeError(f"app did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
    return proc, url, time.perf_counter() - t0




def image_changed(a: np.ndarray | None, b: np.ndarray, ignore: tuple[int, int, int, int]) -> bool:
    """True when b differs from a outside the box where the point markers are drawn."""
    if a is None or a.shape != b.shape:
        return True
    x0, y0, x1, y1 = ignore
    keep = np.ones(a.shape[:2], bool)
    keep[max(y0, 0):y1, max(x0, 0):x1] = False
    return bool((a != b).any(axis=-1)[keep].any())  # lossless PNG / deterministic JPEG: same latent, same pixels


def drive(url: str, res: int, steps: int) -> dict:
    from gradio_client import Client
    from PIL import Image
    c = Client(url, verbose=False)
    t0 = time.perf_counter()
    out = c.predict(3, 0.7, api_name="/set_seed")
    seed_seconds = time.perf_counter() - t0
    (hx, hy), (tx, ty) = pair_for(res)
    c.predict(hx, hy, tx, ty, api_name="/add_pair")
    shown = np.asarray(Image.open(out[0]).convert("RGB"))
    f = shown.shape[0] / res  # display pixels per model pixel
    margin = 30
    ignore = (int(min(hx, tx) * f) - margin, int(min(hy, ty) * f) - margin,
              int(max(hx, tx) * f) + margin, int(max(hy, ty) * f) + margin)
    events = []  # (seconds since Start, step, new image?)
    t_start = time.perf_counter()
    job = c.submit(steps, "", "", "", "", "0.1", "default", "model default", 1, api_name="/run")
    last_path = None
    for item in job:
        now = time.perf_counter() - t_start
        image_path, status = item[0], item[2]
        m = STEP_RE.search(str(status))
        step = int(m.group(1)) if m else None
        new_image = False
        if not isinstance(image_path, str):  # a status-only update (the image output skipped)
            image_path = None
        if image_path and image_path != last_path:
            img = np.asarray(Image.open(image_path).convert("RGB"))
            new_image = image_changed(shown, img, ignore)
            shown, last_path = img, image_path
        events.append((now, step, bool(image_path), new_image, str(status)))
    t_end = time.perf_counter() - t_start
    final_status = events[-1][4] if events else ""
    steps_done = max((e[1] for e in events if e[1] is not None), default=0)
    frame_times = [e[0] for e in events if e[3]]
    gaps = np.diff([0.0] + frame_times + [t_end]) if frame_times else [t_end]
    return {
        "seed_image_s": round(seed_seconds, 3),
        "steps": steps_done, "run_wall_s": round(t_end, 3),
        "ui_steps_per_s": round(steps_done / t_end, 3) if t_end > 0 else None,
        "outputs": len(events), "frames": len(frame_times),
        "frames_per_s": round(len(frame_times) / t_end, 3),
        "first_output_s": round(events[0][0], 3) if events else None,
        "first_frame_s": round(frame_times[0], 3) if frame_times else None,
        "max_frame_gap_s": round(float(np.max(gaps)), 3),
        "final_status": final_status,
    }




SUMMARY_KEYS = ("ui_steps_per_s", "first_output_s", "first_frame_s", "max_frame_gap_s", "frames_per_s")


def drive_runs(url: str, res: int, args, log) -> tuple[dict, dict]:
    """`--runs` drives (quiet, and with `--load` each followed by one beside the load): the first
    quiet drive's numbers, plus per condition every run's numbers and their medians."""
    from cpu_load import CpuLoad
    from load_bench import LOADS
    conditions = ["quiet"] + (["loaded"] if args.load else [])
    per: dict = {c: [] for c in conditions}
    for i in range(args.runs):
        for c in conditions:
            if c == "loaded":
                with CpuLoad(**LOADS[args.load], seconds=900) as load:
                    r = drive(url, res, args.steps)
                r["neighbour_steps_per_s"] = [x.get("steps_per_s") for x in load.results if x.get("kind") == "engine"]
            else:
                r = drive(url, res, args.steps)
            per[c].append(r)
            log(f"run {i + 1} {c:6s}: {r['ui_steps_per_s']} steps/s, first frame {r['first_frame_s']} s, "
                f"largest gap {r['max_frame_gap_s']} s")
    if args.runs == 1 and not args.load:
        return per["quiet"][0], {}
    medians = {c: {k: float(np.median([r[k] for r in per[c] if r[k] is not None] or [np.nan])) for k in SUMMARY_KEYS}
               for c in conditions}
    extra = {"runs": args.runs, "load": CpuLoad(**LOADS[args.load]).describe() if args.load else None,
             "medians": medians, "per_run": per}
    if args.load:
        extra["loaded_over_quiet_steps"] = round(medians["loaded"]["ui_steps_per_s"] / medians["quiet"]["ui_steps_per_s"], 3)
        log(f"medians of {args.runs}: quiet {medians['quiet']}, loaded {medians['loaded']}")
    return {**per["quiet"][0], **{k: round(v, 3) for k, v in medians["quiet"].items()}}, extra


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", choices=["ffhq512", "ffhq1024", "embedded"], default="ffhq512")
    g.add_argument("--model", help="a checkpoint file instead of a --config")
    p.add_argument("--steps", type=int, default=40, help="steps of the UI run (default: 40)")
    p.add_argument("--official-steps", type=int, default=4, help="official-style steps timed (median of all but the first; default: 4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="DRAGGAN_TORCH_THREADS for the app (default: all cores)")
    p.add_argument("--app-dir", type=Path, default=REPO,
                   help="run the app of another checkout (e.g. a baseline commit's `git worktree`)")
    p.add_argument("--runs", type=int, default=1, help="drives of the running app; with several, medians are reported (default: 1)")
    p.add_argument("--load", choices=["engine", "engine-ours", "browser", "engine+browser", "two-engines"], default=None,
                   help="also drive beside a competing load (scripts/cpu_load.py), alternating with quiet drives")
    p.add_argument("--app-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for app.py, repeatable (e.g. --app-arg=--engine --app-arg=ray)")
    p.add_argument("--json", action="store_true", help="only the JSON object on stdout")
    args = p.parse_args(argv)
    import torch

    from draggan_core.model.devices import describe, resolve_device
    device = resolve_device(args.device)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    with tempfile.TemporaryDirectory(prefix="draggan-ui-bench-") as tmp:
        path, desc = model_for(args, Path(tmp))
        from draggan_core.model.checkpoints import load_generator
        res = load_generator(path).img_resolution
        log(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; device {describe(device)}")
        log(f"model: {desc} ({res} px)")
        threads = args.threads or os.cpu_count() or 1
        official = official_step_seconds(path, str(device), args.official_steps + 1, threads)
        log(f"official-style step: {official:.3f} s ({threads} threads)")
        proc, url, startup = start_app(path, str(device), Path(tmp) / "app.log", args.threads,
                                       args.app_dir.resolve(), args.app_arg)
        try:
            ui, runs = drive_runs(url, res, args, log)
            rss = rss_mb(proc.pid, key="VmHWM")
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        ready_line = next((ln for ln in (Path(tmp) / "app.log").read_text(errors="replace").splitlines()
                           if "loaded and rendered" in ln), "")
        m = re.search(r"loaded and rendered in ([\d.]+) s", ready_line)
    result = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores", "torch": torch.__version__, "device": describe(device),
        "model": desc, "resolution": res, "app": str(args.app_dir.resolve()),
        "official_step_s": round(official, 3), "official_steps_per_s": round(1 / official, 3),
        **ui,
        "speedup_vs_official": round(ui["ui_steps_per_s"] * official, 2) if ui["ui_steps_per_s"] else None,
        "app_start_to_serving_s": round(startup, 2),
        "model_load_and_first_image_s": float(m.group(1)) if m else None,
        "app_peak_rss_mb": round(rss) if rss else None,
        **runs,
    }
    log(f"UI: {result['ui_steps_per_s']} steps/s ({result['speedup_vs_official']}x the official step), "
        f"{result['frames']} frames, first output {result['first_output_s']} s, first frame {result['first_frame_s']} s, "
        f"largest gap {result['max_frame_gap_s']} s, app peak RSS {result['app_peak_rss_mb']} MB")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
