"""Writes an official-format StyleGAN2 training snapshot (`network-snapshot-*.pkl`) at test time.

NVIDIA's training loop pickles a dict {G, D, G_ema, augment_pipe, training_set_kwargs} whose networks
go through `torch_utils.persistence`: each network (and each sub-network) becomes a call
`_reconstruct_persistent_obj(meta)` with meta = {type, version, module_src, class_name, state}, where
`module_src` is the Python source of the module that defined the class and `state` is the instance's
`__dict__` (nn.Module bookkeeping, _parameters/_buffers/_modules, plain attributes, _init_args/_kwargs).
Tensors are pickled the way torch pickles them (`_rebuild_parameter(_rebuild_tensor_v2(
_load_from_bytes(<legacy torch.save of the storage>), ...))`).

The repository cannot ship such a file: its `module_src` is NVIDIA's source (non-commercial licence).
It ships the numbers instead (`fixtures/official/`: the weights as .safetensors, the rest of every
network's state as JSON) and this module puts them back together with a placeholder `module_src`, so
the loader's restricted-unpickler path runs end to end on the same structure as the real file.

`python tests/official_pickle.py --check ORIGINAL.pkl` compares the rebuilt snapshot with an original
one (read with an allow-list unpickler, nothing in it is run); `--extract ORIGINAL.pkl` rewrote the
fixture files from it.
"""
from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import functools
import io
import json
import pickle
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official"
STRUCTURE = FIXTURES / "tiny64_snapshot.json"
PICKLE_NAME = "stylegan2-tiny64-randinit.pkl"  # the original's name: messages and tests may show it
PLACEHOLDER_MODULE_SRC = ("# Placeholder for the network module's source. An official snapshot embeds NVIDIA's\n"
                          "# source here; a loader must never run it, so any text serves for tests.\n")
PERSISTENCE_VERSION = 6  # torch_utils.persistence's format version in the official files


# --------------------------------------------------------------------------------------------------
# stand-ins for the modules an official pickle names, registered only while dumping
# --------------------------------------------------------------------------------------------------

class _Persistent:
    """Pickles as `torch_utils.persistence._reconstruct_persistent_obj(meta)`, like NVIDIA's wrapper."""

    def __init__(self, fn, meta):
        self.fn, self.meta = fn, meta

    def __reduce__(self):
        return self.fn, (self.meta,)


@contextlib.contextmanager
def fake_official_modules():
    """Register harmless `torch_utils.persistence` and `dnnlib.util` so pickle can name their globals.

    Yields a namespace with `reconstruct` (the persistence entry point, never called: we only dump)
    and `EasyDict` (a plain dict subclass, pickled by reference like dnnlib's)."""
    names = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")
    saved = {n: sys.modules.get(n) for n in names}
    modules = {n: types.ModuleType(n) for n in names}

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("stand-in for dumping only")

    class EasyDict(dict):
        pass

    for fn_or_cls, module in ((_reconstruct_persistent_obj, "torch_utils.persistence"), (EasyDict, "dnnlib.util")):
        fn_or_cls.__module__, fn_or_cls.__qualname__ = module, fn_or_cls.__name__
        setattr(modules[module], fn_or_cls.__name__, fn_or_cls)
    modules["torch_utils"].persistence = modules["torch_utils.persistence"]
    modules["dnnlib"].util = modules["dnnlib.util"]
    sys.modules.update(modules)
    try:
        yield types.SimpleNamespace(reconstruct=_reconstruct_persistent_obj, EasyDict=EasyDict)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def persistent_network(fake, class_name: str, state: dict, module_src: str = PLACEHOLDER_MODULE_SRC):
    """A network object that pickles exactly as torch_utils.persistence writes one."""
    meta = {"type": "class", "version": PERSISTENCE_VERSION, "module_src": module_src,
            "class_name": class_name, "state": state}
    return _Persistent(fake.reconstruct, meta)


def dump_snapshot(snapshot: dict) -> bytes:
    """Pickle with the protocol of the official files (Python's default when they were written)."""
    return pickle.dumps(snapshot, protocol=4)


# --------------------------------------------------------------------------------------------------
# JSON <-> snapshot objects
# --------------------------------------------------------------------------------------------------
# The JSON holds everything but the tensors. Tagged values: {"$tuple": [...]}, {"$easydict": {...}},
# {"$float64": x} (numpy scalar), {"$tensor": name} (buffer), {"$parameter": name} (frozen
# nn.Parameter), {"$network": {class_name, version, state}}, {"$same_as": key} (the same object as an
# earlier top-level entry: G_ema is G). A network's state leaves out the nn.Module bookkeeping fields
# whose values equal a fresh nn.Module's (empty hook dicts and the like); they are filled back in
# torch's own order. Tensor names are state-dict names within the top-level network's weights file.

def _fresh_module_dict() -> dict:
    return dict(torch.nn.Module().__dict__)


