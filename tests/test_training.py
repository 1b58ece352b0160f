"""Fast smoke tests of the training scripts (the real runs are hours; these exercise the same code)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training import faces, train_embedded

REPO = Path(__file__).resolve().parents[1]


def test_part_weights_follow_the_per_part_scale():
    z = faces.sample_z(3, seed=11)
    masks = torch.from_numpy(faces.render(z).part_masks)
    _, w1 = train_embedded.render_batch(z)
    _, w2 = train_embedded.render_batch(z, (1.0, 2.0, 3.0, 1.0))
    # four gains (every schedule before the ears region): the ears weigh nothing, as then
    assert torch.equal(w1, masks[:, :4].amax(dim=1, keepdim=True))
    expected = (masks[:, :4] * torch.tensor([1.0, 2.0, 3.0, 1.0])[None, :, None, None]).amax(dim=1, keepdim=True)
    assert torch.equal(w2, expected)
    assert torch.equal(train_embedded.render_batch(z, (1.0, 2.0, 3.0, 1.0, 0.0))[1], w2)
    nose = masks[:, 2:3] > 0.99
    assert nose.any() and (w2[nose] >= 2.97).all()
    # a fifth gain weighs the ears region
    _, w3 = train_embedded.render_batch(z, (1.0, 2.0, 3.0, 1.0, 5.0))
    ears = masks[:, 4:5] > 0.99
    assert ears.any() and (w3[ears] >= 4.95).all() and w2[ears].mean() < 0.5  # few ear pixels lie in other parts
    # a sixth weighs the shirt strip, which no other region touches
    _, w4 = train_embedded.render_batch(z, (1.0, 2.0, 3.0, 1.0, 5.0, 4.0))
    shirt = masks[:, 5:6] > 0.99
    assert shirt.any() and (w4[shirt] >= 3.96).all() and w3[shirt].max() == 0.0


def _run(out, steps, extra=()):
    args = ["--out", str(out), "--max-steps", str(steps), "--batch", "4", "--eval-every", "2", "--threads", "1",
            "--lr", "1e-3", *extra]
    assert train_embedded.main(args) == 0
    return torch.load(out / "last.pt", weights_only=True)


def test_training_is_resumable_and_deterministic(tmp_path):
    whole = _run(tmp_path / "a", 4)
    _run(tmp_path / "b", 2)
    resumed = _run(tmp_path / "b", 4, ["--export", str(tmp_path / "m.safetensors")])
    assert whole["step"] == resumed["step"] == 4
    for k, v in whole["G_ema"].items():
        assert torch.equal(v, resumed["G_ema"][k]), k
    from draggan_core.model.checkpoints import load_generator, read_native_metadata
    G = load_generator(tmp_path / "m.safetensors")
    snapshot_meta = read_native_metadata(tmp_path / "m.safetensors")
    assert G.img_resolution == 64 and snapshot_meta["training_steps"] == "4"
    # snapshots carry the default model's drag defaults unless --drag-defaults names others
    assert snapshot_meta["drag_defaults"] == train_embedded.PARTS_DRAG_DEFAULTS_FILE.read_text()
    assert (tmp_path / "a" / "samples_latest.png").is_file()
    # finalize_model exports the same weights, with the drag defaults of the file it is given
    import json
    from safetensors.torch import load_file
    from training import finalize_model
    defaults = {**json.loads(train_embedded.DRAG_DEFAULTS_FILE.read_text()), "lr": 0.0123}
    (tmp_path / "d.json").write_text(json.dumps(defaults))
    finalize_model.main(["--state", str(tmp_path / "b" / "last.pt"), "--out", str(tmp_path / "f.safetensors"),
                         "--drag-defaults", str(tmp_path / "d.json")])
    assert json.loads(read_native_metadata(tmp_path / "f.safetensors")["drag_defaults"]) == defaults
    exported, final = load_file(tmp_path / "m.safetensors"), load_file(tmp_path / "f.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in exported)


def test_part_scale_is_validated(tmp_path):
    with pytest.raises(SystemExit):
        train_embedded.main(["--out", str(tmp_path), "--max-steps", "1", "--part-scale", "1,2"])


def test_landmark_training_smoke(tmp_path):
    from draggan_core.model.landmark_net import LandmarkDetector
    from training import landmarks
    out = tmp_path / "lm.safetensors"
    assert landmarks.main(["--out", str(out), "--max-steps", "2", "--batch", "4", "--eval-n", "8"]) == 0
    det = LandmarkDetector.load(out)
    d = det(np.zeros((1, 64, 64, 3), np.uint8))
    assert d.points.shape == (1, len(faces.LANDMARK_NAMES), 2) and torch.isfinite(d.points).all()


def test_schedule_stages_override_by_step(tmp_path):
    import argparse
    import json
    sched = tmp_path / "s.json"
    sched.write_text(json.dumps({"stages": [{"until_step": 2, "lr": 0.5, "part_scale": "1,1,1,1"},
                                            {"until_step": 4, "lr": 0.1, "decay_start": 2, "decay_end": 4,
                                             "part_scale": "1,2,3,1"}]}))
    args = argparse.Namespace(lr=0.01, decay_start=None, decay_end=None, part_scale="1,1,1,1",
                              schedule_stages=json.loads(sched.read_text())["stages"])
    lrs = [train_embedded.learning_rate(s, train_embedded.stage_for(s, args)) for s in range(6)]
    assert lrs[:2] == [0.5, 0.5] and lrs[2] == pytest.approx(0.1) and lrs[3] == pytest.approx(0.1 * (1 - 0.45))
    assert lrs[4:] == [0.01, 0.01]
    assert train_embedded.stage_for(3, args).part_scale == "1,2,3,1"
    state = _run(tmp_path / "run", 3, ["--schedule", str(sched)])
    assert state["step"] == 3


def test_committed_schedules_are_consistent():
    """The shipped schedule and the CPU-only 6-hour recipe: stages in step order, valid part scales and
    decay windows, and the CPU recipe shares the shipped run's CPU stages (to step 33,979)."""
    import argparse
    import json
    from pathlib import Path
    folder = Path(train_embedded.__file__).parent
    schedules = {p.name: json.loads(p.read_text())["stages"] for p in sorted(folder.glob("embedded_schedule*.json"))}
    assert set(schedules) == {"embedded_schedule.json", "embedded_schedule_cpu6h.json"}

    def with_stages(stages):  # command-line settings that no stage may leak through (lr 1.0 would show)
        return argparse.Namespace(lr=1.0, decay_start=None, decay_end=None, part_scale="1,1,1,1", schedule_stages=stages)

    for name, stages in schedules.items():
        ends = [s["until_step"] for s in stages]
        assert ends == sorted(ends) and len(set(ends)) == len(ends), name
        for s in stages:
            assert len(train_embedded.parse_part_scale(s["part_scale"])) in range(4, len(faces.PART_NAMES) + 1), name
            assert s["decay_start"] < s["decay_end"] and s["lr"] > 0, name
        args = with_stages(stages)
        assert all(0 < train_embedded.learning_rate(k, train_embedded.stage_for(k, args)) <= 2e-3
                   for k in range(0, 90_000, 997)), name
    shared = [s for s in schedules["embedded_schedule.json"] if s["until_step"] <= 33_979]
    assert len(shared) == 3 and schedules["embedded_schedule_cpu6h.json"][:3] == shared
    cpu = with_stages(schedules["embedded_schedule_cpu6h.json"])
    last = train_embedded.stage_for(55_078, cpu)
    assert (last.batch, last.part_l2, last.part_scale) == (32, 8.0, "1,3,8,2")
    # the lr is held, then decays linearly to 10 % by the last step (48,000 -> 55,079)
    assert train_embedded.learning_rate(47_999, last) == 1.5e-3
    assert abs(train_embedded.learning_rate(55_079, last) - 1.5e-4) < 1e-9


