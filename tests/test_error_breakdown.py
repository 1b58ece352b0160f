"""training.error_breakdown on a stand-in generator whose errors are known: the renderer itself with
the shirt parameter fixed (the flaw the tool was written to find)."""
import numpy as np
import pytest
import torch

from training import error_breakdown, faces

RES = 32


class ShirtBlindRenderer:
    """render(z) with shirt_hue held at 0: exact everywhere except the shirt."""
    img_resolution = RES

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        z = z.numpy().copy()
        z[:, faces.PARAM_NAMES.index("shirt_hue")] = 0.0
        return torch.from_numpy(faces.render(z, resolution=RES).images)


@pytest.fixture(scope="module")
def result():
    return error_breakdown.breakdown(ShirtBlindRenderer(), n=24, names=["bg_hue", "shirt_hue"])


def test_the_error_is_found_at_the_bottom(result):
    assert result["resolution"] == RES
    assert sum(result["row_share"]) == pytest.approx(1.0, abs=1e-3)
    assert result["row_share"][-1] > 0.5            # the shirt strip holds most of the error
    assert result["psnr_if_rows_exact"]["bottom_sixteenth"] > result["psnr_db"] + 3


def test_the_ignored_parameter_is_named(result):
    bg, shirt = result["response"]["bg_hue"], result["response"]["shirt_hue"]
    assert bg["G"] == pytest.approx(bg["render"], rel=1e-5) and bg["G"] > 1.0
    assert shirt["G"] == 0.0 and shirt["render_bottom"] > 5.0


def test_bands_split_the_error(result):
    # the shirt is a flat colour over many rows: mostly a coarse-image error
    assert result["psnr_low_band_only"] < result["psnr_high_band_only"]
    assert np.isfinite(result["psnr_low_band_only"]) and result["psnr_low_band_only"] >= result["psnr_db"] - 1e-6
