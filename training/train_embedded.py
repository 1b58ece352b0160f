"""Train the embedded default model: a small StyleGAN2 regressed onto the procedural face renderer.

    python -m training.train_embedded --out runs/embedded --minutes 360

G(z) is trained to reproduce render(z), where z is the renderer's standard-normal parameter vector,
so the generator's latent space *is* the face-parameter space (smooth, every seed a face). The loss is
an L1 weighted up on eyes, brows, nose and mouth (the renderer knows where they are) plus an L1 on 2x
down-sampled images. Resumable: rerunning the same command continues from `OUT/last.pt`.
Batches are a pure function of the step index, so a resumed run sees the same data as an unbroken one.

`--grow-from M --resolution 128` grows a shipped 64 px model by one synthesis block whose ToRGB starts at
zero, so training starts from M's image up-sampled (the skip architecture sums the blocks' ToRGB
outputs) instead of from scratch; a schedule stage's `train_only` trains the new block first.

`--init-model M --train-only image-head` fine-tunes a shipped model's image head only (every ToRGB
layer and the last block): the features of the blocks before it, which the drag engine optimises and
tracks on, and the mapping stay bit for bit those of M, so drags follow the same latent path and only
the rendered image changes.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from draggan_core.model.checkpoints import read_native_metadata, save_native
from draggan_core.model.networks import Generator, GeneratorConfig
from training import faces

HELD_OUT_SEED = 1_000_003  # z for evaluation come from this seed; training seeds are step indices
RENDER_TIMEOUT_S = 120     # a render worker that has not answered in this long is dead or stuck
MAX_STEP_SECONDS = 3.0
# parameters that shape the image but no feature the drag engine uses (its blocks end at b32 here)
TRAIN_ONLY_PRESETS = {"image-head": r"^synthesis\.(b64\.|b\d+\.torgb\.)"}


def trainable_pattern(train_only: str | None) -> str | None:
    return TRAIN_ONLY_PRESETS.get(train_only, train_only) if train_only else None


GROW_CHANNELS = 16  # the b128 block's width: 32 made a 128 px training step ~3x slower (model card, 128 px)


def embedded_config(resolution: int = 64) -> GeneratorConfig:
    """64 px, narrow channels: ~0.2 s per training step of 16 and a fast drag step on 2 CPU cores.
    128 px adds a narrow b128 block (the layout `--grow-from` produces)."""
    channels = {4: 128, 8: 128, 16: 128, 32: 64, 64: 32}
    if resolution == 128:
        channels[128] = GROW_CHANNELS
    elif resolution != 64:
        raise ValueError(f"the embedded models are 64 or 128 px, not {resolution}")
    return GeneratorConfig(
        z_dim=faces.PARAM_DIM, w_dim=256, img_resolution=resolution, mapping_layers=4,
        mapping_lr_multiplier=1.0,      # regression: the mapping must move as fast as the synthesis
        mapping_normalize_z=False,      # z is the renderer's parameter vector; its norm carries information
        channels=channels,
        use_noise=False,                # targets are deterministic in z: noise inputs only cost time
    )


def grow_generator(small: Generator, channels: int = GROW_CHANNELS) -> Generator:
    """`small` plus one synthesis block at twice its resolution, ready to train. The new block's ToRGB
    is zero, so the grown image is exactly small's image up-sampled by the skip path's FIR filter
    (the start of progressive growing's fade-in, with nothing to fade). Every other parameter and
    buffer (w_avg included) is small's, under the same names (NVIDIA's: synthesis.b128.* is new)."""
    res = small.cfg.img_resolution * 2
    cfg = dataclasses.replace(small.cfg, img_resolution=res, channels={**small.cfg.channels, res: channels})
    grown = Generator(cfg, trainable=True)
    missing, unexpected = grown.load_state_dict(small.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(f"synthesis.b{res}.") for k in missing), (missing, unexpected)
    torgb = grown.synthesis.block(res).torgb
    with torch.no_grad():
        torgb.weight.zero_()
        torgb.bias.zero_()
    return grown


DRAG_DEFAULTS_FILE = Path(__file__).with_name("embedded_drag_defaults.json")  # the L1 model's
PARTS_DRAG_DEFAULTS_FILE = Path(__file__).with_name("embedded_parts_drag_defaults.json")  # the default model's
# the 128 px grown model's: the 64 px default's settings with pixel radii doubled (provisional until
# chosen on validation pairs with a trained snapshot)
GROW128_DRAG_DEFAULTS_FILE = Path(__file__).with_name("grow128_drag_defaults.json")


@torch.no_grad()
def export_model(G_ema: Generator, path, step: int, seconds: float, dtype=torch.float16, images: int | None = None,
                 drag_defaults: str | None = None, keep_w_avg: bool = False, extra: dict | None = None,
                 base: dict | None = None):
    """Write the shipped checkpoint: w_avg set to the mean W (truncation needs it), fp16 weights,
    training facts and the drag defaults (JSON text, chosen by the evaluation sweep) in the metadata.
    keep_w_avg: the mapping was frozen, so the w_avg it came with stays (recomputing it from fp16
    weights would move every truncated latent a little). base: the model a fine-tune started from
    (its steps, minutes and images are added, so the metadata counts the whole training)."""
    if not keep_w_avg:
        z = torch.from_numpy(faces.sample_z(8192, seed=HELD_OUT_SEED + 1)).to(G_ema.mapping.w_avg.device)
        G_ema.mapping.w_avg.copy_(G_ema.mapping(z)[:, 0].mean(dim=0))
    images = images if images is not None else step * 16
    meta = {**(extra or {}), "renderer": "training/faces.py"}
    if base:
        meta["fine_tune"] = json.dumps({"base": base, "steps": step, "minutes": round(seconds / 60, 1), "images": images})
        step, seconds, images = step + base["steps"], seconds + 60 * base["minutes"], images + base["images"]
    meta.update({"training_steps": str(step), "training_minutes": f"{seconds / 60:.1f}", "training_images": str(images)})
    if drag_defaults:
        meta["drag_defaults"] = drag_defaults
    save_native(G_ema, path, dtype=dtype, extra_metadata=meta)


def read_drag_defaults(path, parser: argparse.ArgumentParser) -> str:
    """The --drag-defaults file's JSON text, read once up front: a wrong path stops the command
    before any work instead of writing a model without its drag defaults."""
    try:
        return Path(path).read_text()
    except OSError as e:
        parser.error(f"--drag-defaults {path}: {e.strerror}")


def compact_state(state: dict) -> dict:
    """A smaller copy of a training state for the repository: weights in fp16, Adam moments in bf16
    (bf16 keeps fp32's range, so tiny second moments do not underflow to zero)."""
    def cast(sd, dtype):
        return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in sd.items()}
    opt = dict(state["opt"])
    opt["state"] = {k: {**cast(v, torch.bfloat16), "step": v["step"]} for k, v in opt["state"].items()}
    return {**state, "G": cast(state["G"], torch.float16), "G_ema": cast(state["G_ema"], torch.float16), "opt": opt}