def test_render_workers_and_stage_batch_give_the_same_run(tmp_path):
    """Batches rendered by worker processes (the GPU path) equal those rendered in-process, and a
    schedule stage's own batch size is used and counted in the state's image total."""
    import json
    sched = tmp_path / "s.json"
    sched.write_text(json.dumps({"stages": [{"until_step": 2, "lr": 1e-3},
                                            {"until_step": 99, "lr": 1e-3, "batch": 6}]}))
    inline = _run(tmp_path / "inline", 3, ["--schedule", str(sched)])
    workers = _run(tmp_path / "workers", 3, ["--schedule", str(sched), "--workers", "2"])
    assert inline["images"] == workers["images"] == 2 * 4 + 6
    for k, v in inline["G_ema"].items():
        assert torch.equal(v, workers["G_ema"][k]), k


def test_render_workers_close_with_a_full_look_ahead():
    """Closing the stream while large batches are still being rendered or written must return and
    leave no worker behind (Pool.terminate could hang here: the workers ignore SIGTERM)."""
    import argparse
    import multiprocessing
    import threading
    import time
    before = set(multiprocessing.active_children())
    stage = argparse.Namespace(batch=96, part_scale="1,1,1,1")
    stream = train_embedded.BatchStream(0, lambda step: stage, workers=2, lookahead=3)
    z, real, _ = stream.get()
    assert real.shape == (96, 3, 64, 64)
    time.sleep(1.0)  # the workers fill the look-ahead (about 5 MB per batch) while nobody reads
    closer = threading.Thread(target=stream.close, daemon=True)
    closer.start()
    closer.join(timeout=120)
    assert not closer.is_alive(), "BatchStream.close hangs"
    assert stream.pool is None and set(multiprocessing.active_children()) <= before


