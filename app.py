"""Launch the DragGAN web UI: python app.py [--model M] [--host 127.0.0.1] [--port 7860] [--share].

Also a Gradio Space entry point: this module exposes `demo`. Environment: PORT (default port),
DRAGGAN_MODEL (checkpoint), DRAGGAN_MAX_STEPS (upper bound on steps per run).
"""
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from webui.app import build_demo, launch, parse_args  # noqa: E402
from webui.state import UIError  # noqa: E402

if __name__ == "__main__":
    args = parse_args()
    try:
        demo = build_demo(args.model)
    except UIError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    launch(demo, args.host, args.port, args.share)
else:
    demo = build_demo()
