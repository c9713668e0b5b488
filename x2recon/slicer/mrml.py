"""The Slicer boundary: MRML nodes (RAS) ↔ x2recon objects (LPS mm).

This is where MRML nodes cross between RAS and LPS (the only other RAS → LPS step is ``io.mesh`` reading
a mesh file whose header declares ``SPACE=RAS``); the Slicer modules
(X2DatasetBuilder, X2BoneRecon, SpiderCT) call these helpers from their logic.  It imports MRML and
VTK (inside the functions) only — no Qt, no application — so it runs with the ``slicer-core`` wheel;
x2recon's heavy parts (torch, the renderer) are never imported here.

Conventions: an x2recon ``Volume`` holds its array as ``[k, j, i]`` with an IJK → LPS affine; meshes
are ``trimesh.Trimesh`` in LPS mm; an ``XRay`` is a display image with its ``ProjectionGeometry``
(LPS).  A node's parent transform is applied when reading a node (volumes: linear only).
"""

from __future__ import annotations

import numpy as np

#: RAS ↔ LPS: flip the first two axes (its own inverse).
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Node attribute holding an X-ray's ``ProjectionGeometry`` as JSON (LPS mm), set on DRR nodes and
#: reconstructed models.
GEOMETRY_ATTRIBUTE = "x2recon.geometry"

#: Bone colour of reconstructed and ground-truth models.
BONE_COLOR = (0.95, 0.92, 0.84)


def structure_color(name: str) -> tuple[float, float, float]:
    """A stable colour per structure: vertebrae from yellow (C1) to red (L5), ribs alternating blue
    and green by level (left lighter than right), anything else a hue from its name.  Groups
    (``cervical``, ``thoracic``, ``lumbar``, ``vertebrae``, ``ribs``) take a member's colour."""
    import colorsys
    import zlib

    group = {"cervical": "vertebrae_C4", "thoracic": "vertebrae_T7", "vertebrae": "vertebrae_T7",
             "lumbar": "vertebrae_L3", "ribs": "rib_right_5"}
    name = group.get(name, name)
    order = [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]
    if name.startswith("vertebrae_") and name[10:] in order:
        h = 0.16 * (1 - order.index(name[10:]) / (len(order) - 1))
        return colorsys.hsv_to_rgb(h, 0.75, 0.95)
    if name.startswith("rib_") and name.count("_") == 2 and name.split("_")[2].isdigit():
        side, level = name.split("_")[1], int(name.split("_")[2])
        h = 0.58 if level % 2 else 0.38
        return colorsys.hsv_to_rgb(h, 0.55 if side == "left" else 0.8, 0.9)
    return colorsys.hsv_to_rgb((zlib.crc32(name.encode()) % 360) / 360.0, 0.6, 0.9)


def metrics_table_values(table_node) -> dict[str, float]:
    """``label → value`` of a metrics table node with "Metric" and "Value" columns (the panels' and tests' reader)."""
    t = table_node.GetTable()
    labels, values = t.GetColumnByName("Metric"), t.GetColumnByName("Value")
    return {labels.GetValue(i): values.GetValue(i) for i in range(t.GetNumberOfRows())}


def lps_ras_points(points) -> np.ndarray:
    """LPS ↔ RAS for points of shape (..., 3): negate x and y (its own inverse)."""
    p = np.array(points, dtype=float, copy=True)
    p[..., :2] *= -1
    return p


