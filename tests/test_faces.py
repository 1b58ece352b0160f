"""Tests for the procedural face renderer (training/faces.py)."""
import numpy as np
import pytest

from training import faces

RES = 64
L = {name: i for i, name in enumerate(faces.LANDMARK_NAMES)}
P = {name: i for i, name in enumerate(faces.PARAM_NAMES)}
MIRROR_PAIRS = [
    ("eye_left_outer", "eye_right_outer"), ("eye_left_inner", "eye_right_inner"),
    ("eye_left_top", "eye_right_top"), ("eye_left_bottom", "eye_right_bottom"),
    ("pupil_left", "pupil_right"), ("brow_left_outer", "brow_right_outer"),
    ("brow_left_inner", "brow_right_inner"), ("nostril_left", "nostril_right"),
    ("mouth_left", "mouth_right"), ("jaw_left_mouth", "jaw_right_mouth"),
    ("jaw_left_eye", "jaw_right_eye"), ("ear_left", "ear_right"),
]
CENTRE_LANDMARKS = ["nose_tip", "lip_upper", "lip_lower", "chin"]


@pytest.fixture(scope="module")
def batch():
    z = faces.sample_z(48, seed=7)
    return z, faces.render(z)


def _lum(images):
    return ((images + 1.0) / 2.0).mean(axis=1)          # (N, H, W) in [0, 1]


def _pixel(a, xy):
    x, y = np.rint(xy).astype(int)
    return a[..., y, x]


def test_api_constants():
    assert 24 <= faces.PARAM_DIM <= 32
    assert len(faces.PARAM_NAMES) == faces.PARAM_DIM
    assert len(faces.LANDMARK_NAMES) >= 22
    assert len(set(faces.LANDMARK_NAMES)) == len(faces.LANDMARK_NAMES)
    assert faces.PART_NAMES == ("eyes", "brows", "nose", "mouth", "ears", "shirt")


def test_sample_z():
    z = faces.sample_z(5, 3)
    ref = np.random.default_rng(3).standard_normal((5, faces.PARAM_DIM)).astype(np.float32)
    assert z.dtype == np.float32 and np.array_equal(z, ref)


def test_shapes_dtypes_ranges(batch):
    z, b = batch
    n, k = len(z), len(faces.LANDMARK_NAMES)
    assert b.images.shape == (n, 3, RES, RES) and b.images.dtype == np.float32
    assert b.images.min() >= -1.0 and b.images.max() <= 1.0
    assert b.landmarks.shape == (n, k, 2) and b.landmarks.dtype == np.float32
    assert b.part_masks.shape == (n, len(faces.PART_NAMES), RES, RES)
    assert b.part_masks.dtype == np.float32
    assert b.part_masks.min() >= 0.0 and b.part_masks.max() <= 1.0
    assert b.visible.shape == (n, k) and b.visible.dtype == bool
    u8 = faces.to_uint8(b.images)
    assert u8.shape == (n, RES, RES, 3) and u8.dtype == np.uint8
    assert np.array_equal(u8[..., 0], np.rint((b.images[:, 0] + 1) * 127.5).astype(np.uint8))


def test_deterministic_and_1d_input(batch):
    z, b = batch
    again = faces.render(z[:6])
    assert np.array_equal(again.images, b.images[:6])
    assert np.array_equal(again.landmarks, b.landmarks[:6])
    assert np.array_equal(again.part_masks, b.part_masks[:6])
    single = faces.render(z[2])
    assert single.images.shape == (1, 3, RES, RES)
    assert np.array_equal(single.images[0], b.images[2])


def test_resolution_and_pixel_convention():
    z = faces.sample_z(4, 11)
    lo, hi = faces.render(z, 64), faces.render(z, 128, supersample=2)
    # pixel centres at integers: x_128 = 2 * x_64 + 0.5
    np.testing.assert_allclose(hi.landmarks, 2 * lo.landmarks + 0.5, atol=1e-3)
    down = hi.images.reshape(4, 3, 64, 2, 64, 2).mean(axis=(3, 5))
    assert np.abs(down - lo.images).mean() < 0.02


