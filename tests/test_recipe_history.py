"""Recipes that replay on their own: the mask is embedded in the JSON (a masked edit replays from the
recipe file alone, and older recipes that name a mask file still replay), and `history` holds the
runs of an edit made in steps, as the web UI makes it (drag, add a point and drag again from the
result, Stop, a mask applied again, new points), which `drag --recipe` replays to the same latent.
Runs on the bundled default model."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hostile
from draggan_core.cli import program as cli
from draggan_core.edit.recipe import MASK_URI_PREFIX, EditRecorder, MaskError, Recipe, Run, embed_mask, read_mask
from draggan_core.edit.session import DragSession
from draggan_core.edit.settings import DragConfig
from draggan_core.model import checkpoints
from draggan_core.model.latents import seed_to_w
from draggan_core.model.store import default_model_path, drag_defaults_of

MODEL = default_model_path()
RES = json.loads(checkpoints.read_native_metadata(MODEL)["config"])["img_resolution"]
S = RES // 64  # coordinates below are written for 64 px and scaled
TOLERANCE = 1e-6  # replays are expected to be bitwise equal; this is the most the brief allows


def run(*args) -> int:
    return cli.main([str(a) for a in args])


def point(x, y) -> tuple[int, int]:
    return x * S, y * S


def drag_flag(hx, hy, tx, ty) -> str:
    return f"{hx * S},{hy * S}:{tx * S},{ty * S}"


@pytest.fixture
def one_thread():
    """Exact comparisons with one torch thread (another thread count may sum in another order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flexible_region() -> np.ndarray:
    """The left five eighths of the image may change, the rest is fixed (so the mask is active)."""
    flexible = np.zeros((RES, RES), bool)
    flexible[:, : RES * 5 // 8] = True
    return flexible


@pytest.fixture(scope="module")
def masked_edit(tmp_path_factory):
    """A masked drag written with --save-recipe: (its folder, its final latent)."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = tmp_path_factory.mktemp("masked")
        Image.fromarray(flexible_region().astype(np.uint8) * 255).save(folder / "mask.png")
        assert run("drag", "--seed", 11, "--drag", drag_flag(20, 30, 24, 33), "--steps", 4,
                   "--mask", folder / "mask.png", "--out", folder / "a.png", "--save-latent", folder / "a.npy",
                   "--save-recipe", folder / "recipe.json") == 0
    finally:
        torch.set_num_threads(torch_threads)
    return folder, np.load(folder / "a.npy")


# ------------------------------------------------------------------ the mask, embedded
def test_masked_recipe_replays_from_the_recipe_file_alone(masked_edit, tmp_path, monkeypatch, one_thread):
    folder, first = masked_edit
    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe["mask"].startswith(MASK_URI_PREFIX)
    assert recipe["w_mode"] == drag_defaults_of(MODEL)["mask"]["w_mode"]  # the settings a masked run resolves to
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(folder / "recipe.json", alone / "recipe.json")
    assert os.listdir(alone) == ["recipe.json"]
    monkeypatch.chdir(alone)
    assert run("drag", "--recipe", "recipe.json", "--out", "b.png", "--save-latent", "b.npy",
               "--save-recipe", "again.json") == 0
    assert np.abs(np.load("b.npy") - first).max() <= TOLERANCE
    assert json.loads(Path("again.json").read_text()) == recipe  # replaying records the same edit


def test_old_recipe_naming_a_mask_file_still_replays(masked_edit, tmp_path, monkeypatch, one_thread):
    folder, first = masked_edit
    old = json.loads((folder / "recipe.json").read_text())
    old["mask"] = "masks/flexible.png"  # as recipes were written before: relative to the recipe's folder
    (tmp_path / "old" / "masks").mkdir(parents=True)
    shutil.copy(folder / "mask.png", tmp_path / "old" / "masks" / "flexible.png")
    (tmp_path / "old" / "recipe.json").write_text(json.dumps(old))
    monkeypatch.chdir(tmp_path)
    assert run("drag", "--recipe", "old/recipe.json", "--out", "c.png", "--save-latent", "c.npy") == 0
    assert np.abs(np.load("c.npy") - first).max() <= TOLERANCE


def test_old_recipe_with_its_mask_file_missing_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"seed": 1, "drags": [[1, 2, 3, 4]], "mask": "mask.png"}))
    assert run("drag", "--recipe", recipe, "--out", tmp_path / "o.png") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(tmp_path / "mask.png") in err[0], err


@pytest.mark.parametrize("mode", hostile.MASK_IMAGE_MODES)
def test_an_embedded_mask_reads_back_exactly_like_its_file(tmp_path, mode):
    path = tmp_path / "mask.png"
    path.write_bytes(hostile.image_bytes(mode))
    embedded = embed_mask(path)
    assert embedded.startswith(MASK_URI_PREFIX) and embed_mask(embedded) == embedded
    original, replayed = read_mask(path), read_mask(embedded)
    assert replayed.dtype == np.float32 and np.array_equal(original, replayed)


def test_arrays_embed_as_masks():
    flexible = flexible_region()
    assert np.array_equal(read_mask(embed_mask(flexible)), flexible.astype(np.float32))
    assert np.array_equal(read_mask(embed_mask(flexible.astype(np.float32))), flexible.astype(np.float32))
    with pytest.raises(MaskError):
        embed_mask(np.zeros((2, 2, 2)))


@pytest.mark.parametrize("payload,words", [("!!not base64!!", "not valid base64"),
                                           ("aGVsbG8=", "not a readable image")])
def test_a_broken_embedded_mask_is_one_line(tmp_path, capsys, payload, words):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"seed": 1, "drags": [[1, 2, 3, 4]], "mask": MASK_URI_PREFIX + payload}))
    assert run("drag", "--recipe", recipe, "--out", tmp_path / "o.png") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "embedded mask" in err[0] and words in err[0], err


# ------------------------------------------------------------------ history: an edit in several runs
def test_runs_made_like_the_web_ui_replay_to_the_same_latent(tmp_path, monkeypatch, one_thread):
    G = checkpoints.load_generator(MODEL)
    session = DragSession(G, seed_to_w(G, 5, psi=0.7), model_defaults=drag_defaults_of(MODEL))
    recorder = EditRecorder(model=MODEL.name, seed=5, psi=0.7)

    def press_start(max_steps: int, stop_after: int | None = None):
        """What the web UI's Start does (settings left to the model), and its Stop after some steps."""
        session.config = DragConfig(max_steps=max_steps, display_every=0)
        first = session.step_count
        for _ in session.run(max_steps=max_steps):
            if stop_after is not None and session.step_count - first >= stop_after:
                break
        recorder.record_run(session, stopped_after=None if stop_after is None else session.step_count - first)

    mask = flexible_region().astype(np.float32)
    session.add_pair(point(20, 30), point(24, 33))
    press_start(3)                                       # 1: one pair
    session.add_pair(point(28, 40), point(25, 44))
    session.set_mask(mask)
    press_start(5, stop_after=2)                         # 2: a second pair and a mask; Stop after 2 steps
    session.set_mask(mask)
    press_start(2)                                       # 3: the same mask applied again
    session.clear_pairs()
    session.add_pair(point(30, 20), point(30, 17))
    press_start(2)                                       # 4: new points only
    final = session.latent.numpy()

    (tmp_path / "edit").mkdir()
    saved = recorder.recipe().save(tmp_path / "edit" / "recipe.json")
    data = json.loads(saved.read_text())
    runs = data["history"]
    assert [r["steps"] for r in runs] == [3, 2, 2, 2]
    assert [r.get("kept_pairs", 0) for r in runs] == [0, 1, 2, 0]
    assert [r.get("stopped", False) for r in runs] == [False, True, False, False]
    assert [r.get("mask_set_again", False) for r in runs] == [False, False, True, False]
    assert "mask" not in runs[0] and runs[1]["mask"] == runs[2]["mask"] == runs[3]["mask"]
    assert runs[1]["mask"].startswith(MASK_URI_PREFIX)
    assert data["seed"] == 5 and "drags" not in data

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    # the same thread count as the runs above: another sums in another order, and a tracked handle's
    # sub-pixel choice can then differ
    monkeypatch.setenv("DRAGGAN_TORCH_THREADS", "1")
    assert run("drag", "--recipe", saved, "--out", "r.png", "--save-latent", "r.npy", "--save-recipe", "again.json",
               "--log", "log.json") == 0
    replay = np.load("r.npy")
    assert not np.array_equal(replay, seed_to_w(G, 5, psi=0.7).numpy())  # the runs did change the latent
    assert np.abs(replay - final).max() <= TOLERANCE
    assert json.loads(Path("again.json").read_text())["history"] == runs  # replaying records the same runs
    log = json.loads(Path("log.json").read_text())
    assert log["steps"] == 9 and {entry["run"] for entry in log["history"]} == {1, 2, 3, 4}


def test_one_run_is_the_flat_form_or_a_one_element_history():
    flat = {"seed": 3, "psi": 0.5, "drags": [[1, 2, 3, 4]], "steps": 7, "lr": 0.01}
    nested = {"seed": 3, "psi": 0.5, "history": [{"drags": [[1, 2, 3, 4]], "steps": 7, "lr": 0.01}]}
    assert Recipe.from_dict(flat) == Recipe.from_dict(nested)
    recipe = Recipe.from_dict(nested)
    assert recipe.drags == [(1.0, 2.0, 3.0, 4.0)] and recipe.steps == 7 and recipe.settings == {"lr": 0.01}
    assert json.loads(recipe.to_json()) == flat  # one run is written in the flat form, as before


def test_the_web_ui_constructor_still_makes_a_one_run_recipe():
    recipe = Recipe(drags=[(1, 2, 3, 4)], seed=4, psi=0.7, model="m.safetensors", mask="mask.png", steps=12,
                    settings={"lr": 0.01})
    assert json.loads(recipe.to_json()) == {"model": "m.safetensors", "seed": 4, "psi": 0.7, "drags": [[1, 2, 3, 4]],
                                            "steps": 12, "lr": 0.01, "mask": "mask.png"}
    two = Recipe(seed=4, history=[Run(drags=[(1, 2, 3, 4)]), Run(drags=[(5, 6, 7, 8)])])
    with pytest.raises(ValueError, match="2 runs"):
        two.drags


@pytest.mark.parametrize("data,words", [
    ({"seed": 1, "drags": [[1, 2, 3, 4]], "history": [{"drags": [[1, 2, 3, 4]]}]}, "belong in its runs"),
    ({"seed": 1, "history": []}, "list of 1-"),
    ({"seed": 1, "history": [{"drags": [[1, 2, 3, 4]], "kept_pairs": 1}]}, "need a run before"),
    ({"seed": 1, "history": [{"drags": [[1, 2, 3, 4]]}, {"drags": [[1, 2, 3, 5]], "kept_pairs": 1}]},
     "previous run's first ones"),
    ({"seed": 1, "history": [{"drags": [[1, 2, 3, 4]]}, {"drags": [[1, 2, 3, 4]], "stopped": "yes"}]},
     "true or false"),
    ({"seed": 1, "history": [{"drags": [[1, 2, 3, 4]], "colour": 3}]}, "unknown keys"),
    ({"seed": 1, "drags": [[1, 2, 3, 4]], "mask": 3}, "'mask' must be"),
])
def test_bad_histories_are_refused_in_one_line(data, words):
    with pytest.raises(ValueError) as info:
        Recipe.from_dict(data)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_flags_that_would_change_one_of_several_runs_are_refused(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the command loaded a model before refusing its arguments")
    monkeypatch.setattr(checkpoints, "load_generator", refuse)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"seed": 1, "history": [{"drags": [[1, 2, 3, 4]]}, {"drags": [[5, 6, 7, 8]]}]}))
    assert run("drag", "--recipe", recipe, "--drag", "1,1:2,2", "--lr", 0.01, "--out", tmp_path / "o.png") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 runs" in err[0] and "--drag, --lr" in err[0], err


def test_the_recorder_starts_over_and_needs_a_run():
    recorder = EditRecorder(model="m.safetensors", seed=2)
    with pytest.raises(ValueError, match="no run recorded"):
        recorder.recipe()
    recorder.runs.append(Run(drags=[(1, 2, 3, 4)], steps=3))
    recorder.start_over(seed=None, latent="initial_latent.npy")
    assert recorder.runs == [] and recorder.latent == "initial_latent.npy"
    with pytest.raises(TypeError):
        recorder.start_over(colour=1)
