"""Checkpoint formats: NVIDIA pickle, native safetensors (fp32/fp16), rosinality .pt, other configs."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from draggan_core.cli import program as cli
from draggan_core.model.checkpoints import CheckpointError, detect_format, load_generator, save_native
from draggan_core.model.latents import seed_to_w
from draggan_core.model.networks import Generator, GeneratorConfig

import official_pickle
from official_pickle import tiny64_pickle

PKL = tiny64_pickle()  # an official-format training snapshot, written at test time


@pytest.fixture(scope="module")
def G():
    return load_generator(PKL)


@pytest.fixture(scope="module")
def ws(G):
    return seed_to_w(G, 0, psi=0.7) + 0.05 * torch.randn(1, G.num_ws, G.w_dim, generator=torch.Generator().manual_seed(1))


def test_rebuilt_official_snapshot_has_the_official_structure_and_loads_the_stored_weights(G):
    """tests/official_pickle.py writes what NVIDIA's training loop writes (module source aside), and
    the restricted loader reads G_ema's stored weights from it bit for bit."""
    seen = set()
    snapshot = official_pickle.read_snapshot(PKL.read_bytes(), seen)
    assert list(snapshot) == ["G", "D", "G_ema", "augment_pipe", "training_set_kwargs"]
    assert snapshot["G"] is snapshot["G_ema"] and snapshot["augment_pipe"] is None
    assert [snapshot[k].meta["class_name"] for k in ("G", "D")] == ["Generator", "Discriminator"]
    meta = snapshot["G_ema"].meta
    assert list(meta) == ["type", "version", "module_src", "class_name", "state"] and meta["version"] == 6
    assert meta["module_src"] == official_pickle.PLACEHOLDER_MODULE_SRC
    assert list(meta["state"]["_modules"]) == ["synthesis", "mapping"]
    assert meta["state"]["_init_kwargs"]["channel_base"] == 2048
    numpy_scalar = {("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar")}
    assert seen - numpy_scalar == official_pickle.OFFICIAL_GLOBALS - numpy_scalar and seen & numpy_scalar
    stored, loaded = official_pickle.tiny64_weights(), G.state_dict()
    assert sorted(loaded) == sorted(stored) and len(stored) == 94
    for k, v in stored.items():
        assert v.dtype == loaded[k].dtype == torch.float32 and torch.equal(v, loaded[k]), k


def _render(G, ws):
    with torch.no_grad():
        return G.synthesis(ws, noise_mode="const")


def test_pickle_to_safetensors_fp32_is_identical(G, ws, tmp_path):
    out = tmp_path / "tiny.safetensors"
    save_native(G, out)
    assert detect_format(out) == "safetensors"
    G2 = load_generator(out)
    assert G2.cfg == G.cfg
    for k, v in G.state_dict().items():
        assert torch.equal(v, G2.state_dict()[k]), k
    assert torch.equal(_render(G, ws), _render(G2, ws))
    assert all(not p.requires_grad for p in G2.parameters())


def test_native_fp16_is_close(G, ws, tmp_path):
    out = tmp_path / "tiny16.safetensors"
    save_native(G, out, dtype=torch.float16)
    save_native(G, tmp_path / "tiny32.safetensors")
    assert out.stat().st_size < 0.6 * (tmp_path / "tiny32.safetensors").stat().st_size
    G2 = load_generator(out)
    assert all(p.dtype == torch.float32 for p in G2.parameters())  # compute stays fp32
    assert float((_render(G, ws) - _render(G2, ws)).abs().max()) < 1e-2


