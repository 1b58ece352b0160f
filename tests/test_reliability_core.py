"""Malformed points, masks and mask images through the Python API, the state layer and the CLI.

Checkpoints and latents are covered by test_hostile_files.py; this file covers the rest of the input
surface: every bad value raises the documented one-line error and leaves the session as it was.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from draggan_core.cli import program as cli
from draggan_core.cli.drag import CliError, load_mask
from draggan_core.edit.session import DragSession
from draggan_core.edit.settings import DragConfig, DragError
from draggan_core.model.networks import Generator, GeneratorConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostile  # noqa: E402
from official_pickle import tiny64_pickle  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PKL = tiny64_pickle()  # an official-format training snapshot, written at test time

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Like the app on a shared 2-core box: oversubscribed OpenMP threads are many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def G():
    torch.manual_seed(0)
    return Generator(GeneratorConfig(z_dim=8, w_dim=8, img_resolution=32, channel_base=64, channel_max=16,
                                     mapping_layers=2))


@pytest.fixture
def session(G):
    s = DragSession(G, torch.randn(1, G.num_ws, G.w_dim, generator=torch.Generator().manual_seed(1)),
                    DragConfig(display_every=0))
    s.add_pair((5, 5), (8, 6))
    return s


def snapshot(s: DragSession) -> dict:
    return {"pairs": [(p.handle, p.target, p.origin) for p in s.pairs], "step": s.step_count,
            "latent": s.latent.clone(), "mask": None if s.mask is None else s.mask.clone()}


def assert_same(a: dict, b: dict):
    assert a["pairs"] == b["pairs"] and a["step"] == b["step"]
    assert torch.equal(a["latent"], b["latent"])
    assert (a["mask"] is None) == (b["mask"] is None)
    if a["mask"] is not None:
        assert torch.equal(a["mask"], b["mask"])


# --------------------------------------------------------------------------------------------------
# points
# --------------------------------------------------------------------------------------------------

def _bad_points(res):
    pts = hostile.malformed_points()
    return pts + [(res, 0), (0, res), (res - 0.49, 0)]


def test_malformed_points_are_refused_and_change_nothing(session):
    before = snapshot(session)
    for p in _bad_points(session.resolution):
        for handle, target in ((p, (3, 3)), ((3, 3), p)):
            with pytest.raises(DragError) as info:
                session.add_pair(handle, target)
            msg = str(info.value)
            assert "\n" not in msg and len(msg) < 200, msg
            assert any(w in msg for w in ("finite", "outside", "two numbers")), msg
    assert_same(before, snapshot(session))


def test_points_on_the_edges_and_numpy_scalars_are_accepted(session):
    r = session.resolution
    session.add_pair((np.float32(0), np.int64(0)), (r - 1, r - 1))
    session.add_pair(np.array([r - 1, 0]), torch.tensor([0.4, r - 0.6]))
    assert [p.origin for p in session.pairs[1:]] == [(0, 0), (r - 1, 0)]
    assert session.pairs[2].target == (0.4, r - 0.6)  # sub-pixel points are kept (to 1/1000 px)


def test_thousands_of_points_hit_the_cap(G, session):
    rng = np.random.RandomState(0)
    accepted, refused = 0, 0
    for hx, hy, tx, ty in rng.randint(0, G.img_resolution, size=(5000, 4)):
        try:
            session.add_pair((hx, hy), (tx, ty))
            accepted += 1
        except DragError as e:
            assert "at most 128" in str(e)
            refused += 1
    assert len(session.pairs) == 128 and accepted == 127 and refused == 5000 - 127
    # a run with the maximum number of pairs still works and stays finite
    results = list(session.run(max_steps=1))
    assert results and torch.isfinite(session.latent).all()


def test_state_layer_points(tmp_path):
    from conftest import ui_model_path
    from webui.editor.state import MAX_POINT_PAIRS, EditorState, UIError

    st = EditorState.create(ui_model_path(), seed=1)
    try:
        st.click(10, 10)
        before = st.debug_info()
        for x, y in [(float("nan"), 1), (1, float("inf")), (-1, 3), (64, 3), (1e308, 2), ("x", 1), (None, 2)]:
            with pytest.raises(UIError) as info:
                st.click(x, y)
            assert len(str(info.value)) < 120, str(info.value)  # 1e308 is not printed with 300 digits
            with pytest.raises(UIError):
                st.add_pair(x, y, 5, 5)
        assert st.debug_info() == {**before, "pending": None}  # add_pair drops the pending click
        for i in range(3000):
            try:
                st.click(i % 64, (i * 7) % 64)
            except UIError as e:
                assert f"at most {MAX_POINT_PAIRS}" in str(e)
        assert len(st.session.pairs) == MAX_POINT_PAIRS
    finally:
        st.cleanup()


# --------------------------------------------------------------------------------------------------
# masks (arrays)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [
    np.full((8, 8), np.nan, np.float32), np.full((32, 32), np.inf), np.zeros((2, 3, 4)), np.zeros((0, 0)),
    np.zeros((5, 0)), np.zeros(16), np.array([[{}]], dtype=object), np.array([["a", "b"]]), "mask", 3.0,
], ids=["nan", "inf", "3d", "empty", "zero-width", "1d", "object", "strings", "str", "scalar"])
def test_bad_masks_are_refused_and_keep_the_previous_mask(session, mask):
    good = np.zeros((32, 32), np.float32)
    good[:, :16] = 1
    session.set_mask(good)
    before = snapshot(session)
    with pytest.raises(DragError, match="mask"):
        session.set_mask(mask)
    assert_same(before, snapshot(session))


def test_odd_but_valid_masks(session):
    session.set_mask(np.zeros((32, 32)))
    assert session.mask is None  # nothing flexible = no mask
    session.set_mask(np.full((7, 3000), 5.0))  # any size, values clamped to [0, 1]
    assert session.mask.shape == (32, 32) and float(session.mask.min()) == 1.0
    big = np.zeros((2048, 2048), bool)
    big[:1024] = True
    session.set_mask(big)
    assert session.mask.shape == (32, 32) and float(session.mask[:16].min()) == 1 and float(session.mask[16:].max()) == 0
    session.set_mask(-np.ones((32, 32)))
    assert session.mask is None
    results = list(session.run(max_steps=2))
    assert results[-1].step == 2


def test_editor_values_with_wrong_shapes(tmp_path):
    from conftest import ui_model_path
    from webui.editor.state import EditorState, UIError, editor_alpha

    st = EditorState.create(ui_model_path(), seed=2)
    try:
        layer = np.zeros((256, 256, 4), np.uint8)
        layer[100:140, 60:200, 3] = 255
        st.set_mask_from_layer(editor_alpha({"background": None, "layers": [layer]}))
        before = st.debug_info()
        bad_values = [
            {"layers": [np.zeros((256, 256, 3), np.uint8) + 255]},   # RGB layer: no alpha
            {"layers": [np.zeros((256, 256), np.uint8) + 255]},      # 2-D layer
            {"layers": [np.zeros((4, 4, 4, 4), np.uint8) + 255]},    # 4-D
            np.zeros((2, 2, 2, 2), np.uint8) + 1,                    # plain 4-D image
        ]
        for value in bad_values:
            with pytest.raises(UIError):
                st.set_mask_from_layer(editor_alpha(value))
            assert st.debug_info() == before
        # a layer of another size than the canvas is resized (a hostile client may send any size)
        st.set_mask_from_layer(editor_alpha({"layers": [np.full((3, 5000, 4), 255, np.uint8)]}))
        assert st.debug_info()["mask_pixels"] == 64 * 64
        st.set_mask_from_layer(editor_alpha({"layers": [None, np.zeros((256, 256, 4), np.uint8)]}))
        assert st.debug_info()["mask_pixels"] == 0  # nothing painted clears the mask
    finally:
        st.cleanup()


# --------------------------------------------------------------------------------------------------
# mask images (CLI --mask)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", hostile.MASK_IMAGE_MODES)
def test_mask_image_modes(tmp_path, mode):
    path = tmp_path / f"mask_{mode.replace(';', '')}.png"
    path.write_bytes(hostile.image_bytes(mode))
    m = load_mask(path)
    assert m.shape == (256, 256) and m.dtype == np.float32 and np.isfinite(m).all()
    assert m[60:200, 100:140].min() > (0 if mode == "I;16" else 0.99)
    assert m[:50].max() == 0


@pytest.mark.parametrize("name,data,words", [
    ("bomb.png", lambda: hostile.png_bomb(9000, 9000), "too large"),
    ("lying.png", hostile.png_lying_header, "too large"),
    ("garbage.png", lambda: hostile.garbage_bytes(3000), "not a readable image"),
    ("truncated.png", hostile.truncated_png, "not a readable image"),
    ("empty.png", lambda: b"", "not a readable image"),
    ("latent.png", lambda: b"\x93NUMPY" + b"\0" * 200, "not a readable image"),
])
def test_bad_mask_images_are_refused(tmp_path, name, data, words):
    path = tmp_path / name
    path.write_bytes(data())
    with pytest.raises(CliError) as info:
        load_mask(path)
    msg = str(info.value)
    assert words in msg and str(path) in msg and "\n" not in msg, msg


def test_cli_drag_with_bad_masks_exits_2_with_one_line(tmp_path, capsys):
    cases = {"bomb.png": hostile.png_bomb(9000, 9000), "garbage.png": hostile.garbage_bytes(3000),
             "truncated.png": hostile.truncated_png()}
    for name, data in cases.items():
        mask = tmp_path / name
        mask.write_bytes(data)
        out = tmp_path / "out.png"
        code = cli.main(["drag", "--model", str(PKL), "--seed", "0", "--drag", "20,20:24,20", "--steps", "1",
                         "--mask", str(mask), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and name in lines[0], err
        assert not out.exists()
    for p in ("nan,3:4,5", "inf,1:2,3", "1,2:3", "1,2:3,4:5,6", "x,1:2,3", "999,1:2,3"):  # malformed --drag
        try:
            code = cli.main(["drag", "--model", str(PKL), "--seed", "0", "--drag", p, "--steps", "1",
                             "--out", str(tmp_path / "o.png")])
        except SystemExit as e:  # argparse usage error
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and "error" in err and "Traceback" not in err, (p, err)
        assert not (tmp_path / "o.png").exists()


def test_cli_drag_tracking_options_reach_the_session(tmp_path):
    import json
    log = tmp_path / "log.json"
    code = cli.main(["drag", "--model", str(PKL), "--seed", "0", "--drag", "20.5,20:24,20.25", "--steps", "2",
                     "--feature-block", "16", "--track-block", "32", "--track-patch", "1", "--subpixel",
                     "--out", str(tmp_path / "o.png"), "--log", str(log)])
    assert code == 0
    rec = json.loads(log.read_text())
    assert rec["targets"][0] == [24, 20.25]
    with pytest.raises(SystemExit):
        cli.main(["drag", "--model", str(PKL), "--seed", "0", "--drag", "1,1:2,2", "--track-patch", "x",
                  "--out", str(tmp_path / "p.png")])