def _decode(value, ctx):
    """ctx: .fake (the stand-in modules), .tensors (this network's weights), .module_src."""
    if isinstance(value, list):
        return [_decode(v, ctx) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == "$tuple":
            return tuple(_decode(v, ctx) for v in inner)
        if tag == "$easydict":
            return ctx.fake.EasyDict({k: _decode(v, ctx) for k, v in inner.items()})
        if tag == "$float64":
            return np.float64(inner)
        if tag == "$tensor":
            return ctx.tensors[inner]
        if tag == "$parameter":
            return torch.nn.Parameter(ctx.tensors[inner], requires_grad=False)
        if tag == "$network":
            return _decode_network(inner, ctx)
    return {k: _decode(v, ctx) for k, v in value.items()}


def _decode_network(record: dict, ctx):
    assert record["version"] == PERSISTENCE_VERSION
    encoded = record["state"]
    state = {}
    for key, fresh_value in _fresh_module_dict().items():  # a fresh dict each time: no shared objects
        if key == "_modules":
            state[key] = {name: _decode(sub, ctx) for name, sub in encoded[key].items()}
        elif key in encoded:
            state[key] = _decode(encoded[key], ctx)
        else:
            state[key] = fresh_value
    for key, value in encoded.items():
        if key not in state:
            state[key] = _decode(value, ctx)
    return persistent_network(ctx.fake, record["class_name"], state, ctx.module_src)


def _load_weights(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(FIXTURES / name))


def tiny64_snapshot_bytes(module_src: str = PLACEHOLDER_MODULE_SRC) -> bytes:
    """The official-format snapshot of the tiny64 random-weights generator, as bytes."""
    spec = json.loads(STRUCTURE.read_text())
    with fake_official_modules() as fake:
        snapshot = {}
        for key, value in spec["snapshot"].items():
            if isinstance(value, dict) and "$same_as" in value:
                snapshot[key] = snapshot[value["$same_as"]]  # the same object: pickle memoises it
            elif isinstance(value, dict) and "$network" in value:
                # clone: each tensor gets a storage of its own, as in the official file (a tensor that
            # views a larger buffer would pickle the whole buffer)
                tensors = {k: t.clone() for k, t in _load_weights(value["$network"]["weights"]).items()}
                ctx = types.SimpleNamespace(fake=fake, tensors=tensors, module_src=module_src)
                snapshot[key] = _decode_network(value["$network"], ctx)
            else:
                snapshot[key] = _decode(value, types.SimpleNamespace(fake=fake))
        return dump_snapshot(snapshot)


@functools.cache
def tiny64_pickle() -> Path:
    """Path of the rebuilt official snapshot, written once per process to a private temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="official-pickle-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / PICKLE_NAME
    path.write_bytes(tiny64_snapshot_bytes())
    return path


def tiny64_weights() -> dict[str, torch.Tensor]:
    """G_ema's state dict as stored in the fixture (what loading the snapshot must give)."""
    return _load_weights("tiny64_G_ema.safetensors")


# --------------------------------------------------------------------------------------------------
# reading an original snapshot (allow-list unpickler, nothing run) and rewriting the fixture from it
# --------------------------------------------------------------------------------------------------

class _Record:
    def __init__(self, meta):
        self.meta = meta


class _ReadEasyDict(dict):
    pass


def _read_rebuild_parameter(data, requires_grad, backward_hooks, *rest):
    assert not rest and not backward_hooks
    return torch.nn.Parameter(data, requires_grad=requires_grad)


# The globals an official snapshot names (numpy 1.x writes numpy.core, numpy 2 numpy._core).
OFFICIAL_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"), ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch.storage", "_load_from_bytes"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "scalar"), ("numpy", "dtype"), ("dnnlib.util", "EasyDict"),
}


def read_snapshot(data: bytes, globals_seen: set | None = None):
    """Decode an official snapshot into _Record / tensor / plain objects without running any of it;
    the (module, name) of every global it names is added to `globals_seen`."""
    from draggan_core.model import checkpoints as ck
    allowed = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Record,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): ck._rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _read_rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): ck._load_storage_from_bytes,
        ("numpy._core.multiarray", "scalar"): ck._numpy_scalar,
        ("numpy.core.multiarray", "scalar"): ck._numpy_scalar,
        ("numpy", "dtype"): ck._numpy_dtype,
        ("dnnlib.util", "EasyDict"): _ReadEasyDict,
    }

    assert set(allowed) == OFFICIAL_GLOBALS

    class Reader(pickle.Unpickler):
        def find_class(self, module, name):
            if globals_seen is not None:
                globals_seen.add((module, name))
            return allowed[(module, name)]

        def persistent_load(self, pid):
            raise pickle.UnpicklingError("persistent id")

    return Reader(io.BytesIO(data)).load()


def _encode(value, tensors: dict, path: str):
    """JSON for one value of a network's state; `path` is the network's state-dict prefix."""
    if isinstance(value, _Record):
        return {"$network": _encode_network(value, tensors, path)}
    if isinstance(value, np.float64):
        return {"$float64": float(value)}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, tensors, path) for v in value]}
    if isinstance(value, _ReadEasyDict):
        return {"$easydict": {k: _encode(v, tensors, path) for k, v in value.items()}}
    if isinstance(value, list):
        return [_encode(v, tensors, path) for v in value]
    if isinstance(value, dict):
        assert type(value) is dict and not any(k.startswith("$") for k in value)
        return {k: _encode(v, tensors, path) for k, v in value.items()}
    assert value is None or type(value) in (bool, int, float, str), f"{path}: {type(value)} not supported"
    return value


