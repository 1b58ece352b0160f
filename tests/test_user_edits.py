"""The user-edit benchmark (draggan_core/evaluation/user_edits.py) and the engine's own ends: a handle that lost
its feature, no progress, the local term. Mechanics on small inputs; the quality numbers are in
docs/evaluation.md."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from draggan_core.edit.session import DragSession
from draggan_core.edit.settings import DragConfig
from draggan_core.evaluation import user_edits as ue
from draggan_core.model.landmark_net import LandmarkDetector
from draggan_core.model.latents import seed_to_w
from draggan_core.model.store import ModelStore, default_model_path

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return ModelStore().get(default_model_path())


@pytest.fixture(scope="module")
def detector():
    return LandmarkDetector.load()


def test_reach_radius_follows_the_rule_and_scales():
    assert ue.reach_radius(1.0, 128) == 1.0            # at least 1 px
    assert ue.reach_radius(5.0, 128) == pytest.approx(2.0)  # 0.4 |move|
    assert ue.reach_radius(20.0, 128) == 3.0           # at most 3 px
    assert ue.reach_radius(2.5, 64) == pytest.approx(1.0)  # 64 px: a 5 px move at 128 -> 2 px, halved


def test_edits_name_real_landmarks_and_stress_edits_are_far():
    names = LandmarkDetector.load().names
    for edit in ue.EVERYDAY_EDITS + ue.STRESS_EDITS:
        assert all(name in names for name, _, _ in edit.moves), edit.name
        longest = max(math.hypot(dx, dy) for _, dx, dy in edit.moves)
        assert (10 <= longest <= 16) if edit.stress else (2 <= longest <= 9.3), edit.name
    assert len(ue.EVERYDAY_EDITS) >= 16 and len({e.name for e in ue.EVERYDAY_EDITS + ue.STRESS_EDITS}) == \
        len(ue.EVERYDAY_EDITS) + len(ue.STRESS_EDITS)


def test_plan_clicks_pixels_and_refuses_invisible_or_outside_points():
    names = ["a", "b"]
    pts = np.array([[10.4, 20.6], [60.0, 60.0]])
    edit = ue.UserEdit("t", (("a", 3, -2),))
    handles, targets, idx, goal = ue.plan(edit, names, pts, np.array([1.0, 1.0]), 128)
    assert handles == [(10, 21)] and targets == [(13, 19)] and idx == [0]
    np.testing.assert_allclose(goal, [[13.4, 18.6]])
    assert ue.plan(edit, names, pts, np.array([0.2, 1.0]), 128) is None           # not visible
    assert ue.plan(ue.UserEdit("t", (("b", 70, 0),)), names, pts, np.ones(2), 128) is None  # leaves the image
    _, targets64, _, _ = ue.plan(edit, names, pts / 2, np.ones(2), 64)           # moves scale with resolution
    assert targets64 == [(6, 9)]  # (5, 10) + (1.5, -1), rounded half to even


def test_judge_an_unchanged_image_is_intact_and_not_reached(model, detector):
    pool = ue.SeedPool(model.G, detector, "val")
    s, image, points, visible = pool.get(0)
    edit = ue.EVERYDAY_EDITS[0]
    handles, targets, idx, goal = ue.plan(edit, detector.names, points, visible, 128)
    verdict = ue.judge(edit, detector, image, points, visible, image, idx, goal, handles, targets, 128)
    assert verdict["intact"] and not verdict["reached"] and verdict["drift"] < 0.05
    assert verdict["pixel_change"] == 0.0
    # the same judge with the landmarks where the move puts them: reached
    verdict = ue.judge(edit, detector, image, points, visible, image, idx, points[idx], handles, targets, 128)
    assert verdict["reached"]


def test_benchmark_runs_every_edit_through_the_session_loop(model, detector):
    edits = (ue.EVERYDAY_EDITS[0], ue.STRESS_EDITS[0])
    seen = []
    r = ue.evaluate_edits(model.G, detector, edits, seeds_per_edit=1, split="val", model_defaults=model.drag_defaults,
                          config=DragConfig(max_steps=3, display_every=0), progress=lambda i, rec: seen.append(rec))
    assert [x["edit"] for x in seen] == [e.name for e in edits]
    assert r["everyday"]["edits"] == 1 and r["stress"]["edits"] == 1
    for rec in seen:
        assert rec["steps"] <= 3 and rec["success"] == (rec["reached"] and rec["intact"])
        assert rec["false_claim"] == (rec["claimed"] and not rec["reached"])
    json.dumps({k: v for k, v in r.items()})  # the CLI writes it as JSON


# ---------------------------------------------------------------------------------------- the engine's ends
def _session(model, defaults: dict, drags=(((56, 93), (49, 87)), ((84, 98), (91, 92))), seed=0, steps=300):
    md = dict(model.drag_defaults)
    md.update(defaults)
    s = DragSession(model.G, seed_to_w(model.G, seed), DragConfig(max_steps=steps, display_every=0), model_defaults=md)
    for h, t in drags:
        s.add_pair(h, t)
    return s


def test_a_lost_handle_ends_the_run_at_the_best_state(model):
    """A threshold so low that the handles count as lost after a few steps: the run ends by itself,
    says so, does not claim arrival, and the session is back at the best state it saw."""
    s = _session(model, {"lost_match": 0.02, "patience": 0})
    results = list(s.run())
    last = results[-1]
    assert last.end == "lost_handle" and last.done and not last.reached
    assert "stopped following" in last.message and "kept the best result" in last.message
    assert len(results) < 100
    # the best state: the smallest mean tracked distance before any match exceeded the threshold
    ok = [r for r in results[:-1] if max(r.matches) <= 0.02]
    best = min(ok, key=lambda r: sum(r.distances))
    assert s.step_count == best.step - 1 and last.handles == best.handles
    image = s.render()
    assert last.image is not None and np.array_equal(last.image, image)


def test_no_progress_for_patience_steps_ends_the_run(model):
    s = _session(model, {"lost_match": 0.0, "patience": 5, "lr": 1e-9, "lr_multi_point": 1e-9})
    results = list(s.run())
    assert results[-1].end == "stalled" and "no handle came closer for 5 steps" in results[-1].message
    assert len(results) <= 8


def test_official_compat_has_no_automatic_ends(model):
    s = DragSession(model.G, seed_to_w(model.G, 0), DragConfig(max_steps=4, compat="official", display_every=0),
                    model_defaults={"lost_match": 0.0001, "patience": 1})
    s.add_pair((56, 93), (49, 87))
    results = list(s.run())
    assert results[-1].end == "max_steps" and results[-1].message is None and s.step_count == 4


def test_the_local_term_keeps_far_features(model):
    """Ten steps of a smile with and without the local term: the feature map far from the mouth
    changes less with it, the handles still move."""
    def far_change(lam):
        s = _session(model, {"lambda_local": lam, "lost_match": 0.0, "patience": 0}, steps=10)
        _, f0 = model.G.synthesis(s._ws(), feature_res=16, stop_at_feature=True)
        results = list(s.run())
        _, f1 = model.G.synthesis(s._ws(), feature_res=16, stop_at_feature=True)
        return (f1 - f0)[..., :6, :].abs().mean().item(), results[-1].distances  # rows 0-5: above the eyes

    free, d_free = far_change(0.0)
    kept, d_kept = far_change(4.0)
    assert kept < 0.8 * free
    assert max(d_kept) < math.dist((56, 93), (49, 87))


def test_local_reference_is_retaken_for_new_points(model):
    s = _session(model, {"lambda_local": 1.0, "lost_match": 0.0}, drags=(((56, 93), (52, 90)),), steps=5)
    list(s.run())
    first = s._mask_reference.clone()
    list(s.run(max_steps=2))  # resuming keeps it
    assert torch.equal(s._mask_reference, first)
    s.add_pair((84, 98), (88, 95))
    list(s.run(max_steps=1))  # a new point: the image as it is now
    assert not torch.equal(s._mask_reference, first)


def test_cli_runs_both_engines_on_the_same_seeds(capsys):
    from draggan_core.cli.program import main
    rc = main(["eval", "--edits", "stress", "--pairs", "1", "--steps", "2", "--compat", "both", "--split", "val",
               "--json", "--quiet", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    ours, official = json.loads(out[-1])
    assert (ours["compat"], official["compat"]) == ("ours", "official")
    assert ours["stress"]["edits"] == official["stress"]["edits"] == len(ue.STRESS_EDITS)
    assert "user edits (val split, 1 seeds per edit, engine official)" in "\n".join(out)


def test_the_history_strip_has_a_word_for_every_way_a_run_ends():
    from draggan_core.edit.settings import RUN_ENDS
    from webui.editor.running import RUN_END_WORDS
    assert set(RUN_ENDS) <= set(RUN_END_WORDS)


def test_the_web_ui_examples_work_as_advertised(model, detector):
    """Every example edit offered in the web UI reaches its targets with the model's defaults and
    keeps every face part (the examples were taken from the user-edit benchmark)."""
    from webui.services import load_examples
    for ex in load_examples():
        if ex["model"] != default_model_path().name:
            continue
        s = DragSession(model.G, seed_to_w(model.G, ex["seed"], psi=ex["psi"]), DragConfig(display_every=0),
                        model_defaults=model.drag_defaults)
        for hx, hy, tx, ty in ex["pairs"]:
            s.add_pair((hx, hy), (tx, ty))
        last = list(s.run())[-1]
        assert last.reached and last.end == "arrived", (ex["name"], last.message)
        assert ue.faces_intact(s.render()[None], detector)[0], ex["name"]


def test_the_seed_0_smile_ends_as_a_smile_on_an_intact_face(model, detector):
    """The first edit people try: seed 0's mouth corners up and out, default settings, 300 steps.
    Judged as a person judges it: every face part is still there, the RE-DETECTED corners moved most
    of the way, and the run claims arrival only where the re-detection confirms it."""
    s = _session(model, {})
    image0 = s.render()
    last = list(s.run())[-1]
    image1 = s.render()
    assert ue.faces_intact(image1[None], detector)[0], last.message
    idx = [detector.names.index("mouth_left"), detector.names.index("mouth_right")]
    before, after = (detector(im[None]).points[0].numpy()[idx].astype(np.float64) for im in (image0, image1))
    targets = np.array([(49, 87), (91, 92)], np.float64)
    start, end = np.linalg.norm(before - targets, axis=1), np.linalg.norm(after - targets, axis=1)
    assert (end < 0.5 * start).all(), (start, end)
    if last.reached:  # "arrived" must be true of the image, not only of the tracked handles
        assert (end <= ue.reach_radius(math.dist((56, 93), (49, 87)), 128)).all(), end


def test_a_drag_off_the_face_ends_by_itself_at_the_best_frame(model, detector):
    """The nose tip dragged into the top-left corner of the background cannot be done: the run ends
    before max steps with a status that says why, does not claim arrival, keeps the best state it
    saw, and the face is still a face."""
    s = _session(model, {}, drags=(((64, 75), (6, 6)),))
    results = list(s.run())
    last = results[-1]
    assert last.end in ("limit", "lost_handle") and not last.reached and len(results) < 300, last.message
    assert "kept the best result" in last.message
    best = min(results[:-1], key=lambda r: sum(r.distances))
    assert s.step_count == best.step - 1 and last.handles == best.handles
    assert np.array_equal(last.image, s.render())
    assert ue.faces_intact(last.image[None], detector)[0]


def test_the_seed_0_smile_with_a_mask_keeps_the_nose(model, detector):
    """The same smile with the flexible region painted around the mouth corners (discs as in the
    evaluation's masks): the mask must not cost the face a part (without the mask's motion anchor the
    nose faded away here), and the corners still move most of the way."""
    from draggan_core.evaluation.protocol import flexible_mask
    s = _session(model, {})
    s.set_mask(flexible_mask(np.array([(56, 93), (84, 98)], np.float64), np.array([(49, 87), (91, 92)], np.float64), 128))
    image0 = s.render()
    last = list(s.run())[-1]
    image1 = s.render()
    assert ue.parts_lost(image1, detector) == [], last.message
    idx = [detector.names.index("mouth_left"), detector.names.index("mouth_right")]
    before, after = (detector(im[None]).points[0].numpy()[idx].astype(np.float64) for im in (image0, image1))
    targets = np.array([(49, 87), (91, 92)], np.float64)
    assert (np.linalg.norm(after - targets, axis=1) < 0.5 * np.linalg.norm(before - targets, axis=1)).all()
