"""The command line as a newcomer meets it: installable entry point, outputs checked before any work,
duplicate drags refused, --scale, GIF markers, bench progress, defaults in --help, model sizes,
recipes written by `drag --save-recipe`. Runs on the bundled default model (in the repository)."""
from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageSequence

from draggan_core.cli import program as cli, drag as cli_drag
from draggan_core.model import checkpoints, paths
from draggan_core.model.registry import ModelEntry
from draggan_core.model.store import DEFAULT_MODEL_NAME, default_model_path, drag_defaults_of

REPO = Path(__file__).resolve().parents[1]
MODEL = default_model_path()
RESOLUTION = json.loads(checkpoints.read_native_metadata(MODEL)["config"])["img_resolution"]  # the default model's
S = RESOLUTION // 64  # coordinates below are written for 64 px and scaled


def run(*args) -> int:
    return cli.main([str(a) for a in args])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a command gets as far as loading a generator."""
    def refuse(*args, **kwargs):
        raise AssertionError("the command loaded a model before refusing its arguments")
    monkeypatch.setattr(checkpoints, "load_generator", refuse)


def gif_frames(path: Path) -> tuple[list[np.ndarray], list[int]]:
    with Image.open(path) as im:
        frames = [(np.asarray(f.convert("RGB")).copy(), f.info.get("duration")) for f in ImageSequence.Iterator(im)]
    return [f for f, _ in frames], [d for _, d in frames]


# ------------------------------------------------------------------ installable
def test_console_script_is_the_cli_main():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    target = project["project"]["scripts"]["draggan"]
    module, _, attr = target.partition(":")
    assert getattr(importlib.import_module(module), attr) is cli.main
    # dependencies come from requirements.txt, so the two install routes cannot drift apart
    assert "dependencies" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]


def test_wheel_carries_the_bundled_models_where_paths_looks():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    package = f"draggan_core.{paths.WHEEL_CHECKPOINTS_DIR.name}"
    assert package in setuptools["packages"]
    folder = REPO / setuptools["package-dir"][package]
    assert folder == paths.SOURCE_CHECKPOINTS_DIR and (folder / DEFAULT_MODEL_NAME).is_file()
    patterns = setuptools["package-data"][package]
    for name in (DEFAULT_MODEL_NAME, "landmarks64.safetensors"):
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name
    assert any(fnmatch.fnmatch("registry.json", p) for p in setuptools["package-data"]["draggan_core"])


def test_installed_wheel_folder_wins_over_a_checkout_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "WHEEL_CHECKPOINTS_DIR", tmp_path / "absent")
    assert paths.bundled_checkpoints_dir() == paths.SOURCE_CHECKPOINTS_DIR
    monkeypatch.setattr(paths, "WHEEL_CHECKPOINTS_DIR", tmp_path)
    assert paths.bundled_checkpoints_dir() == tmp_path


def test_program_name_follows_the_console_command(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/draggan"])
    assert cli.build_parser().prog == "draggan"
    monkeypatch.setattr(sys, "argv", ["/somewhere/draggan_core/__main__.py"])
    assert cli.build_parser().prog == "python -m draggan_core"


def test_works_from_another_folder_with_the_default_model(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-m", "draggan_core", "render", "--seed", "1", "--out", "a.png"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "a.png").size == (RESOLUTION, RESOLUTION)


def test_bare_model_name_is_found_in_the_models_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.resolve_model_path(DEFAULT_MODEL_NAME) == MODEL
    with pytest.raises(cli.CliError, match="not found"):
        cli.resolve_model_path("no-such-model.safetensors")
    with pytest.raises(cli.CliError, match="not found"):  # a path with a folder is taken literally
        cli.resolve_model_path(f"elsewhere/{DEFAULT_MODEL_NAME}")


def test_closed_pipe_ends_quietly(capsys):
    def add_parser(subparsers):  # what `draggan models | head -1` does to a command
        p = subparsers.add_parser("pipe-test", help="x")
        p.set_defaults(func=lambda args: (_ for _ in ()).throw(BrokenPipeError(32, "Broken pipe")))

    cli.register_command("pipe-test")(add_parser)
    try:
        assert cli.main(["pipe-test"]) == 1
        assert capsys.readouterr().err == ""
    finally:
        cli.COMMANDS.pop("pipe-test")


# ------------------------------------------------------------------ a. outputs checked first
def _output_cases(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    drag = ["drag", "--seed", 0, "--drag", "20,20:24,24"]
    good = tmp_path / "ok.png"
    return [
        (["render", "--seed", 0, "--out", missing / "a.png"], "--out"),
        (["render", "--seed", 0, "--out", good, "--raw", missing / "r.npy"], "--raw"),
        (["render", "--seed", 0, "--out", good, "--save-latent", missing / "w.npy"], "--save-latent"),
        ([*drag, "--out", missing / "a.png"], "--out"),
        ([*drag, "--out", good, "--gif", missing / "a.gif"], "--gif"),
        ([*drag, "--out", good, "--log", missing / "log.json"], "--log"),
        ([*drag, "--out", good, "--save-latent", missing / "w.npy"], "--save-latent"),
        ([*drag, "--out", good, "--save-recipe", missing / "r.json"], "--save-recipe"),
        (["convert", MODEL, missing / "m.safetensors"], "OUT"),
        (["invert", "--image", REPO / "docs" / "samples.png", "--out", missing / "w.npy"], "--out"),
        (["invert", "--image", REPO / "docs" / "samples.png", "--out", tmp_path / "w.npy",
          "--png", missing / "r.png"], "--png"),
        (["eval", "--pairs", 1, "--out", missing / "e.json"], "--out"),
    ]


def test_missing_output_folder_fails_before_any_work(tmp_path, capsys, no_model_loading):
    for argv, flag in _output_cases(tmp_path):
        assert run(*argv) == 2, argv
        line = one_error_line(capsys)
        assert flag in line and "does not exist" in line, (argv, line)
    assert not any(tmp_path.iterdir())  # nothing written, no folder created


def test_unusable_outputs_are_refused_up_front(tmp_path, capsys, no_model_loading, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    drag = ["drag", "--seed", 0, "--drag", "20,20:24,24"]
    cases = [
        ([*drag, "--out", a_file / "a.png"], "is not a folder"),
        ([*drag, "--out", tmp_path], "is a folder"),
        ([*drag, "--out", tmp_path / "a.unknownext"], "cannot write"),
        ([*drag, "--out", tmp_path / "a.png", "--gif", tmp_path / "a.jpg"], "animation"),
        ([*drag, "--out", tmp_path / "a.png", "--gif", tmp_path / "a.png"], "--out and --gif"),
        ([*drag, "--out", tmp_path / "a.png", "--log", tmp_path / "x.json", "--save-recipe", tmp_path / "x.json"],
         "--save-recipe and --log"),
    ]
    for argv, words in cases:
        assert run(*argv) == 2, argv
        assert words in one_error_line(capsys), argv
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert run(*drag, "--out", locked / "a.png") == 2  # root ignores permission bits, so pretend
    assert "not writable" in one_error_line(capsys)


# ------------------------------------------------------------------ b. duplicate drags
def test_duplicate_drags_are_refused(tmp_path, capsys, no_model_loading):
    out = tmp_path / "o.png"
    cases = [
        (["--drag", "30,40:34,44", "--drag", "30,40:34,44"], "given twice"),
        (["--drag", "30,40:34,44", "--drag", "30.0,40.0001:34,44.0"], "given twice"),  # same point, as stored
        (["--drag", "30,40:34,44", "--drag", "30,40:20,20"], "two targets"),
    ]
    for extra, words in cases:
        assert run("drag", "--seed", 3, *extra, "--out", out) == 2, extra
        line = one_error_line(capsys)
        assert words in line and "30,40" in line, line
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"seed": 3, "drags": [[1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4]]}))
    assert run("drag", "--recipe", recipe, "--out", out) == 2
    assert "1,2:3,4 is given twice" in one_error_line(capsys)
    assert not out.exists()


def test_distinct_drags_with_a_shared_target_are_fine():
    cli_drag.check_distinct_drags([(1, 2, 9, 9), (3, 4, 9, 9), (1, 2.5, 9, 9)])


# ------------------------------------------------------------------ c. --scale
def test_render_scale_enlarges_with_nearest_neighbour(tmp_path):
    assert run("render", "--seed", 5, "--out", tmp_path / "1.png") == 0
    assert run("render", "--seed", 5, "--out", tmp_path / "3.png", "--scale", 3) == 0
    small, big = np.asarray(Image.open(tmp_path / "1.png")), np.asarray(Image.open(tmp_path / "3.png"))
    assert small.shape == (RESOLUTION, RESOLUTION, 3) and big.shape == (3 * RESOLUTION, 3 * RESOLUTION, 3)
    assert np.array_equal(big, small.repeat(3, axis=0).repeat(3, axis=1))


def test_scale_is_validated(tmp_path, capsys):
    for bad in ("0", "-2", "1.5", "x"):
        with pytest.raises(SystemExit) as e:
            cli.main(["render", "--seed", "0", "--out", str(tmp_path / "a.png"), "--scale", bad])
        assert e.value.code == 2
    capsys.readouterr()
    assert run("render", "--seed", 0, "--out", tmp_path / "a.png", "--scale", 1000) == 2
    assert "--scale 1000" in one_error_line(capsys)
    assert not (tmp_path / "a.png").exists()


def test_help_says_coordinates_are_model_pixels(capsys):
    with pytest.raises(SystemExit):
        cli.main(["drag", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Coordinates are model pixels" in text
    assert "--scale N enlarge the written PNG and GIF N times, nearest neighbour; coordinates stay model pixels" in text


# ------------------------------------------------------------------ d. GIF markers, held last frame
def test_drag_gif_has_markers_and_holds_the_last_frame(tmp_path):
    handle, target = (20 * S, 30 * S), (28 * S, 36 * S)
    common = ["drag", "--seed", 3, "--drag", f"{handle[0]},{handle[1]}:{target[0]},{target[1]}", "--steps", 3, "--stop-distance", 0.01,
              "--out", tmp_path / "out.png", "--scale", 2]
    assert run(*common, "--gif", tmp_path / "m.gif") == 0
    assert run(*common, "--gif", tmp_path / "plain.gif", "--no-gif-markers") == 0
    marked, durations = gif_frames(tmp_path / "m.gif")
    plain, _ = gif_frames(tmp_path / "plain.gif")
    assert len(marked) >= 4  # the start and a frame per step
    assert 2 <= len(plain) <= len(marked)  # the encoder merges consecutive frames that look the same
    assert marked[0].shape == (2 * RESOLUTION, 2 * RESOLUTION, 3)
    assert Image.open(tmp_path / "out.png").size == (2 * RESOLUTION, 2 * RESOLUTION)
    assert durations[-1] > 10 * durations[0]

    def at(frame, point):
        return tuple(int(v) for v in frame[int((point[1] + 0.5) * 2), int((point[0] + 0.5) * 2)])

    assert at(marked[0], handle) == cli_drag.HANDLE_RGB
    for frame in marked:
        assert at(frame, target) == cli_drag.TARGET_RGB
    for frame in plain:
        assert at(frame, handle) != cli_drag.HANDLE_RGB and at(frame, target) != cli_drag.TARGET_RGB
    midway = ((handle[0] + target[0]) // 2, (handle[1] + target[1]) // 2)  # the line between them
    assert at(marked[0], midway) == cli_drag.LINE_RGB
    # the PNG is the edited image, never marked
    assert at(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")), target) != cli_drag.TARGET_RGB


def test_gif_without_scale_is_enlarged_for_viewing(tmp_path):
    assert run("drag", "--seed", 3, "--drag", "20,30:22,30", "--steps", 1, "--out", tmp_path / "o.png",
               "--gif", tmp_path / "a.gif") == 0
    frames, _ = gif_frames(tmp_path / "a.gif")
    assert frames[0].shape[0] == cli_drag.GIF_MIN_SIDE
    assert Image.open(tmp_path / "o.png").size == (RESOLUTION, RESOLUTION)


# ------------------------------------------------------------------ e. bench progress
def test_bench_shows_progress_on_stderr_and_keeps_json_clean(capsys):
    assert run("bench", "--config", "embedded", "--steps", 2, "--json") == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["steps"] == 2 and summary["ours_step_s"] > 0
    for phase in cli_drag_phase_labels():
        assert f"timing {phase}: 2 steps" in captured.err
    assert captured.err.index("loading embedded") < captured.err.index("timing")

    assert run("bench", "--config", "embedded", "--steps", 1) == 0
    captured = capsys.readouterr()
    assert "timing" not in captured.out and "speedup" in captured.out  # results on stdout, progress not
    assert "timing official-style" in captured.err


def cli_drag_phase_labels():
    from draggan_core.cli.bench import PHASE_LABELS
    return PHASE_LABELS.values()


# ------------------------------------------------------------------ i. defaults in --help
def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_of_every_command_shows_its_default():
    commands = _command_parsers()
    assert {"render", "drag", "bench", "eval", "invert", "models", "download", "convert", "info"} <= set(commands)
    for name, parser in commands.items():
        formatter = parser.formatter_class(prog=parser.prog)
        for action in parser._actions:
            if not action.option_strings or action.required or action.help == argparse.SUPPRESS \
                    or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help (so no default shown)"
            text = formatter._get_help_string(action) % {"default": action.default}
            assert "default" in text, f"{name} {action.option_strings[0]}: {text}"


def test_drag_help_shows_numbers_and_the_default_models_values(capsys):
    with pytest.raises(SystemExit):
        cli.main(["drag", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    recommended = drag_defaults_of(MODEL)
    assert f"the model's recommended value; {recommended['lr']} for the default model" in text
    assert f"{recommended['r2']} for the default model" in text
    assert "maximum optimisation steps (default: 300)" in text
    assert "one GIF frame every K steps (default: 1)" in text
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "the median is reported) (default: 20)" in " ".join(capsys.readouterr().out.split())


# ------------------------------------------------------------------ j. models sizes
def test_models_lists_sizes_or_no_size_column(capsys, monkeypatch):
    assert run("models") == 0
    out = capsys.readouterr().out
    local, downloadable = out.split("downloadable")
    default_line = next(line for line in local.splitlines() if line.startswith(DEFAULT_MODEL_NAME))
    assert f"{MODEL.stat().st_size / 1e6:.1f} MB" in default_line and "default" in default_line
    header = downloadable.splitlines()[1].split()
    assert header[:2] == ["name", "res"] and "size" not in header  # the registry verifies no size yet
    assert all(" ? " not in line for line in out.splitlines())

    from draggan_core.model import registry
    entries = [ModelEntry(name="known", url="https://example.org/known.pkl", filename="known.pkl", resolution=256,
                          size_bytes=363_000_000, licence="L"),
               ModelEntry(name="unknown", url="https://example.org/u.pkl", filename="u.pkl", resolution=512,
                          licence="L")]
    monkeypatch.setattr(registry, "list_models", lambda: entries)
    assert run("models") == 0
    rows = capsys.readouterr().out.split("downloadable")[1].splitlines()
    assert rows[1].split()[:3] == ["name", "res", "size"]
    assert "363 MB" in rows[2] and rows[3].split()[2] == "?"


# ------------------------------------------------------------------ drag --save-recipe
def test_saved_recipe_replays_to_the_same_latent(tmp_path, monkeypatch):
    (tmp_path / "edit").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    assert run("render", "--seed", 11, "--out", "start.png", "--save-latent", "start.npy") == 0
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save("mask.png")
    assert run("drag", "--latent", "start.npy", "--drag", "20,30:24,33", "--drag", "40,30:37,33", "--steps", 4,
               "--lr", 0.01, "--mask", "mask.png", "--out", "edit/a.png", "--save-latent", "edit/a.npy",
               "--save-recipe", "edit/recipe.json") == 0
    recipe = json.loads((tmp_path / "edit" / "recipe.json").read_text())
    assert recipe["model"] == DEFAULT_MODEL_NAME  # bundled: by name, found from any folder
    assert recipe["latent"] == "../start.npy"  # relative to the recipe
    assert recipe["mask"].startswith("data:image/png;base64,")  # embedded: the recipe needs no mask.png beside it
    assert recipe["drags"] == [[20, 30, 24, 33], [40, 30, 37, 33]] and recipe["steps"] == 4
    assert recipe["lr"] == 0.01 and "r2" in recipe  # the model's recommendations are spelled out too

    monkeypatch.chdir(tmp_path / "elsewhere")
    assert run("drag", "--recipe", "../edit/recipe.json", "--out", "b.png", "--save-latent", "b.npy") == 0
    first, replay = np.load(tmp_path / "edit" / "a.npy"), np.load(tmp_path / "elsewhere" / "b.npy")
    assert not np.array_equal(first, np.load(tmp_path / "start.npy"))  # the drag did change the latent
    assert np.array_equal(first, replay)
