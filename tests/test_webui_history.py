"""The editor's state without a server: a new image clears points and mask (Undo clear swaps them
back), runs are history steps that undo and redo exactly, the recipe replays the history, the
download files, the examples file, and who may download models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ui_model_path
from draggan_core.edit.recipe import Recipe, read_mask, replay_runs
from draggan_core.edit.session import DragSession
from draggan_core.model.latents import load_latent
from draggan_core.model.store import ModelStore

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(autouse=True)
def one_thread():
    """Exact comparisons: one torch thread (reduction order), as the app does on a shared box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def st():
    from webui.editor.state import EditorState
    s = EditorState.create(ui_model_path(), seed=3)
    yield s
    s.cleanup()


def band(y0=100, y1=160):
    """A painted layer (editor pixels, 256 px): a horizontal band = model rows y0/4 .. y1/4."""
    a = np.zeros((256, 256), np.uint8)
    a[y0:y1, 20:236] = 255
    return a


def run(st, steps, stop_after=None):
    """A run as Start does it; stop_after: updates to take before pressing Stop."""
    n = st.configure(max_steps=steps, stop_distance=0.1)
    updates = st.run_stream(n)
    if stop_after is None:
        return list(updates)
    out = [next(updates) for _ in range(stop_after)]
    st.stop_requested = True
    out += list(updates)
    st.stop_view()
    return out


def test_a_new_image_clears_points_and_mask_and_undo_clear_swaps_them_back(st):
    st.add_pair(20, 40, 26, 40)
    st.click(10, 12)  # a pending handle
    st.set_mask_from_layer(band())
    mask = st.mask_array().copy()
    st.set_seed(4)
    assert st.session.pairs == [] and st.pending is None and st.mask_array() is None
    assert st.cleared_note() == " - 1 point pair, a handle and the mask cleared (↶ Undo clear brings them back)"
    st.add_pair(1, 1, 2, 2)  # new work on the new image
    assert st.restore_cleared() == "1 point pair, a handle and the mask"
    assert [(p.origin, p.target) for p in st.session.pairs] == [((20, 40), (26, 40))]
    assert st.pending == (10, 12) and np.array_equal(st.mask_array(), mask)
    assert st.cleared.describe() == "1 point pair"  # what was there instead: a second press swaps back
    st.restore_cleared()
    assert [(p.origin, p.target) for p in st.session.pairs] == [((1, 1), (2, 2))] and st.mask_array() is None
    st.clear_points()
    st.set_seed(5)  # nothing to clear: the earlier cleared points stay available
    assert st.cleared_note() == "" and st.cleared.describe() == "1 point pair, a handle and the mask"


def test_runs_undo_and_redo_exactly_and_a_run_again_after_undo_is_the_same_run(st):
    st.add_pair(20, 40, 26, 40)
    start = st.image.copy()
    run(st, 8)
    after_a = st.image.copy()
    st.add_pair(40, 30, 40, 34)
    run(st, 6)
    latent_b, image_b, step_b = st.session.latent.clone(), st.image.copy(), st.session.step_count
    assert [h.caption(i + 1) for i, h in enumerate(st.history)] == ["run 1: 8", "run 2: 6"] and st.cursor == 2
    st.undo_run()  # before run 2: run 1's image, run 2's points
    assert np.array_equal(st.image, after_a) and len(st.session.pairs) == 2 and st.session.step_count == 8
    run(st, 6)  # run 2 again: the optimiser and tracked handles were restored, so it is the same run
    assert torch.equal(st.session.latent, latent_b) and np.array_equal(st.image, image_b)
    assert len(st.history) == 2 and st.session.step_count == step_b  # the redo branch was replaced
    st.goto(0)
    assert np.array_equal(st.image, start) and st.cursor == 0
    assert [(p.origin, p.handle) for p in st.session.pairs] == [((20, 40), (20, 40))]
    st.redo_run()
    st.redo_run()
    assert torch.equal(st.session.latent, latent_b) and st.cursor == 2
    with pytest.raises(Exception, match="no run to redo"):
        st.redo_run()
    assert st.cleared_note() == ""  # nothing of the user's was replaced
    st.add_pair(5, 5, 8, 8)  # new points after the last run, then Undo run: Undo clear keeps them
    st.undo_run()
    assert "3 point pairs cleared" in st.cleared_note() and len(st.session.pairs) == 2
    st.redo_run()
    assert st.cleared_note() == ""
    assert st.restore_cleared() == "3 point pairs" and len(st.session.pairs) == 3
    items = st.history_items()
    assert [c for _, c in items] == ["start", "run 1: 8", "▶ run 2: 6"] and items[0][0].shape == (96, 96, 3)


def test_the_recipe_replays_the_whole_history(st, tmp_path):
    """Run, Stop, resume, a mask and another pair, Undo and a different run: the recipe's replay in
    a fresh session ends on the editor's latent."""
    st.add_pair(20, 40, 27, 44)
    run(st, 30, stop_after=2)
    assert st.history[-1].outcome == "stopped"
    run(st, 5)
    st.set_mask_from_layer(band(80, 200))
    st.add_pair(30, 30, 30, 34)
    run(st, 6)
    st.undo_run()
    st.clear_points()
    st.add_pair(44, 40, 47, 40)
    run(st, 7)
    recipe = Recipe.from_dict(json.loads(st.recipe_json()))
    assert recipe.seed == 3 and recipe.model == ui_model_path().name and len(recipe.history) == 3
    assert recipe.history[0].stopped and recipe.history[-1].drags == [(44.0, 40.0, 47.0, 40.0)]
    assert recipe.history[-1].mask is not None and recipe.history[0].mask is None
    model = ModelStore().get(ui_model_path())
    from draggan_core.model.latents import seed_to_w
    session = DragSession(model.G, seed_to_w(model.G, recipe.seed, psi=recipe.psi), model_defaults=model.drag_defaults)
    for _ in replay_runs(session, recipe.history):
        pass
    assert session.step_count == st.session.step_count
    assert torch.allclose(session.latent, st.session.latent.to(session.latent.device), atol=1e-5)
    # a mask survives the round trip as painted (model pixels)
    assert np.array_equal(read_mask(recipe.history[-1].mask) > 0.5, st.mask_array())


