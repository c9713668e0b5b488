"""Radiographs as users bring them (issue 20, items 3, 4 and the X-ray rows of 8): a DICOM pixel spacing no
chest could have is checked against the lung fields and replaced, ImagerPixelSpacing/PixelSpacing/ERMF are
told apart, the view comes from ViewPosition/PatientOrientation and is printed, 12-bit data in a 16-bit PNG,
grey + alpha PNGs, structured reports, a VOI window that blanks the image, absurd spacings and views are
named — and the rendering's caption names the camera, not the X-ray's view."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import SimpleITK as sitk

from x2recon.errors import X2ReconInputError
from x2recon.io.image import write_png16
from x2recon.io.xray import read_xray

NIH = "xray_nih_cxr/00000001_000.png"
CR = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage


@pytest.fixture(scope="module")
def nih(shared_data):
    """The real PA chest radiograph (8-bit, 512², no geometry) and its pixels."""
    path = shared_data / NIH
    return path, sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit-VR little-endian DICOM element (OB/OW with the long length form)."""
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr in (b"OB", b"OW"):
        return struct.pack("<HH", group, elem) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


def write_dicom(path, sop: bytes, elements: dict, pixels: np.ndarray | None = None):
    """A DICOM file written byte by byte (GDCM's writer rewrites spacing tags by its own rules, differently
    from one call to the next): ``elements`` {(group, elem): (VR, bytes)}, ``pixels`` uint16 or none."""
    meta = (_element(2, 1, b"OB", b"\0\1") + _element(2, 2, b"UI", sop) + _element(2, 3, b"UI", b"1.2.3.4")
            + _element(2, 0x10, b"UI", b"1.2.840.10008.1.2.1"))  # explicit VR little endian
    items = {(8, 0x16): (b"UI", sop), (8, 0x18): (b"UI", b"1.2.3.4"), **elements}
    if pixels is not None:
        H, W = pixels.shape
        us = lambda v: (b"US", struct.pack("<H", v))  # noqa: E731
        items.update({(0x28, 2): us(1), (0x28, 4): (b"CS", b"MONOCHROME2"), (0x28, 0x10): us(H), (0x28, 0x11): us(W),
                      (0x28, 0x100): us(16), (0x28, 0x101): us(16), (0x28, 0x102): us(15), (0x28, 0x103): us(0),
                      (0x7FE0, 0x10): (b"OW", np.asarray(pixels, "<u2").tobytes())})
    body = b"".join(_element(*key, *items[key]) for key in sorted(items))
    path.write_bytes(b"\0" * 128 + b"DICM" + _element(2, 0, b"UL", struct.pack("<I", len(meta))) + meta + body)
    return path


#: value representations of the tags the tests write
VR = {"0018|1110": b"DS", "0018|1111": b"DS", "0018|1114": b"DS", "0018|1164": b"DS", "0018|5101": b"CS",
      "0020|0020": b"CS", "0028|0030": b"DS", "0028|0a02": b"CS", "0028|1050": b"DS", "0028|1051": b"DS"}


def cr_dicom(path, a, tags):
    """A CR radiograph (MONOCHROME2, 16-bit) of ``a`` with exactly the DICOM ``tags`` {"gggg|eeee": text}."""
    elements = {(0x8, 0x60): (b"CS", b"CR")}
    for k, v in tags.items():
        elements[tuple(int(x, 16) for x in k.split("|"))] = (VR[k], v.encode())
    return write_dicom(path, CR.encode(), elements, np.asarray(a, np.uint16))


def ips(mm: float) -> dict:
    """ImagerPixelSpacing ``mm``\\``mm``."""
    return {"0018|1164": f"{mm:g}\\{mm:g}"}


def big_nih(a8):
    """The NIH radiograph at 1024² (nearest-neighbour ×2) in 12-bit values, as a CR stores it."""
    return np.kron(a8.astype(np.uint16) * 16, np.ones((2, 2), np.uint16))