_OVERDUE_SCRIPT = """
import argparse, os, signal, sys, time
from training import train_embedded
if __name__ == "__main__":
    train_embedded.RENDER_TIMEOUT_S = 0.3  # so the look-ahead below counts as overdue
    stage = argparse.Namespace(batch=1500, part_scale="1,1,1,1")  # ~2 s per batch: still rendering at close
    stream = train_embedded.BatchStream(0, lambda step: stage, workers=2, lookahead=2)
    print(" ".join(str(p.pid) for p in stream.pool._pool), flush=True)
    stream._fill()
    os.kill(stream.pool._pool[0].pid, signal.SIGSTOP)  # a hung worker: it never delivers its batch
    t = time.time()
    stream.close()
    print(f"closed in {time.time() - t:.1f} s", flush=True)
"""


def test_render_workers_are_killed_when_a_batch_is_overdue(tmp_path):
    """The emergency branch of BatchStream.close (a worker hangs, here stopped with SIGSTOP): close
    returns, the interpreter exits, and no render worker outlives it (they ignore SIGTERM, so
    Pool.terminate alone would wait for the hung one forever)."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path
    script = tmp_path / "overdue.py"
    script.write_text(_OVERDUE_SCRIPT)
    root = Path(train_embedded.__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in proc.stdout.readline().split()]
    try:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        assert out.strip().startswith("closed in"), out
        time.sleep(0.5)
        alive = [pid for pid in workers if Path(f"/proc/{pid}/status").exists()
                 and "zombie" not in Path(f"/proc/{pid}/status").read_text()]
        assert not alive, f"render workers {alive} survived"
    finally:  # never leave a stopped worker behind, even when the test fails
        proc.kill()
        for pid in workers:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def test_part_l2_adds_a_squared_error_on_the_part_regions_only():
    torch.manual_seed(0)
    real = torch.rand(2, 3, 8, 8) * 2 - 1
    fake = real.clone()
    part = torch.zeros(2, 1, 8, 8)
    part[:, :, 2:4, 2:4] = 1.0
    fake[:, :, 6, 6] += 0.5  # an error outside the parts: the L2 term ignores it
    base = train_embedded.regression_loss(fake, real, part, 8.0)
    assert train_embedded.regression_loss(fake, real, part, 8.0, part_l2=4.0) == pytest.approx(base.item())
    fake[:, :, 2, 2] -= 0.5  # inside a part: now the squared error counts
    with_l2 = train_embedded.regression_loss(fake, real, part, 8.0, part_l2=4.0)
    without = train_embedded.regression_loss(fake, real, part, 8.0)
    expected_extra = 4.0 * (0.25 * 2 * 3) / (part.sum() * 3)
    assert (with_l2 - without).item() == pytest.approx(expected_extra.item(), rel=1e-5)


def test_image_l2_adds_the_mean_squared_error_of_the_whole_image():
    torch.manual_seed(0)
    real = torch.rand(2, 3, 8, 8) * 2 - 1
    fake = real.clone()
    part = torch.zeros(2, 1, 8, 8)
    fake[:, :, 6, 6] += 0.5  # outside every part
    with_l2 = train_embedded.regression_loss(fake, real, part, 8.0, image_l2=16.0)
    without = train_embedded.regression_loss(fake, real, part, 8.0)
    assert (with_l2 - without).item() == pytest.approx(16.0 * (fake - real).square().mean().item(), rel=1e-5)


def test_image_head_fine_tune_keeps_every_drag_on_the_same_latent_path(tmp_path):
    """--init-model M --train-only image-head changes only ToRGB layers and the last block: the mapping,
    w_avg and every feature block the drag engine uses stay bit for bit M's, so a drag from the same
    seed takes the same latent path on both models, while the rendered image differs."""
    import json
    import re
    from draggan_core.model.checkpoints import load_generator
    from draggan_core.edit.settings import DragConfig
    from draggan_core.edit.session import DragSession
    from draggan_core.model.latents import seed_to_w
    from draggan_core.model.store import PARTS_64_MODEL_NAME, drag_defaults_of
    from draggan_core.model.paths import CHECKPOINTS_DIR
    base = CHECKPOINTS_DIR / PARTS_64_MODEL_NAME  # the 64 px model the image-head preset was written for
    tuned_path = tmp_path / "m.safetensors"
    state = _run(tmp_path / "head", 3, ["--init-model", str(base), "--train-only", "image-head", "--part-l2", "8",
                                        "--part-scale", "1,3,8,2", "--export", str(tuned_path)])
    assert state["train_only"] == train_embedded.TRAIN_ONLY_PRESETS["image-head"]
    with pytest.raises(SystemExit):  # resuming a head-only state as a full training would mix the two
        _run(tmp_path / "head", 4)
    A, B = load_generator(base), load_generator(tuned_path)
    sa, sb = A.state_dict(), B.state_dict()
    changed = {k for k in sa if not torch.equal(sa[k], sb[k])}
    assert "synthesis.b64.conv1.weight" in changed and "synthesis.b16.torgb.weight" in changed
    assert all(re.search(state["train_only"], k) for k in changed), changed
    assert "mapping.w_avg" not in changed
    from draggan_core.model.checkpoints import read_native_metadata
    base_meta, meta = read_native_metadata(base), read_native_metadata(tuned_path)
    assert int(meta["training_steps"]) == int(base_meta["training_steps"]) + 3  # the whole training counted
    assert json.loads(meta["fine_tune"])["steps"] == 3 and state["base"]["model"] == base.name

    defaults = drag_defaults_of(base)
    torch.set_num_threads(1)
    ws = seed_to_w(A, 5, psi=0.7)
    for res in (defaults["feature_res"], defaults["track_res"]):  # motion supervision and tracking blocks
        assert torch.equal(A.synthesis(ws, feature_res=res, stop_at_feature=True)[1],
                           B.synthesis(ws, feature_res=res, stop_at_feature=True)[1]), res
    runs = []
    for G in (A, B):
        w = seed_to_w(G, 3, psi=0.7, w_mode="w")
        s = DragSession(G, w, DragConfig(display_every=0), model_defaults=defaults)
        s.add_pair((30, 40), (34, 44))
        steps = list(s.run(max_steps=6))
        assert not torch.equal(s.latent, w) and not steps[-1].reached  # it moved, target not yet reached
        runs.append((s.latent, s.render(), [(r.handles, r.loss) for r in steps]))
    assert torch.equal(runs[0][0], runs[1][0])          # the same latent after 6 steps
    assert runs[0][2] == runs[1][2]                      # the same tracked handles and losses at every step
    assert np.abs(runs[0][1].astype(int) - runs[1][1].astype(int)).max() > 0  # a different image


def test_sweeps_start_from_the_swept_models_own_drag_defaults():
    """A sweep of the default (parts) model starts from its own lr (8e-3), not the L1 model's; a bare
    snapshot without drag defaults starts from the L1 model's file; --set values win."""
    from draggan_core.model.store import default_model_path, drag_defaults_of
    from training.sweep_drag import base_drag_defaults
    from training.train_embedded import DRAG_DEFAULTS_FILE
    l1 = json.loads(DRAG_DEFAULTS_FILE.read_text())
    model = default_model_path()  # shipped in checkpoints/
    own = drag_defaults_of(model)
    assert own and own != l1 and base_drag_defaults(model) == own
    assert base_drag_defaults(model, {"r1": 4.0}) == {**own, "r1": 4.0}
    from official_pickle import tiny64_pickle
    bare = tiny64_pickle()  # an official-format snapshot: no drag defaults in it
    assert drag_defaults_of(bare) == {}
    assert base_drag_defaults(bare) == l1


