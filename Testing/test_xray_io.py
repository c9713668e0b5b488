"""X-ray inputs: our DRRs with their geometry, plain PNGs, DICOM radiographs and 2D volumes become an
XRay; bad files fail with a message naming the file and the problem."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from x2recon.drr.render import render_drr, write_drr
from x2recon.errors import X2ReconInputError
from x2recon.geometry import ProjectionGeometry
from x2recon.io.image import write_png16
from x2recon.io.xray import read_xray, write_geometry, xray_from_array


@pytest.fixture(scope="module")
def drr_files(chest_half_seg, tmp_path_factory):
    ct, _, _, iso = chest_half_seg
    g = ProjectionGeometry.from_view("LAT", iso, size=(96, 96))
    folder = tmp_path_factory.mktemp("drr")
    img = render_drr(ct, g, device="cpu")
    write_drr(img, folder, "LAT")
    return folder, img


def test_drr_png_uses_its_geometry_file(drr_files):
    folder, img = drr_files
    x = read_xray(folder / "LAT.png", view="AP")  # the sidecar wins over the default view
    assert x.geometry == img.geometry
    assert np.allclose(x.image, img.display / 65535.0)
    r = x.resized(64)
    assert r.image.shape == (64, 64) and r.geometry.size == (64, 64)
    assert np.isclose(r.image.mean(), x.image.mean(), atol=2e-3)  # area resampling keeps the mean


def test_plain_png_gets_the_default_geometry(tmp_path):
    a = (np.random.default_rng(0).random((80, 80)) * 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(a), str(tmp_path / "x.png"))
    x = read_xray(tmp_path / "x.png", view="PA")
    assert x.geometry.size == (80, 80) and x.geometry.name == "PA"
    assert np.allclose(x.image, a / 255.0)
    write_png16((a.astype(np.uint16) * 257), tmp_path / "x16.png")
    assert np.allclose(read_xray(tmp_path / "x16.png").image, a / 255.0, atol=1e-6)


def test_dicom_radiograph_spacing_distances_and_monochrome1(tmp_path):
    rng = np.random.default_rng(1)
    a = (rng.random((1, 100, 100)) * 4000).astype(np.uint16)
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((2.0, 2.0, 1.0))
    for k, v in {"0008|0060": "DX", "0018|1110": "1500", "0018|1111": "1300"}.items():
        img.SetMetaData(k, v)
    path = tmp_path / "chest.dcm"
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    w.SetFileName(str(path))
    w.Execute(img)
    # GDCM always writes MONOCHROME2; make it a bone-dark MONOCHROME1 radiograph (same length)
    raw = path.read_bytes()
    assert raw.count(b"MONOCHROME2") == 1
    path.write_bytes(raw.replace(b"MONOCHROME2", b"MONOCHROME1"))
    x = read_xray(path, view="AP")
    g = x.geometry
    assert g.size == (100, 100) and np.isclose(g.spacing[0], 2.0)  # the detector's pixel spacing
    assert np.isclose(g.sdd, 1500.0) and np.isclose(np.linalg.norm(g.source - g.isocenter), 1300.0)
    # MONOCHROME1 (bone dark) is inverted once: the lowest stored pixel becomes the brightest (SimpleITK's
    # reader may already invert it, and read_xray must then not invert again)
    stored = a[0].astype(float)
    assert x.image.flat[np.argmin(stored)] > x.image.flat[np.argmax(stored)]


def test_bad_inputs_say_what_is_wrong(tmp_path, drr_files):
    folder, _ = drr_files
    cases = []
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = 200
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.png"))
    cases.append((tmp_path / "rgb.png", "greyscale"))
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((16, 16), np.uint8) * 3), str(tmp_path / "tiny.png"))
    cases.append((tmp_path / "tiny.png", "at least"))
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, (64, 90), dtype=np.uint8)),
                    str(tmp_path / "wide.png"))
    cases.append((tmp_path / "wide.png", "square"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((64, 64), np.uint8)), str(tmp_path / "blank.png"))
    cases.append((tmp_path / "blank.png", "blank"))
    vol = sitk.GetImageFromArray(np.random.default_rng(0).random((5, 40, 40)).astype(np.float32))
    sitk.WriteImage(vol, str(tmp_path / "ct.nii.gz"))
    cases.append((tmp_path / "ct.nii.gz", "5 slices"))
    (tmp_path / "notes.txt").write_text("hello")
    cases.append((tmp_path / "notes.txt", "unsupported"))
    cases.append((tmp_path / "missing.png", "not found"))
    # a DRR whose geometry file is for another image size
    import shutil

    shutil.copyfile(folder / "LAT.png", tmp_path / "moved.png")
    write_geometry(ProjectionGeometry.from_view("AP", size=(128, 128)), tmp_path / "moved.json")
    cases.append((tmp_path / "moved.png", "geometry is for 128×128"))
    for path, words in cases:
        with pytest.raises(X2ReconInputError) as e:
            read_xray(path)
        assert path.name in str(e.value) and words in str(e.value), str(e.value)


def test_xray_from_array_types():
    g = ProjectionGeometry.from_view("AP", size=(40, 40))
    ramp = np.tile(np.linspace(0, 1, 40), (40, 1))
    assert np.allclose(xray_from_array((ramp * 65535).astype(np.uint16), g).image, ramp, atol=1e-4)
    assert np.allclose(xray_from_array(ramp.astype(np.float32), g).image, ramp)
    with pytest.raises(X2ReconInputError, match=r"\[0, 1\]"):
        xray_from_array(ramp * 3, g)
