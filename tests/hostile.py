"""Builds a corpus of hostile and broken checkpoint / latent files in a temporary folder.

Nothing binary is committed: every file is generated here at test time. Each code-execution payload
would create `marker` if it ever ran, so a test only has to check that the marker never appears.
The pickles are written opcode by opcode (or through a harmless stand-in module) so that the
referenced globals are exactly the names an attacker would use.
"""
from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from official_pickle import dump_snapshot, fake_official_modules, persistent_network

# --------------------------------------------------------------------------------------------------
# a tiny pickle assembler
# --------------------------------------------------------------------------------------------------

PROTO2 = b"\x80\x02"
MARK, TUPLE, REDUCE, STOP, EMPTY_DICT, SETITEM = b"(", b"t", b"R", b".", b"}", b"s"


def GLOBAL(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def STR(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def BYTES(b: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(b)) + b  # BINBYTES (protocol 3)


def call(module: str, name: str, *args: bytes) -> bytes:
    """Opcodes for module.name(*args) where args are already-encoded opcodes."""
    return GLOBAL(module, name) + MARK + b"".join(args) + TUPLE + REDUCE


def program(body: bytes, proto: bytes = b"\x80\x03") -> bytes:
    return proto + body + STOP


def _touch_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


# --------------------------------------------------------------------------------------------------
# code-execution pickles
# --------------------------------------------------------------------------------------------------

def pickle_os_system(marker: Path) -> bytes:
    return program(call("os", "system", STR(f"touch '{marker}'")))


def pickle_posix_system(marker: Path) -> bytes:
    return program(call("posix", "system", STR(f"touch '{marker}'")))


def pickle_eval(marker: Path) -> bytes:
    return program(call("builtins", "eval", STR(_touch_code(marker))))


def pickle_exec(marker: Path) -> bytes:
    return program(call("builtins", "exec", STR(_touch_code(marker))))


def pickle_popen(marker: Path) -> bytes:
    # subprocess.Popen(("touch", marker)): a tuple argument, built with MARK ... TUPLE
    return program(call("subprocess", "Popen", MARK + STR("touch") + STR(str(marker)) + TUPLE))


def pickle_dunder_import(marker: Path) -> bytes:
    # getattr(__import__('os'), 'system')('touch marker')
    get_system = call("builtins", "getattr", call("builtins", "__import__", STR("os")), STR("system"))
    return program(get_system + MARK + STR(f"touch '{marker}'") + TUPLE + REDUCE)


def pickle_nested_in_dict(marker: Path) -> bytes:
    """A plausible checkpoint dict whose G_ema value is an exec() call."""
    return program(EMPTY_DICT + STR("G_ema") + call("builtins", "exec", STR(_touch_code(marker))) + SETITEM)


def pickle_persistent_bare(marker: Path) -> bytes:
    """torch_utils.persistence object whose module_src would write the marker (NVIDIA's loader execs it)."""
    meta = _meta_dict("Generator", _touch_code(marker) + "\nclass Generator: pass\n")
    return program(EMPTY_DICT + STR("G_ema") + call("torch_utils.persistence", "_reconstruct_persistent_obj", meta)
                   + SETITEM)


def _meta_dict(class_name: str, module_src: str) -> bytes:
    items = [("type", STR("class")), ("version", b"K\x06"), ("module_src", STR(module_src)),
             ("class_name", STR(class_name)),
             ("state", EMPTY_DICT + STR("_parameters") + EMPTY_DICT + SETITEM)]
    return EMPTY_DICT + MARK + b"".join(STR(k) + v for k, v in items) + b"u"  # SETITEMS


def pickle_load_from_bytes_legacy(marker: Path) -> bytes:
    """torch.storage._load_from_bytes whose payload is a legacy torch.save stream running exec()."""
    inner = program(call("builtins", "exec", STR(_touch_code(marker))), proto=PROTO2)
    return program(call("torch.storage", "_load_from_bytes", BYTES(inner)))


def pickle_load_from_bytes_zip(marker: Path) -> bytes:
    """torch.storage._load_from_bytes whose payload is a torch zip with a hostile data.pkl."""
    inner = torch_zip_with_data_pkl(pickle_os_system(marker))
    return program(call("torch.storage", "_load_from_bytes", BYTES(inner)))


def torch_zip_with_data_pkl(data_pkl: bytes) -> bytes:
    """A genuine torch.save zip archive with its data.pkl replaced."""
    buf = io.BytesIO()
    torch.save({"g_ema": {"x": torch.zeros(2)}}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                data = data_pkl
            dst.writestr(info, data)
    return out.getvalue()


# --------------------------------------------------------------------------------------------------
# a *valid* NVIDIA-style pickle whose embedded module source is hostile
# --------------------------------------------------------------------------------------------------

def nvidia_style_pickle(G: torch.nn.Module, module_src: str, init_kwargs: dict) -> bytes:
    """A training snapshot holding G pickled as torch_utils.persistence does, with `module_src`."""
    with fake_official_modules() as fake:
        def record(module: torch.nn.Module, class_name: str, kwargs=None):
            state = {
                "training": False,
                "_parameters": dict(module._parameters),
                "_buffers": dict(module._buffers),
                "_modules": {k: record(m, type(m).__name__) for k, m in module._modules.items()},
                "_init_args": (),
                "_init_kwargs": kwargs or {},
            }
            return persistent_network(fake, class_name, state, module_src)

        g = record(G, "Generator", init_kwargs)
        return dump_snapshot({"G": g, "D": None, "G_ema": g, "augment_pipe": None, "training_set_kwargs": None})


# --------------------------------------------------------------------------------------------------
# broken files
# --------------------------------------------------------------------------------------------------

def garbage_bytes(n: int = 4096, seed: int = 0) -> bytes:
    return np.random.RandomState(seed).bytes(n)


def pickle_like_garbage(n: int = 4096) -> bytes:
    return b"\x80\x04" + garbage_bytes(n, seed=1)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def safetensors_header_only(tensors: dict, metadata: dict | None = None, data: bytes = b"") -> bytes:
    """A raw safetensors file: 8-byte header length + JSON header + data (header may lie)."""
    header = dict(tensors)
    if metadata is not None:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def huge_declared_safetensors(metadata: dict) -> bytes:
    shape = [1 << 20, 1 << 20]  # 4 TiB of float32 declared, 16 bytes present
    return safetensors_header_only({"synthesis.b4.const": {"dtype": "F32", "shape": shape,
                                                           "data_offsets": [0, 4 * shape[0] * shape[1]]}},
                                   metadata, data=b"\0" * 16)


def pickle_huge_tensor() -> bytes:
    """An NVIDIA-style pickle with a tensor claiming 10^12 elements backed by a 4-byte storage."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated, but it is what NVIDIA pickles hold
        storage = torch.zeros(1).storage()
    torch.save(storage, buf, _use_new_zipfile_serialization=False)
    storage = call("torch.storage", "_load_from_bytes", BYTES(buf.getvalue()))
    size = MARK + b"J" + struct.pack("<i", 1_000_000) + b"J" + struct.pack("<i", 1_000_000) + TUPLE
    stride = MARK + b"J" + struct.pack("<i", 1_000_000) + b"K\x01" + TUPLE
    tensor = GLOBAL("torch._utils", "_rebuild_tensor_v2") + MARK + storage + b"K\x00" + size + stride \
        + b"\x89" + GLOBAL("collections", "OrderedDict") + MARK + TUPLE + REDUCE + TUPLE + REDUCE
    return program(EMPTY_DICT + STR("G_ema") + tensor + SETITEM)


def npy_header(dtype_descr: str, shape: tuple, fortran=False) -> bytes:
    d = "{'descr': %r, 'fortran_order': %s, 'shape': %r, }" % (dtype_descr, fortran, shape)
    header = d.encode()
    pad = -(10 + len(header) + 1) % 64
    header += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def npy_pickled_object(marker: Path) -> bytes:
    """An object-dtype .npy: numpy would unpickle the body (an exec() call) if allow_pickle were on."""
    return npy_header("|O", (1,)) + pickle_exec(marker)


def npy_object_dtype_real() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"w": 1}, None], dtype=object), allow_pickle=True)
    return buf.getvalue()


def npy_huge_declared() -> bytes:
    return npy_header("<f4", (100000, 100000)) + b"\0" * 64


HOSTILE_PICKLES = {
    "os_system": pickle_os_system,
    "posix_system": pickle_posix_system,
    "eval": pickle_eval,
    "exec": pickle_exec,
    "subprocess_popen": pickle_popen,
    "dunder_import": pickle_dunder_import,
    "exec_in_dict": pickle_nested_in_dict,
    "persistent_module_src": pickle_persistent_bare,
    "load_from_bytes_legacy": pickle_load_from_bytes_legacy,
    "load_from_bytes_zip": pickle_load_from_bytes_zip,
}


# --------------------------------------------------------------------------------------------------
# images and masks (PNG written chunk by chunk: the declared size can be anything)
# --------------------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import zlib
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 9000, height: int = 9000) -> bytes:
    """A valid all-black 8-bit grayscale PNG of width x height that compresses ~1000:1.

    9000x9000 is ~79 KB on disk, 81 M pixels decoded (324 MB as RGBA): below PIL's own bomb limit
    (2 x 89 M pixels), so only an application limit stops it."""
    import zlib
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def png_lying_header(width: int = 1 << 30, height: int = 1 << 30) -> bytes:
    """A PNG whose IHDR declares an absurd size and holds almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"x\x9c\x03\x00\x00\x00\x00\x01") \
        + _png_chunk(b"IEND", b"")


def image_bytes(mode: str = "RGBA", size=(256, 256), fmt: str = "PNG", box=(100, 60, 140, 200)) -> bytes:
    """An image of the given PIL mode with the box (x0, y0, x1, y1) painted 'on' (white / opaque)."""
    from PIL import Image
    if mode == "P":  # a palette image whose palette maps the box to white
        return _save(Image.open(io.BytesIO(image_bytes("L", size, "PNG", box))).convert("P"), fmt)
    im = Image.new(mode, size)
    on = {"1": 1, "L": 255, "P": 255, "I": 65535, "I;16": 65535, "F": 1.0, "LA": (255, 255),
          "RGB": (255, 255, 255), "RGBA": (255, 255, 255, 255), "CMYK": (0, 0, 0, 0)}[mode]
    if mode == "CMYK":
        im.paste((0, 0, 0, 255), (0, 0) + size)  # CMYK "black" everywhere, white in the box
    im.paste(on, box)
    return _save(im, fmt)


def _save(im, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def truncated_png() -> bytes:
    return truncated(image_bytes("RGBA"))


MASK_IMAGE_MODES = ("1", "L", "P", "LA", "RGB", "RGBA", "I;16")


def malformed_points() -> list:
    """Handle/target values a caller might pass: none of them may reach the optimiser."""
    nan, inf = float("nan"), float("inf")
    return [(nan, 3), (3, nan), (inf, 3), (3, -inf), (-1, 5), (5, -1), (64, 3), (3, 64), (1e308, 1e308),
            (-1e308, 0), ("a", 3), (None, 3), (3,), (1, 2, 3), "12", None, (), ([1], 2)]
