"""The shared preprocessing: 1.3× square crops and the log-DCT spectrum (checked against SciPy)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.fft import dctn
from skimage import data

from worker.preprocess import (
    crop_face,
    crops_to_tensor_layout,
    dct2,
    dct_matrix,
    SPECTRUM_EPS,
    log_dct_spectrum,
    square_crop_box,
)


def test_dct_matrix_is_orthonormal():
    d = dct_matrix(299)
    assert np.allclose(d @ d.T, np.eye(299), atol=1e-10)


def test_log_dct_spectrum_matches_scipy_on_a_real_face():
    face = data.astronaut()[20:220, 150:350]  # the astronaut's face, 200×200 RGB
    x = face.transpose(2, 0, 1).astype(np.float64) / 255.0
    expected = np.log(np.abs(dctn(x, axes=(-2, -1), norm="ortho")) + SPECTRUM_EPS)
    assert np.allclose(dct2(x), dctn(x, axes=(-2, -1), norm="ortho"), atol=1e-10)
    got = log_dct_spectrum(x)
    assert got.shape == (3, 200, 200) and got.dtype == np.float32
    assert np.allclose(got, expected, atol=1e-4)
    # Energy compaction: the DC coefficient dominates the highest frequencies by orders of magnitude.
    assert got[:, 0, 0].min() > got[:, -20:, -20:].mean() + 5


def test_log_dct_spectrum_rectangular():
    x = np.random.default_rng(0).random((2, 3, 17, 31))
    expected = np.log(np.abs(dctn(x, axes=(-2, -1), norm="ortho")) + SPECTRUM_EPS)
    assert np.allclose(log_dct_spectrum(x), expected, atol=1e-4)


@pytest.mark.parametrize(
    "box,frame,expected_side",
    [
        ((40, 40, 60, 80), (200, 200), 52),  # 40 px tall face → 52 px square
        ((0, 0, 30, 30), (200, 200), 39),  # at the corner: shifted inside, side kept
        ((10, 10, 190, 190), (200, 100), 100),  # bigger than the frame: clipped to it
    ],
)
def test_square_crop_box(box, frame, expected_side):
    w, h = frame
    x1, y1, x2, y2 = square_crop_box(box, w, h)
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert max(x2 - x1, y2 - y1) == expected_side
    if expected_side <= min(w, h):
        assert x2 - x1 == y2 - y1
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        if x1 > 0 and y1 > 0:  # not shifted: centred on the face
            assert abs((x1 + x2) / 2 - cx) <= 1 and abs((y1 + y2) / 2 - cy) <= 1


def test_crop_face_and_layout():
    frame = data.astronaut()
    crop = crop_face(frame, (170, 40, 320, 200), size=299)
    assert crop.shape == (299, 299, 3) and crop.dtype == np.uint8
    tensor = crops_to_tensor_layout(crop[None])
    assert tensor.shape == (1, 3, 299, 299) and tensor.dtype == np.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0
    with pytest.raises(ValueError):
        crop_face(frame[..., 0], (0, 0, 10, 10))
