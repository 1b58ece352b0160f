"""Time from opening the editor's page to its first image, in Chromium (Debian's, never `playwright install`).

    python scripts/page_load.py [--model PATH] [--runs 5]

Starts `python app.py --model PATH` on a free loopback port (scripts/load_test.py's Server), waits
until it answers, then opens the
page `--runs` times in a fresh browser context each and reports, per load, the seconds from
`page.goto` to the main image being decoded (`#canvas img` complete with a non-zero width).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from draggan_core.cli.bench import _cpu_name  # noqa: E402
from draggan_core.model.store import default_model_path  # noqa: E402
from scripts.load_test import Server  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/lib/chromium/chromium")
FIRST_IMAGE = ("() => { const i = document.querySelector('#canvas img');"
               " return i !== null && i.complete && i.naturalWidth > 0; }")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(default_model_path()))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="DRAGGAN_TORCH_THREADS for the app")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    server = Server(model=args.model, threads=args.threads)
    url = server.url
    try:
        times = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            for _ in range(args.runs):
                context = browser.new_context()
                page = context.new_page()
                t0 = time.perf_counter()
                page.goto(url)
                page.wait_for_function(FIRST_IMAGE, timeout=60_000)
                times.append(time.perf_counter() - t0)
                context.close()
            browser.close()
    finally:
        server.stop()
    print(f"machine: {_cpu_name()}, {os.cpu_count()} CPUs", file=sys.stderr)
    print(json.dumps({"model": args.model, "runs": args.runs, "seconds": [round(t, 3) for t in times],
                      "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)}))


if __name__ == "__main__":
    main()
