"""`python app.py`: start-up, top to bottom.

1. parse: the options, and whether the server can listen where they say (a second, not a start-up);
2. services (`webui.services`, process-wide): the device every model goes on, the CPU threads;
3. model: found, or downloaded from the registry, and loaded once into the shared store;
4. first state: a new visitor's `EditorState` (`webui.editor`), its image rendered; then the Ray
   engine when asked for (the last service: starting Ray takes a while, so it waits until the cheap
   checks passed) and a throwaway drag to warm up;
5. page: `webui.app.build_demo` (gradio is imported only now);
6. serve: `webui.app.launch`, until the server stops; the engine is closed then.

Everything that can fail on bad input happens before gradio is even imported, so mistakes cost a
second and one line (exit 2), never a traceback after the server printed its URL."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from draggan_core.model.devices import DeviceError, add_device_argument, describe
from draggan_core.model.registry import DownloadError, download, list_models

from . import services
from .editor.state import EditorState
from .services import UIError


# ---------------------------------------------------------------------------------------- 1. parse
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DragGAN web UI")
    p.add_argument("--model", default=None,
                   help="checkpoint path, a name in checkpoints/, or a known model name from `draggan models` "
                        "(downloaded with a progress bar and verified first); default: $DRAGGAN_MODEL or the "
                        "embedded faces model")
    add_device_argument(p)
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", os.environ.get("HOST", "127.0.0.1")),
                   help="address to listen on (0.0.0.0 to serve the network)")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", os.environ.get("GRADIO_SERVER_PORT", 7860))))
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default)")
    p.add_argument("--allow-downloads", action=argparse.BooleanOptionalAction, default=None,
                   help="let visitors download known models into this server's checkpoints/ (default: on, "
                        "except with --share or on a Hugging Face Space)")
    serving = p.add_argument_group("serving on Ray (pip install -r requirements-serve.txt; docs/serving.md)")
    serving.add_argument("--engine", choices=("local", "ray"), default="local",
                         help="where drags run: in this process (default) or on a Ray Serve deployment")
    serving.add_argument("--ray-address", default=None, metavar="ADDR",
                         help="a Ray cluster (e.g. ray://head:10001 or auto); default: start a local one on 127.0.0.1")
    serving.add_argument("--replicas", type=int, default=2, help="engine replicas to deploy (default 2)")
    serving.add_argument("--gpus-per-replica", type=float, default=0.0, metavar="G",
                         help="GPUs per replica (default 0: CPU replicas)")
    args = p.parse_args(argv)
    if args.engine == "local" and (args.ray_address or args.gpus_per_replica):
        p.error("--ray-address and --gpus-per-replica need --engine ray")
    if args.replicas < 1 or args.gpus_per_replica < 0:
        p.error("--replicas must be at least 1 and --gpus-per-replica at least 0")
    return args


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on (host, port), in one line naming our own flags, or None.

    Found by binding a socket there, as the server will (SO_REUSEADDR included, like uvicorn's: a
    port whose last connections linger in TIME_WAIT is free for the server, so it is free here too).
    Checked before the model loads, so a busy port costs a second, not a start-up."""
    import errno
    import socket
    if not 0 < port < 65536:
        return f"--port {port} is not a port number (1-65535)"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        return f"--host {host}: unknown address ({getattr(e, 'strerror', None) or e})"
    with socket.socket(family, kind, proto) as trial:
        trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            trial.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return port_in_use(host, port)
            if e.errno == errno.EACCES:
                return f"port {port} on {host}: permission denied (below 1024 needs root); pick another with --port"
            if e.errno == errno.EADDRNOTAVAIL:
                return f"--host {host} is not an address of this machine"
            return f"cannot listen on {host} port {port}: {e.strerror or e}"
    return None


def port_in_use(host: str, port: int) -> str:
    return f"port {port} on {host} is in use; pick another with --port"


# ------------------------------------------------------------------------------------- 2. services
def start_services(args):
    """The device every model of this process goes on, and the main thread's CPU threads."""
    device = services.configure_device(args.device)
    set_torch_threads()
    return device


def set_torch_threads():
    """Threads of the main thread (start-up, page loads): the CPU share of one run. Drag runs and the
    frame renderer set their own (`webui.services.THREADS`)."""
    import torch
    n = services.THREADS.share()
    torch.set_num_threads(n)
    return n