def render_batch(z: np.ndarray, part_gains=(1.0, 1.0, 1.0, 1.0), resolution: int = 64):
    """Renders and the per-pixel extra loss weight: max over parts of gain_p * coverage_p, [N,1,H,W]
    (gains relative to --part-gain, in faces.PART_NAMES order). Parts without a gain weigh 0: the
    four-value scales written before the ears region existed reproduce those runs exactly."""
    batch = faces.render(z, resolution=resolution)
    images = torch.from_numpy(batch.images)
    gains = tuple(part_gains) + (0.0,) * (len(faces.PART_NAMES) - len(part_gains))
    gains = torch.tensor(gains, dtype=torch.float32)[None, :, None, None]
    weights = (torch.from_numpy(batch.part_masks) * gains).amax(dim=1, keepdim=True)
    return images, weights


def _init_render_worker():
    # render workers must outlive a SIGTERM/SIGINT so the trainer can finish its step and save
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def _render_task(batch: int, seed: int, part_scale: str, resolution: int = 64):
    z = faces.sample_z(batch, seed=seed)
    real, part_weight = render_batch(z, parse_part_scale(part_scale), resolution)
    # numpy, not tensors: torch sends tensors between processes through shared-memory file
    # descriptors, which sandboxed machines may not support; plain pickled arrays always work
    return z, real.numpy(), part_weight.numpy()


