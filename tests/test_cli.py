"""`python -m draggan_core` commands on the official fixture."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from draggan_core.cli import program as cli
from draggan_core.model.store import DEFAULT_MODEL_NAME
from official_pickle import FIXTURES, tiny64_pickle

REPO = Path(__file__).resolve().parents[1]
PKL = tiny64_pickle()  # an official-format training snapshot, written at test time
SEED0 = FIXTURES / "tiny64_seed0.npz"


@pytest.fixture(scope="module")
def ref():
    with np.load(SEED0) as d:
        return {k: d[k] for k in d.files}


def run(*args) -> int:
    return cli.main([str(a) for a in args])


def test_render_seed_matches_official(tmp_path, ref):
    out, raw = tmp_path / "seed0.png", tmp_path / "seed0.npy"
    assert run("render", "--model", PKL, "--seed", 0, "--out", out, "--raw", raw) == 0
    arr = np.load(raw)
    assert arr.shape == (3, 64, 64) and arr.dtype == np.float32
    assert np.abs(arr - ref["image_f32"][0]).max() < 1e-4
    assert arr.min() < -1.0  # unclamped, as the fixture (about -1.6 .. 1.0)
    png = np.asarray(Image.open(out))
    assert png.shape == (64, 64, 3)
    diff = np.abs(png.astype(int) - ref["image_uint8"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3


def test_render_latent_matches_official(tmp_path, ref):
    w = tmp_path / "w.npy"
    np.save(w, ref["w_plus"])
    raw = tmp_path / "raw.npy"
    assert run("render", "--model", PKL, "--latent", w, "--out", tmp_path / "x.png", "--raw", raw) == 0
    assert np.abs(np.load(raw) - ref["image_f32"][0]).max() < 1e-4
    # one W vector (w_dim,) broadcast to all layers gives the same image (rows are equal here)
    np.save(w, ref["w_plus"][0, 0])
    raw2 = tmp_path / "raw2.npy"
    assert run("render", "--model", PKL, "--latent", w, "--out", tmp_path / "y.png", "--raw", raw2) == 0
    assert np.abs(np.load(raw2) - np.load(raw)).max() < 1e-6


def test_save_latent_round_trip(tmp_path, ref):
    w = tmp_path / "sub" / "w.npy"
    w.parent.mkdir()  # output folders must exist (checked before any work)
    raw_a, raw_b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert run("render", "--model", PKL, "--seed", 0, "--psi", 0.7, "--out", tmp_path / "a.png", "--raw", raw_a,
               "--save-latent", w) == 0
    saved = np.load(w)
    assert saved.shape == (1, 10, 64) and saved.dtype == np.float32
    assert np.abs(saved - ref["w_plus"]).max() < 1e-5
    assert run("render", "--model", PKL, "--latent", w, "--out", tmp_path / "b.png", "--raw", raw_b) == 0
    assert np.array_equal(np.load(raw_a), np.load(raw_b))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_render_options(tmp_path):
    outs = {}
    for mode in ("const", "none", "random"):
        raw = tmp_path / f"{mode}.npy"
        assert run("render", "--model", PKL, "--seed", 7, "--noise-mode", mode, "--out", tmp_path / f"{mode}.png",
                   "--raw", raw) == 0
        outs[mode] = np.load(raw)
    assert not np.array_equal(outs["const"], outs["none"])
    raw = tmp_path / "psi1.npy"
    assert run("render", "--model", PKL, "--seed", 7, "--psi", 1.0, "--cutoff", 4, "--out", tmp_path / "p.png",
               "--raw", raw) == 0
    assert not np.array_equal(np.load(raw), outs["const"])


def test_render_errors_exit_2_with_one_line(tmp_path, capsys):
    bad_w = tmp_path / "bad.npy"
    np.save(bad_w, np.zeros((3, 3), np.float32))
    cases = [
        (["render", "--model", tmp_path / "missing.pkl", "--seed", 0, "--out", tmp_path / "o.png"], "not found"),
        (["render", "--model", PKL, "--latent", bad_w, "--out", tmp_path / "o.png"], "(1, 10, 64)"),
        (["render", "--model", PKL, "--latent", tmp_path / "nope.npy", "--out", tmp_path / "o.png"], "no such"),
        (["render", "--model", PKL, "--seed", -5, "--out", tmp_path / "o.png"], "seed"),
        (["render", "--model", PKL, "--seed", 0, "--cutoff", 99, "--out", tmp_path / "o.png"], "cutoff"),
        (["render", "--model", PKL, "--seed", 0, "--class", 1, "--out", tmp_path / "o.png"], "not conditional"),
        (["render", "--model", PKL, "--seed", 0, "--out", tmp_path / "o.unknownext"], "cannot write"),
        (["convert", PKL, PKL], "overwrite"),
        (["download", "no-such-model", "--dir", tmp_path], "unknown model"),
    ]
    for argv, words in cases:
        assert run(*argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1, err
        assert words.lower() in err.lower(), err
        assert "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_usage_errors_exit_2(capsys):
    for argv in (["render", "--seed", "0"], ["render", "--seed", "0", "--latent", "w.npy", "--out", "x.png"],
                 ["nonexistent-command"], []):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
    capsys.readouterr()


def test_default_model_missing_is_explained(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "DEFAULT_MODEL", tmp_path / "checkpoints" / DEFAULT_MODEL_NAME)
    assert run("render", "--seed", 0, "--out", tmp_path / "o.png") == 2
    err = capsys.readouterr().err
    assert DEFAULT_MODEL_NAME in err and "does not exist" in err and "--model" in err
    assert run("info") == 2
    assert "does not exist" in capsys.readouterr().err


def test_default_model_is_used(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "DEFAULT_MODEL", PKL)
    assert run("info") == 0
    assert "num_ws:          10" in capsys.readouterr().out


def test_models_lists_registry(capsys):
    assert run("models") == 0
    out = capsys.readouterr().out
    assert "stylegan2-ffhq-512" in out and "sd-lions-512" in out


def test_commands_are_pluggable(capsys):
    def add_parser(subparsers):
        p = subparsers.add_parser("hello-test")
        p.add_argument("--name", default="x")
        p.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)

    cli.register_command("hello-test")(add_parser)
    try:
        assert cli.main(["hello-test", "--name", "world"]) == 0
        assert capsys.readouterr().out.strip() == "hello world"
    finally:
        cli.COMMANDS.pop("hello-test")


def test_errors_raised_by_commands_become_exit_2(capsys):
    def add_parser(subparsers):
        p = subparsers.add_parser("boom-test")
        p.set_defaults(func=lambda args: (_ for _ in ()).throw(ValueError("bad value\nsecond line")))

    cli.register_command("boom-test")(add_parser)
    try:
        assert cli.main(["boom-test"]) == 2
        assert capsys.readouterr().err == "error: bad value\n"
    finally:
        cli.COMMANDS.pop("boom-test")


def test_subprocess_render_and_error(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = tmp_path / "s.png"
    res = subprocess.run([sys.executable, "-m", "draggan_core", "render", "--model", str(PKL), "--seed", "0",
                          "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert out.is_file()
    res = subprocess.run([sys.executable, "-m", "draggan_core", "render", "--model", str(tmp_path / "none.pkl"),
                          "--seed", "0", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and "Traceback" not in res.stderr


def test_latent_save_load_api(tmp_path):
    from draggan_core.model.latents import load_latent, save_latent
    from draggan_core.model.networks import Generator, GeneratorConfig
    G = Generator(GeneratorConfig(z_dim=8, w_dim=8, img_resolution=8, channel_base=64, channel_max=16,
                                  mapping_layers=2))
    w = torch.randn(1, G.num_ws, 8, dtype=torch.float64)
    path = save_latent(tmp_path / "w.latent", w)  # any suffix is kept as given
    assert path == tmp_path / "w.latent" and path.is_file()
    back = load_latent(path, G)
    assert back.dtype == torch.float32 and torch.equal(back, w.float())
    save_latent(tmp_path / "w2.npy", w[0])
    assert np.load(tmp_path / "w2.npy").shape == (1, G.num_ws, 8)