def start_ray_engine(args):
    """The Ray Serve engine (ray is imported only here); stopped when the app exits, SIGTERM included."""
    import signal
    try:
        from draggan_core.serving.ray_engine import start_engine
    except ImportError as e:
        raise UIError(f"--engine ray needs Ray Serve: pip install -r requirements-serve.txt ({e})") from None
    try:
        engine = start_engine(address=args.ray_address, replicas=args.replicas,
                              gpus_per_replica=args.gpus_per_replica,
                              log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except Exception as e:
        raise UIError(f"cannot start the Ray Serve engine: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}") from None
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM -> KeyboardInterrupt: gradio and Ray shut down
    services.set_engine(engine)
    return engine


# ---------------------------------------------------------------------------------------- 3. model
def resolve_startup_model(requested: str | None) -> Path:
    """A local file or checkpoints/ name as before; else a registry name, downloaded (progress bar on
    the console, checksum verified) into checkpoints/ unless already there."""
    requested = requested or os.environ.get("DRAGGAN_MODEL") or None
    try:
        return services.resolve_model_path(requested)
    except UIError:
        known = {e.name: e for e in list_models()}
        if requested not in known:
            raise UIError(f"model {requested}: no such checkpoint file, and not a known model name "
                          "(see `python -m draggan_core models`)") from None
    entry = known[requested]
    target = entry.local_path(download_dir())
    if not target.is_file():
        print(f"downloading {entry.name} ({entry.url}) to {target.parent}/ ...", file=sys.stderr, flush=True)
    try:
        return download(entry, dest_dir=download_dir(), progress=True)
    except DownloadError as e:
        raise UIError(f"cannot download {entry.name}: {e}") from None


def download_dir() -> Path:
    """Where downloaded checkpoints go: $DRAGGAN_DOWNLOAD_DIR, else the checkpoints/ folder."""
    return Path(os.environ.get("DRAGGAN_DOWNLOAD_DIR") or Path(__file__).resolve().parents[1] / "checkpoints")


# ------------------------------------------------------------------ 4. first state, 5. page
def prepare(args):
    """Everything that can fail on bad input, before serving: services, model (loaded, first image
    rendered), page. Raises UIError / DeviceError with one-line messages."""
    device = start_services(args)
    t0 = time.perf_counter()
    path = resolve_startup_model(args.model)
    model = services.load_model(path)
    st = EditorState.create(path)  # the first image, as the first visitor will see it
    seconds = time.perf_counter() - t0
    # after the cheap checks: starting Ray takes a while
    engine = start_ray_engine(args) if getattr(args, "engine", "local") == "ray" else None
    t1 = time.perf_counter()
    st.warm_up()
    from .app import build_demo  # gradio is imported only now
    allow = getattr(args, "allow_downloads", None)
    demo = build_demo(path, first_state=st, allow_downloads=services.downloads_allowed_by_default(
        share=getattr(args, "share", False)) if allow is None else allow)
    info = (f"model {model.name} ({model.G.img_resolution} px) on {describe(device)}, "
            f"loaded and rendered in {seconds:.1f} s, first drag steps warmed up in {time.perf_counter() - t1:.1f} s")
    if engine is not None:
        info += f"; drags run on {engine.describe()}"
    return demo, info


# ---------------------------------------------------------------------------------------- 6. serve
def serve(demo, args, info: str) -> int:
    """Serve the page until the server stops; a port taken while the model loaded is one line, exit 2."""
    from .app import launch
    try:
        launch(demo, args.host, args.port, args.share, info)
    except OSError as e:
        # taken while the model loaded: gradio's own message would send users to GRADIO_SERVER_PORT
        problem = port_problem(args.host, args.port)
        if problem is None and "Cannot find empty port" in str(e):  # (and freed again since)
            problem = port_in_use(args.host, args.port)
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        return 2
    finally:
        services.ENGINE.close()  # a Ray engine stops the Ray it started
    return 0


def main(argv=None):
    args = parse_args(argv)
    problem = port_problem(args.host, args.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        demo, info = prepare(args)
    except (UIError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return serve(demo, args, info)