def _encode_tensor(value, tensors: dict, name: str):
    if isinstance(value, torch.nn.Parameter):
        assert not value.requires_grad
        tensors[name] = value.detach()
        return {"$parameter": name}
    assert isinstance(value, torch.Tensor) and not value.requires_grad, name
    tensors[name] = value
    return {"$tensor": name}


def _encode_network(record: _Record, tensors: dict, path: str) -> dict:
    meta = record.meta
    assert list(meta) == ["type", "version", "module_src", "class_name", "state"] and meta["type"] == "class"
    fresh = _fresh_module_dict()
    state = {}
    for key, value in meta["state"].items():
        if key == "_modules":
            state[key] = {name: _encode(sub, tensors, f"{path}{name}.") for name, sub in value.items()}
        elif key in ("_parameters", "_buffers"):
            state[key] = {name: _encode_tensor(t, tensors, path + name) for name, t in value.items()}
        elif key in fresh and key != "training" and type(value) is type(fresh[key]) and value == fresh[key]:
            continue  # bookkeeping as in any fresh nn.Module: filled back in when writing
        else:
            state[key] = _encode(value, tensors, path)
    return {"class_name": meta["class_name"], "version": meta["version"], "state": state}


def extract(original: Path):
    """Rewrite the fixture's JSON and weights from an original snapshot."""
    from safetensors.torch import save_file
    snapshot = read_snapshot(original.read_bytes())
    spec, seen = {}, {}
    for key, value in snapshot.items():
        if isinstance(value, _Record) and id(value) in seen:
            spec[key] = {"$same_as": seen[id(value)]}
        elif isinstance(value, _Record):
            seen[id(value)] = key
            tensors = {}
            encoded = _encode_network(value, tensors, "")
            # G and G_ema are one object: its weights are G_ema's, the network the loader reads
            weights = "tiny64_G_ema.safetensors" if key == "G" else f"tiny64_{key}.safetensors"
            save_file({k: t.contiguous() for k, t in tensors.items()}, str(FIXTURES / weights))
            spec[key] = {"$network": {"weights": weights, **encoded}}
        else:
            spec[key] = _encode(value, {}, "")
    STRUCTURE.write_text(_readable_json({"snapshot": spec}) + "\n")


def _readable_json(value, indent: str = "") -> str:
    """JSON with one line per field of a network state; short leaf values stay on one line."""
    flat = json.dumps(value)
    if not isinstance(value, (dict, list)) or not value or ("$network" not in flat and len(flat) <= 100):
        return flat
    inner = indent + "  "
    if isinstance(value, list):
        items = [inner + _readable_json(v, inner) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    items = [f"{inner}{json.dumps(k)}: {_readable_json(v, inner)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + "\n" + indent + "}"


def check(original: Path) -> list[str]:
    """Differences between the rebuilt snapshot and an original one (module_src aside)."""
    ours, theirs = read_snapshot(tiny64_snapshot_bytes()), read_snapshot(original.read_bytes())
    problems = []
    if (ours["G"] is ours["G_ema"]) != (theirs["G"] is theirs["G_ema"]):
        problems.append("G / G_ema identity differs")

    def compare(a, b, where):
        if type(a) is not type(b) and not (isinstance(a, _Record) and isinstance(b, _Record)):
            problems.append(f"{where}: {type(a).__name__} != {type(b).__name__}")
        elif isinstance(a, _Record):
            for k in ("type", "version", "class_name"):
                if a.meta[k] != b.meta[k]:
                    problems.append(f"{where}.{k}: {a.meta[k]!r} != {b.meta[k]!r}")
            compare(a.meta["state"], b.meta["state"], where)
        elif isinstance(a, torch.Tensor):
            if a.dtype != b.dtype or a.shape != b.shape or a.stride() != b.stride() or not torch.equal(a, b) \
                    or a.requires_grad != b.requires_grad:
                problems.append(f"{where}: tensor differs")
        elif isinstance(a, dict):
            if list(a) != list(b):
                problems.append(f"{where}: keys {list(a)} != {list(b)}")
            for k in a:
                if k in b:
                    compare(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, (list, tuple)):
            if len(a) != len(b):
                problems.append(f"{where}: length differs")
            for i, (x, y) in enumerate(zip(a, b)):
                compare(x, y, f"{where}[{i}]")
        elif a != b:
            problems.append(f"{where}: {a!r} != {b!r}")

    compare(ours, theirs, "snapshot")
    return problems


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", type=Path, metavar="ORIGINAL.pkl")
    action.add_argument("--extract", type=Path, metavar="ORIGINAL.pkl")
    args = parser.parse_args()
    if args.extract:
        extract(args.extract)
    else:
        found = check(args.check)
        print("\n".join(found) or "rebuilt snapshot matches the original (module_src aside)")
        sys.exit(1 if found else 0)
