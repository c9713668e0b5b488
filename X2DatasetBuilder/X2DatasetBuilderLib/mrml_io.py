"""The Slicer boundary: MRML nodes (RAS) ↔ x2recon objects (LPS mm).

This is the only place in the project that converts between RAS and LPS; later modules
(X2BoneRecon, SpiderCT) import these helpers.  Imports MRML and VTK only — no Qt, no app.
"""

from __future__ import annotations

import numpy as np

#: RAS ↔ LPS: flip the first two axes (its own inverse).
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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
    node.SetAttribute("x2recon.geometry", g.to_json())
    return node


def load_model_node(path, scene, name: str, color=(0.95, 0.92, 0.84)):
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


def mesh_to_model_node(vertices, faces, scene, name: str, color=(0.95, 0.92, 0.84)):
    """An in-memory triangle mesh in LPS mm (vertices (N, 3), faces (M, 3)) → a model node in RAS."""
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
    model = scene.AddNewNodeByClass("vtkMRMLModelNode", name)
    model.SetAndObservePolyData(poly)
    disp = scene.AddNewNodeByClass("vtkMRMLModelDisplayNode")
    disp.SetColor(*color)
    model.SetAndObserveDisplayNodeID(disp.GetID())
    return model


def segmentation_to_labelmap_volume(seg_node, reference_node, scene):
    """A segmentation node → ``Volume`` on the reference grid, values = TotalSegmentator ids.

    Segments are matched by ID or name (``vertebrae_T7``, ``vertebrae T7`` …); unknown names
    are reported rather than guessed.
    """
    import slicer
    import vtk

    from x2recon.structures import name_to_id

    ids = vtk.vtkStringArray()
    seg_node.GetSegmentation().GetSegmentIDs(ids)
    seg_ids = [ids.GetValue(i) for i in range(ids.GetNumberOfValues())]
    lut = name_to_id()
    mapping, unknown = {}, []
    for k, sid in enumerate(seg_ids, 1):
        seg = seg_node.GetSegmentation().GetSegment(sid)
        cands = [sid, seg.GetName()]
        key = next((c.strip().replace(" ", "_") for c in cands if c and c.strip().replace(" ", "_") in lut), None)
        if key is None:
            unknown.append(seg.GetName())
        else:
            mapping[k] = lut[key]
    if not mapping:
        raise ValueError(f"segmentation {seg_node.GetName()!r}: no segment has a TotalSegmentator name ({unknown[:5]})")
    lab_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__x2recon_tmp_labels")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            seg_node, ids, lab_node, reference_node)
        if not ok:
            raise ValueError(f"segmentation {seg_node.GetName()!r}: export to a labelmap failed")
        vol = volume_node_to_volume(lab_node)
    finally:
        scene.RemoveNode(lab_node)
    out = np.zeros(vol.array.shape, np.uint8)
    for k, tid in mapping.items():
        out[vol.array == k] = tid
    res = vol.with_array(out)
    res.path = seg_node.GetName()
    return res, unknown