def test_landmarks_inside_image(batch):
    _, b = batch
    many = faces.render(faces.sample_z(128, 1))
    for lm in (b.landmarks, many.landmarks):
        assert lm.min() > 1.0 and lm.max() < RES - 2.0
    assert many.visible.mean() > 0.95


def test_head_layout(batch):
    _, b = batch
    lm = b.landmarks
    eye_y = lm[:, [L["pupil_left"], L["pupil_right"]], 1].mean(1) / RES
    mouth = [L["mouth_left"], L["mouth_right"], L["lip_upper"], L["lip_lower"]]
    mouth_y = lm[:, mouth, 1].mean(1) / RES
    assert np.all((eye_y > 0.36) & (eye_y < 0.52)) and 0.4 <= np.median(eye_y) <= 0.46
    assert np.all((mouth_y > 0.62) & (mouth_y < 0.82)) and 0.69 <= np.median(mouth_y) <= 0.76
    eye_w = np.linalg.norm(lm[:, L["eye_left_outer"]] - lm[:, L["eye_left_inner"]], axis=1)
    mouth_w = np.linalg.norm(lm[:, L["mouth_right"]] - lm[:, L["mouth_left"]], axis=1)
    other_w = np.linalg.norm(lm[:, L["eye_right_outer"]] - lm[:, L["eye_right_inner"]], axis=1)
    assert np.all((eye_w > 5.0) & (eye_w < 11.5)) and 7.0 <= np.median(eye_w) <= 9.5
    assert np.all(np.maximum(eye_w, other_w) > 6.5)        # yaw foreshortens the far eye
    assert np.all((mouth_w > 10.5) & (mouth_w < 21.0)) and 13 <= np.median(mouth_w) <= 18


def test_left_right_and_vertical_order(batch):
    _, b = batch
    x, y = b.landmarks[..., 0], b.landmarks[..., 1]
    chain = ["jaw_left_eye", "eye_left_outer", "eye_left_inner", "eye_right_inner",
             "eye_right_outer", "jaw_right_eye"]
    for a, c in zip(chain, chain[1:]):
        assert np.all(x[:, L[a]] < x[:, L[c]]), (a, c)
    for a, c in [("brow_left_outer", "brow_left_inner"), ("brow_left_inner", "brow_right_inner"),
                 ("brow_right_inner", "brow_right_outer"), ("nostril_left", "nostril_right"),
                 ("mouth_left", "mouth_right"), ("jaw_left_mouth", "jaw_right_mouth"),
                 ("ear_left", "eye_left_outer"), ("eye_right_outer", "ear_right"),
                 ("jaw_left_mouth", "mouth_left"), ("mouth_right", "jaw_right_mouth")]:
        assert np.all(x[:, L[a]] < x[:, L[c]]), (a, c)
    column = ["brow_left_inner", "pupil_left", "nose_tip", "lip_upper", "lip_lower", "chin"]
    for a, c in zip(column, column[1:]):
        assert np.all(y[:, L[a]] < y[:, L[c]]), (a, c)
    # nose tip lies inside the face
    nx = x[:, L["nose_tip"]]
    assert np.all((nx > x[:, L["jaw_left_mouth"]]) & (nx < x[:, L["jaw_right_mouth"]]))
    assert np.all((nx > x[:, L["eye_left_inner"]] - 3) & (nx < x[:, L["eye_right_inner"]] + 3))


def test_symmetric_face_is_mirror_symmetric():
    z = faces.sample_z(6, 5)
    for name in ("head_x", "tilt", "yaw", "gaze_x", "light_dir"):
        z[:, P[name]] = 0.0                      # z = 0 is the middle of each range
    b = faces.render(z)
    c = (RES - 1) / 2.0
    lm = b.landmarks
    for left, right in MIRROR_PAIRS:
        np.testing.assert_allclose(lm[:, L[left], 0] + lm[:, L[right], 0], 2 * c, atol=1e-3)
        np.testing.assert_allclose(lm[:, L[left], 1], lm[:, L[right], 1], atol=1e-3)
    for name in CENTRE_LANDMARKS:
        np.testing.assert_allclose(lm[:, L[name], 0], c, atol=1e-3)
    flipped = b.images[..., ::-1]
    assert np.abs(b.images - flipped).mean() < 0.01
    assert np.array_equal(b.visible, b.visible[:, [L[n] for n in _mirror_order()]])
    masks = b.part_masks
    assert np.abs(masks - masks[..., ::-1]).max() < 1e-3


