"""Launch the DragGAN web UI: python app.py [--model M] [--device auto|cpu|cuda|mps] [--host H]
[--port P] [--share] [--engine local|ray [--ray-address ADDR] [--replicas N] [--gpus-per-replica G]]
(--engine ray: drags run on a Ray Serve deployment, docs/serving.md).

Also a Gradio Space entry point: this module exposes `demo`. Environment: PORT (default port),
DRAGGAN_MODEL (checkpoint), DRAGGAN_DEVICE (device), DRAGGAN_MAX_STEPS (upper bound on steps per run),
DRAGGAN_TORCH_THREADS (CPU threads the app may use).
"""
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from webui.launcher import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
else:  # imported by a Space runner, which calls demo.launch() itself: services, then the page
    from webui.app import build_demo  # noqa: E402
    from webui.services import configure_device  # noqa: E402

    configure_device(None)
    demo = build_demo()
