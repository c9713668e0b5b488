"""Off-screen PNG renderings of meshes (VTK): front and side views, optionally coloured by
per-vertex scalars (e.g. the distance to ground truth) with a colour legend — X2BR Fig. 4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

from ..io.atomic import atomic_write_bytes

# camera directions in LPS: (from where the camera looks, up); anterior = −y, patient's left = +x
VIEWS = {"AP": ((0.0, -1.0, 0.0), (0.0, 0.0, 1.0)), "LAT": ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
         "PA": ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0))}
#: each panel's caption: where the camera stands, so that it does not read as the X-ray's view (a PA film's
#: reconstruction is shown from the front all the same)
CAMERAS = {"AP": "camera: anterior", "LAT": "camera: patient's left", "PA": "camera: posterior"}


def _legend_actors(vtk, lut, legend: str | None) -> list:
    """A colour bar at the right edge and its title above it, right-aligned, at a readable fixed size
    (the bar's own title is shrunk to the bar's width, which makes a long title unreadably small)."""
    bar = vtk.vtkScalarBarActor()
    bar.SetLookupTable(lut)
    bar.SetNumberOfLabels(5)
    bar.UnconstrainedFontSizeOn()
    prop = bar.GetLabelTextProperty()
    prop.SetColor(0, 0, 0)
    prop.SetFontSize(15)
    prop.ItalicOff()
    prop.ShadowOff()
    bar.SetWidth(0.13)
    bar.SetHeight(0.6)
    bar.SetPosition(0.85, 0.18)
    title = vtk.vtkTextActor()
    title.SetInput(legend or "")
    tp = title.GetTextProperty()
    tp.SetColor(0, 0, 0)
    tp.SetFontSize(17)
    tp.SetJustificationToRight()
    tp.SetVerticalJustificationToBottom()
    title.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
    title.GetPositionCoordinate().SetValue(0.98, 0.81)
    return [bar, title]


def _scalar_colours(vtk, poly, scalars, n_vertices: int, scalar_range, legend):
    """Set ``scalars`` (one per vertex) on ``poly``; their lookup table, blue (low) to red (high, the 99th
    percentile unless ``scalar_range``)."""
    from vtk.util import numpy_support

    s = np.asarray(scalars, np.float64).reshape(-1)
    if len(s) != n_vertices:
        raise ValueError(f"{len(s)} scalars for {n_vertices} vertices")
    arr = numpy_support.numpy_to_vtk(s, deep=True)
    arr.SetName(legend or "scalars")
    poly.GetPointData().SetScalars(arr)
    lo, hi = scalar_range or (float(s.min()), float(np.percentile(s, 99)) if len(s) else 1.0)
    hi = hi if hi > lo else lo + 1e-6
    lut = vtk.vtkLookupTable()
    lut.SetHueRange(0.667, 0.0)  # blue (close) → red (far)
    lut.SetTableRange(lo, hi)
    lut.Build()
    return lut


def _view_renderer(vtk, poly, lut, color, view: str, center, radius: float):
    """A white renderer showing ``poly`` (coloured by ``lut``, else in ``color``) from ``VIEWS[view]``."""
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
    ren.SetBackground(1, 1, 1)
    ren.AddActor(actor)
    d, up = VIEWS[view]
    cam = ren.GetActiveCamera()
    cam.SetFocalPoint(*center)
    cam.SetPosition(*(center + 4 * radius * np.asarray(d)))
    cam.SetViewUp(*up)
    cam.SetViewAngle(30)
    ren.ResetCameraClippingRange()
    ren.ResetCamera()
    return ren


def render_png(mesh: trimesh.Trimesh, path: str | Path, *, views: tuple[str, ...] = ("AP", "LAT"),
               scalars: np.ndarray | None = None, scalar_range: tuple[float, float] | None = None,
               legend: str | None = None, size: int = 600, color=(0.95, 0.92, 0.84), title: str | None = None) -> Path:
    """Render ``mesh`` seen from each of ``views`` side by side into a PNG (atomic: encoded in memory, then
    written by Python, so a full disk is an ``OSError`` naming ``path`` and leaves no partial file — VTK's
    PNG writer only prints libpng's error and leaves a truncated file)."""
    import vtk
    from vtkmodules.util import numpy_support as ns

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
    if title is not None:  # a file name decoded under a non-UTF-8 locale holds surrogates, which VTK cannot take
        title = title.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    lut = None if scalars is None else _scalar_colours(vtk, poly, scalars, len(mesh.vertices), scalar_range, legend)
    win = vtk.vtkRenderWindow()
    win.SetOffScreenRendering(1)
    win.SetSize(size * len(views), size)
    center = np.asarray(mesh.bounds).mean(0)
    radius = float(np.linalg.norm(np.asarray(mesh.bounds)[1] - np.asarray(mesh.bounds)[0])) / 2
    for i, v in enumerate(views):
        ren = _view_renderer(vtk, poly, lut, color, v, center, radius)
        ren.SetViewport(i / len(views), 0, (i + 1) / len(views), 1)
        label = vtk.vtkTextActor()
        label.SetInput(CAMERAS[v] if title is None or i else f"{title} — {CAMERAS[v]}")
        label.GetTextProperty().SetColor(0, 0, 0)
        label.GetTextProperty().SetFontSize(18)
        label.SetPosition(10, 10)
        ren.AddViewProp(label)
        if lut is not None and i == len(views) - 1:
            for actor2d in _legend_actors(vtk, lut, legend):
                ren.AddViewProp(actor2d)
        win.AddRenderer(ren)
    win.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(win)
    grab.ReadFrontBufferOff()
    grab.Update()
    path = Path(path)
    w = vtk.vtkPNGWriter()
    w.WriteToMemoryOn()
    w.SetInputConnection(grab.GetOutputPort())
    w.Write()
    win.Finalize()
    atomic_write_bytes(path, ns.vtk_to_numpy(w.GetResult()).tobytes())
    return path


def render_confidence(mesh: trimesh.Trimesh, confidence: np.ndarray, path: str | Path, *,
                      views: tuple[str, ...] = ("AP", "LAT"), size: int = 600, title: str | None = None) -> Path:
    """``mesh`` coloured by its per-vertex confidence on a fixed 0–1 scale (blue: unsure, red: decisive; see
    ``x2b.confidence``), the legend naming the scale — so renderings of different runs compare."""
    return render_png(mesh, path, views=views, scalars=confidence, scalar_range=(0.0, 1.0),
                      legend="confidence 0 (unsure) - 1 (decisive)", size=size, title=title)