# ------------------------------------------------------------------ item 3: the pixel spacing against anatomy
def test_absurd_dicom_pixel_spacing_is_replaced_by_the_lung_estimate(nih, tmp_path):
    """The issue's CR: 1024 px at PixelSpacing 0.168 mm makes a 172 mm wide chest.  The lung fields say so,
    the spacing is not used (a warning names it) and the detector comes out the size of a chest cassette."""
    _, a8 = nih
    x = read_xray(cr_dicom(tmp_path / "cr.dcm", big_nih(a8), {"0028|0030": "0.168\\0.168"}), view="PA")
    p = x.placement
    assert 350 <= p.pixel_mm * 1024 <= 500  # real chest detectors: 35–43 cm (the file said 172 mm)
    assert p.sources["pixel_mm"].startswith("estimated: lung fields")
    assert any("PixelSpacing 0.168" in w and "not used" in w and "mm wide at the patient" in w for w in p.warnings)
    assert "WARNING: DICOM PixelSpacing 0.168" in p.text()
    # a plausible ImagerPixelSpacing is used, and the text says it was checked against the lungs
    ok = read_xray(cr_dicom(tmp_path / "ok.dcm", big_nih(a8), ips(0.42)), view="PA").placement
    assert ok.pixel_mm == pytest.approx(0.42) and not ok.warnings
    assert ok.sources["pixel_mm"].startswith("DICOM ImagerPixelSpacing") and "within 120–400 mm" in ok.sources["spacing check"]


def test_imager_pixel_spacing_pixel_spacing_and_ermf(nih, tmp_path):
    """ImagerPixelSpacing (the detector's) wins over a PixelSpacing calibrated to the patient; the ERMF gives
    the SOD when DistanceSourceToPatient is absent; a PixelSpacing calibrated to the patient (GEOMETRY) alone
    is scaled back to the detector by the magnification."""
    _, a8 = nih
    tags = {"0028|0030": "0.38\\0.38", "0018|1114": "1.1", "0018|1110": "1800"}
    x = read_xray(cr_dicom(tmp_path / "ips.dcm", big_nih(a8), {**tags, **ips(0.42)}), view="PA")
    g = x.geometry
    assert g.spacing[0] == pytest.approx(0.42)
    assert np.linalg.norm(g.source - g.isocenter) == pytest.approx(1800 / 1.1)  # SOD = SDD / ERMF
    assert "EstimatedRadiographicMagnificationFactor 1.1" in x.placement.sources["sod"]
    assert "0.38" in x.placement.sources["pixel_mm"] and "not used" in x.placement.sources["pixel_mm"]
    tags = {"0028|0030": "0.38\\0.38", "0028|0a02": "GEOMETRY", "0018|1114": "1.1", "0018|1110": "1800"}
    x = read_xray(cr_dicom(tmp_path / "cal.dcm", big_nih(a8), tags), view="PA")
    assert x.geometry.spacing[0] == pytest.approx(0.38 * 1.1)  # patient plane × magnification = detector
    assert "at the patient" in x.placement.sources["pixel_mm"]