def vtk_matrix_to_numpy(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_vtk_matrix(a: np.ndarray):
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def volume_node_to_volume(node):
    """A scalar/labelmap volume node → ``x2recon.io.volume.Volume`` (array [k, j, i], LPS affine)."""
    import vtk
    from vtk.util import numpy_support

    from x2recon.io.volume import Volume

    img = node.GetImageData()
    if img is None or img.GetNumberOfPoints() == 0:
        raise ValueError(f"volume node {node.GetName()!r} has no image data")
    if img.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume node {node.GetName()!r} is not a scalar volume")
    ni, nj, nk = img.GetDimensions()
    arr = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(nk, nj, ni).copy()
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    A = LPS_RAS @ vtk_matrix_to_numpy(m)
    # a parent transform (if any) moves the volume in world space: apply it (linear only)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise ValueError(f"volume node {node.GetName()!r} is under a non-linear transform: harden it first")
        t = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(t)
        A = LPS_RAS @ vtk_matrix_to_numpy(t) @ LPS_RAS @ A
    spacing = np.linalg.norm(A[:3, :3], axis=0)
    return Volume(arr, spacing, A[:3, 3], A[:3, :3] / spacing, node.GetName())


def volume_to_volume_node(vol, scene, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """``Volume`` (LPS) → a new volume node (RAS) in ``scene`` with display node."""
    import vtk
    from vtk.util import numpy_support

    arr = np.ascontiguousarray(vol.array)
    img = vtk.vtkImageData()
    nk, nj, ni = arr.shape
    img.SetDimensions(ni, nj, nk)
    vtk_arr = numpy_support.numpy_to_vtk(arr.reshape(-1), deep=True)
    img.GetPointData().SetScalars(vtk_arr)
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetAndObserveImageData(img)
    node.SetIJKToRASMatrix(numpy_to_vtk_matrix(LPS_RAS @ vol.affine))
    display_class = {
        "vtkMRMLScalarVolumeNode": "vtkMRMLScalarVolumeDisplayNode",
        "vtkMRMLLabelMapVolumeNode": "vtkMRMLLabelMapVolumeDisplayNode",
    }[class_name]
    disp = scene.AddNewNodeByClass(display_class)
    if class_name == "vtkMRMLScalarVolumeNode":
        disp.SetAutoWindowLevel(True)
    color = scene.GetNodeByID("vtkMRMLColorTableNodeGrey" if class_name == "vtkMRMLScalarVolumeNode" else "vtkMRMLColorTableNodeLabels")
    if color is not None:  # present in the application's scene (colour logic), not in a bare one
        disp.SetAndObserveColorNodeID(color.GetID())
    node.SetAndObserveDisplayNodeID(disp.GetID())
    return node


def drr_to_volume_node(drr, scene, name: str):
    """A DRR as a single-slice volume node lying on its detector plane in world coordinates.

    Pixel (col, row) sits at ``geometry.pixel_to_world(col, row)``: in the 3D view the image
    appears where the detector is, and a slice view aligned to it shows the radiograph.
    """
    from x2recon.io.volume import Volume

    g = drr.geometry
    A = np.eye(4)
    A[:3, 0] = g.u * g.spacing[0]
    A[:3, 1] = g.v * g.spacing[1]
    A[:3, 2] = g.plane_normal
    A[:3, 3] = g.pixel_to_world(0, 0)
    spacing = np.array([g.spacing[0], g.spacing[1], 1.0])
    vol = Volume(drr.display[None].astype(np.uint16), spacing, A[:3, 3], A[:3, :3] / spacing)
    node = volume_to_volume_node(vol, scene, name)
    node.SetAttribute(GEOMETRY_ATTRIBUTE, g.to_json())
    return node


def load_model_node(path, scene, name: str, color=BONE_COLOR):
    """A mesh file in LPS mm (as x2recon writes them) → a model node in RAS."""
    import slicer

    model = scene.AddNewNodeByClass("vtkMRMLModelNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLModelStorageNode")
    storage.SetFileName(str(path))
    storage.SetCoordinateSystem(slicer.vtkMRMLStorageNode.CoordinateSystemLPS)
    model.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(model):
        scene.RemoveNode(model)
        raise ValueError(f"{path}: cannot read the mesh")
    disp = scene.AddNewNodeByClass("vtkMRMLModelDisplayNode")
    disp.SetColor(*color)
    model.SetAndObserveDisplayNodeID(disp.GetID())
    return model


def mesh_to_model_node(vertices, faces, scene, name: str, color=BONE_COLOR, normals=None):
    """An in-memory triangle mesh in LPS mm (vertices (N, 3), faces (M, 3)) → a model node in RAS.

    ``normals`` (N, 3), LPS, become the polydata's point normals (flipped to RAS like the points).
    """
    import vtk
    from vtk.util import numpy_support

    v = np.ascontiguousarray(lps_ras_points(vertices), dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"mesh {name!r}: expected vertices (N, 3) and triangles (M, 3), got {v.shape}, {f.shape}")
    if f.size and (f.min() < 0 or f.max() >= len(v)):
        raise ValueError(f"mesh {name!r}: a triangle refers to a vertex that does not exist")
    pts = vtk.vtkPoints()
    pts.SetData(numpy_support.numpy_to_vtk(v, deep=True))
    cells = vtk.vtkCellArray()
    offsets = numpy_support.numpy_to_vtkIdTypeArray(np.arange(0, 3 * len(f) + 1, 3, dtype=np.int64), deep=True)
    conn = numpy_support.numpy_to_vtkIdTypeArray(f.reshape(-1).copy(), deep=True)
    cells.SetData(offsets, conn)
    poly = vtk.vtkPolyData()
    poly.SetPoints(pts)
    poly.SetPolys(cells)
    if normals is not None:
        n = np.ascontiguousarray(lps_ras_points(normals), dtype=np.float32)
        if n.shape != v.shape:
            raise ValueError(f"mesh {name!r}: {len(n)} normals for {len(v)} vertices")
        arr = numpy_support.numpy_to_vtk(n, deep=True)
        arr.SetName("Normals")
        poly.GetPointData().SetNormals(arr)
    model = scene.AddNewNodeByClass("vtkMRMLModelNode", name)
    model.SetAndObservePolyData(poly)
    disp = scene.AddNewNodeByClass("vtkMRMLModelDisplayNode")
    disp.SetColor(*color)
    model.SetAndObserveDisplayNodeID(disp.GetID())
    return model


def model_node_to_mesh(node):
    """A model node → ``trimesh.Trimesh`` in LPS mm, world coordinates (parent transforms applied).

    Polygons and strips are triangulated; vertex ``i`` of the result is point ``i`` of the node's
    polydata, so per-vertex values computed on the mesh can be written back with ``set_point_scalars``.
    """
    import trimesh
    import vtk
    from vtk.util import numpy_support

    poly = node.GetPolyData()
    if poly is None or poly.GetNumberOfPoints() == 0:
        raise ValueError(f"model {node.GetName()!r} has no points")
    parent = node.GetParentTransformNode()
    if parent is not None:
        t = vtk.vtkGeneralTransform()
        parent.GetTransformToWorld(t)
        tf = vtk.vtkTransformPolyDataFilter()
        tf.SetInputData(poly)
        tf.SetTransform(t)
        tf.Update()
        poly = tf.GetOutput()
    tri = vtk.vtkTriangleFilter()
    tri.SetInputData(poly)
    tri.PassVertsOff()
    tri.PassLinesOff()
    tri.Update()
    out = tri.GetOutput()
    if out.GetNumberOfPoints() != poly.GetNumberOfPoints():  # never expected: the filter keeps the points
        raise RuntimeError(f"model {node.GetName()!r}: triangulation changed the points")
    if out.GetPolys().GetNumberOfCells() == 0:
        raise ValueError(f"model {node.GetName()!r} has no surface (no polygons)")
    ras = numpy_support.vtk_to_numpy(out.GetPoints().GetData()).astype(np.float64)
    faces = numpy_support.vtk_to_numpy(out.GetPolys().GetConnectivityArray()).astype(np.int64).reshape(-1, 3)
    return trimesh.Trimesh(lps_ras_points(ras), faces, process=False)


def set_point_scalars(model_node, name: str, values) -> None:
    """Store one value per point of ``model_node``'s polydata as the point array ``name`` (replacing
    an array of that name).  Values are scalars (distances, …): no RAS/LPS flip applies."""
    import vtk
    from vtk.util import numpy_support

    poly = model_node.GetPolyData()
    if poly is None:
        raise ValueError(f"model {model_node.GetName()!r} has no polydata")
    v = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
    if len(v) != poly.GetNumberOfPoints():
        raise ValueError(f"model {model_node.GetName()!r}: {len(v)} values for {poly.GetNumberOfPoints()} points")
    arr = numpy_support.numpy_to_vtk(v, deep=True, array_type=vtk.VTK_DOUBLE)
    arr.SetName(name)
    pd = poly.GetPointData()
    if pd.HasArray(name):
        pd.RemoveArray(name)
    pd.AddArray(arr)
    poly.Modified()
    model_node.Modified()


def point_scalars(model_node, name: str) -> np.ndarray | None:
    """The point array ``name`` of a model node's polydata, or ``None``."""
    from vtk.util import numpy_support

    poly = model_node.GetPolyData()
    arr = poly.GetPointData().GetArray(name) if poly is not None else None
    return None if arr is None else numpy_support.vtk_to_numpy(arr).astype(np.float64).copy()


def segment_ids(seg_node) -> list[str]:
    """The segment IDs of a segmentation node, in order."""
    import vtk

    ids = vtk.vtkStringArray()
    seg_node.GetSegmentation().GetSegmentIDs(ids)
    return [ids.GetValue(i) for i in range(ids.GetNumberOfValues())]


def segment_totalseg_names(seg_node) -> dict[str, str | None]:
    """Segment ID → TotalSegmentator name, matched by ID or name (``vertebrae_T7``, ``vertebrae T7``
    …), or ``None`` for a segment without such a name (reported by callers, never guessed)."""
    from x2recon.structures import name_to_id

    lut = name_to_id()
    out = {}
    for sid in segment_ids(seg_node):
        seg = seg_node.GetSegmentation().GetSegment(sid)
        cands = [sid, seg.GetName()]
        out[sid] = next((c.strip().replace(" ", "_") for c in cands if c and c.strip().replace(" ", "_") in lut), None)
    return out


def _export_segments(seg_node, ids: list[str], reference_node, scene):
    """Segments ``ids`` → ``Volume`` holding 1..len(ids) in that order (0 elsewhere), on
    ``reference_node``'s grid or, without one, on the segmentation's own grid."""
    import slicer
    import vtk

    arr = vtk.vtkStringArray()
    for sid in ids:
        arr.InsertNextValue(sid)
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    lab_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__x2recon_tmp_labels")
    try:
        if reference_node is not None:
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg_node, arr, lab_node,
                                                                                       reference_node)
        else:
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg_node, arr, lab_node)
        if not ok:
            raise ValueError(f"segmentation {seg_node.GetName()!r}: export to a labelmap failed")
        # the labelmap lies where the segmentation lies: under the same transform
        lab_node.SetAndObserveTransformNodeID(seg_node.GetTransformNodeID())
        return volume_node_to_volume(lab_node)
    finally:  # the labelmap and what the export made for it (display node, colour table)
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in before:
                scene.RemoveNode(node)


