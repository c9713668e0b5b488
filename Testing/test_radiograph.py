"""Real radiographs (io/xray.py): DICOM CR/DX tags, PNG/JPEG without geometry placed by the lung fields and
what was assumed said on stdout."""

import numpy as np
import pytest
import SimpleITK as sitk

from x2recon.errors import X2ReconInputError
from x2recon.geometry import CHEST_DEFAULTS
from x2recon.io.xray import TRAINING_LUNGS, lung_fields, place_xray, read_xray
from x2recon.sample_data import sample_data_dir

NIH = "xray_nih_cxr/00000001_000.png"


def chest_image(n=256, dx=0, dy=0):
    """A frontal chest in display values: body, two dark lung fields (outer edges at 40 and 216 px when
    unshifted, rows 40–180), a bright mediastinum and spine between them; shifted by (dx, dy) px."""
    rows, cols = np.mgrid[:n, :n].astype(float)
    img = np.full((n, n), 0.55)
    for cx in (84 + dx, 172 + dx):
        img[((cols - cx) / 44) ** 2 + ((rows - 110 - dy) / 70) ** 2 <= 1] = 0.15
    img[np.abs(cols - 128 - dx) < 12] = 0.85  # spine / mediastinum
    img[rows > 190 + dy] = 0.75  # abdomen below the diaphragm
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_png(path, a):
    sitk.WriteImage(sitk.GetImageFromArray(a), str(path))
    return path


def test_lung_fields_of_a_synthetic_chest():
    l, r, t, b = lung_fields(chest_image() / 255.0)
    assert abs(l - 40) <= 3 and abs(r - 216) <= 3 and abs(t - 40) <= 4 and abs(b - 180) <= 4
    assert lung_fields(np.full((128, 128), 0.5)) is None  # nothing like two lung fields


def test_png_without_geometry_is_placed_by_its_lungs_and_says_so(tmp_path):
    x = read_xray(write_png(tmp_path / "cxr.png", chest_image(dx=20, dy=-10)), view="PA")
    p = x.placement
    assert p.method == "lung fields" and p.assumed
    width = p.lungs_px[1] - p.lungs_px[0]
    m = CHEST_DEFAULTS["sdd"] / CHEST_DEFAULTS["sod"]
    assert p.pixel_mm == pytest.approx(TRAINING_LUNGS["width_mm"] * m / width)
    # the training patient's lung centre projects onto this image's lung centre
    dx, dz = TRAINING_LUNGS["centre_mm"]
    col, row = np.asarray(x.geometry.project(np.array([dx, 0.0, dz]))).reshape(2)
    assert abs(col - (128 + 20)) <= 2 and abs(row - (110 - 10)) <= 3
    text = p.text()
    assert "ASSUMED" in text and "--pixel-spacing" in text and "--geometry" in text and "estimated" in text


def test_flags_override_what_would_be_assumed(tmp_path):
    path = write_png(tmp_path / "cxr.png", chest_image())
    x = read_xray(path, view="PA", pixel_spacing=0.7, sdd=1000.0, sod=900.0)
    g = x.geometry
    assert g.spacing[0] == pytest.approx(0.7) and g.sdd == pytest.approx(1000.0)
    assert np.linalg.norm(g.source - g.isocenter) == pytest.approx(900.0)
    assert x.placement.sources["pixel_mm"] == "given (--pixel-spacing)"
    assert not any(k in ("sdd", "sod", "pixel_mm") and v.startswith("assumed") for k, v in x.placement.sources.items())


def test_unknown_values_come_from_the_models_training_geometry(tmp_path):
    path = write_png(tmp_path / "cxr.png", chest_image())
    x = read_xray(path, view="PA", model_geometry={"sdd": 1000.0, "sod": 850.0, "box_size": 300.0})
    g, p = x.geometry, x.placement
    assert g.sdd == pytest.approx(1000.0) and g.box_size == 300.0
    assert np.linalg.norm(g.source - g.isocenter) == pytest.approx(850.0)
    assert p.sources["sdd"] == "assumed: 1000 mm (the model's training geometry)"
    assert p.pixel_mm == pytest.approx(TRAINING_LUNGS["width_mm"] * (1000.0 / 850.0) / (p.lungs_px[1] - p.lungs_px[0]))


def test_jpeg_is_read_and_placed(tmp_path):
    path = tmp_path / "cxr.jpg"
    sitk.WriteImage(sitk.GetImageFromArray(chest_image()), str(path))
    x = read_xray(path, view="PA")
    assert x.placement.method == "lung fields" and x.image.shape == (256, 256)