class BatchStream:
    """Training batches for steps start, start+1, ...: rendered in this process, or by `workers`
    processes with a bounded look-ahead (a GPU consumes batches faster than one core renders them).
    The result is the same either way: batch `step` is z = sample_z(batch, seed=step) and its render
    (at the stage's resolution)."""

    def __init__(self, start: int, settings, workers: int = 0, lookahead: int = 4):
        self.next_step, self.settings, self.pending = start, settings, collections.deque()
        self.pool = None
        if workers > 0:
            self.pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_render_worker)
            self.depth = lookahead * workers

    def _task(self, step):
        stage = self.settings(step)
        return stage.batch, step, stage.part_scale, getattr(stage, "resolution", 64)

    def _fill(self):
        """Queue render tasks until the look-ahead is full."""
        while len(self.pending) < self.depth:
            self.pending.append(self.pool.apply_async(_render_task, self._task(self.next_step)))
            self.next_step += 1

    def get(self):
        """(z [N, PARAM_DIM] numpy, images [N,3,H,W], part weights [N,1,H,W]) for the next step."""
        if self.pool is None:
            z, real, part_weight = _render_task(*self._task(self.next_step))
            self.next_step += 1
        else:
            self._fill()
            try:
                z, real, part_weight = self.pending.popleft().get(timeout=RENDER_TIMEOUT_S)
            except multiprocessing.TimeoutError:
                raise RuntimeError(f"no batch from the render workers in {RENDER_TIMEOUT_S} s: a worker died or "
                                   "hangs; rerun with --workers 0 to render in this process") from None
        return z, torch.from_numpy(real), torch.from_numpy(part_weight)

    def close(self):
        if self.pool is None:
            return
        # The workers ignore SIGTERM (a Ctrl-C or a SIGTERM to the process group must not kill them
        # mid-step), so Pool.terminate cannot stop one that is busy: on a GPU machine it waited forever
        # for a worker blocked writing a 6 MB batch to a pipe nobody read any more. So let the
        # look-ahead finish, then let the idle workers exit normally.
        for pending in self.pending:
            pending.wait(RENDER_TIMEOUT_S)
        if all(pending.ready() for pending in self.pending):
            self.pool.close()
            self.pool.join()
        else:  # a worker hangs: its batch is not needed any more, and waiting for it would hang us too
            for child in multiprocessing.active_children():
                child.kill()
        self.pool = None


def regression_loss(fake, real, part_weight, part_gain, part_l2: float = 0.0, image_l2: float = 0.0):
    diff = fake - real
    weight = 1.0 + part_gain * part_weight
    full = (diff.abs() * weight).sum() / (weight.sum() * fake.shape[1])
    half = F.l1_loss(F.avg_pool2d(fake, 2), F.avg_pool2d(real, 2))
    if part_l2 > 0:
        # L1's optimum is the median: a 1-px dark dot whose position G cannot pin down is dropped
        # (skin everywhere); a squared error on the part regions prefers a blurred, darker dot
        full = full + part_l2 * (diff.square() * part_weight).sum() / (part_weight.sum() * fake.shape[1] + 1e-8)
    if image_l2 > 0:
        # PSNR scores the mean, L1 fits the median: where G cannot tell (edges, the shirt) they differ
        full = full + image_l2 * diff.square().mean()
    return full + half