def _mirror_order():
    swap = {}
    for a, c in MIRROR_PAIRS:
        swap[a], swap[c] = c, a
    return [swap.get(n, n) for n in faces.LANDMARK_NAMES]


def test_pupils_are_dark_in_white_sclera(batch):
    _, b = batch
    lum = _lum(b.images)
    ratios = []
    for i in range(len(lum)):
        for side in ("left", "right"):
            k = L[f"pupil_{side}"]
            if not b.visible[i, k]:
                continue
            px, py = np.rint(b.landmarks[i, k]).astype(int)
            pupil = lum[i, py, px]
            around = lum[i, py - 2:py + 3, px - 4:px + 5].max()   # sclera next to the iris
            assert around > 0.35 and pupil < 0.6 * around, (i, side, pupil, around)
            ratios.append(pupil / around)
    assert len(ratios) > 0.9 * 2 * len(lum)
    assert np.percentile(ratios, 90) < 0.15


def test_mouth_corners_on_lip_boundary(batch):
    _, b = batch
    img = (b.images + 1.0) / 2.0
    redness = img[:, 0] / (img[:, 1] + 0.02)     # lighting scales channels equally
    for i in range(len(img)):
        for side in ("left", "right"):
            cx, cy = np.rint(b.landmarks[i, L[f"mouth_{side}"]]).astype(int)
            jx, jy = b.landmarks[i, L[f"jaw_{side}_mouth"]]
            mx, my = b.landmarks[i, L[f"mouth_{side}"]]
            cheek = redness[i, int(round((my + jy) / 2 - 3)), int(round((mx + jx) / 2))]
            win = redness[i, cy - 1:cy + 2, cx - 1:cx + 2]
            assert win.max() > cheek + 0.15, (i, side)          # lip pixels touch the corner
            assert win.min() < cheek + 0.1, (i, side)           # ... and so do skin pixels


def test_lip_colour_distinct_from_skin(batch):
    _, b = batch
    img = (b.images + 1.0) / 2.0
    redness = img[:, 0] / (img[:, 1] + 0.02)
    chin = 0.5 * (b.landmarks[:, L["chin"]] + b.landmarks[:, L["lip_lower"]])
    for i in range(len(img)):
        # the lower lip band just above the lip_lower landmark
        lip = max(_pixel(redness[i], b.landmarks[i, L["lip_lower"]] - np.array([0.0, dy]))
                  for dy in (0.6, 1.4))
        assert lip > _pixel(redness[i], chin[i]) + 0.15, i


