"""Growing the 64 px default model to 128 px (train_embedded --grow-from): the grown model starts
exactly at the 64 px image up-sampled, trains on 128 px renders, resumes, and sees batches that
depend on the step only."""
import argparse
import json
import re

import pytest
import torch

from draggan_core.model.checkpoints import load_generator, read_native_metadata
from draggan_core.model.ops import upsample2d
from draggan_core.model.paths import CHECKPOINTS_DIR
from draggan_core.model.store import PARTS_64_MODEL_NAME
from training import faces, train_embedded

BASE_64 = CHECKPOINTS_DIR / PARTS_64_MODEL_NAME  # the model the 128 px one grew from
NEW_BLOCK = r"^synthesis\.b128\."


@pytest.fixture(scope="module")
def small():
    return load_generator(BASE_64)


def test_grown_model_starts_at_the_64px_image_upsampled(small):
    torch.manual_seed(0)
    grown = train_embedded.grow_generator(small, 16)
    assert grown.img_resolution == 128 and grown.num_ws == small.num_ws + 2
    # every old parameter and buffer kept under its name; the new ones are NVIDIA's b128 names
    old, new = small.state_dict(), grown.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old)
    assert {k for k in new if k not in old} and all(k.startswith("synthesis.b128.") for k in new if k not in old)
    assert grown.synthesis.b128.conv1.weight.shape[0] == 16
    z = torch.from_numpy(faces.sample_z(4, seed=123))
    with torch.no_grad():
        for psi in (1.0, 0.7):
            expected = upsample2d(small(z, truncation_psi=psi), grown.synthesis.b128.resample_filter)
            image = grown(z, truncation_psi=psi)
            assert image.shape == (4, 3, 128, 128)
            assert torch.equal(image, expected), (image - expected).abs().max()
    # not a trivial equality: the new block computes real features, only its ToRGB is zero
    ws = grown.mapping(z)
    _, features = grown.synthesis(ws, feature_res=128)
    assert features.abs().mean() > 1e-3


def test_batches_are_a_pure_function_of_the_step():
    stage = argparse.Namespace(batch=3, part_scale="1,3,8,2", resolution=128)
    first = train_embedded.BatchStream(5, lambda step: stage)
    skipped = [first.get() for _ in range(3)]  # steps 5, 6, 7
    again = train_embedded.BatchStream(7, lambda step: stage).get()
    z = faces.sample_z(3, seed=7)
    real, weight = train_embedded.render_batch(z, (1, 3, 8, 2), resolution=128)
    for a, b in zip(skipped[2], again):
        assert (a == b).all()
    assert (again[0] == z).all() and torch.equal(again[1], real) and torch.equal(again[2], weight)
    assert real.shape == (3, 3, 128, 128) and weight.shape == (3, 1, 128, 128)
    assert not torch.equal(skipped[0][1], skipped[1][1])


def _grow_run(out, steps, schedule, extra=()):
    args = ["--out", str(out), "--grow-from", str(BASE_64), "--resolution", "128",
            "--max-steps", str(steps), "--batch", "2", "--eval-every", "1000", "--threads", "1",
            "--schedule", str(schedule), *extra]
    assert train_embedded.main(args) == 0
    return torch.load(out / "last.pt", weights_only=True)


def test_grown_training_trains_the_new_block_first_and_resumes(tmp_path, small):
    sched = tmp_path / "s.json"
    sched.write_text(json.dumps({"stages": [
        {"until_step": 2, "lr": 2e-3, "part_scale": "1,3,8,2", "part_l2": 8.0, "train_only": NEW_BLOCK},
        {"until_step": 99, "lr": 5e-4, "part_scale": "1,3,8,2", "part_l2": 8.0}]}))
    after_new_block = _grow_run(tmp_path / "a", 2, sched)
    old = small.state_dict()
    changed = {k for k, v in after_new_block["G"].items() if k in old and not torch.equal(v, old[k].float())}
    assert not changed, changed  # the 64 px network is untouched while the new block trains
    assert not torch.equal(after_new_block["G"]["synthesis.b128.torgb.weight"],
                           torch.zeros_like(after_new_block["G"]["synthesis.b128.torgb.weight"]))
    start = json.loads((tmp_path / "a" / "log.jsonl").read_text().splitlines()[0])
    assert start["step"] == 0 and start["grown_from"] == BASE_64.name and start["psnr"] > 20

    resumed = _grow_run(tmp_path / "a", 4, sched, ["--export", str(tmp_path / "m.safetensors")])
    whole = _grow_run(tmp_path / "b", 4, sched)
    assert resumed["step"] == whole["step"] == 4 and resumed["images"] == 8
    for k, v in whole["G_ema"].items():
        assert torch.equal(v, resumed["G_ema"][k]), k
    for k, v in whole["opt"]["state"].items():
        assert torch.equal(v["exp_avg"], resumed["opt"]["state"][k]["exp_avg"]), k
    # the second stage trains everything: the mapping and the 64 px blocks moved too
    assert not torch.equal(whole["G"]["mapping.fc0.weight"], old["mapping.fc0.weight"].float())
    assert not torch.equal(whole["G"]["synthesis.b16.conv1.weight"], old["synthesis.b16.conv1.weight"].float())

    # the snapshot is a 128 px model whose metadata counts the 64 px model's training too
    G = load_generator(tmp_path / "m.safetensors")
    meta, small_meta = read_native_metadata(tmp_path / "m.safetensors"), read_native_metadata(BASE_64)
    assert G.img_resolution == 128 and G.cfg.channels[128] == 16
    assert int(meta["training_steps"]) == int(small_meta["training_steps"]) + 4

    # the state knows its architecture: resuming it at the wrong resolution is refused
    with pytest.raises(SystemExit):
        train_embedded.main(["--out", str(tmp_path / "a"), "--max-steps", "5", "--threads", "1"])