def segments_to_label_volume(seg_node, scene, ids: list[str] | None = None, reference_node=None):
    """Segments ``ids`` (default: all) → ``Volume`` holding 1..len(ids) in that order (0 elsewhere;
    where segments overlap, the later one), LPS, on ``reference_node``'s grid or the segmentation's
    own.  No node is left in the scene."""
    ids = segment_ids(seg_node) if ids is None else list(ids)
    if not ids:
        raise ValueError(f"segmentation {seg_node.GetName()!r} has no segments")
    res = _export_segments(seg_node, ids, reference_node, scene)
    res.path = seg_node.GetName()
    return res


def segmentation_to_labelmap_volume(seg_node, reference_node, scene):
    """A segmentation node → ``Volume`` on the reference grid, values = TotalSegmentator ids.

    Segments are matched by ID or name (``vertebrae_T7``, ``vertebrae T7`` …); unknown names
    are reported rather than guessed.
    """
    from x2recon.structures import name_to_id

    names = segment_totalseg_names(seg_node)
    ids = list(names)
    lut = name_to_id()
    mapping = {k: lut[names[sid]] for k, sid in enumerate(ids, 1) if names[sid] is not None}
    unknown = [seg_node.GetSegmentation().GetSegment(sid).GetName() for sid in ids if names[sid] is None]
    if not mapping:
        raise ValueError(f"segmentation {seg_node.GetName()!r}: no segment has a TotalSegmentator name ({unknown[:5]})")
    vol = _export_segments(seg_node, ids, reference_node, scene)
    out = np.zeros(vol.array.shape, np.uint8)
    for k, tid in mapping.items():
        out[vol.array == k] = tid
    res = vol.with_array(out)
    res.path = seg_node.GetName()
    return res, unknown