def test_pixel_spacings_no_detector_has(nih, tmp_path, capsys):
    """--pixel-spacing 1e-9 or 5 mm on a 512² image: refused, naming the option (not "pixel 0.000 mm, shift
    (+3150008.0, …) px" and a mesh); a DICOM's 1e-6 mm: not used, said, the lung estimate instead."""
    from x2recon.cli import main

    path, a8 = nih
    for value in (1e-9, 5.0):
        with pytest.raises(X2ReconInputError, match=r"--pixel-spacing .* a radiograph's detector is 10–2000 mm"):
            read_xray(path, view="PA", pixel_spacing=value)
    rc = main(["reconstruct", "--xray", str(path), "--model", "demo", "--out", str(tmp_path / "m.ply"),
               "--pixel-spacing", "1e-9", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "--pixel-spacing 1e-09 mm" in err and not (tmp_path / "m.ply").exists()
    p = read_xray(cr_dicom(tmp_path / "tiny.dcm", big_nih(a8), {"0028|0030": "1e-6\\1e-6"}), view="PA").placement
    assert 350 <= p.pixel_mm * 1024 <= 500 and any("PixelSpacing 1e-06 mm" in w and "not used" in w for w in p.warnings)


# ------------------------------------------------------------------ item 4: the view
def test_view_position_is_read_and_the_view_printed(nih, tmp_path):
    """A PA CR without --view is placed as PA (it was AP, byte-identical to --view AP), says why; --view wins
    but the disagreement is named; a PNG's view is said to be assumed."""
    path, a8 = nih
    dcm = cr_dicom(tmp_path / "pa.dcm", big_nih(a8), {"0018|5101": "PA", **ips(0.42)})
    x = read_xray(dcm)
    assert x.geometry == read_xray(dcm, view="PA").geometry and x.geometry != read_xray(dcm, view="AP").geometry
    assert x.placement.view == "PA" and x.placement.sources["view"] == "DICOM ViewPosition PA"
    assert "view PA" in x.placement.text()
    forced = read_xray(dcm, view="AP").placement
    assert forced.sources["view"] == "given (--view)" and any("ViewPosition is PA" in w for w in forced.warnings)
    png = read_xray(path).placement
    assert png.view == "AP" and png.sources["view"].startswith("assumed: AP") and "view AP" in png.text()


@pytest.mark.slow
def test_reconstruct_uses_the_view_position(nih, tmp_path, capsys):
    """``x2recon reconstruct`` on a PA CR without --view: the PA mesh (it was byte-identical to --view AP's), and
    stdout says why (~20 s: two reconstructions at 32³)."""
    import trimesh

    from x2recon.cli import main

    _, a8 = nih
    dcm = cr_dicom(tmp_path / "pa.dcm", big_nih(a8)[::4, ::4].copy(), {"0018|5101": "PA", **ips(1.68)})
    meshes = {}
    for tag, extra in (("none", []), ("AP", ["--view", "AP"])):
        out = tmp_path / f"{tag}.ply"
        assert main(["reconstruct", "--xray", str(dcm), "--model", "demo", "--out", str(out), "--resolution", "32",
                     "--device", "cpu", "--quiet", *extra]) == 0
        meshes[tag] = trimesh.load(out, process=False)
    text = capsys.readouterr().out
    assert "view PA" in text and "view: DICOM ViewPosition PA" in text
    assert meshes["none"].vertices.shape != meshes["AP"].vertices.shape or \
        not np.allclose(meshes["none"].vertices, meshes["AP"].vertices)


def test_patient_orientation_turns_the_image_and_tells_a_lateral(nih, tmp_path):
    """PatientOrientation R\\F (patient's left on the image's left): the image is mirrored into the L\\F an AP/PA
    view is displayed in, and said; A\\F without ViewPosition is a lateral."""
    _, a8 = nih
    a = big_nih(a8)[::4, ::4].copy()
    a[:20, :40] = 4000  # a marker: not symmetric
    plain = read_xray(cr_dicom(tmp_path / "lf.dcm", a, {"0018|5101": "PA", "0020|0020": "L\\F", **ips(1.68)}))
    mirrored = read_xray(cr_dicom(tmp_path / "rf.dcm", a[:, ::-1].copy(), {"0018|5101": "PA", "0020|0020": "R\\F", **ips(1.68)}))
    assert np.allclose(plain.image, mirrored.image, atol=1e-6)
    assert "mirrored left–right" in mirrored.placement.sources["orientation"]
    lat = read_xray(cr_dicom(tmp_path / "lat.dcm", a, {"0020|0020": "A\\F", **ips(1.68)})).placement
    assert lat.view == "LAT" and "PatientOrientation A\\F" in lat.sources["view"]


def test_rendering_caption_names_the_camera(tmp_path):
    """The rendering's captions say where the camera stands ("… — camera: anterior"), not "… — AP", which
    reads as the X-ray's view.  Rendered in a child process: off-screen VTK (Mesa's LLVM) followed by the
    first import of triton in one process crashes it, which would take the rest of a test session down."""
    import json
    import subprocess
    import sys

    script = f"""
import json, trimesh, vtk
from x2recon.mesh.render import render_png
seen = []
class Recording(vtk.vtkTextActor):
    def SetInput(self, text):
        seen.append(text)
        return super().SetInput(text)
vtk.vtkTextActor = Recording
render_png(trimesh.creation.box((30, 20, 40)), {str(tmp_path / "r.png")!r}, title="pa.dcm", size=120)
print(json.dumps(seen))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen[:2] == ["pa.dcm — camera: anterior", "camera: patient's left"]


# ------------------------------------------------------------------ item 8: the X-ray rows of the sweep
def with_sbit(png_bytes: bytes, bits: int) -> bytes:
    """A PNG with an sBIT chunk (grey significant bits) after its IHDR."""
    body = b"sBIT" + bytes([bits])
    chunk = struct.pack(">I", 1) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return png_bytes[:33] + chunk + png_bytes[33:]  # 8-byte signature + 25-byte IHDR chunk


def test_16bit_png_with_12bit_data(nih, tmp_path):
    """0–4080 in a 16-bit PNG (PadChest-style) reads as the 8-bit original does (it was /65535: [0, 0.06]);
    with an sBIT chunk the significant bits scale it; both said."""
    _, a8 = nih
    png12 = write_png16(a8.astype(np.uint16) * 16, tmp_path / "cxr12.png")
    x = read_xray(png12, view="PA")
    assert np.allclose(x.image, a8 / 255.0, atol=1e-6)  # (v·16)/4080 = v/255: the independent reference
    assert "12 of its 16 bits" in x.placement.sources["pixels"]
    # the PNG way: 12-bit data stored shifted to 16 bits with an sBIT chunk of 12, which ITK's reader shifts
    # back to 0–4095 (so it too was divided by 65 535); the significant bits scale it
    data = a8.astype(np.uint16) * 8  # 0–2040 of 4095: not windowed to its own range
    raw = write_png16(data << 4, tmp_path / "s.png").read_bytes()
    (tmp_path / "sbit.png").write_bytes(with_sbit(raw, 12))
    x = read_xray(tmp_path / "sbit.png", view="PA")
    assert np.allclose(x.image, data / 4095.0, atol=1e-6) and "12 significant bits (sBIT)" in x.placement.sources["pixels"]


def test_grey_alpha_png(nih, tmp_path):
    """A grey + alpha PNG (ITK: "Unknown PixelType"): opaque alpha is dropped and said; transparency refused."""
    from PIL import Image

    _, a8 = nih
    la = np.stack([a8, np.full_like(a8, 255)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    x = read_xray(tmp_path / "la.png", view="PA")
    assert np.allclose(x.image, a8 / 255.0) and "alpha channel dropped" in x.placement.sources["pixels"]
    la[:50, :50, 1] = 0
    Image.fromarray(la, "LA").save(tmp_path / "holes.png")
    with pytest.raises(X2ReconInputError, match="transparent"):
        read_xray(tmp_path / "holes.png", view="PA")


def test_structured_report_is_named(tmp_path):
    """A DICOM structured report (no pixels) is named as one, not "no ImageIO reader"."""
    sr = b"1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: no pixel data
    path = write_dicom(tmp_path / "report.dcm", sr, {(8, 0x60): (b"CS", b"SR"), (0x40, 0xA040): (b"CS", b"CONTAINER")})
    with pytest.raises(X2ReconInputError, match=r"report\.dcm: is a DICOM structured report .* not an image"):
        read_xray(path)


def test_voi_window_that_blanks_the_image(nih, tmp_path):
    """A VOI window above every stored value makes the image constant: the window is not applied (said, with
    the data's range), and the image reads as without the window — not "the image is constant"."""
    _, a8 = nih
    a = big_nih(a8)[::2, ::2].copy()
    x = read_xray(cr_dicom(tmp_path / "w.dcm", a, {"0028|1050": "10000", "0028|1051": "100", **ips(0.84)}))
    ref = read_xray(cr_dicom(tmp_path / "n.dcm", a, ips(0.84)))
    assert np.allclose(x.image, ref.image)
    assert "NOT applied" in x.placement.sources["window"] and any("VOI window" in w for w in x.placement.warnings)


def test_geometry_file_and_view_that_cannot_be(nih, tmp_path, capsys):
    """A geometry file with 1e-300 mm pixels is named (it was blamed on the image: "is this an X-ray of the
    kind…"); --view 1e309 is refused as a view ("math domain error" before)."""
    import json
    import shutil

    from x2recon.cli import main
    from x2recon.geometry import ProjectionGeometry

    path, _ = nih
    shutil.copyfile(path, tmp_path / "cxr.png")
    d = json.loads(ProjectionGeometry.from_view("PA", size=(512, 512)).to_json())
    d["spacing"] = [1e-300, 1e-300]
    (tmp_path / "cxr.json").write_text(json.dumps(d))
    with pytest.raises(X2ReconInputError, match=r"cxr\.json: geometry: pixel spacing 1e-300"):
        read_xray(tmp_path / "cxr.png")
    with pytest.raises(SystemExit) as e:
        main(["reconstruct", "--xray", str(path), "--view", "1e309", "--model", "demo", "--out", str(tmp_path / "m.ply")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--view" in err and "finite" in err and "math domain" not in err
    with pytest.raises(X2ReconInputError, match="finite"):
        read_xray(path, view=float("inf"))
