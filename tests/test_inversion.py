"""GAN inversion (draggan_core/edit/inversion.py) and `python -m draggan_core invert`: fast, deterministic."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from draggan_core.edit.inversion import InversionError, invert, invert_iter, load_image, prepare_target, psnr_uint8
from draggan_core.model.networks import Generator, GeneratorConfig, to_uint8_image

torch.set_num_threads(1)


def _tiny_generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    cfg = GeneratorConfig(z_dim=16, w_dim=32, img_resolution=16, mapping_layers=2,
                          channels={4: 32, 8: 32, 16: 16}, use_noise=True)
    G = Generator(cfg)
    with torch.no_grad():
        z = torch.randn(256, cfg.z_dim)
        G.mapping.w_avg.copy_(G.mapping(z)[:, 0].mean(0))
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.05)  # exercise the constant-noise path
    return G


@pytest.fixture(scope="module")
def G():
    return _tiny_generator()


@pytest.fixture(scope="module")
def known(G):
    """An image generated from a known W+ (rows differ: truly W+) and its latent."""
    with torch.no_grad():
        z = torch.from_numpy(np.random.RandomState(123).randn(2, G.z_dim)).float()
        w = G.mapping(z, truncation_psi=0.7)
        w_plus = torch.cat([w[:1, :5], w[1:, 5:]], dim=1)
        img = to_uint8_image(G.synthesis(w_plus, noise_mode="const"))
    return w_plus, img


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (no real pixel data: must be refused before decoding)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------ quality
def test_inverting_a_generated_image_reaches_high_psnr(G, known):
    w_true, img = known
    with torch.no_grad():
        avg = to_uint8_image(G.synthesis(G.mapping.w_avg.view(1, 1, -1).expand(1, G.num_ws, -1)))
    start_psnr = psnr_uint8(avg, img)
    result = invert(G, img, steps=60)
    assert result.w_plus.shape == (1, G.num_ws, G.w_dim)
    assert result.w_plus.dtype == torch.float32 and torch.isfinite(result.w_plus).all()
    assert result.image.shape == (16, 16, 3) and result.image.dtype == np.uint8
    # a no-op or broken optimiser stays near the start (w_avg / best random sample)
    # (a random-weights generator has a rough latent landscape: ~27 dB is its ceiling at 200+ steps)
    assert result.psnr >= 22.0, (result.psnr, start_psnr)
    assert result.psnr >= start_psnr + 10
    assert result.psnr >= result.history[0]["psnr"] + 5  # better than the chosen start point
    # the reported PSNR is the PSNR of the returned latent's image with the shared generator
    with torch.no_grad():
        again = to_uint8_image(G.synthesis(result.w_plus, noise_mode="const"))
    assert np.array_equal(again, result.image)
    assert result.psnr == pytest.approx(psnr_uint8(again, img))
    # deterministic
    assert torch.equal(invert(G, img, steps=8).w_plus, invert(G, img, steps=8).w_plus)


def test_w_plus_phase_improves_on_w_only(G, known):
    _, img = known
    w_only = invert(G, img, steps=40, w_steps=40)
    both = invert(G, img, steps=40, w_steps=20)
    assert torch.allclose(w_only.w_plus, w_only.w_plus[:, :1].expand_as(w_only.w_plus))  # one shared vector
    assert not torch.allclose(both.w_plus, both.w_plus[:, :1].expand_as(both.w_plus))
    assert both.psnr > w_only.psnr


# ------------------------------------------------------------------------------------------ events
def test_progress_events_and_previews(G, known):
    _, img = known
    events = list(invert_iter(G, img, steps=12, w_steps=4, preview_every=5))
    assert [e.step for e in events[:-1]] == list(range(1, 13))
    assert all(e.total == 12 for e in events)
    assert [e.phase for e in events[:-1]] == ["w"] * 4 + ["w+"] * 8
    assert [e.step for e in events[:-1] if e.image is not None] == [5, 10]
    assert all(e.image.shape == (16, 16, 3) and e.image.dtype == np.uint8 for e in events if e.image is not None)
    assert all(np.isfinite(e.loss) and np.isfinite(e.psnr) for e in events)
    last = events[-1]
    assert last.done and last.phase == "done" and last.result is not None and last.image is not None
    assert not any(e.done for e in events[:-1])
    assert len(last.result.history) == 12

    seen = []
    result = invert(G, img, steps=6, progress=seen.append)
    assert len(seen) == 7 and seen[-1].result is result


def test_cancel_between_steps(G, known):
    _, img = known
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 3

    result = invert(G, img, steps=50, should_stop=should_stop)
    assert result.cancelled
    assert len(result.history) == 3
    assert result.w_plus.shape == (1, G.num_ws, G.w_dim) and torch.isfinite(result.w_plus).all()

    # leaving the loop is a cancel too, and a later run is unaffected
    it = invert_iter(G, img, steps=50)
    for ev in it:
        if ev.step == 2:
            break
    it.close()
    assert not invert(G, img, steps=3).cancelled


# ------------------------------------------------------------------------------------------ inputs
@pytest.mark.parametrize("bad, match", [
    (np.zeros((0, 5, 3), np.uint8), "no pixels"),
    (np.zeros((5, 0), np.uint8), "no pixels"),
    (b"", "empty"),
    (b"this is not an image at all", "not an image"),
    (_png_header_only(100_000, 100_000), "too large"),
    (_png_header_only(9000, 9000), "too large"),          # 81 MP: over MAX_PIXELS
    (np.zeros((4, 4, 2), np.uint8), "shape"),
    (np.zeros((4, 4, 3), np.int64), "dtype"),
    (12345, "cannot read"),
], ids=["zero-height", "zero-width", "empty-bytes", "text-bytes", "png-100k-square", "png-81MP",
        "two-channels", "int64", "int"])
def test_invalid_images_are_rejected(G, bad, match):
    with pytest.raises(InversionError, match=match):
        load_image(bad)
    with pytest.raises(InversionError):
        invert_iter(G, bad)  # raised on the call, before any work


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(InversionError, match="no such"):
        load_image(tmp_path / "nope.png")
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:60])
    with pytest.raises(InversionError):
        load_image(tmp_path / "cut.png")


def test_modes_crop_and_resize():
    rgba = np.zeros((20, 30, 4), np.uint8)  # fully transparent: white
    assert (load_image(Image.fromarray(rgba, "RGBA")) == 255).all()
    assert (load_image(rgba) == 255).all()
    gray = Image.fromarray(np.full((10, 10), 77, np.uint8), "L")
    assert load_image(gray).shape == (10, 10, 3) and (load_image(gray) == 77).all()
    i16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert (load_image(i16) == 255).all()
    pal = Image.new("P", (8, 8), 0)
    assert load_image(pal).shape == (8, 8, 3)
    # wide image: the centre square is kept; upsampled from tiny sizes too
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 200
    out = prepare_target(wide, 16)
    assert out.shape == (16, 16, 3) and abs(int(out.mean()) - 200) <= 2
    assert prepare_target(np.full((1, 1, 3), 9, np.uint8), 16).shape == (16, 16, 3)
    big = Image.new("RGB", (1000, 700), (10, 20, 30))
    buf = io.BytesIO()
    big.save(buf, format="JPEG")
    assert np.abs(prepare_target(buf.getvalue(), 16).astype(int) - [10, 20, 30]).max() <= 3


def test_bad_settings(G, known):
    _, img = known
    for kw in ({"steps": -1}, {"w_steps": 99, "steps": 10}, {"lr": 0.0}, {"init": "magic"}, {"bogus": 1}):
        with pytest.raises(InversionError):
            invert_iter(G, img, **kw)


# ------------------------------------------------------------------------------------------ PTI
def test_pti_uses_a_private_copy(G, known):
    _, img = known
    before = {k: v.clone() for k, v in G.state_dict().items()}
    grads_before = [p.requires_grad for p in G.parameters()]
    plain = invert(G, img, steps=20)
    tuned = invert(G, img, steps=20, pti_steps=15, pti_lr=3e-3)
    after = G.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in G.parameters()] == grads_before
    assert all(p.grad is None for p in G.parameters())
    assert tuned.generator is not None and tuned.generator is not G
    assert plain.generator is None
    assert tuned.psnr > plain.psnr
    with torch.no_grad():
        again = to_uint8_image(tuned.generator.synthesis(tuned.w_plus, noise_mode="const"))
    assert np.array_equal(again, tuned.image)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_round_trip(G, known, tmp_path, capsys):
    from draggan_core.model.checkpoints import save_native
    from draggan_core.cli.program import main
    from draggan_core.model.latents import load_latent

    model = tmp_path / "tiny.safetensors"
    save_native(G, model)
    _, img = known
    src = tmp_path / "in.png"
    Image.fromarray(np.kron(img, np.ones((3, 2, 1), np.uint8))).convert("RGBA").save(src)  # 48x32, RGBA
    out, png = tmp_path / "w.npy", tmp_path / "sub" / "recon.png"
    png.parent.mkdir()  # output folders must exist (the CLI checks them before any work)
    rc = main(["invert", "--model", str(model), "--image", str(src), "--out", str(out), "--steps", "30",
               "--png", str(png)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "PSNR" in captured.out and "dB" in captured.out
    w = load_latent(out, G)
    assert w.shape == (1, G.num_ws, G.w_dim)
    assert np.asarray(Image.open(png)).shape == (16, 16, 3)

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    for argv, message in [(["--image", str(bad)], "not an image"),
                          (["--image", str(tmp_path / "missing.png")], "not found"),
                          (["--image", str(src), "--steps", "-3"], "--steps")]:
        rc = main(["invert", "--model", str(model), "--out", str(tmp_path / "x.npy"), *argv])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.npy").exists()