def test_cli_convert_and_info(tmp_path, capsys):
    out = tmp_path / "conv.safetensors"
    assert cli.main(["convert", str(PKL), str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert cli.main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    fields = dict(re.findall(r"^([a-z_ ]+):\s+(.*)$", text, flags=re.M))
    assert fields["format"] == "safetensors"
    assert fields["family"] == "stylegan2"
    assert fields["architecture"] == "skip"
    assert fields["resolution"].startswith("64x64")
    assert fields["num_ws"] == "10"
    assert fields["w_dim"] == "64"
    assert fields["z_dim"] == "64"
    assert fields["mapping layers"] == "2"
    assert fields["channels"] == "b4:128 b8:128 b16:128 b32:64 b64:32"
    assert fields["parameters"] == "979,704"
    assert cli.main(["info", "--model", str(PKL)]) == 0
    assert "nvidia-pickle" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# rosinality round trip
# --------------------------------------------------------------------------------------------------

def to_rosinality(G: Generator) -> tuple[dict, torch.Tensor]:
    """Our (NVIDIA-named) state dict -> rosinality stylegan2-pytorch `g_ema` names and shapes."""
    sd = {k: v.clone() for k, v in G.state_dict().items()}
    cfg = G.cfg
    out = {}
    for i in range(cfg.mapping_layers):
        out[f"style.{i + 1}.weight"] = sd[f"mapping.fc{i}.weight"]
        out[f"style.{i + 1}.bias"] = sd[f"mapping.fc{i}.bias"]

    def conv(dst, src, noise_key, res, up):
        out[f"{dst}.conv.weight"] = sd[f"{src}.weight"][None]
        out[f"{dst}.conv.modulation.weight"] = sd[f"{src}.affine.weight"]
        out[f"{dst}.conv.modulation.bias"] = sd[f"{src}.affine.bias"]
        out[f"{dst}.noise.weight"] = sd[f"{src}.noise_strength"].reshape(1)
        out[f"{dst}.activate.bias"] = sd[f"{src}.bias"]
        out[noise_key] = sd[f"{src}.noise_const"].reshape(1, 1, res, res)
        if up:  # rosinality keeps its blur kernel as a buffer; the loader must ignore it
            out[f"{dst}.conv.blur.kernel"] = torch.ones(4, 4) / 4

    def torgb(dst, src, up):
        out[f"{dst}.conv.weight"] = sd[f"{src}.weight"][None]
        out[f"{dst}.conv.modulation.weight"] = sd[f"{src}.affine.weight"]
        out[f"{dst}.conv.modulation.bias"] = sd[f"{src}.affine.bias"]
        out[f"{dst}.bias"] = sd[f"{src}.bias"].reshape(1, -1, 1, 1)
        if up:
            out[f"{dst}.upsample.kernel"] = torch.ones(4, 4) / 4

    out["input.input"] = sd["synthesis.b4.const"][None]
    conv("conv1", "synthesis.b4.conv1", "noises.noise_0", 4, False)
    torgb("to_rgb1", "synthesis.b4.torgb", False)
    for i, res in enumerate(cfg.block_resolutions[1:]):
        conv(f"convs.{2 * i}", f"synthesis.b{res}.conv0", f"noises.noise_{2 * i + 1}", res, True)
        conv(f"convs.{2 * i + 1}", f"synthesis.b{res}.conv1", f"noises.noise_{2 * i + 2}", res, False)
        torgb(f"to_rgbs.{i}", f"synthesis.b{res}.torgb", True)
    return out, sd["mapping.w_avg"][None]


def test_rosinality_round_trip(tmp_path):
    # rosinality models have no conv_clamp; build a matching generator with non-trivial weights
    torch.manual_seed(0)
    cfg = GeneratorConfig(z_dim=32, w_dim=32, img_resolution=32, channel_base=512, channel_max=64,
                          mapping_layers=3, mapping_lr_multiplier=0.01)
    G = Generator(cfg)
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("bias") or name.endswith("noise_strength"):
                p.copy_(0.1 * torch.randn_like(p) + (1 if "affine" in name else 0))
        G.mapping.w_avg.copy_(0.3 * torch.randn(cfg.w_dim))
    sd, latent_avg = to_rosinality(G)
    path = tmp_path / "rosinality.pt"
    torch.save({"g_ema": sd, "latent_avg": latent_avg, "args": argparse.Namespace(lr_mlp=0.01, size=32)}, path)
    assert detect_format(path) == "torch-zip"
    G2 = load_generator(path)
    assert G2.cfg.img_resolution == 32 and G2.cfg.mapping_layers == 3 and G2.cfg.channels == cfg.channels
    for k, v in G.state_dict().items():
        assert torch.equal(v, G2.state_dict()[k]), k
    z = torch.randn(2, cfg.z_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(G(z, truncation_psi=0.7), G2(z, truncation_psi=0.7))


def test_rosinality_round_trip_of_fixture(G, ws, tmp_path):
    sd, latent_avg = to_rosinality(G)
    path = tmp_path / "fixture.pt"
    torch.save({"g_ema": sd, "latent_avg": latent_avg, "args": argparse.Namespace(lr_mlp=0.01)}, path)
    G2 = load_generator(path)
    # rosinality has no conv_clamp (the fixture's 256 never triggers at these magnitudes)
    assert torch.allclose(_render(G, ws), _render(G2, ws), atol=1e-6, rtol=0)
    assert torch.equal(seed_to_w(G, 0), seed_to_w(G2, 0))


def test_rosinality_missing_key_is_clear(tmp_path):
    torch.manual_seed(0)
    G = Generator(GeneratorConfig(z_dim=8, w_dim=8, img_resolution=8, channel_base=64, channel_max=16, mapping_layers=2))
    sd, latent_avg = to_rosinality(G)
    del sd["to_rgbs.0.conv.modulation.bias"]
    path = tmp_path / "broken.pt"
    torch.save({"g_ema": sd, "latent_avg": latent_avg}, path)
    with pytest.raises(CheckpointError, match=r"broken\.pt.*missing"):
        load_generator(path)


# --------------------------------------------------------------------------------------------------
# other configurations
# --------------------------------------------------------------------------------------------------

def test_resnet_architecture_runs_and_round_trips(tmp_path):
    torch.manual_seed(0)
    cfg = GeneratorConfig(z_dim=16, w_dim=16, img_resolution=16, channel_base=256, channel_max=32,
                          mapping_layers=2, architecture="resnet", conv_clamp=256)
    G = Generator(cfg)
    keys = G.state_dict().keys()
    assert "synthesis.b8.skip.weight" in keys and "synthesis.b4.torgb.weight" not in keys
    assert "synthesis.b16.torgb.weight" in keys
    z = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img = G(z, truncation_psi=0.5)
    assert img.shape == (2, 3, 16, 16) and torch.isfinite(img).all()
    with torch.no_grad():
        a = G.synthesis(G.mapping(z), fused=True)
        b = G.synthesis(G.mapping(z), fused=False)
    assert float((a - b).abs().max()) < 1e-4
    save_native(G, tmp_path / "resnet.safetensors")
    G2 = load_generator(tmp_path / "resnet.safetensors")
    assert G2.cfg.architecture == "resnet"
    with torch.no_grad():
        assert torch.equal(G2(z, truncation_psi=0.5), img)


def test_conditional_model_runs(tmp_path):
    torch.manual_seed(0)
    cfg = GeneratorConfig(z_dim=16, w_dim=16, c_dim=5, img_resolution=8, channel_base=128, channel_max=32,
                          mapping_layers=2)
    G = Generator(cfg)
    assert "mapping.embed.weight" in G.state_dict()
    z = torch.randn(1, 16, generator=torch.Generator().manual_seed(0))
    c = torch.nn.functional.one_hot(torch.tensor([2]), 5).float()
    with torch.no_grad():
        img = G(z, c)
        other = G(z, torch.nn.functional.one_hot(torch.tensor([3]), 5).float())
    assert img.shape == (1, 3, 8, 8) and torch.isfinite(img).all()
    assert not torch.equal(img, other)
    with pytest.raises(ValueError, match="conditional"):
        G(z)
    w = seed_to_w(G, 1, c=c)
    assert w.shape == (1, G.num_ws, 16)
    save_native(G, tmp_path / "cond.safetensors")
    G2 = load_generator(tmp_path / "cond.safetensors")
    assert G2.cfg.c_dim == 5
    with torch.no_grad():
        assert torch.equal(G2(z, c), img)


def test_grayscale_model_renders_through_cli(tmp_path):
    torch.manual_seed(0)
    G = Generator(GeneratorConfig(z_dim=8, w_dim=8, img_resolution=8, img_channels=1, channel_base=64,
                                  channel_max=16, mapping_layers=2))
    save_native(G, tmp_path / "gray.safetensors")
    out = tmp_path / "gray.png"
    assert cli.main(["render", "--model", str(tmp_path / "gray.safetensors"), "--seed", "1", "--out", str(out),
                     "--raw", str(tmp_path / "gray.npy")]) == 0
    from PIL import Image
    assert Image.open(out).mode == "L"
    assert np.load(tmp_path / "gray.npy").shape == (1, 8, 8)


def test_shipped_embedded_models_load_and_carry_their_metadata():
    """Every generator shipped in checkpoints/ (the default parts model, the opt-in L1 and 128 px
    models) loads as a native file within the size limit, carries its training record and drag
    defaults, and renders finite faces at its resolution; the model list puts the default first, and
    the web UI labels it."""
    import json
    from draggan_core.model.checkpoints import read_native_metadata
    from draggan_core.model.store import DEFAULT_MODEL_NAME, drag_defaults_of, list_local_models
    repo_checkpoints = Path(__file__).resolve().parents[1] / "checkpoints"
    models = list_local_models(repo_checkpoints)
    assert models[0].name == DEFAULT_MODEL_NAME
    from webui.services import model_choices
    labels = [label for label, _ in model_choices()]
    assert labels[0] == DEFAULT_MODEL_NAME + " (default)" and sum("(default)" in lb for lb in labels) == 1
    assert "landmarks64.safetensors" not in [p.name for p in models]  # the detector is not a generator
    for path in models:
        assert path.stat().st_size <= 50 * 2**20
        meta = read_native_metadata(path)
        assert int(meta["training_steps"]) > 0 and int(meta["training_images"]) > 0
        defaults = drag_defaults_of(path)
        assert json.loads(meta["drag_defaults"]) == defaults and 0 < defaults["lr"] < 0.1
        G = load_generator(path)
        img = G.synthesis(seed_to_w(G, 3, psi=0.7))
        res = 128 if "128" in path.name else 64
        assert img.shape == (1, 3, res, res) and torch.isfinite(img).all()
