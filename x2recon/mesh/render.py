"""Off-screen PNG renderings of meshes (VTK): front and side views, optionally coloured by
per-vertex scalars (e.g. the distance to ground truth) with a colour legend — X2BR Fig. 4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

from ..io.atomic import atomic_path

# camera directions in LPS: (from where the camera looks, up); anterior = −y, patient's left = +x
VIEWS = {"AP": ((0.0, -1.0, 0.0), (0.0, 0.0, 1.0)), "LAT": ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
         "PA": ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0))}


def render_png(mesh: trimesh.Trimesh, path: str | Path, *, views: tuple[str, ...] = ("AP", "LAT"),
               scalars: np.ndarray | None = None, scalar_range: tuple[float, float] | None = None,
               legend: str | None = None, size: int = 600, color=(0.95, 0.92, 0.84), title: str | None = None) -> Path:
    """Render ``mesh`` seen from each of ``views`` side by side into a PNG (atomic)."""
    import vtk
    from vtk.util import numpy_support

    from ..io.mesh import to_polydata

    if len(mesh.faces) == 0:
        raise ValueError("cannot render an empty mesh")
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_ERROR)  # off-screen: no X-server warnings
    for v in views:
        if v not in VIEWS:
            raise ValueError(f"unknown view {v!r}; use {', '.join(VIEWS)}")
    poly = to_polydata(mesh)
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputData(poly)
    normals.SplittingOff()
    normals.Update()
    poly = normals.GetOutput()
    lut = None
    if scalars is not None:
        s = np.asarray(scalars, np.float64).reshape(-1)
        if len(s) != len(mesh.vertices):
            raise ValueError(f"{len(s)} scalars for {len(mesh.vertices)} vertices")
        arr = numpy_support.numpy_to_vtk(s, deep=True)
        arr.SetName(legend or "scalars")
        poly.GetPointData().SetScalars(arr)
        lo, hi = scalar_range or (float(s.min()), float(np.percentile(s, 99)) if len(s) else 1.0)
        hi = hi if hi > lo else lo + 1e-6
        lut = vtk.vtkLookupTable()
        lut.SetHueRange(0.667, 0.0)  # blue (close) → red (far)
        lut.SetTableRange(lo, hi)
        lut.Build()
    win = vtk.vtkRenderWindow()
    win.SetOffScreenRendering(1)
    win.SetSize(size * len(views), size)
    center = np.asarray(mesh.bounds).mean(0)
    radius = float(np.linalg.norm(np.asarray(mesh.bounds)[1] - np.asarray(mesh.bounds)[0])) / 2
    for i, v in enumerate(views):
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputData(poly)
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        if lut is not None:
            mapper.SetLookupTable(lut)
            mapper.SetScalarRange(lut.GetTableRange())
            mapper.ScalarVisibilityOn()
        else:
            mapper.ScalarVisibilityOff()
            actor.GetProperty().SetColor(*color)
        actor.GetProperty().SetSpecular(0.2)
        ren = vtk.vtkRenderer()
        ren.SetViewport(i / len(views), 0, (i + 1) / len(views), 1)
        ren.SetBackground(1, 1, 1)
        ren.AddActor(actor)
        d, up = VIEWS[v]
        cam = ren.GetActiveCamera()
        cam.SetFocalPoint(*center)
        cam.SetPosition(*(center + 4 * radius * np.asarray(d)))
        cam.SetViewUp(*up)
        cam.SetViewAngle(30)
        ren.ResetCameraClippingRange()
        ren.ResetCamera()
        label = vtk.vtkTextActor()
        label.SetInput(v if title is None or i else f"{title} — {v}")
        label.GetTextProperty().SetColor(0, 0, 0)
        label.GetTextProperty().SetFontSize(18)
        label.SetPosition(10, 10)
        ren.AddActor2D(label)
        if lut is not None and i == len(views) - 1:
            bar = vtk.vtkScalarBarActor()
            bar.SetLookupTable(lut)
            bar.SetTitle(legend or "")
            bar.SetNumberOfLabels(5)
            bar.GetTitleTextProperty().SetColor(0, 0, 0)
            bar.GetLabelTextProperty().SetColor(0, 0, 0)
            bar.SetWidth(0.12)
            bar.SetHeight(0.6)
            bar.SetPosition(0.86, 0.2)
            ren.AddActor2D(bar)
        win.AddRenderer(ren)
    win.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(win)
    grab.ReadFrontBufferOff()
    grab.Update()
    path = Path(path)
    with atomic_path(path) as tmp:
        w = vtk.vtkPNGWriter()
        w.SetFileName(str(tmp))
        w.SetInputConnection(grab.GetOutputPort())
        w.Write()
    win.Finalize()
    return path
