"""Checkpoint formats, detected from the file contents (never from the file name).

- NVIDIA pickles (stylegan2-ada-pytorch / stylegan3 repo): read by a restricted unpickler that never
  runs the networks' embedded source (`module_src`) and refuses every global outside an allow-list.
- rosinality stylegan2-pytorch `.pt`: `torch.load(weights_only=True)` plus a name conversion.
- Our native format: `.safetensors` with the GeneratorConfig JSON in the metadata.

Every failure raises CheckpointError with a one-line message naming the file and the reason.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .networks import Generator, GeneratorConfig
from .ops import make_fir_filter

MAX_CHECKPOINT_BYTES = 2 * 1024 ** 3  # the largest public StyleGAN2 pickles are ~400 MB
NATIVE_FORMAT = "draggan-native-v1"


class CheckpointError(Exception):
    """A checkpoint could not be loaded; the message is meant for users (one line)."""


# --------------------------------------------------------------------------------------------------
# NVIDIA pickles through a restricted unpickler
# --------------------------------------------------------------------------------------------------

@dataclass
class PersistentRecord:
    """What a `torch_utils.persistence` object becomes: its class name and pickled state, no code."""
    class_name: str
    state: dict


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError("malformed persistent object")
    return PersistentRecord(class_name=str(meta.get("class_name")), state=meta["state"])


def _load_storage_from_bytes(data):
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("malformed tensor storage")
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    if not isinstance(storage, torch.UntypedStorage | torch.TypedStorage):
        raise pickle.UnpicklingError("tensor without storage")
    if any(not isinstance(s, int) or s < 0 for s in (*size, *stride, storage_offset)) or len(size) != len(stride):
        raise pickle.UnpicklingError("malformed tensor shape")
    # set_() would grow (allocate) the storage to fit a declared shape: refuse tensors bigger than their data.
    if all(s > 0 for s in size):
        itemsize = torch.empty((), dtype=storage.dtype).element_size()
        extent = storage_offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
        raw = storage._untyped_storage if isinstance(storage, torch.TypedStorage) else storage
        if extent * itemsize > raw.nbytes():
            raise pickle.UnpicklingError(f"tensor of shape {tuple(size)} is larger than its stored data")
    t = torch.empty((0,), dtype=storage.dtype)
    t.set_(storage._untyped_storage if isinstance(storage, torch.TypedStorage) else storage,
           storage_offset, tuple(size), tuple(stride))
    return t


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter without tensor data")
    return data


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("unsupported numpy scalar")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_dtype(name, align=False, copy=False):
    dtype = np.dtype(name)
    if dtype.hasobject:
        raise pickle.UnpicklingError("object dtype is not allowed")
    return dtype


class _SafeDict(dict):
    """Stands in for dnnlib.util.EasyDict."""


# The complete allow-list. Each entry maps to OUR safe replacement, never to the named callable.
_ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("dnnlib.util", "EasyDict"): _SafeDict,
    ("builtins", "set"): set,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name} (not on the allow-list)") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing persistent id")


def _record_state_dict(record: PersistentRecord, prefix="") -> dict[str, torch.Tensor]:
    """Walk _parameters/_buffers/_modules like nn.Module.state_dict() does."""
    out = {}
    state = record.state
    for kind in ("_parameters", "_buffers"):
        for name, value in (state.get(kind) or {}).items():
            if value is not None:
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{prefix}{name} is not a tensor")
                out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, PersistentRecord):
            raise CheckpointError(f"module {prefix}{name} is not a persistent network object")
        out.update(_record_state_dict(child, f"{prefix}{name}."))
    return out


def _nvidia_config(record: PersistentRecord, state_dict) -> GeneratorConfig:
    kwargs = dict(record.state.get("_init_kwargs") or {})
    args = record.state.get("_init_args") or ()
    names = ["z_dim", "c_dim", "w_dim", "img_resolution", "img_channels"]
    for n, v in zip(names, args):
        kwargs.setdefault(n, v)
    mapping = dict(kwargs.get("mapping_kwargs") or {})
    synth = dict(kwargs.get("synthesis_kwargs") or {})
    for k in ("channel_base", "channel_max", "conv_clamp", "architecture", "resample_filter", "use_noise",
              "num_fp16_res"):
        if k in kwargs:
            synth.setdefault(k, kwargs[k])
    num_mapping = len([k for k in state_dict if re.fullmatch(r"mapping\.fc\d+\.weight", k)])
    res = int(kwargs["img_resolution"])
    cfg = GeneratorConfig(
        z_dim=int(kwargs["z_dim"]), w_dim=int(kwargs["w_dim"]), c_dim=int(kwargs.get("c_dim", 0)),
        img_resolution=res, img_channels=int(kwargs.get("img_channels", 3)),
        mapping_layers=num_mapping,
        mapping_lr_multiplier=float(mapping.get("lr_multiplier", 0.01)),
        w_avg_beta=float(mapping.get("w_avg_beta", 0.995)),
        channels=_channels_from_state(state_dict, res),
        architecture=str(synth.get("architecture", "skip")),
        conv_clamp=None if synth.get("conv_clamp") is None else float(synth["conv_clamp"]),
        use_noise=any(k.endswith("noise_strength") for k in state_dict),
        resample_filter=tuple(synth.get("resample_filter", (1, 3, 3, 1))),
    )
    return cfg


def _channels_from_state(state_dict, res) -> dict[int, int]:
    channels = {}
    r = 4
    while r <= res:
        key = f"synthesis.b{r}.conv1.weight"
        if key not in state_dict:
            raise CheckpointError(f"missing {key}")
        channels[r] = int(state_dict[key].shape[0])
        r *= 2
    return channels


def _load_nvidia_pickle(path: Path):
    with open(path, "rb") as f:
        try:
            data = _RestrictedUnpickler(f).load()
        except CheckpointError:
            raise
        except Exception as e:  # pickle, torch and numpy raise many types on hostile/corrupt input
            raise CheckpointError(f"{path}: not a loadable StyleGAN pickle ({_short(e)})") from None
    if isinstance(data, dict):
        record = data.get("G_ema", data.get("G"))
    else:
        record = data
    if isinstance(data, tuple) and len(data) == 3:
        raise CheckpointError(f"{path}: TensorFlow-era (G, D, Gs) pickles are not supported; convert it with "
                              "NVIDIA's legacy.py to a PyTorch pickle first")
    if not isinstance(record, PersistentRecord):
        raise CheckpointError(f"{path}: pickle has no G_ema network")
    if record.class_name != "Generator":
        raise CheckpointError(f"{path}: G_ema is a {record.class_name}, expected Generator")
    state_dict = _record_state_dict(record)
    if any(k.startswith("synthesis.L") for k in state_dict):
        raise CheckpointError(f"{path}: StyleGAN3 (alias-free) generators are not supported, only StyleGAN2")
    if not any(re.match(r"synthesis\.b\d+\.", k) for k in state_dict):
        raise CheckpointError(f"{path}: unrecognised generator (no synthesis.b<res> blocks)")
    cfg = _nvidia_config(record, state_dict)
    return cfg, state_dict


# --------------------------------------------------------------------------------------------------
# rosinality .pt
# --------------------------------------------------------------------------------------------------

def _rosinality_to_nvidia(sd: dict[str, torch.Tensor], latent_avg, lr_mlp: float):
    out = {}
    n_mlp = len([k for k in sd if re.fullmatch(r"style\.\d+\.weight", k)])
    for i in range(n_mlp):
        out[f"mapping.fc{i}.weight"] = sd[f"style.{i + 1}.weight"]
        out[f"mapping.fc{i}.bias"] = sd[f"style.{i + 1}.bias"]
    w_dim = out["mapping.fc0.weight"].shape[0]
    out["mapping.w_avg"] = latent_avg.reshape(-1) if latent_avg is not None else torch.zeros(w_dim)

    def conv(src, dst, res, noise_key):
        out[f"{dst}.weight"] = sd[f"{src}.conv.weight"][0]
        out[f"{dst}.affine.weight"] = sd[f"{src}.conv.modulation.weight"]
        out[f"{dst}.affine.bias"] = sd[f"{src}.conv.modulation.bias"]
        out[f"{dst}.bias"] = sd[f"{src}.activate.bias"]
        out[f"{dst}.noise_strength"] = sd[f"{src}.noise.weight"].reshape([])
        out[f"{dst}.noise_const"] = sd[noise_key].reshape(res, res)

    def torgb(src, dst):
        out[f"{dst}.weight"] = sd[f"{src}.conv.weight"][0]
        out[f"{dst}.affine.weight"] = sd[f"{src}.conv.modulation.weight"]
        out[f"{dst}.affine.bias"] = sd[f"{src}.conv.modulation.bias"]
        out[f"{dst}.bias"] = sd[f"{src}.bias"].reshape(-1)

    out["synthesis.b4.const"] = sd["input.input"][0]
    conv("conv1", "synthesis.b4.conv1", 4, "noises.noise_0")
    torgb("to_rgb1", "synthesis.b4.torgb")
    num_up = len([k for k in sd if re.fullmatch(r"to_rgbs\.\d+\.bias", k)])
    res = 4
    for i in range(num_up):
        res *= 2
        conv(f"convs.{2 * i}", f"synthesis.b{res}.conv0", res, f"noises.noise_{2 * i + 1}")
        conv(f"convs.{2 * i + 1}", f"synthesis.b{res}.conv1", res, f"noises.noise_{2 * i + 2}")
        torgb(f"to_rgbs.{i}", f"synthesis.b{res}.torgb")
    cfg = GeneratorConfig(
        z_dim=int(out["mapping.fc0.weight"].shape[1]), w_dim=int(w_dim), img_resolution=res,
        mapping_layers=n_mlp, mapping_lr_multiplier=lr_mlp, channels=_channels_from_state(out, res),
        img_channels=int(out[f"synthesis.b{res}.torgb.weight"].shape[0]))
    # rosinality keeps no per-layer copies of the [1,3,3,1] FIR filter that our modules hold as buffers
    fir = make_fir_filter(cfg.resample_filter)
    for r in cfg.block_resolutions:
        for layer in ("", ".conv1") + ((".conv0",) if r > 4 else ()):
            out[f"synthesis.b{r}{layer}.resample_filter"] = fir.clone()
    return cfg, out


def _load_rosinality(path: Path):
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: refused by the safe torch loader ({_short(e)})") from None
    if not isinstance(ckpt, dict) or "g_ema" not in ckpt:
        raise CheckpointError(f"{path}: torch file without a 'g_ema' generator (not a rosinality checkpoint)")
    args = ckpt.get("args")
    lr_mlp = float(getattr(args, "lr_mlp", 0.01)) if args is not None else 0.01
    try:
        return _rosinality_to_nvidia(ckpt["g_ema"], ckpt.get("latent_avg"), lr_mlp)
    except KeyError as e:
        raise CheckpointError(f"{path}: rosinality checkpoint is missing {e.args[0]}") from None


# --------------------------------------------------------------------------------------------------
# native safetensors
# --------------------------------------------------------------------------------------------------

def save_native(G: Generator, path: str | os.PathLike, dtype=torch.float32, extra_metadata: dict | None = None):
    """Write G's weights and config to `.safetensors` (fp16 halves the size; compute stays fp32)."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in G.state_dict().items()}
    meta = {"format": NATIVE_FORMAT, "config": G.cfg.to_json()}
    if extra_metadata:
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra_metadata.items()})
    save_file(tensors, str(path), metadata=meta)