@torch.no_grad()
def evaluate(G_ema, z_eval, real_eval):
    fake = torch.cat([G_ema(z, fused=False) for z in z_eval.split(32)]).cpu()
    mse = ((fake.clamp(-1, 1) - real_eval) / 2).square().mean(dim=[1, 2, 3])  # images in [0,1] units
    psnr = (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()
    l1 = ((fake.clamp(-1, 1) - real_eval).abs().mean() * 127.5).item()
    return psnr, l1, fake


def save_grid(path, real, fake, n=16, scale=3):
    from PIL import Image
    pairs = torch.stack([real[:n], fake[:n].clamp(-1, 1)], dim=1)  # [n,2,3,H,W]
    n, _, c, h, w = pairs.shape
    cols = 4
    rows = math.ceil(n / cols)
    grid = torch.ones(3, rows * h, cols * (2 * w + 2))
    for i in range(n):
        r, cidx = divmod(i, cols)
        x0 = cidx * (2 * w + 2)
        grid[:, r * h:(r + 1) * h, x0:x0 + w] = pairs[i, 0]
        grid[:, r * h:(r + 1) * h, x0 + w:x0 + 2 * w] = pairs[i, 1]
    arr = ((grid * 127.5 + 128).clamp(0, 255).byte().permute(1, 2, 0).numpy())
    Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST).save(path)


def widen_z_fourier(state: dict, cfg: GeneratorConfig, k_max: int, fc0_index: int) -> None:
    """Give a training state's mapping the z Fourier features (`GeneratorConfig.mapping_z_fourier`), in
    place: fc0 gains zero weights for the new inputs, and its stored weights and Adam moments are rescaled
    for the layer's new equalised-lr gain, so G's function is unchanged and training continues from it."""
    old_in = cfg.z_dim * (1 + 2 * cfg.mapping_z_fourier)
    cfg = dataclasses.replace(cfg, mapping_z_fourier=k_max)
    new_in = cfg.z_dim * (1 + 2 * k_max)
    gain_ratio = math.sqrt(new_in / old_in)  # stored weight = actual weight / gain, gain ~ 1/sqrt(fan-in)

    def widen(t, scale):
        out = torch.zeros(t.shape[0], new_in, dtype=t.dtype)
        out[:, :old_in] = t.float() * scale
        return out
    for key in ("G", "G_ema"):
        state[key]["mapping.fc0.weight"] = widen(state[key]["mapping.fc0.weight"], gain_ratio)
    moments = state["opt"]["state"].get(fc0_index)
    if moments is not None:  # gradients w.r.t. the stored weight shrink by the same ratio
        moments["exp_avg"] = widen(moments["exp_avg"], 1 / gain_ratio)
        moments["exp_avg_sq"] = widen(moments["exp_avg_sq"], 1 / gain_ratio ** 2)
    state["config"] = cfg.to_json()


def base_info(path) -> dict:
    """What a fine-tune starts from, for the exported metadata."""
    meta = read_native_metadata(path)
    return {"model": Path(path).name, "steps": int(meta.get("training_steps", 0)),
            "minutes": float(meta.get("training_minutes", 0)), "images": int(meta.get("training_images", 0))}


def mapping_frozen(pattern: str | None) -> bool:
    return bool(pattern) and not any(re.search(pattern, f"mapping.fc{i}.weight") for i in range(8))


def parse_part_scale(text) -> tuple[float, ...]:
    return tuple(float(v) for v in str(text).split(","))


def stage_for(step: int, args):
    """The settings in force at `step`: the --schedule stage covering it, else the command line's."""
    for stage in args.schedule_stages:
        if step < stage["until_step"]:
            return argparse.Namespace(**{**vars(args), **{k.replace("-", "_"): v for k, v in stage.items()}})
    return args