def dicom(tmp_path, a, tags, monochrome1=True, spacing=0.35):
    img = sitk.GetImageFromArray(a[None])
    img.SetSpacing((spacing, spacing, 1.0))  # GDCM writes it as the radiograph's pixel spacing
    for k, v in {"0008|0060": "DX", **tags}.items():
        img.SetMetaData(k, v)
    path = tmp_path / "cxr.dcm"
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    w.SetFileName(str(path))
    w.Execute(img)
    if monochrome1:  # GDCM writes MONOCHROME2; make a bone-dark radiograph (same length)
        raw = path.read_bytes()
        assert raw.count(b"MONOCHROME2") == 1
        path.write_bytes(raw.replace(b"MONOCHROME2", b"MONOCHROME1"))
    return path


def test_dicom_monochrome1_spacing_sid_and_voi_window(tmp_path):
    bright = chest_image().astype(np.uint16) * 16  # 0 … 4080, bone bright
    stored = (4095 - bright).astype(np.uint16)  # MONOCHROME1: bone dark as stored
    stored[5:10, 5:10] = 4095  # far outside the window: clipped to its edge
    tags = {"0018|1110": "1500", "0018|1111": "1350",
            "0028|1050": "2000", "0028|1051": "3000"}  # window 500 … 3500
    # 1.6 mm pixels: the synthetic lungs (176 px) are then 253 mm wide at the patient, a plausible chest
    # (0.35 mm made them 55 mm, and such a spacing is now refused in favour of the lung-field estimate)
    path = dicom(tmp_path, stored, tags, spacing=1.6)
    x = read_xray(path, view="PA")
    g, p = x.geometry, x.placement
    from x2recon.io.xray import _read_dicom

    img = sitk.ReadImage(str(path))
    raw = _read_dicom(path, img, sitk.GetArrayFromImage(img)[0])[0]
    assert np.ptp(raw) == pytest.approx(3500.0 - 639.0)  # stored 639 … 4095 cut at the window top, 3500
    assert g.spacing[0] == pytest.approx(1.6) and g.sdd == pytest.approx(1500.0)
    assert np.linalg.norm(g.source - g.isocenter) == pytest.approx(1350.0)
    assert p.sources["pixel_mm"].startswith("DICOM") and p.sources["sdd"] == "DICOM DistanceSourceToDetector"
    assert "MONOCHROME1" in p.sources["photometric"] and "window" in p.sources
    assert x.image[128, 128] > x.image[110, 84] + 0.3  # inverted: spine bright, lung dark
    # the window clipped the 4095 block to 3500, the same value as the darkest lung pixels (4095 − 240 > 3500)
    lung = x.image[100:120, 70:100]
    assert x.image[7, 7] == pytest.approx(float(lung.min()), abs=0.02)


def test_dicom_without_window_keeps_the_full_range(tmp_path):
    stored = (4095 - chest_image().astype(np.uint16) * 16).astype(np.uint16)
    stored[5:10, 5:10] = 4095
    x = read_xray(dicom(tmp_path, stored, {}), view="PA")
    assert "window" not in x.placement.sources
    assert x.placement.sources["sdd"].startswith("assumed")


def test_non_square_image_without_spacing_or_lungs_is_refused(tmp_path):
    a = np.tile(np.linspace(0, 255, 90), (60, 1)).astype(np.uint8)  # a ramp: no lung fields
    with pytest.raises(X2ReconInputError, match="--pixel-spacing"):
        read_xray(write_png(tmp_path / "odd.png", a))
    x = read_xray(write_png(tmp_path / "odd.png", a), pixel_spacing=0.5)
    assert x.geometry.spacing[0] == 0.5


def nih_path():
    p = sample_data_dir() / NIH if sample_data_dir() is not None else None
    if p is None or not p.exists():
        pytest.skip(f"{NIH} not in the shared data")
    return p


def test_real_nih_radiograph_is_placed_plausibly():
    """The real PA chest (8-bit PNG, no geometry): lungs found, a detector of 38–50 cm (real chest
    cassettes: 35–43 cm), placed near the centre."""
    x = read_xray(nih_path(), view="PA")
    p = x.placement
    assert p.method == "lung fields" and p.assumed
    l, r, t, b = p.lungs_px
    assert 0.5 < (r - l) / 512 < 0.8 and b > t
    assert 380 < p.pixel_mm * 512 < 500
    assert abs(p.shift_px[0]) < 30 and abs(p.shift_px[1]) < 40


def test_reconstruct_prints_what_it_assumed(tmp_path, capsys):
    """``x2recon reconstruct`` on a PNG without geometry says, on stdout, what it assumed and how to give it."""
    from x2recon.cli import main

    path = write_png(tmp_path / "cxr.png", chest_image(n=128)[::1, ::1])
    rc = main(["reconstruct", "--xray", str(path), "--view", "PA", "--model", "demo", "--out", str(tmp_path / "m.ply"),
               "--resolution", "32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "cxr.png: geometry: ASSUMED" in out and "--pixel-spacing" in out
    assert "the model's training geometry" in out  # SDD/SOD from the checkpoint's build, not a constant