def test_download_files(st, tmp_path):
    from PIL import Image
    files = st.download_files(scale=2)
    assert files["gif"] is None and files["recipe"] is None  # no run yet
    assert files["png"].name == "draggan-seed3-x2.png" and Image.open(files["png"]).size == (128, 128)
    assert st.download_files(scale=2)["png"] == files["png"]  # unchanged: not written again
    st.add_pair(20, 40, 26, 40)
    run(st, 5)
    files = st.download_files(scale=8, pixels=True)
    big = np.asarray(Image.open(files["png"]))
    assert files["png"].name == "draggan-seed3-run1-x8.png" and big.shape == (512, 512, 3)
    assert np.array_equal(big[::8, ::8], st.image)  # nearest: every model pixel an 8x8 square
    assert torch.equal(load_latent(str(files["latent"]), st.G).cpu(), st.session.latent.cpu())
    assert Image.open(files["gif"]).n_frames >= 2
    assert Recipe.from_dict(json.loads(files["recipe"].read_text())).drags == [(20.0, 40.0, 26.0, 40.0)]
    smooth = np.asarray(Image.open(st.download_files(scale=8, pixels=False)["png"]))
    assert not np.array_equal(smooth, big)  # Lanczos


def test_an_uploaded_latent_recipe_is_one_zip_with_its_latent(st, tmp_path):
    import zipfile
    w = tmp_path / "start.npy"
    st.save_current_latent(w)
    st.upload_latent(str(w), name="start.npy")
    st.add_pair(20, 40, 26, 40)
    run(st, 3)
    path = st.download_files()["recipe"]
    assert path.suffix == ".zip"
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == ["initial_latent.npy", "recipe.json"]
        assert json.loads(z.read("recipe.json"))["latent"] == "initial_latent.npy"


def test_the_examples_file(tmp_path):
    from draggan_core.model.store import list_local_models
    from webui.services import EXAMPLES_FILE, load_examples
    examples = load_examples()
    assert examples and examples[0]["seed"] == 3 and examples[0]["pairs"][:2] == [(55, 95, 50, 90), (87, 91, 92, 86)]
    local = {p.name for p in list_local_models()}
    for ex in examples:  # every example names a shipped model and fits its image
        assert ex["model"] in local, ex
        res = 128 if "128" in ex["model"] else 64
        assert all(0 <= v < res for pair in ex["pairs"] for v in pair), ex
    bad = tmp_path / "examples.json"
    bad.write_text(json.dumps({"examples": [{"name": "no seed", "pairs": [[1, 2, 3, 4]]},
                                            {"name": "ok", "seed": 1, "pairs": [[1, 2, 3, 4]]}]}))
    assert [e["name"] for e in load_examples(bad)] == ["ok"]  # a bad entry is skipped, not fatal
    bad.write_text("{not json")
    assert load_examples(bad) == []
    assert EXAMPLES_FILE.name == "examples.json"


def test_an_example_sets_model_seed_and_points_in_one_step(st):
    from draggan_core.model.store import default_model_path
    st.add_pair(1, 1, 2, 2)
    st.load_example(3, 0.7, [(55, 95, 50, 90), (87, 91, 92, 86)], default_model_path())
    assert st.resolution == 128 and st.seed == 3
    assert [(p.origin, p.target) for p in st.session.pairs] == [((55, 95), (50, 90)), ((87, 91), (92, 86))]
    assert st.cleared.describe() == "1 point pair"


def test_who_may_download_models(monkeypatch):
    from webui.launcher import parse_args
    from webui.services import downloads_allowed_by_default
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert downloads_allowed_by_default() and not downloads_allowed_by_default(share=True)
    monkeypatch.setenv("SPACE_ID", "someone/draggan")
    assert not downloads_allowed_by_default()
    assert parse_args([]).allow_downloads is None
    assert parse_args(["--share", "--allow-downloads"]).allow_downloads is True
    assert parse_args(["--no-allow-downloads"]).allow_downloads is False


def test_downloads_off_refuse_and_hide(monkeypatch):
    import gradio as gr
    import PIL.Image
    from webui.app import build_demo
    limit = PIL.Image.MAX_IMAGE_PIXELS
    try:
        demo = build_demo(ui_model_path(), allow_downloads=False)
        monkeypatch.setenv("SPACE_ID", "someone/draggan")
        assert build_demo(ui_model_path()).draggan_allow_downloads is False  # a Space: off by default
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = limit
    fn = next(f.fn for f in demo.fns.values() if f.api_name == "download_model")
    with pytest.warns(UserWarning, match="model downloads are turned off"):
        out = fn("test-faces64")
    assert out[0] == gr.skip() and out[1].startswith("⚠")
    registry = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "registry")
    assert registry.choices == []  # nothing to pick either
