"""Latent codes: seeds -> z -> W+, and loading/saving user-supplied W / W+ latents safely.

A latent file is untrusted input. `load_latent` only reads plain numeric arrays (`.npy` without
pickles, or a `torch.save` file through the weights-only loader), detects the format from the file's
first bytes, and checks size, dtype, shape, finiteness and magnitude before handing back a tensor.
Every failure raises LatentError with a one-line message meant for users.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

MAX_LATENT_BYTES = 64 * 1024 ** 2
MAX_ABS_VALUE = 1e4
MAX_SEED = 2 ** 32 - 1
W_MODES = ("w", "w+")

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_DICT_KEYS = ("w", "ws", "latent")


class LatentError(ValueError):
    """A latent could not be used; the message is meant for users (one line)."""


# --------------------------------------------------------------------------------------------------
# seeds
# --------------------------------------------------------------------------------------------------

def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise LatentError(f"seed must be an integer, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise LatentError(f"seed must be in [0, {MAX_SEED}], got {seed}")
    return seed


def seed_to_z(seed: int, z_dim: int) -> torch.Tensor:
    """[1, z_dim] float32 z drawn exactly like the official code: RandomState(seed).randn(1, z_dim)."""
    seed = _check_seed(seed)
    return torch.from_numpy(np.random.RandomState(seed).randn(1, int(z_dim))).to(torch.float32)


@torch.no_grad()
def seed_to_w(G, seed: int, psi: float = 0.7, cutoff: int | None = None, w_mode: str = "w+",
              c: torch.Tensor | None = None) -> torch.Tensor:
    """Map a seed through G.mapping with truncation. Returns [1, num_ws, w_dim] float32.

    w_mode "w+" (default) keeps the mapping's per-layer rows (they differ only when a truncation
    cutoff is used); "w" uses the first row for every layer (one shared W vector).
    """
    if w_mode not in W_MODES:
        raise LatentError(f"w_mode must be one of {W_MODES}, got {w_mode!r}")
    z = seed_to_z(seed, G.mapping.cfg.z_dim)
    param = next(G.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    ws = G.mapping(z.to(device), c, truncation_psi=psi, truncation_cutoff=cutoff)
    if w_mode == "w":
        ws = ws[:, :1].expand(-1, ws.shape[1], -1)
    return ws.to(torch.float32).contiguous()


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------

def _model_dims(G) -> tuple[int, int]:
    cfg = getattr(G, "cfg", None)
    if cfg is not None:
        return int(cfg.num_ws), int(cfg.w_dim)
    return int(G.num_ws), int(G.w_dim)


def _read_source(path_or_bytes) -> tuple[bytes, str]:
    """Return (content, display name) with the size limit enforced before reading everything."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        if len(data) > MAX_LATENT_BYTES:
            raise LatentError(f"latent data is {len(data)} bytes, larger than the {MAX_LATENT_BYTES} byte limit")
        return data, "latent data"
    path = Path(os.fspath(path_or_bytes))
    name = str(path)
    if not path.is_file():
        raise LatentError(f"{name}: no such latent file")
    size = path.stat().st_size
    if size > MAX_LATENT_BYTES:
        raise LatentError(f"{name}: file is {size / 1024 ** 2:.1f} MB, larger than the "
                          f"{MAX_LATENT_BYTES // 1024 ** 2} MB limit for latents")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LATENT_BYTES + 1)
    except OSError as e:
        raise LatentError(f"{name}: cannot read ({e.strerror or e})") from None
    if len(data) > MAX_LATENT_BYTES:
        raise LatentError(f"{name}: larger than the {MAX_LATENT_BYTES // 1024 ** 2} MB limit for latents")
    return data, name


def _short(e: BaseException) -> str:
    from .checkpoints import short_reason
    return short_reason(e)


MAX_LATENT_ELEMENTS = 4 * 1024 ** 2  # far above any W+ (18 x 512); stops absurd declared shapes early


