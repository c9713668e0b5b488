"""Inputs that are too large, mislabelled or ambiguous are refused (or named) before any work: CTs over the voxel
limit (from the header, no voxel read), CTs whose histogram cannot be Hounsfield units, NIfTI headers whose
qform and sform disagree, meshes over registration's point limit, list and JSON files in a legacy encoding
or nested absurdly deep, missing inputs in a CT list, implausible box sizes and thresholds, and messages that
hid what differs (grid direction, a lying STL header, numpy reprs)."""

from __future__ import annotations

import gzip
import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from x2recon.errors import X2ReconInputError


# ------------------------------------------------------------------ helpers
def nifti_bytes(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> bytearray:
    """An uncompressed NIfTI-1 file of ``array`` ([k, j, i]) as SimpleITK writes it (both qform and sform set)."""
    import tempfile

    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(np.asarray(direction, float).ravel().tolist())
    with tempfile.TemporaryDirectory() as d:
        sitk.WriteImage(img, f"{d}/x.nii")
        return bytearray(Path(f"{d}/x.nii").read_bytes())


def header_only(dtype, size=(1024, 1024, 800), spacing=0.5) -> bytes:
    """The 352 bytes (header + extension flag) of a NIfTI claiming ``size`` voxels of ``dtype``: a realistic
    0.5 mm CT's header without its gigabytes."""
    hdr = nifti_bytes(np.zeros((2, 2, 2), dtype), (spacing,) * 3)[:352]
    struct.pack_into("<4h", hdr, 40, 3, *size)
    return bytes(hdr)


def lumbar(shared_data) -> tuple[np.ndarray, tuple, tuple, tuple]:
    """The lumbar crop's HU array and grid (spacing, origin, direction: oblique)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(shared_data / "lumbar_crop_verse" / "ct.nii.gz"))
    return sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


# ------------------------------------------------------------------ 1. size, from the header
@pytest.mark.parametrize("dtype", [np.int16, np.float64])
def test_a_ct_over_the_voxel_limit_is_refused_from_its_header(tmp_path, monkeypatch, dtype):
    """1024×1024×800 at 0.5 mm: int16 reached 10 GB and a traceback in hu_to_mu, float64 one in
    GetArrayFromImage.  Now the header alone is read: the voxel reader is never called."""
    import SimpleITK as sitk

    from x2recon.io.volume import MAX_VOLUME_VOXELS, read_ct

    f = tmp_path / "big.nii"
    f.write_bytes(header_only(dtype))
    monkeypatch.setattr(sitk, "ReadImage", lambda *a, **k: pytest.fail("voxels were read"))
    with pytest.raises(X2ReconInputError) as e:
        read_ct(f)
    msg = str(e.value)
    assert str(f) in msg and "1024×1024×800" in msg and "839 M" in msg
    assert f"{MAX_VOLUME_VOXELS / 1e6:,.0f} M voxels" in msg and "MAX_VOLUME_VOXELS" in msg
    suggested = float(msg.rsplit("e.g. ", 1)[1].split(" mm")[0])
    assert np.prod(np.ceil(np.array([1024, 1024, 800]) * 0.5 / suggested)) <= MAX_VOLUME_VOXELS  # the advice fits


def test_a_ct_at_the_limit_is_not_refused_for_size(tmp_path):
    from x2recon.io.volume import read_ct

    f = tmp_path / "at_limit.nii"
    f.write_bytes(header_only(np.int16, size=(512, 512, 1024), spacing=1.0))
    with pytest.raises(X2ReconInputError, match="truncated NIfTI"):  # the next check: the voxels are missing
        read_ct(f)


# ------------------------------------------------------------------ 2. Hounsfield histogram
REAL_CTS = ["chest_lidc0001", "chest_lidc0001_half", "abdomen_pancreas_cb001", "chest_lungdx_a0001",
            "wholebody_tcga_thca", "head_invesalius", "thoracoabdominal_slab", "lumbar_crop_verse"]
FAST_CTS = ["head_invesalius", "lumbar_crop_verse"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in FAST_CTS else pytest.mark.slow) for n in REAL_CTS])
def test_every_real_ct_passes_the_histogram_check(shared_data, name):
    from x2recon.io.volume import read_ct

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor does any of them warn about its NIfTI frame
        read_ct(shared_data / name / "ct.nii.gz")


def test_the_bundled_sample_ct_passes(chest_half):
    from x2recon.io.volume import read_ct

    read_ct(chest_half[0])


def _variants(a):
    return {
        # stored values are HU + 1024; the slope/intercept applied again: HU − 1024, air clipped at −2048
        "twice": ((a.astype(np.int32) - 1024).clip(-2048, None).astype(np.int16),
                  r"fat and soft tissue .* and the soft-tissue peak sits at -\d+ HU instead of near 0.*: a rescale "
                  r"intercept of -1024 applied twice\?"),
        "int8": (a.clip(-128, 127).astype(np.int8),
                 r"no voxels above 300 HU, so no bone: values span -128…127, an 8-bit copy of the CT"),
        "no_bone": (np.where(a > 250, 40, a).astype(np.int16), r"no voxels above 300 HU.*not a CT in Hounsfield units\?"),
    }


@pytest.mark.parametrize("variant", ["twice", "int8", "no_bone"])
@pytest.mark.parametrize("name", ["lumbar_crop_verse", "head_invesalius"])
def test_impossible_hu_is_refused_saying_what_looks_wrong(tmp_path, shared_data, name, variant):
    import SimpleITK as sitk

    from x2recon.io.volume import read_ct

    img = sitk.ReadImage(str(shared_data / name / "ct.nii.gz"))
    arr, pattern = _variants(sitk.GetArrayFromImage(img))[variant]
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    f = tmp_path / f"{variant}.nii.gz"
    sitk.WriteImage(out, str(f))
    with pytest.raises(X2ReconInputError, match=pattern) as e:
        read_ct(f)
    assert str(e.value).startswith(str(f))


def test_a_volume_from_memory_gets_the_same_histogram_check(tmp_path, shared_data):
    """Slicer passes CT nodes as Volumes (no read_ct): the case is refused alike, with nothing built."""
    from x2recon.dataset.case import build_case
    from x2recon.io.volume import Volume

    a, sp, org, d = lumbar(shared_data)
    ct = Volume(a.clip(-128, 127), sp, org, np.reshape(d, (3, 3)))
    res = build_case(ct, tmp_path, case_id="int8", config=None)
    assert res.status == "failed" and "no voxels above 300 HU" in res.reason


# ------------------------------------------------------------------ 3. NIfTI qform / sform
def test_nifti_frames_parse_as_simpleitk_places_the_volume(shared_data):
    """The struct parser's qform and sform (LPS) equal SimpleITK's affine on a file SimpleITK wrote from an
    oblique grid: the independent reference for the checks below."""
    from x2recon.io.volume import nifti_frames

    a, sp, org, d = lumbar(shared_data)
    fr = nifti_frames(bytes(nifti_bytes(a, sp, org, d)[:348]))
    expected = np.eye(4)
    expected[:3, :3] = np.reshape(d, (3, 3)) @ np.diag(sp)
    expected[:3, 3] = org
    assert fr["qform_code"] > 0 and fr["sform_code"] > 0
    np.testing.assert_allclose(fr["sform"], expected, atol=1e-4)
    np.testing.assert_allclose(fr["qform"], expected, atol=1e-4)


def _patched(tmp_path, shared_data, name, change) -> Path:
    a, sp, org, d = lumbar(shared_data)
    b = nifti_bytes(a, sp, org, d)
    change(b)
    f = tmp_path / name
    f.write_bytes(gzip.compress(bytes(b)) if name.endswith(".gz") else bytes(b))
    return f


def _srow(b) -> np.ndarray:
    return np.array(struct.unpack("<12f", b[280:328]), np.float64).reshape(3, 4)


def _set_srow(b, s) -> None:
    b[280:328] = struct.pack("<12f", *np.asarray(s, np.float64).ravel())


def test_mirrored_sform_is_refused(tmp_path, shared_data):
    def mirror(b):
        s = _srow(b)
        s[:, 0] *= -1  # the i axis flipped: a mirror image of the qform
        _set_srow(b, s)

    f = _patched(tmp_path, shared_data, "mirrored.nii.gz", mirror)
    from x2recon.io.volume import read_ct

    with pytest.raises(X2ReconInputError, match="qform and sform are mirror images"):
        read_ct(f)


def test_shifted_sform_is_used_and_said(tmp_path, shared_data):
    from x2recon.io.volume import read_ct

    moved = {}

    def shift(b):
        s = _srow(b)
        s[0, 3] += 100.0  # 100 mm towards the patient's left (RAS x)
        moved["ras"] = s[:, 3].copy()
        _set_srow(b, s)

    f = _patched(tmp_path, shared_data, "shifted.nii", shift)
    with pytest.warns(UserWarning, match=r"shifted.nii: NIfTI qform and sform disagree \(origins 100.0 mm apart.*"
                                         r"placed by the sform"):
        v = read_ct(f)
    np.testing.assert_allclose(v.origin, moved["ras"] * [-1, -1, 1], atol=1e-3)  # the sform's origin, in LPS


def test_no_frame_codes_are_said(tmp_path, shared_data):
    from x2recon.io.volume import read_ct

    def no_codes(b):
        b[252:256] = struct.pack("<2h", 0, 0)

    f = _patched(tmp_path, shared_data, "nocodes.nii", no_codes)
    with pytest.warns(UserWarning, match="nocodes.nii: NIfTI header has neither a qform nor an sform code"):
        v = read_ct(f)
    np.testing.assert_allclose(v.direction, np.eye(3))  # what the warning says was assumed
    np.testing.assert_allclose(v.origin, 0)


# ------------------------------------------------------------------ 4. registration size
def test_a_10m_face_mesh_is_refused_before_it_is_read(tmp_path, monkeypatch, capsys):
    """A binary STL announcing 10 M triangles, of the matching size (sparse: no disk used): refused from the
    header; trimesh is never asked to load it (it took 11.7 GiB in GBCPD's kernel, or 300 s of silence)."""
    import trimesh

    from x2recon.cli import main
    from x2recon.registration.inputs import MAX_POINTS

    n = 10_000_000
    big = tmp_path / "big.stl"
    with open(big, "wb") as f:
        f.write(b"binary".ljust(80) + struct.pack("<I", n))
        f.truncate(84 + 50 * n)
    small = tmp_path / "s.ply"
    trimesh.creation.icosphere(2).export(small)
    monkeypatch.setattr(trimesh, "load", lambda *a, **k: pytest.fail("the mesh was loaded"))
    for method in ("gbcpd", "cpd"):
        assert main(["register", str(big), str(small), "--method", method, "--out", str(tmp_path / "r.ply")]) == 2
        err = capsys.readouterr().err
        assert f"{big}: source has 10,000,000 triangles (about 5,000,000 points)" in err
        assert f"{MAX_POINTS:,} points" in err and "MAX_POINTS" in err and "Traceback" not in err


def test_point_arrays_over_the_limit_are_refused():
    from x2recon.registration.inputs import MAX_POINTS, load_points

    with pytest.raises(X2ReconInputError, match=f"target has {MAX_POINTS + 1:,} points"):
        load_points(np.zeros((MAX_POINTS + 1, 3)), "target")


def test_mesh_header_counts_match_the_files(tmp_path):
    import trimesh

    from x2recon.io.mesh import header_counts, write_mesh

    m = trimesh.creation.icosphere(2)
    for suffix in ("stl", "ply", "off"):
        write_mesh(m, tmp_path / f"m.{suffix}")
        nv, nf = header_counts(tmp_path / f"m.{suffix}")
        assert nf == len(m.faces) and nv in (None, len(m.vertices))


def test_an_stl_whose_header_lies_says_so(tmp_path):
    import trimesh

    from x2recon.io.mesh import read_mesh, write_mesh

    f = tmp_path / "lie.stl"
    write_mesh(trimesh.creation.icosphere(1), f)
    b = bytearray(f.read_bytes())
    b[80:84] = struct.pack("<I", 1000)  # 80 triangles in the file
    f.write_bytes(bytes(b))
    with pytest.raises(X2ReconInputError, match=r"lie.stl: binary STL header announces 1,000 triangles \(50,084 bytes\), "
                                                r"but the file holds 4,084 bytes"):
        read_mesh(f)


# ------------------------------------------------------------------ 5. list files and JSON documents
def test_a_ct_list_with_bom_comments_and_blank_lines(tmp_path, chest_half):
    from x2recon.dataset.builder import discover

    lst = tmp_path / "cts.txt"
    lst.write_bytes(f"\ufeff# my cases\n\n   \n{chest_half[0]}\n  # last line\n".encode("utf-8"))
    cases = discover([lst])
    assert [c.ct for c in cases] == [str(chest_half[0])]


def test_a_latin1_ct_list_is_a_clear_error(tmp_path):
    from x2recon.dataset.builder import discover

    lst = tmp_path / "latin1.txt"
    lst.write_bytes("/data/Pérez/ct.nii.gz\n".encode("latin-1"))
    with pytest.raises(X2ReconInputError, match=r"latin1.txt: CT list is not UTF-8 text \(byte 0xE9 on line 1"):
        discover([lst])


def test_missing_listed_cts_are_refused_before_any_case(tmp_path, capsys):
    """20 000 missing paths (100 000 ran for an hour, a failed case each): one error naming the list, the first
    five and the count; no case started."""
    from x2recon.cli import main

    lst = tmp_path / "many.txt"
    lst.write_text("\n".join(f"/nowhere/ct_{i}.nii.gz" for i in range(20_000)))
    out = tmp_path / "ds"
    assert main(["build-dataset", "--ct", str(lst), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{lst}: inputs not found: /nowhere/ct_0.nii.gz, " in err and "/nowhere/ct_4.nii.gz … " in err
    assert "(20,000 of 20,000 listed paths are missing)" in err and "/nowhere/ct_5.nii.gz" not in err
    assert not (out / "cases").exists() and not (out / "status").exists()


def test_geometry_json_bom_latin1_and_nesting(tmp_path):
    from x2recon.geometry import ProjectionGeometry

    g = ProjectionGeometry.from_view("AP", (0, 0, 0))
    ok = tmp_path / "bom.json"
    ok.write_bytes(b"\xef\xbb\xbf" + g.to_json().encode())
    assert ProjectionGeometry.from_json(ok) == g
    latin = tmp_path / "latin1.json"
    latin.write_bytes(g.to_json().replace('"name": "AP"', '"name": "salle Ménard"').encode("latin-1"))
    with pytest.raises(X2ReconInputError, match=r"latin1.json: geometry JSON is not UTF-8 text \(byte 0xE9 on line 3"):
        ProjectionGeometry.from_json(latin)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(X2ReconInputError, match="deep.json: geometry JSON is nested 100,000 levels deep"):
        ProjectionGeometry.from_json(deep)


# ------------------------------------------------------------------ 6. numbers
@pytest.mark.parametrize("box", [float("nan"), float("inf"), 1e9, 5.0, -384.0])
def test_implausible_box_sizes_are_refused_and_never_written(tmp_path, box):
    from x2recon.dataset.config import BuildConfig
    from x2recon.geometry import ProjectionGeometry

    with pytest.raises(ValueError, match="box_size must be a finite edge of 10–2000 mm"):
        ProjectionGeometry.from_view("AP", (0, 0, 0), box_size=box)
    with pytest.raises(ValueError, match="--box-size"):
        BuildConfig(box_size=box)
    d = ProjectionGeometry.from_view("AP", (0, 0, 0)).to_dict()
    f = tmp_path / "g.json"
    f.write_text(json.dumps({**d, "box_size": box}))  # Python writes NaN/Infinity as other tools may
    with pytest.raises(X2ReconInputError, match=r"g.json: invalid geometry: .*box_size"):
        ProjectionGeometry.from_json(f)


@pytest.mark.parametrize("option, value", [("--threshold-hu", "nan"), ("--threshold-hu", "1e9"),
                                           ("--threshold-hu", "-2000"), ("--box-size", "1e9"), ("--box-size", "nan"),
                                           ("--sdd", "1e9"), ("--sod", "inf"), ("--detector-mm", "1e-9")])
def test_numeric_build_options_are_finite_and_plausible(tmp_path, capsys, option, value):
    from x2recon.cli import main

    with pytest.raises(SystemExit) as e:
        main(["build-dataset", "--ct", str(tmp_path), "--out", str(tmp_path / "ds"), option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and repr(value) in err


def test_threshold_hu_is_checked_by_the_config_too():
    from x2recon.dataset.config import BuildConfig

    with pytest.raises(ValueError, match="--threshold-hu"):
        BuildConfig(threshold_hu=float("nan"))


# ------------------------------------------------------------------ 7. what the messages and the console say
def test_a_grid_that_differs_only_in_direction_prints_the_direction(shared_data):
    from x2recon.dataset.config import BuildConfig
    from x2recon.dataset.segmentation import segment
    from x2recon.io.volume import read_ct, read_labelmap

    ct = read_ct(shared_data / "lumbar_crop_verse" / "ct.nii.gz")
    lab = read_labelmap(shared_data / "lumbar_crop_verse" / "labels_verse.nii.gz")
    lab.direction = np.diag([1.0, 1.0, 1.0])
    with pytest.raises(X2ReconInputError) as e:
        segment(ct, lab, BuildConfig(label_convention="verse", structures=["vertebrae_L3"]))
    msg = str(e.value)
    assert "does not match" in msg and "direction [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]" in msg
    assert f"direction {np.round(ct.direction, 3).tolist()}" in msg


def test_a_labelmap_with_few_structures_is_said_on_the_console(tmp_path, chest_half):
    """Labels holding 1 of the 3 requested vertebrae: a warning with the count and the missing names (it was
    said only in meta.json).  The build is cancelled right after segmentation to keep the test short."""
    from x2recon.dataset.case import CaseInput, build_case
    from x2recon.dataset.config import BuildConfig
    from x2recon.errors import CancelledError
    from x2recon.io.volume import read_labelmap, write_volume
    from x2recon.structures import totalseg_v2

    lab = read_labelmap(chest_half[1])
    t7 = {v: k for k, v in totalseg_v2().items()}["vertebrae_T7"]
    one = tmp_path / "one.nii.gz"
    write_volume(lab.with_array(np.where(lab.array == t7, t7, 0).astype(np.uint8)), one)
    calls = []
    cfg = BuildConfig(structures=["vertebrae_T7", "vertebrae_T8", "vertebrae_T9"], views=["AP"])
    with pytest.warns(UserWarning, match=r"chest: structures found 1 of 3 requested \(labelmap:.*one.nii.gz\); "
                                         r"missing: vertebrae_T8, vertebrae_T9"):
        with pytest.raises(CancelledError):
            build_case(CaseInput("chest", str(chest_half[0]), str(one)), tmp_path / "cases", config=cfg,
                       cancel=lambda: calls.append(1) or len(calls) > 1)


def test_numpy_reprs_never_reach_a_message():
    import numpy as np

    from x2recon.errors import plain, without_numpy_reprs
    from x2recon.geometry import ProjectionGeometry

    d = ProjectionGeometry.from_view("AP", (0, 0, 0)).to_dict()
    d["spacing"] = list(np.zeros(2))  # e.g. a DICOM PixelSpacing of 0 read through numpy
    with pytest.raises(X2ReconInputError) as e:
        ProjectionGeometry.from_dict(d)
    assert "np." not in str(e.value) and "got (0, 0)" in str(e.value)
    assert plain(np.array([np.nan, 0.5])) == "[nan, 0.5]"
    assert without_numpy_reprs("got (np.float64(0.0), np.int64(3)) and array([1., 2.])") == "got (0.0, 3) and [1., 2.]"