def learning_rate(step: int, args) -> float:
    """Constant, then (optionally) linear decay to 10 % between --decay-start and --decay-end."""
    if args.decay_start is None or args.decay_end is None or step < args.decay_start:
        return args.lr
    t = min((step - args.decay_start) / max(args.decay_end - args.decay_start, 1), 1.0)
    return args.lr * (1 - 0.9 * t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/embedded")
    p.add_argument("--minutes", type=float, default=360.0, help="total training wall-time budget (all resumes)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (tests, smoke runs)")
    p.add_argument("--batch", type=int, default=16, help="images per step (a --schedule stage may set its own)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--decay-start", type=int, default=None, help="step where the lr starts decaying linearly")
    p.add_argument("--decay-end", type=int, default=None, help="step where the lr reaches 10%% of --lr")
    p.add_argument("--part-gain", type=float, default=8.0, help="extra L1 weight on the part regions")
    p.add_argument("--part-scale", default="1,1,1,1", metavar="E,B,N,M[,EARS[,SHIRT]]",
                   help="per-part multipliers of --part-gain for eyes, brows, nose, mouth and (optional, default 0) ears and shirt")
    p.add_argument("--part-l2", type=float, default=0.0,
                   help="weight of an extra squared error on the part regions (a stage may set part_l2)")
    p.add_argument("--image-l2", type=float, default=0.0,
                   help="weight of an extra squared error on the whole image (a stage may set image_l2)")
    p.add_argument("--schedule", default=None, metavar="JSON",
                   help="stages [{until_step, lr, decay_start, decay_end, part_scale, batch, part_l2, image_l2, train_only}, ...] "
                        "overriding those options per step range, e.g. training/embedded_schedule.json (the shipped "
                        "run); a stage's train_only trains only the matching parameters at its steps")
    p.add_argument("--ema-kimg", type=float, default=2.0, help="G_ema half-life in thousands of images")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--save-every-min", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--workers", type=int, default=0,
                   help="render batches in this many worker processes (0: in the training process)")
    p.add_argument("--resume-state", default=None, metavar="PATH",
                   help="state to continue from when OUT/last.pt does not exist yet, e.g. the committed "
                        "training/state/embedded-last.pt")
    p.add_argument("--resolution", type=int, default=64, choices=(64, 128), help="render and train at this size")
    p.add_argument("--grow-from", default=None, metavar="SAFETENSORS",
                   help="start from this native model grown by one block to --resolution (twice its own), whose "
                        "first image is the model's up-sampled; used when there is no state to resume")
    p.add_argument("--grow-channels", type=int, default=GROW_CHANNELS, help="width of the block --grow-from adds")
    p.add_argument("--init-model", default=None, metavar="SAFETENSORS",
                   help="start from this native model's weights (G and G_ema) when there is no state to resume")
    p.add_argument("--train-only", default=None, metavar="PRESET|REGEX",
                   help="train only the parameters whose names match (preset: image-head = every ToRGB layer "
                        "and the last block); the rest stay frozen, G_ema included")
    p.add_argument("--z-fourier", type=int, default=0, metavar="K",
                   help="resume a state whose mapping lacks them with z Fourier features k = 1..K "
                        "(GeneratorConfig.mapping_z_fourier; new weights start at zero, so G is unchanged)")
    p.add_argument("--export", default=None, help="also write G_ema as native safetensors (fp16) here")
    p.add_argument("--drag-defaults", default=str(PARTS_DRAG_DEFAULTS_FILE), metavar="JSON",
                   help="drag defaults written into --export snapshots (default: the default model's, "
                        "training/embedded_parts_drag_defaults.json; finalize_model sets the final ones)")
    args = p.parse_args(argv)
    drag_defaults = read_drag_defaults(args.drag_defaults, p) if args.export else None
    args.schedule_stages = json.loads(Path(args.schedule).read_text())["stages"] if args.schedule else []
    for scale in [args.part_scale] + [stage.get("part_scale", args.part_scale) for stage in args.schedule_stages]:
        if not 4 <= len(parse_part_scale(scale)) <= len(faces.PART_NAMES):
            p.error(f"--part-scale needs 4 to {len(faces.PART_NAMES)} values ({', '.join(faces.PART_NAMES)}; "
                    f"the regions left out weigh 0)")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: let cuDNN pick its kernels
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "last.pt"
    source = ckpt_path if ckpt_path.exists() else Path(args.resume_state) if args.resume_state else None
    state = None
    if source is not None and source.exists():
        state = torch.load(source, weights_only=True, map_location="cpu")  # the optimiser moves its state
    base = None  # the model a fine-tune or a grown model starts from (--init-model, --grow-from)
    grown = None
    if state is not None:  # the state knows its architecture (a grown model's b128 width included)
        cfg = GeneratorConfig.from_json(state["config"])
        if args.z_fourier and cfg.mapping_z_fourier not in (0, args.z_fourier):
            p.error(f"{source} already has z Fourier features k <= {cfg.mapping_z_fourier}, not --z-fourier {args.z_fourier}")
    elif args.grow_from:
        from draggan_core.model.checkpoints import load_generator
        small = load_generator(args.grow_from).cpu()
        if small.img_resolution * 2 != args.resolution:
            p.error(f"--grow-from {args.grow_from}: a {small.img_resolution} px model grows to "
                    f"{small.img_resolution * 2} px, not --resolution {args.resolution}")
        grown = grow_generator(small, args.grow_channels)
        cfg = grown.cfg
        base = base_info(args.grow_from)
    else:
        cfg = embedded_config(args.resolution)
    if cfg.img_resolution != args.resolution:
        p.error(f"{source} holds a {cfg.img_resolution} px model: resume it with --resolution {cfg.img_resolution}")
    unwidened = cfg if state is not None and args.z_fourier and cfg.mapping_z_fourier == 0 else None
    if unwidened is not None:  # the state is widened below, once the optimiser's parameter order is known
        cfg = dataclasses.replace(cfg, mapping_z_fourier=args.z_fourier)
    G = Generator(cfg, trainable=True)
    G_ema = Generator(cfg)
    G_ema.load_state_dict(G.state_dict())
    if grown is not None:
        G.load_state_dict(grown.state_dict())
        G_ema.load_state_dict(grown.state_dict())
    if args.init_model and state is None and grown is None:
        from draggan_core.model.checkpoints import load_generator
        init = load_generator(args.init_model).cpu()
        if init.cfg.to_json() != cfg.to_json():
            p.error(f"--init-model {args.init_model}: not the embedded architecture")
        G.load_state_dict(init.state_dict())  # w_avg included: a frozen mapping keeps it
        G_ema.load_state_dict(init.state_dict())
        base = base_info(args.init_model)
    pattern = trainable_pattern(args.train_only)
    trainable = [(n, q) for n, q in G.named_parameters() if pattern is None or re.search(pattern, n)]
    if not trainable:
        p.error(f"--train-only {args.train_only}: matches no parameter")
    if unwidened is not None:
        order = [n for n, _ in trainable]
        if "mapping.fc0.weight" not in order:
            p.error("--z-fourier adds inputs to the mapping: it must be trained (see --train-only)")
        widen_z_fourier(state, unwidened, args.z_fourier, order.index("mapping.fc0.weight"))
        print(f"{source}: mapping given z Fourier features k <= {args.z_fourier}", file=sys.stderr)
    names = {n for n, _ in trainable}
    for n, q in G.named_parameters():
        q.requires_grad_(n in names)
    for stage in args.schedule_stages:
        stage_pattern = trainable_pattern(stage.get("train_only", args.train_only))
        if stage_pattern and not any(re.search(stage_pattern, n) for n in names):
            p.error(f"schedule stage until step {stage['until_step']}: train_only {stage_pattern} matches no "
                    "trainable parameter")
    ema_pairs = dict(G_ema.named_parameters())
    ema_params = [ema_pairs[n] for n, _ in trainable]
    params = [q for _, q in trainable]
    G.to(device)
    G_ema.to(device)
    opt = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.99))
    step, seconds, images = 0, 0.0, 0
    if state is not None:
        if (state.get("train_only") or "") != (pattern or ""):
            p.error(f"{source} was trained with --train-only {state.get('train_only') or '(all parameters)'}; "
                    f"resume it with the same setting")
        G.load_state_dict(state["G"])
        G_ema.load_state_dict(state["G_ema"])
        for param_state in state["opt"]["state"].values():  # older compact states hold a bf16 step count
            param_state["step"] = param_state["step"].float()
        opt.load_state_dict(state["opt"])
        step, seconds = int(state["step"]), float(state["seconds"])
        images = int(state.get("images", step * 16))  # states before per-stage batches ran at 16
        base = state.get("base") or None
        print(f"resumed from {source}: step {step}, {seconds / 60:.1f} min trained", file=sys.stderr)

    z_eval = torch.from_numpy(faces.sample_z(64, HELD_OUT_SEED))
    real_eval, _ = render_batch(z_eval.numpy(), resolution=args.resolution)
    z_eval = z_eval.to(device)
    log = open(out / "log.jsonl", "a")
    if grown is not None:  # where training starts: the small model's image up-sampled
        psnr, l1, _ = evaluate(G_ema, z_eval, real_eval)
        log.write(json.dumps({"step": 0, "kimg": 0.0, "minutes": 0.0, "psnr": psnr, "l1": l1, "grown_from": base["model"]}) + "\n")
        log.flush()

    def save():
        tmp = out / "last.pt.tmp"
        torch.save({"G": G.state_dict(), "G_ema": G_ema.state_dict(), "opt": opt.state_dict(),
                    "step": step, "seconds": seconds, "images": images, "config": cfg.to_json(),
                    "train_only": pattern or "", "base": base or {}}, tmp)
        os.replace(tmp, ckpt_path)
        if args.export:
            export_model(G_ema, args.export, step, seconds, images=images, keep_w_avg=mapping_frozen(pattern), base=base,
                         drag_defaults=drag_defaults)

    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    from tqdm import tqdm
    budget = args.minutes * 60
    bar = tqdm(total=int(budget), initial=int(min(seconds, budget)), unit="s", dynamic_ncols=True,
               desc="train", file=sys.stderr, mininterval=2 if sys.stderr.isatty() else 30, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s [{elapsed}<{remaining}] {postfix}")
    last_save = time.time()
    psnr = float("nan")
    stream = BatchStream(step, lambda i: stage_for(i, args), workers=args.workers)
    active_pattern = pattern  # the parameters that take gradients now (a stage's train_only narrows them)
    start_step, start_seconds = step, seconds
    while seconds < budget and not stopping and (args.max_steps is None or step < args.max_steps):
        t0 = time.time()
        stage = stage_for(step, args)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, stage)
        stage_pattern = trainable_pattern(stage.train_only)
        if stage_pattern != active_pattern:
            # frozen parameters get no gradient: Adam skips them (their moments wait, untouched) and
            # backward stops where nothing before needs one, so a new-block-only stage is cheaper
            for n, q in trainable:
                q.requires_grad_(stage_pattern is None or re.search(stage_pattern, n) is not None)
            active_pattern = stage_pattern
        z, real, part_weight = stream.get()
        fake = G(torch.from_numpy(z).to(device), fused=False)
        loss = regression_loss(fake, real.to(device), part_weight.to(device), args.part_gain, stage.part_l2, stage.image_l2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_beta = 0.5 ** (len(z) / (args.ema_kimg * 1000))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - ema_beta)
        step += 1
        images += len(z)
        # a step longer than MAX_STEP_SECONDS was suspended (SIGSTOP, laptop sleep): count it as capped
        dt = min(time.time() - t0, MAX_STEP_SECONDS)
        seconds += dt
        bar.update(dt)
        if step % args.eval_every == 0:
            psnr, l1, fake_eval = evaluate(G_ema, z_eval, real_eval)
            log.write(json.dumps({"step": step, "kimg": images / 1000, "minutes": seconds / 60,
                                  "loss": loss.item(), "psnr": psnr, "l1": l1, "device": device.type}) + "\n")
            log.flush()
            save_grid(out / "samples_latest.png", real_eval, fake_eval)
        if step % 20 == 0:  # loss.item() waits for the device: not every step
            bar.set_postfix_str(f"step {step} loss {loss.item():.4f}" + ("" if math.isnan(psnr) else f" psnr {psnr:.2f}dB"))
        if time.time() - last_save > args.save_every_min * 60:
            save()
            last_save = time.time()
    bar.close()
    save()  # before closing the render workers, so that a hang there cannot lose the state
    stream.close()
    psnr, l1, fake_eval = evaluate(G_ema, z_eval, real_eval)
    save_grid(out / "samples_latest.png", real_eval, fake_eval)
    per_step = (seconds - start_seconds) / max(step - start_step, 1)
    print(f"stopped at step {step} ({seconds / 60:.1f} min; {per_step:.3f} s per step in this run): "
          f"held-out PSNR {psnr:.2f} dB, L1 {l1:.2f}/255", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