def _load_native(path: Path):
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != NATIVE_FORMAT or "config" not in meta:
                raise CheckpointError(f"{path}: safetensors file without a DragGAN generator config in its metadata")
            cfg = GeneratorConfig.from_json(meta["config"])
            state_dict = {k: f.get_tensor(k).to(torch.float32) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({_short(e)})") from None
    return cfg, state_dict


def read_native_metadata(path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------

def detect_format(path: str | os.PathLike) -> str:
    """'nvidia-pickle', 'torch-zip' (rosinality), or 'safetensors', from the first bytes."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "nvidia-pickle"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(f"{path}: unknown checkpoint format (not a pickle, torch zip or safetensors file)")


def load_generator(path: str | os.PathLike, device="cpu") -> Generator:
    """Load any supported checkpoint into a frozen, eval-mode fp32 Generator."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{path}: file is {size / 1e9:.1f} GB, larger than the {MAX_CHECKPOINT_BYTES / 1e9:.0f} GB limit")
    fmt = detect_format(path)
    if fmt == "nvidia-pickle":
        cfg, state_dict = _load_nvidia_pickle(path)
    elif fmt == "torch-zip":
        cfg, state_dict = _load_rosinality(path)
    else:
        cfg, state_dict = _load_native(path)
    return _build(path, cfg, state_dict, device)


def _build(path, cfg: GeneratorConfig, state_dict, device) -> Generator:
    try:
        G = Generator(cfg)
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid generator config ({e})") from None
    expected = G.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} tensors, e.g. {missing[0]}")
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected tensors, e.g. {unexpected[0]}")
    for k, v in state_dict.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        if not v.is_floating_point() or not torch.isfinite(v).all():
            raise CheckpointError(f"{path}: {k} contains non-finite or non-float values")
    G.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()})
    return G.to(device)


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def short_reason(e: BaseException) -> str:
    """One short line explaining an exception (torch's multi-paragraph weights-only errors included)."""
    text = _ANSI_ESCAPE.sub("", str(e)).strip()
    if text.startswith("Weights only load failed"):
        # torch's message: a generic preamble, advice, then the actual reason on a later line
        m = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?:\. Please use|\n|$)", text)
        if m:
            text = m.group(1)
        else:
            lines = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()
                     and not ln.strip().startswith(("Check the documentation", "(1)", "(2)"))]
            text = lines[0] if lines else "refused by torch's weights-only loader"
    text = text.strip().splitlines()[0].strip() if text.strip() else type(e).__name__
    return text[:200]


_short = short_reason