@pytest.mark.parametrize("name", ["grow128_schedule.json", "grow128_shirt_schedule.json"])
def test_committed_grow_schedule_is_consistent(name):
    from pathlib import Path
    folder = Path(train_embedded.__file__).parent
    stages = json.loads((folder / name).read_text())["stages"]
    ends = [s["until_step"] for s in stages]
    assert ends == sorted(ends) and len(set(ends)) == len(ends)
    assert stages[0]["train_only"] == NEW_BLOCK and all("train_only" not in s for s in stages[1:])
    assert stages[1]["lr"] < stages[0]["lr"]  # everything trains at a lower lr than the new block did
    # the shipped file's schedule replays the first plan to where that run was stopped (step 19,979)
    first = json.loads((folder / "grow128_schedule.json").read_text())["stages"]

    def settings(stages, step):
        args = argparse.Namespace(lr=1.0, decay_start=None, decay_end=None, part_scale="1,1,1,1", part_l2=0.0,
                                  image_l2=0.0, train_only=None, schedule_stages=stages)
        st = train_embedded.stage_for(step, args)
        return train_embedded.learning_rate(step, st), st.part_scale, st.part_l2, st.image_l2, st.train_only
    assert all(settings(stages, k) == settings(first, k) for k in range(0, 19_979, 97))
    grown = train_embedded.grow_generator(load_generator(BASE_64))
    names = [n for n, _ in grown.named_parameters()]
    assert {n for n in names if re.search(NEW_BLOCK, n)} == {n for n in names if n.startswith("synthesis.b128.")}


def test_model_metrics_at_128px_use_the_protocol_scaled(small):
    """The model-card metrics of a 128 px model: PSNR against 128 px renders, pixel radii doubled,
    and a smaller baseline compared through its up-sampled image (so the grown model at its start
    scores exactly what the 64 px model up-sampled does)."""
    from draggan_core.model.landmark_net import LandmarkDetector
    from training import model_metrics
    torch.manual_seed(0)
    grown = train_embedded.grow_generator(small).eval().requires_grad_(False)
    m = model_metrics.compute_metrics(grown, LandmarkDetector.load(), n=6, baseline_G=small, drag_edits=1,
                                      model_defaults=json.loads(train_embedded.GROW128_DRAG_DEFAULTS_FILE.read_text()),
                                      log=lambda s: None)
    assert m["resolution"] == 128 and m["drag"]["success_px"] == 4.0
    assert m["psnr_db"] == pytest.approx(m["baseline_psnr_db"], abs=1e-4) and 20 < m["psnr_db"] < 40
    assert m["landmark_px_detector_on_renders"] < 1.0  # 128 px renders, seen down-sampled by the 64 px detector


def test_compact_state_resumes_and_a_128px_state_never_replaces_the_default(tmp_path, monkeypatch):
    from training import finalize_model
    sched = tmp_path / "s.json"
    sched.write_text(json.dumps({"stages": [{"until_step": 1, "lr": 2e-3, "train_only": NEW_BLOCK},
                                            {"until_step": 99, "lr": 5e-4}]}))
    state = _grow_run(tmp_path / "a", 2, sched)
    compact = tmp_path / "compact.pt"
    finalize_model.main(["--state", str(tmp_path / "a" / "last.pt"), "--compact-state", str(compact)])
    small_state = torch.load(compact, weights_only=True)
    assert small_state["step"] == 2 and small_state["G"]["synthesis.b128.conv1.weight"].dtype == torch.float16
    assert compact.stat().st_size < 0.6 * (tmp_path / "a" / "last.pt").stat().st_size
    resumed = _grow_run(tmp_path / "b", 3, sched, ["--resume-state", str(compact)])
    assert resumed["step"] == 3 and resumed["base"] == state["base"]

    # without --out, a 128 px state goes to its own file with the 128 px drag defaults
    monkeypatch.setattr(finalize_model, "MODEL_128_PATH", tmp_path / "m128.safetensors")
    finalize_model.main(["--state", str(tmp_path / "b" / "last.pt")])
    meta = read_native_metadata(tmp_path / "m128.safetensors")
    assert json.loads(meta["drag_defaults"]) == json.loads(train_embedded.GROW128_DRAG_DEFAULTS_FILE.read_text())
    assert load_generator(tmp_path / "m128.safetensors").img_resolution == 128
