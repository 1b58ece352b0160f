"""Hostile and broken files must be refused with a clear one-line error and never run code."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from draggan_core.cli import program as cli
from draggan_core.model.checkpoints import CheckpointError, load_generator, save_native
from draggan_core.model.latents import MAX_LATENT_BYTES, LatentError, load_latent
from draggan_core.model.networks import Generator, GeneratorConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostile  # noqa: E402
from official_pickle import tiny64_pickle  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# torch warns about pickle protocol 3 in hand-made payloads; irrelevant here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def small_G():
    torch.manual_seed(0)
    return Generator(GeneratorConfig(z_dim=8, w_dim=8, img_resolution=8, channel_base=64, channel_max=16,
                                     mapping_layers=2))


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PWNED"
    yield m
    time.sleep(0.05)  # a spawned process (Popen payload) would need a moment
    assert not m.exists(), "a payload ran!"


def assert_checkpoint_refused(path: Path, *reason_words: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_generator(path)
    msg = str(info.value)
    assert "\n" not in msg and "\x1b" not in msg, msg
    assert str(path) in msg, msg
    for word in reason_words:
        assert word.lower() in msg.lower(), msg
    return msg


# --------------------------------------------------------------------------------------------------
# code-execution pickles
# --------------------------------------------------------------------------------------------------

REFUSAL_WORDS = {
    "os_system": ("os.system",),
    "posix_system": ("posix.system",),
    "eval": ("builtins.eval",),
    "exec": ("builtins.exec",),
    "subprocess_popen": ("subprocess.Popen",),
    "dunder_import": ("allow-list",),
    "exec_in_dict": ("builtins.exec",),
    "persistent_module_src": ("no synthesis",),
    "load_from_bytes_legacy": ("exec",),
    "load_from_bytes_zip": ("os.system",),
}


@pytest.mark.parametrize("name", sorted(hostile.HOSTILE_PICKLES))
def test_hostile_pickle_is_refused(name, tmp_path, marker, small_G):
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(hostile.HOSTILE_PICKLES[name](marker))
    assert_checkpoint_refused(path, *REFUSAL_WORDS[name])
    # the same file offered as a latent is not even parsed as a pickle
    with pytest.raises(LatentError, match="not a latent file"):
        load_latent(path, small_G)


def test_valid_pickle_with_hostile_module_src_loads_without_running_it(tmp_path, marker):
    """The real attack surface: a working checkpoint whose embedded source is malicious."""
    torch.manual_seed(0)
    cfg = GeneratorConfig(z_dim=16, w_dim=16, img_resolution=16, channel_base=256, channel_max=32,
                          mapping_layers=2, conv_clamp=256)
    G = Generator(cfg)
    src = f"import os\nos.system('touch {marker}')\nopen({str(marker)!r}, 'w').close()\nclass Generator: pass\n"
    kwargs = {"z_dim": 16, "c_dim": 0, "w_dim": 16, "img_resolution": 16, "img_channels": 3,
              "mapping_kwargs": {"num_layers": 2}, "synthesis_kwargs": {"channel_base": 256, "channel_max": 32,
                                                                       "conv_clamp": 256, "architecture": "skip"}}
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(hostile.nvidia_style_pickle(G, src, kwargs))
    G2 = load_generator(path)
    assert G2.cfg.channels == cfg.channels and G2.cfg.conv_clamp == 256
    ws = torch.randn(1, G.num_ws, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(G.synthesis(ws), G2.synthesis(ws))


def test_torch_zip_with_hostile_data_pkl(tmp_path, marker, small_G):
    data = hostile.torch_zip_with_data_pkl(hostile.pickle_exec(marker))
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    assert_checkpoint_refused(path, "refused", "exec")
    with pytest.raises(LatentError, match="refused"):
        load_latent(path, small_G)
    data = hostile.torch_zip_with_data_pkl(hostile.pickle_os_system(marker))
    with pytest.raises(LatentError, match="os.system"):
        load_latent(data, small_G)


# --------------------------------------------------------------------------------------------------
# broken / oversized checkpoints
# --------------------------------------------------------------------------------------------------

def test_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.pkl"
    path.write_bytes(hostile.garbage_bytes())
    assert_checkpoint_refused(path, "unknown checkpoint format")
    path2 = tmp_path / "pickle_like.pkl"
    path2.write_bytes(hostile.pickle_like_garbage())
    assert_checkpoint_refused(path2, "not a loadable")
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    assert_checkpoint_refused(empty)
    assert_checkpoint_refused(tmp_path / "does-not-exist.pkl", "no such file")


def test_truncated_fixture_pickle(tmp_path):
    path = tmp_path / "truncated.pkl"
    path.write_bytes(hostile.truncated(tiny64_pickle().read_bytes()))
    assert_checkpoint_refused(path, "truncated")


def test_huge_tensor_in_pickle_is_not_allocated(tmp_path):
    path = tmp_path / "huge.pkl"
    path.write_bytes(hostile.pickle_huge_tensor())
    assert_checkpoint_refused(path, "larger than its stored data")


def test_safetensors_with_nan_weights(tmp_path, small_G):
    G = Generator(small_G.cfg)
    G.load_state_dict(small_G.state_dict())
    with torch.no_grad():
        G.synthesis.b8.conv1.weight[0, 0, 1, 1] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_native(G, path)
    assert_checkpoint_refused(path, "synthesis.b8.conv1.weight", "non-finite")
    with torch.no_grad():
        G.synthesis.b8.conv1.weight[0, 0, 1, 1] = float("inf")
    save_native(G, path)
    assert_checkpoint_refused(path, "non-finite")


def test_safetensors_with_wrong_shapes(tmp_path, small_G):
    from safetensors.torch import save_file
    tensors = {k: v.clone().contiguous() for k, v in small_G.state_dict().items()}
    tensors["synthesis.b8.conv0.weight"] = torch.zeros(16, 16, 5, 5)
    path = tmp_path / "shapes.safetensors"
    save_file(tensors, str(path), metadata={"format": "draggan-native-v1", "config": small_G.cfg.to_json()})
    assert_checkpoint_refused(path, "synthesis.b8.conv0.weight", "shape")
    del tensors["synthesis.b8.conv0.weight"]
    tensors["synthesis.b8.extra"] = torch.zeros(1)
    save_file(tensors, str(path), metadata={"format": "draggan-native-v1", "config": small_G.cfg.to_json()})
    assert_checkpoint_refused(path, "missing")


def test_safetensors_without_our_metadata(tmp_path, small_G):
    from safetensors.torch import save_file
    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in small_G.state_dict().items()}, str(path))
    assert_checkpoint_refused(path, "config")
    path.write_bytes(hostile.safetensors_header_only({}, {"format": "draggan-native-v1", "config": "{\"evil\": 1}"}))
    assert_checkpoint_refused(path, "unknown generator config")


def test_safetensors_huge_declared_tensor(tmp_path, small_G):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(hostile.huge_declared_safetensors({"format": "draggan-native-v1",
                                                        "config": small_G.cfg.to_json()}))
    assert_checkpoint_refused(path, "unreadable safetensors")


def test_checkpoint_over_size_limit(tmp_path, monkeypatch):
    from draggan_core.model import checkpoints
    path = tmp_path / "big.pkl"
    with open(path, "wb") as f:
        f.write(b"\x80\x04")
        f.truncate(4096)
    monkeypatch.setattr(checkpoints, "MAX_CHECKPOINT_BYTES", 1024)
    assert_checkpoint_refused(path, "limit")


# --------------------------------------------------------------------------------------------------
# latents
# --------------------------------------------------------------------------------------------------

def assert_latent_refused(source, G, *words) -> str:
    with pytest.raises(LatentError) as info:
        load_latent(source, G)
    msg = str(info.value)
    assert "\n" not in msg and "\x1b" not in msg, msg
    if isinstance(source, Path):
        assert str(source) in msg, msg
    for word in words:
        assert word.lower() in msg.lower(), msg
    return msg


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def test_latent_object_dtype_and_pickled_npy(tmp_path, marker, small_G):
    path = tmp_path / "w.npy"
    path.write_bytes(hostile.npy_pickled_object(marker))
    assert_latent_refused(path, small_G, "python objects")
    path.write_bytes(hostile.npy_object_dtype_real())
    assert_latent_refused(path, small_G, "python objects")
    path.write_bytes(hostile.pickle_exec(marker))  # a raw pickle named .npy
    assert_latent_refused(path, small_G, "not a latent file")


@pytest.mark.parametrize("arr,words", [
    (np.zeros((1, 8), dtype=np.complex64), ("dtype",)),
    (np.zeros((1, 8), dtype=[("a", "<f4")]), ("dtype",)),
    (np.array(["a"] * 8), ("dtype",)),
    (np.zeros((1, 8), dtype=bool), ("dtype",)),
    (np.zeros((1, 4, 7), dtype=np.float32), ("shape (1, 4, 7)", "(1, 4, 8)", "(8,)")),
    (np.zeros((2, 4, 8), dtype=np.float32), ("shape",)),
    (np.full((4, 8), np.nan, dtype=np.float32), ("nan",)),
    (np.full((8,), np.inf), ("infinite",)),
    (np.full((8,), 1e5, dtype=np.float32), ("large",)),
])
def test_latent_bad_content(arr, words, small_G):
    assert_latent_refused(_npy(arr), small_G, *words)


def test_latent_accepted_shapes_and_formats(tmp_path, small_G):
    rng = np.random.RandomState(0)
    wp = rng.randn(1, 4, 8).astype(np.float32)
    for arr in (wp, wp[0], wp.astype(np.float64), (wp * 10).astype(np.int32)):
        t = load_latent(_npy(arr), small_G)
        assert t.shape == (1, 4, 8) and t.dtype == torch.float32
        assert np.allclose(t.numpy(), np.asarray(arr, dtype=np.float32).reshape(1, 4, 8))
    for container in (torch.from_numpy(wp), {"w": torch.from_numpy(wp)}, {"ws": torch.from_numpy(wp[0])},
                      {"latent": torch.from_numpy(wp[0, 0]), "step": 3}):
        path = tmp_path / "w.bin"  # extension deliberately meaningless
        torch.save(container, path)
        t = load_latent(path, small_G)
        assert t.shape == (1, 4, 8)
    torch.save({"w": torch.zeros(1, 4, 8), "ws": torch.zeros(1, 4, 8)}, path)
    assert_latent_refused(path, small_G, "exactly one tensor")
    torch.save([1, 2, 3], path)
    assert_latent_refused(path, small_G, "list")
    torch.save(torch.zeros(1, 4, 8, dtype=torch.complex64), path)
    assert_latent_refused(path, small_G, "dtype")


def test_latent_size_limits(tmp_path, small_G):
    assert_latent_refused(hostile.npy_huge_declared(), small_G, "too large")
    truncated = _npy(np.zeros((1, 4, 8), np.float32))[:-10]
    assert_latent_refused(truncated, small_G, "truncated")
    big = tmp_path / "big.npy"
    with open(big, "wb") as f:
        f.write(b"\x93NUMPY")
        f.truncate(MAX_LATENT_BYTES + 1)  # sparse: nothing real is written
    assert_latent_refused(big, small_G, "limit")
    assert_latent_refused(tmp_path / "missing.npy", small_G, "no such")
    assert_latent_refused(b"", small_G, "empty")
    assert_latent_refused(hostile.garbage_bytes(64), small_G, "not a latent file")


# --------------------------------------------------------------------------------------------------
# through the CLI
# --------------------------------------------------------------------------------------------------

def test_cli_info_on_every_bad_file_in_process(tmp_path, marker, capsys):
    files = {f"{n}.pkl": fn(marker) for n, fn in hostile.HOSTILE_PICKLES.items()}
    files.update({"garbage.bin": hostile.garbage_bytes(), "huge.pkl": hostile.pickle_huge_tensor(),
                  "zip.pt": hostile.torch_zip_with_data_pkl(hostile.pickle_exec(marker))})
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert cli.main(["info", str(path)]) == 2, name
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and str(path) in lines[0], err
        assert "Traceback" not in err


def _run_cli(*args, cwd=REPO):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "draggan_core", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_subprocess_refuses_hostile_pickle(tmp_path, marker):
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(hostile.pickle_os_system(marker))
    res = _run_cli("info", str(bad))
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and str(bad) in res.stderr
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout


def test_cli_subprocess_refuses_garbage(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(hostile.garbage_bytes())
    res = _run_cli("info", str(bad))
    assert res.returncode != 0
    assert "error:" in res.stderr and "Traceback" not in res.stderr


def test_pickle_warning_suppressed_in_payload_builders():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hostile.pickle_huge_tensor()  # building the corpus itself must not warn (or run anything)