def test_z_fourier_widening_keeps_the_generator_and_trains_on(tmp_path):
    from draggan_core.model.networks import Generator, GeneratorConfig
    out = tmp_path / "run"
    before = _run(out, 2)
    z = torch.from_numpy(faces.sample_z(3, seed=9))

    def image(state):
        G = Generator(GeneratorConfig.from_json(state["config"]))
        G.load_state_dict({k: v.float() for k, v in state["G_ema"].items()})
        return G(z, fused=False)
    widened = _run(out, 2, ["--z-fourier", "2"])  # no step taken: only the widening
    cfg = GeneratorConfig.from_json(widened["config"])
    assert cfg.mapping_z_fourier == 2 and widened["G"]["mapping.fc0.weight"].shape[1] == 5 * faces.PARAM_DIM
    assert torch.allclose(image(before), image(widened), atol=1e-5)
    assert widened["G"]["mapping.fc0.weight"][:, faces.PARAM_DIM:].abs().max() == 0
    trained = _run(out, 4, ["--z-fourier", "2"])
    assert trained["G"]["mapping.fc0.weight"][:, faces.PARAM_DIM:].abs().max() > 0
    with pytest.raises(SystemExit):  # a state with features cannot take another K
        _run(out, 5, ["--z-fourier", "3"])
