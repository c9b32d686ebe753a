"""DICOM: HU, padding as air, window presets and MONOCHROME1, on real pydicom / pydicom-data files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medflow.config import DataConfig, DicomSource, IngestConfig
from medflow.data.dicom import apply_window, decode_dicom, hounsfield
from medflow.data.images import BadImage, load_image_file

LIMITS = dict(max_pixels=80_000_000, min_side=8, max_side=20000)


def dcm_file(name: str) -> Path:
    """Exact-name lookup (never a glob: globbing tries the network)."""
    path = get_testdata_file(name)
    assert path is not None, f"DICOM test file {name} missing: pydicom-data is a dev dependency (make setup)"
    return Path(path)


def decode(name: str, **cfg: object):
    return decode_dicom(dcm_file(name).read_bytes(), DicomSource(**cfg), **LIMITS)


def test_ct_small_hounsfield_and_metadata() -> None:
    ds = pydicom.dcmread(dcm_file("CT_small.dcm"))
    stored = ds.pixel_array
    hu = hounsfield(ds, stored, padding_hu=-1000.0)
    assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, -1024)
    assert stored[0, 0] == 175 and hu[0, 0] == -849.0  # 175 * 1 - 1024
    assert stored[64, 64] == 1928 and hu[64, 64] == 904.0
    np.testing.assert_array_equal(hu, stored.astype(np.float32) - 1024)  # no padding in this file
    dec = decode("CT_small.dcm")
    assert (dec.format, dec.width, dec.height, dec.channels, dec.bit_depth) == ("dicom", 128, 128, 1, 16)
    assert dec.meta["modality"] == "CT" and dec.meta["pixel_spacing"] == pytest.approx(0.661468)
    assert dec.meta["slice_thickness"] == 5.0 and dec.meta["window"] == "lung:-600/1500"
    # lung window -1350..150: -849 HU -> (−849 + 1350) / 1500 * 255 = 85.2 -> 85; 904 HU -> 255 (clipped)
    assert tuple(dec.rgb[0, 0]) == (85, 85, 85) and dec.rgb[64, 64, 0] == 255
    # bone window -500..1300: 904 HU -> 1404 / 1800 * 255 = 198.9 -> 199
    assert decode("CT_small.dcm", window="bone").rgb[64, 64, 0] == 199


def test_padding_outside_scan_circle_becomes_air() -> None:
    ds = pydicom.dcmread(dcm_file("693_UNCI.dcm"))
    stored = ds.pixel_array
    assert ds.PixelPaddingValue == -2000 and (stored == -2000).sum() > 0
    assert stored[0, 0] == -2016 and stored[256, 256] == 1056  # corner outside the circle; brain tissue
    hu = hounsfield(ds, stored, padding_hu=-1000.0)
    raw_hu = stored * 1.0 - 1024
    air = (stored == -2000) | (raw_hu < -1024)
    assert hu.min() == -1024.0 and (hu[air] == -1000.0).all()  # nothing below air remains
    np.testing.assert_array_equal(hu[~air], raw_hu[~air])
    assert hu[0, 0] == -1000.0 and hu[256, 256] == 32.0

    lung = decode("693_UNCI.dcm", window="lung").rgb[..., 0]
    # air -1000 -> (−1000 + 1350) / 1500 * 255 = 59.5 -> 60 (not 0: padding is air, not -3040 HU)
    assert lung[0, 0] == 60 and lung[256, 256] == 235  # 32 HU -> 1382 / 1500 * 255 = 234.9
    assert (lung[air] == 60).all()
    mediastinum = decode("693_UNCI.dcm", window="mediastinum").rgb[..., 0]
    assert mediastinum[0, 0] == 0 and mediastinum[256, 256] == 114  # -125..225: 157 / 350 * 255 = 114.4
    soft = decode("693_UNCI.dcm", window="soft_tissue")  # -160..240 HU
    assert soft.meta["window"] == "soft_tissue:40/400" and soft.rgb[0, 0, 0] == 0
    assert soft.rgb[256, 256, 0] == 122  # (32 + 160) / 400 * 255 = 122.4
    brain = decode("693_UNCI.dcm", window="brain")  # 0..80 HU
    assert brain.meta["window"] == "brain:40/80" and brain.rgb[0, 0, 0] == 0
    assert brain.rgb[256, 256, 0] == 102  # 32 / 80 * 255 = 102.0
    custom = decode("693_UNCI.dcm", window="custom", level=0.0, width=2000.0)
    assert custom.rgb[256, 256, 0] == 132 and custom.meta["window"] == "custom:0/2000"  # 1032 / 2000 * 255
    # whole image: the same linear window applied to the expected HU
    expected = np.clip(np.rint((np.where(air, -1000.0, raw_hu) + 1350) * 255 / 1500), 0, 255)
    np.testing.assert_array_equal(lung, expected.astype(np.uint8))


def test_monochrome1_is_inverted_with_file_window() -> None:
    ds = pydicom.dcmread(dcm_file("RG1_UNCR.dcm"))
    stored = ds.pixel_array
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.Modality == "CR"
    dec = decode("RG1_UNCR.dcm", window="lung")  # HU presets do not apply to CR: the file's window is used
    assert dec.meta["window"] == "file:15000/30000" and dec.meta["modality"] == "CR"
    assert (dec.width, dec.height) == (1841, 1955)
    grey = dec.rgb[..., 0]
    lo, hi = np.unravel_index(stored.argmin(), stored.shape), np.unravel_index(stored.argmax(), stored.shape)
    assert stored[lo] == 874 and grey[lo] == 248  # 255 - round(874 / 30000 * 255 = 7.4)
    assert stored[hi] == 26479 and grey[hi] == 30  # 255 - round(225.1)
    assert stored[1000, 900] == 3606 and grey[1000, 900] == 224  # 255 - round(30.65)
    assert grey.max() == 248 and grey.min() == 30


def test_custom_window_applies_to_other_modalities_in_their_units() -> None:
    ds = pydicom.dcmread(dcm_file("RG1_UNCR.dcm"))
    stored = ds.pixel_array
    dec = decode("RG1_UNCR.dcm", window="custom", level=4000.0, width=8000.0)
    assert dec.meta["window"] == "custom:4000/8000"
    assert stored[1000, 900] == 3606 and dec.rgb[1000, 900, 0] == 255 - 115  # round(3606 / 8000 * 255 = 114.9)


def test_palette_colour_goes_through_the_lookup_table() -> None:
    ds = pydicom.dcmread(dcm_file("OBXXXX1A.dcm"))
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    assert list(ds.RedPaletteColorLookupTableDescriptor) == [256, 0, 16]  # 256 entries of 16 bits, first index 0
    stored = ds.pixel_array
    tables = [np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, "<u2") for c in ("Red", "Green", "Blue")]
    expected = np.stack([t[stored] >> 8 for t in tables], axis=-1).astype(np.uint8)
    dec = decode("OBXXXX1A.dcm")
    assert (dec.width, dec.height, dec.channels, dec.meta["window"]) == (800, 600, 3, "palette")
    np.testing.assert_array_equal(dec.rgb, expected)
    assert tuple(dec.rgb[0, 0]) == (37, 62, 94)  # index stored[0, 0] -> (9472, 15872, 24064) >> 8
    assert len({tuple(p) for p in dec.rgb[::20, ::20].reshape(-1, 3)}) > 50  # colour, not grey indices


def test_multi_frame_is_quarantined_with_its_own_reason() -> None:
    with pytest.raises(BadImage) as e:
        decode("OBXXXX1A_2frame.dcm")
    assert e.value.reason == "multi_frame" and "2 frames" in e.value.detail


def test_apply_window_edges() -> None:
    out = apply_window(np.array([-2000.0, -100.0, 0.0, 100.0, 5000.0]), level=0.0, width=200.0)
    np.testing.assert_array_equal(out, [0, 0, 128, 255, 255])


def test_bad_dicom() -> None:
    raw = dcm_file("CT_small.dcm").read_bytes()
    ds = pydicom.dcmread(io.BytesIO(raw))
    del ds.PixelData
    bio = io.BytesIO()
    ds.save_as(bio)
    with pytest.raises(BadImage) as e:
        decode_dicom(bio.getvalue(), DicomSource(), **LIMITS)
    assert e.value.reason == "no_pixel_data"
    with pytest.raises(BadImage) as e:
        decode_dicom(raw[: len(raw) - 5000], DicomSource(), **LIMITS)
    assert e.value.reason == "truncated"
    with pytest.raises(BadImage) as e:
        decode_dicom(raw, DicomSource(), max_pixels=10_000, min_side=8, max_side=20000)  # 128x128
    assert e.value.reason == "decompression_bomb"


def test_dicom_sniffed_without_extension(tmp_path: Path) -> None:
    target = tmp_path / "IM0001"
    target.write_bytes(dcm_file("CT_small.dcm").read_bytes())
    dec = load_image_file(target, DataConfig(), IngestConfig())
    assert dec.format == "dicom" and dec.meta["patient_id"] == "1CT1"
