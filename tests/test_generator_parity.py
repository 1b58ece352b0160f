"""Our generator against the official NVIDIA outputs stored in tests/fixtures/official."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from draggan_core.model.checkpoints import load_generator
from draggan_core.model.latents import load_latent, seed_to_w, seed_to_z
from draggan_core.model.networks import to_uint8_image
from official_pickle import FIXTURES, tiny64_pickle

SEED0 = FIXTURES / "tiny64_seed0.npz"


@pytest.fixture(scope="module")
def G():
    return load_generator(tiny64_pickle())


@pytest.fixture(scope="module")
def ref():
    with np.load(SEED0) as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def ws(ref):
    return torch.from_numpy(ref["w_plus"]).float()


def _max_abs(a, b) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


def test_image_matches_official(G, ws, ref):
    with torch.no_grad():
        img = G.synthesis(ws, noise_mode="const")
    assert img.shape == (1, 3, 64, 64) and img.dtype == torch.float32
    assert _max_abs(img, ref["image_f32"]) < 1e-4


def test_uint8_image_matches_official(G, ws, ref):
    with torch.no_grad():
        ours = to_uint8_image(G.synthesis(ws, noise_mode="const"))
    theirs = ref["image_uint8"]
    assert ours.shape == theirs.shape == (64, 64, 3) and ours.dtype == np.uint8
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    assert diff.max() <= 1
    assert (diff > 0).mean() <= 1e-3  # float rounding may flip a value sitting on an integer boundary


@pytest.mark.parametrize("res", [4, 8, 16, 32, 64])
def test_block_features_match_official(G, ws, ref, res):
    with torch.no_grad():
        _, feat = G.synthesis(ws, noise_mode="const", feature_res=res)
    expected = ref[f"feat_b{res}"]
    assert tuple(feat.shape) == expected.shape
    assert _max_abs(feat, expected) < 1e-4


def test_seed0_z_and_w_match_official(G, ref):
    z = seed_to_z(0, G.z_dim)
    assert z.shape == (1, 64) and z.dtype == torch.float32
    assert torch.equal(z, torch.from_numpy(ref["z"]).float())
    w = seed_to_w(G, 0, psi=0.7)
    assert w.shape == (1, G.num_ws, G.w_dim) and w.dtype == torch.float32
    assert _max_abs(w, ref["w_plus"]) < 1e-5


def test_seed_validation():
    from draggan_core.model.latents import LatentError
    for bad in (-1, 2 ** 32, 1.5, "3", True):
        with pytest.raises(LatentError):
            seed_to_z(bad, 8)
    assert seed_to_z(2 ** 32 - 1, 8).shape == (1, 8)
    assert seed_to_z(np.int64(7), 8).shape == (1, 8)


@pytest.mark.parametrize("batch", [1, 3])
def test_fused_and_unfused_modulated_conv_agree(G, ws, batch):
    gen = torch.Generator().manual_seed(batch)
    wb = ws.repeat(batch, 1, 1) + 0.1 * torch.randn(batch, *ws.shape[1:], generator=gen)
    with torch.no_grad():
        fused = G.synthesis(wb, fused=True)
        unfused = G.synthesis(wb, fused=False)
    assert _max_abs(fused, unfused) < 1e-4
    if batch > 1:  # batched samples equal single-sample renders
        with torch.no_grad():
            single = G.synthesis(wb[1:2])
        assert _max_abs(single, fused[1:2]) < 1e-4


@pytest.mark.parametrize("res", [4, 8, 16, 32, 64])
def test_stop_at_feature_equals_full_forward(G, ws, res):
    with torch.no_grad():
        _, full = G.synthesis(ws, feature_res=res)
        img, early = G.synthesis(ws, feature_res=res, stop_at_feature=True)
    assert img is None
    assert torch.allclose(early, full, atol=1e-6, rtol=0)


def test_noise_modes(G, ws):
    with torch.no_grad():
        const_a = G.synthesis(ws, noise_mode="const")
        const_b = G.synthesis(ws, noise_mode="const")
        none = G.synthesis(ws, noise_mode="none")
        torch.manual_seed(0)
        rand_a = G.synthesis(ws, noise_mode="random")
        rand_b = G.synthesis(ws, noise_mode="random")
    for img in (const_a, none, rand_a, rand_b):
        assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()
    assert torch.equal(const_a, const_b)  # deterministic
    assert not torch.equal(const_a, none)  # noise strengths are non-zero in the fixture
    assert not torch.equal(rand_a, rand_b)
    with pytest.raises(ValueError):
        G.synthesis(ws, noise_mode="bogus")


def test_single_w_vector_is_broadcast(G, ws):
    w = ws[0, 0].numpy()  # without a cutoff, the seed's W+ rows are all the same W
    for arr in (w, w[None]):
        loaded = load_latent(_npy_bytes(arr), G)
        assert loaded.shape == (1, G.num_ws, G.w_dim)
        assert torch.equal(loaded, ws[:, :1].expand(-1, G.num_ws, -1))
    with torch.no_grad():
        a = G.synthesis(load_latent(_npy_bytes(w), G))
        b = G.synthesis(ws)
    assert _max_abs(a, b) < 1e-6
    # the mapping network itself broadcasts one W to every layer
    with torch.no_grad():
        m = G.mapping(seed_to_z(5, G.z_dim), None, truncation_psi=1.0)
    assert torch.equal(m, m[:, :1].expand_as(m))


def test_truncation_and_cutoff(G):
    w_full = seed_to_w(G, 3, psi=1.0)
    w_trunc = seed_to_w(G, 3, psi=0.5)
    w_cut = seed_to_w(G, 3, psi=0.5, cutoff=4)
    w_avg = G.mapping.w_avg
    assert torch.allclose(w_trunc, w_avg + 0.5 * (w_full - w_avg), atol=1e-6)
    assert torch.allclose(w_cut[:, :4], w_trunc[:, :4], atol=0)
    assert torch.equal(w_cut[:, 4:], w_full[:, 4:])
    assert not torch.allclose(w_cut[:, 4:], w_trunc[:, 4:])
    assert torch.equal(seed_to_w(G, 3, psi=0.0), w_avg.expand(1, G.num_ws, -1))
    assert torch.equal(seed_to_w(G, 3, psi=0.5, cutoff=4, w_mode="w"), w_cut[:, :1].expand_as(w_cut))


def test_parameters_frozen_by_default(G):
    assert not G.training
    params = list(G.parameters())
    assert len(params) > 0
    assert all(not p.requires_grad for p in params)
    assert G.num_parameters() == 979_704  # the fixture README's count


def test_gradients_flow_to_latent_only(G, ws):
    w = ws.clone().requires_grad_(True)
    img, feat = G.synthesis(w, feature_res=32)
    (img.square().mean() + feat.mean()).backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    assert all(p.grad is None for p in G.parameters())


def _npy_bytes(arr) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr))
    return buf.getvalue()