def segmentation_to_mask_volume(seg_node, scene, ids: list[str] | None = None, reference_node=None):
    """The union of segments ``ids`` (default: all) → ``Volume`` of 0/1 (uint8), LPS, on
    ``reference_node``'s grid or the segmentation's own."""
    ids = segment_ids(seg_node) if ids is None else list(ids)
    if not ids:
        raise ValueError(f"segmentation {seg_node.GetName()!r} has no segments")
    vol = _export_segments(seg_node, ids, reference_node, scene)
    res = vol.with_array((vol.array > 0).astype(np.uint8))
    res.path = seg_node.GetName()
    return res


def xray_node_to_xray(node, view=None):
    """An X-ray volume node (one slice: a radiograph, or a DRR made by X2DatasetBuilder) → ``XRay``.

    Geometry: the node's ``x2recon.geometry`` attribute (LPS) when it has one, else the default
    chest geometry of ``view`` (AP, PA, LAT or an angle) for the image's size and pixel spacing;
    with neither, ``X2ReconInputError`` says so.  Pixels: row 0 of the image is the volume's first
    row (j = 0), as DICOM and our DRR nodes store it.  Display images are used as they are (8/16-bit
    scaled to [0, 1], as PNG files are read): DRR nodes (geometry attribute), images loaded from
    PNG/JPEG files, and any 8-bit image.  Anything else (a DICOM radiograph's raw values, floats) is
    mapped as the dataset builder maps DRRs (robust window, then CLAHE).  Colour images are averaged
    to grey.  A parent transform of the node is not applied to the geometry attribute.
    """
    from vtk.util import numpy_support

    from x2recon.errors import X2ReconInputError
    from x2recon.geometry import ProjectionGeometry
    from dataclasses import replace

    from x2recon.io.xray import display_map, place_xray, xray_from_array

    name = node.GetName()
    img = node.GetImageData()
    if img is None or img.GetNumberOfPoints() == 0:
        raise X2ReconInputError(name, "the X-ray volume node has no image data")
    ni, nj, nk = img.GetDimensions()
    if nk != 1:
        raise X2ReconInputError(name, f"is a volume of {nk} slices ({ni}×{nj}×{nk}); an X-ray is one 2D image")
    ncomp = img.GetNumberOfScalarComponents()
    a = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(nj, ni, ncomp)
    if ncomp == 1:
        a = a[..., 0]
    else:  # RGB(A) radiograph: grey = mean of the colour channels
        a = a[..., :3].astype(np.float64).mean(-1)
        if img.GetScalarType() in (3, 5):  # unsigned char / short: keep the display scale
            a = np.round(a).astype(numpy_support.get_numpy_array_type(img.GetScalarType()))
    text = node.GetAttribute(GEOMETRY_ATTRIBUTE)
    storage = node.GetStorageNode()
    fname = (storage.GetFileName() or "") if storage is not None else ""
    display = bool(text) or fname.lower().endswith((".png", ".jpg", ".jpeg")) or a.dtype == np.uint8
    if display and a.dtype in (np.uint8, np.uint16):
        pass  # xray_from_array scales 8/16-bit display images to [0, 1]
    elif display and np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1:
        a = a.astype(np.float32)
    else:
        try:
            a = display_map(a)
        except ValueError as e:
            raise X2ReconInputError(name, str(e)) from None
    H, W = a.shape
    if text:
        try:
            geometry = ProjectionGeometry.from_json(text)
        except (ValueError, KeyError, TypeError) as e:
            raise X2ReconInputError(name, f"its {GEOMETRY_ATTRIBUTE} attribute is not a valid geometry ({e})") from None
    elif view is None or str(view).strip() == "":
        raise X2ReconInputError(name, f"has no X-ray geometry (no {GEOMETRY_ATTRIBUTE} attribute, which DRRs made by "
                                      "X2DatasetBuilder carry) and no view was chosen: choose its view "
                                      "(AP, PA, LAT or an angle in degrees)")
    else:
        sp = node.GetSpacing()
        pixel_mm = None if np.allclose(sp[:2], 1.0) else float(sp[0])
        unit = a / 255.0 if a.dtype == np.uint8 else a / 65535.0 if a.dtype == np.uint16 else a
        try:  # placed from the lung fields, what was assumed kept for the panel (never silently the default)
            geometry, placement = place_xray(unit, view, pixel_mm=pixel_mm,
                                             sources={"pixel_mm": "the volume node's spacing"} if pixel_mm else None)
        except ValueError as e:
            raise X2ReconInputError(name, f"view {view!r}: {e}") from None
        return replace(xray_from_array(a, geometry, name), placement=placement)
    return xray_from_array(a, geometry, name)