def _from_npy(data: bytes, name: str) -> np.ndarray:
    # Read the header ourselves first: np.load would allocate whatever shape the header declares.
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise LatentError(f"{name}: unsupported .npy format version {version[0]}.{version[1]}")
    except LatentError:
        raise
    except Exception as e:
        raise LatentError(f"{name}: unreadable .npy header ({_short(e)})") from None
    if dtype.hasobject:
        raise LatentError(f"{name}: .npy holds Python objects (pickled data is refused); save a plain float array")
    if dtype.kind not in "fiu" or dtype.fields is not None or dtype.subdtype is not None:
        raise LatentError(f"{name}: latent has dtype {dtype}, expected a real float or integer array")
    count = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    if count > MAX_LATENT_ELEMENTS:
        raise LatentError(f"{name}: .npy declares shape {tuple(shape)}, far too large for a latent")
    if count * dtype.itemsize > len(data) - f.tell():
        raise LatentError(f"{name}: .npy is truncated (header declares more data than the file holds)")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # truncated data, bad shapes, ...
        raise LatentError(f"{name}: unreadable .npy file ({_short(e)})") from None
    if not isinstance(arr, np.ndarray):
        raise LatentError(f"{name}: .npy does not hold an array")
    return arr


def _from_torch(data: bytes, name: str) -> np.ndarray:
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:
        raise LatentError(f"{name}: refused by the safe torch loader ({_short(e)})") from None
    if isinstance(obj, dict):
        found = [k for k in _DICT_KEYS if k in obj]
        tensors = [k for k in found if isinstance(obj[k], torch.Tensor)]
        if len(tensors) != 1:
            raise LatentError(f"{name}: torch file is a dict; expected exactly one tensor under "
                              f"{'/'.join(repr(k) for k in _DICT_KEYS)}, found keys {sorted(map(str, obj))[:8]}")
        obj = obj[tensors[0]]
    if not isinstance(obj, torch.Tensor):
        raise LatentError(f"{name}: torch file holds a {type(obj).__name__}, expected a latent tensor")
    if obj.is_complex() or obj.dtype == torch.bool or obj.is_quantized or obj.is_sparse:
        raise LatentError(f"{name}: latent tensor has dtype {obj.dtype}, expected a real float or integer type")
    return obj.detach().to(torch.float64).numpy()


def _check_array(arr: np.ndarray, name: str, num_ws: int, w_dim: int) -> torch.Tensor:
    if arr.dtype.kind not in "fiu" or arr.dtype.fields is not None or arr.dtype.hasobject:
        raise LatentError(f"{name}: latent has dtype {arr.dtype}, expected a real float or integer array")
    shape = tuple(arr.shape)
    expected = (f"(1, {num_ws}, {w_dim}) or ({num_ws}, {w_dim}) for W+, "
                f"({w_dim},) or (1, {w_dim}) for W")
    if shape == (1, num_ws, w_dim):
        out = arr
    elif shape == (num_ws, w_dim):
        out = arr[None]
    elif shape in ((w_dim,), (1, w_dim)):
        out = np.broadcast_to(arr.reshape(1, 1, w_dim), (1, num_ws, w_dim))
    else:
        raise LatentError(f"{name}: latent has shape {shape}, this model needs {expected}")
    out = np.asarray(out, dtype=np.float64)
    if not np.isfinite(out).all():
        raise LatentError(f"{name}: latent contains NaN or infinite values")
    peak = float(np.abs(out).max()) if out.size else 0.0
    if peak >= MAX_ABS_VALUE:
        raise LatentError(f"{name}: latent values are implausibly large (max |w| = {peak:.3g}, limit {MAX_ABS_VALUE:g})")
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def load_latent(path_or_bytes, G) -> torch.Tensor:
    """Load a W / W+ latent for G from a path or bytes. Returns [1, num_ws, w_dim] float32 (CPU).

    Accepted: `.npy` (no pickles) or `torch.save` files (a tensor, or a dict with one tensor under
    'w' / 'ws' / 'latent'), detected from the content. Shapes (1, num_ws, w_dim), (num_ws, w_dim),
    or a single W vector (w_dim,) / (1, w_dim) which is repeated for every layer.
    """
    num_ws, w_dim = _model_dims(G)
    data, name = _read_source(path_or_bytes)
    if data.startswith(_NPY_MAGIC):
        arr = _from_npy(data, name)
    elif data.startswith(_ZIP_MAGIC):
        arr = _from_torch(data, name)
    elif not data:
        raise LatentError(f"{name}: empty file")
    else:
        raise LatentError(f"{name}: not a latent file (expected a .npy array or a torch.save tensor)")
    return _check_array(arr, name, num_ws, w_dim)


def save_latent(path, w) -> Path:
    """Write w as a float32 .npy of shape (1, num_ws, w_dim). Accepts [num_ws, w_dim] too."""
    if isinstance(w, torch.Tensor):
        w = w.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(w, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] != 1:
        raise LatentError(f"save_latent expects a [1, num_ws, w_dim] latent, got shape {tuple(arr.shape)}")
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # np.save(str) would append '.npy' to other suffixes
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
    return path