def test_part_masks_cover_their_landmarks(batch):
    _, b = batch
    parts = {
        "eyes": ["eye_left_outer", "eye_left_inner", "eye_right_inner", "eye_right_outer",
                 "eye_left_top", "eye_left_bottom", "eye_right_top", "eye_right_bottom",
                 "pupil_left", "pupil_right"],
        "brows": ["brow_left_outer", "brow_left_inner", "brow_right_inner", "brow_right_outer"],
        "nose": ["nose_tip", "nostril_left", "nostril_right"],
        "mouth": ["mouth_left", "mouth_right", "lip_upper", "lip_lower"],
        "ears": ["ear_left", "ear_right"],
        "shirt": [],
    }
    for j, part in enumerate(faces.PART_NAMES):
        mask = b.part_masks[:, j]
        for name in parts[part]:
            vals = np.array([_pixel(mask[i], b.landmarks[i, L[name]]) for i in range(len(mask))])
            assert vals.min() > 0.95, (part, name, vals.min())
        area = mask.sum(axis=(1, 2)) / RES ** 2
        assert np.all((area > 0.01) & (area < 0.12)), (part, area.min(), area.max())
        # anti-aliased: some fractional coverage on the border
        assert np.mean((mask > 0.05) & (mask < 0.95)) > 0.002
    # the eye mask does not swallow the mouth and vice versa
    eyes, mouth = b.part_masks[:, 0], b.part_masks[:, 3]
    for i in range(len(eyes)):
        assert _pixel(eyes[i], b.landmarks[i, L["mouth_left"]]) == 0.0
        assert _pixel(mouth[i], b.landmarks[i, L["pupil_left"]]) == 0.0
    # the shirt strip: the bottom centre, never the mouth
    shirt = b.part_masks[:, faces.PART_NAMES.index("shirt")]
    assert (shirt[:, RES - 1, RES // 2] == 1.0).all()
    for i in range(len(shirt)):
        assert _pixel(shirt[i], b.landmarks[i, L["lip_lower"]]) == 0.0


def test_varied_identities(batch):
    z, b = batch
    imgs = b.images[:16].reshape(16, -1)
    diffs = [np.abs(imgs[i] - imgs[j]).mean() for i in range(16) for j in range(i + 1, 16)]
    assert np.mean(diffs) > 0.2 and np.min(diffs) > 0.05        # [-1, 1] units
    # hair colour: a wide spread including very dark and very light hair
    hair = faces.colors(faces.decode_params(faces.sample_z(256, 0)))["hair"]
    lum = hair.mean(axis=1)
    assert lum.min() < 40 and lum.max() > 200 and lum.std() > 40
    chroma = hair.max(axis=1) - hair.min(axis=1)
    assert np.mean(chroma > 100) > 0.1                            # reds / unusual colours
    # on the rendered images: the hair above the forehead differs between faces
    zz = faces.sample_z(16, 3)
    zz[:, P["hairline"]] = 1.5
    bb = faces.render(zz)
    top = 0.5 * (bb.landmarks[:, L["brow_left_inner"]] + bb.landmarks[:, L["brow_right_inner"]])
    top[:, 1] -= 9
    cols = np.stack([_pixel(bb.images[i], top[i]) for i in range(16)])
    assert cols.std(axis=0).mean() > 0.2


def test_skin_and_visibility_effects():
    z = np.zeros((3, faces.PARAM_DIM), np.float32)
    z[1, P["yaw"]] = 3.0
    z[2, P["yaw"]] = -3.0
    b = faces.render(z)
    assert b.visible[0].all()
    assert not b.visible[1, L["ear_right"]] and b.visible[1, L["ear_left"]]
    assert not b.visible[2, L["ear_left"]] and b.visible[2, L["ear_right"]]
    # yaw moves the features sideways relative to the face outline
    nose = b.landmarks[:, L["nose_tip"], 0]
    assert nose[1] > nose[0] + 2 and nose[2] < nose[0] - 2


def test_mouth_regimes():
    z = np.zeros((3, faces.PARAM_DIM), np.float32)
    z[:, P["mouth_open"]] = [-2.0, 2.0, -2.0]
    z[:, P["smile"]] = [0.0, 0.0, 2.5]
    b = faces.render(z)
    lm = b.landmarks
    height = lm[:, L["lip_lower"], 1] - lm[:, L["lip_upper"], 1]
    assert height[1] > height[0] + 3                          # open mouth is taller
    corners_y = lm[:, [L["mouth_left"], L["mouth_right"]], 1].mean(1)
    assert corners_y[2] < corners_y[0] - 1.5                  # smile lifts the corners
    lum = _lum(b.images)
    # the open mouth has a dark interior (teeth sit at the top of it)
    inside = lm[1, L["lip_lower"]] - np.array([0.0, 0.35 * height[1]])
    cheek = 0.5 * (lm[1, L["mouth_left"]] + lm[1, L["jaw_left_mouth"]])
    assert _pixel(lum[1], inside) < 0.5 * _pixel(lum[1], cheek)


def test_small_z_steps_give_small_image_changes(batch):
    z, b = batch
    delta = faces.sample_z(len(z), 99)
    near = faces.render(z + 0.05 * delta)
    step = np.abs(near.images - b.images).mean(axis=(1, 2, 3))
    identity = np.abs(b.images - np.roll(b.images, 1, axis=0)).mean(axis=(1, 2, 3))
    assert step.max() < 0.08      # |0.05 * delta| ~ 0.28 in z: a small but not tiny move
    assert step.mean() < 0.1 * identity.mean()
    lm_step = np.abs(near.landmarks - b.landmarks).max(axis=(1, 2))
    assert lm_step.max() < 1.5
