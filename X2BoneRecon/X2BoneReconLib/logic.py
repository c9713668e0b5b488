"""X2BoneReconLogic: X-ray volume node(s) + a model file → bone model node; a model node against a
ground-truth segmentation or model → metrics table and distance heat map (X2BR paper, Fig. 4).

MRML in, MRML out; imports no Qt and nothing that needs the Slicer application, so it runs (and is
tested) with the real MRML of the ``slicer-core`` wheel.  Nodes are read and written through
``x2recon.slicer.mrml`` (the project's one RAS ↔ LPS boundary).  torch, the networks and the metrics
are imported on first use, never when the module loads.  The background process the panel runs
(``x2recon reconstruct`` with progress lines) is described here too: its command line, its
progress lines, and loading its result.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

from x2recon.slicer.mrml import (  # structure_color: shared with SpiderCT, re-exported here
    metrics_table_values,
    BONE_COLOR,
    GEOMETRY_ATTRIBUTE,
    mesh_to_model_node,
    model_node_to_mesh,
    segment_ids,
    segment_totalseg_names,
    segmentation_to_mask_volume,
    set_point_scalars,
    structure_color,
    xray_node_to_xray,
)
from x2recon.slicer.process import PROGRESS_RE, parse_progress_line  # noqa: F401 (shared with SpiderCT; re-exported)

log = logging.getLogger(__name__)

#: Point array of the per-vertex distance to the reference surface (the heat map).
DISTANCE_ARRAY = "Distance (mm)"
#: the reconstruction's per-vertex confidence (0 unsure – 1 decisive) as a point array and legend title
CONFIDENCE_TITLE = "Confidence (0-1)"
#: Colour maps used for the heat map when the scene has them (Slicer's default colour nodes).
DISTANCE_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeFileColdToHotRainbow.txt", "vtkMRMLColorTableNodeFileViridis.txt")
DISTANCE_COLOR_NODE_NAMES = ("ColdToHotRainbow", "Viridis")
#: The colour table this module makes when the scene has none of those (a bare MRML scene).
FALLBACK_COLOR_NAME = "X2Recon distance"
#: Node attributes on a reconstructed model: the structures its network was trained on, its X-ray node.
STRUCTURES_ATTRIBUTE = "x2recon.structures"
XRAY_ATTRIBUTE = "x2recon.io.xray"
#: Files the background reconstruction reads and writes in its working folder.
XRAY_PNG, XRAY_JSON, LATERAL_PNG, LATERAL_JSON, MESH_FILE = "xray.png", "xray.json", "lateral.png", "lateral.json", "bones.ply"
#: What ``x2recon reconstruct --refine template --out bones.ply`` writes beside the refined mesh.
X2B_MESH_FILE, PARTS_DIR, DETECTIONS_FILE = "bones_x2b.ply", "bones_parts", "bones_detections.json"
#: Attribute tying the nodes of one X2BR result together (the refined mesh's node ID).
X2BR_ATTRIBUTE = "x2recon.x2br.refine"


def metric_rows(tau: float = 0.02, tau_mm: float = 7.68) -> list[tuple[str, str]]:
    """``(key, label)`` of the metrics table's rows, in the papers' order, each labelled with its protocol
    (``x2recon.metrics.protocol``, as ``x2recon evaluate`` and ``x2recon compare`` report them): *paper* —
    the ground truth centred and scaled to a longest edge of 1 (X2BR §4.3), F-score@``tau``; *world* — mm
    where the bones are, F-score at ``tau_mm`` (0.02 × the box edge).  NC is the same number in both;
    per-axis errors after ICP and surface distances are in mm."""
    t, tm = f"{tau:g}", f"{tau_mm:.3g}"
    return [
        ("paper_iou", "IoU (paper)"),
        ("paper_iou_vox", "IoU(vox) (paper, 32³)"),
        ("paper_chamfer_l1", "Chamfer-L1 (paper, unit box)"),
        ("paper_fscore", f"F-score@{t} (paper)"),
        ("world_iou", "IoU (world)"),
        ("world_iou_vox", "IoU(vox) (world, 64³)"),
        ("world_chamfer_l1", "Chamfer-L1 (world, mm)"),
        ("world_fscore", f"F-score@{tm} mm (world)"),
        ("paper_normal_consistency", "NC"),
        ("maxe", "maxe (mm)"),
        ("maye", "maye (mm)"),
        ("maze", "maze (mm)"),
        ("mean_distance_mm", "Mean surface distance (mm)"),
        ("max_distance_mm", "Max surface distance (mm)"),
        ("world_accuracy", "Accuracy (world, mm)"),
        ("world_completeness", "Completeness (world, mm)"),
        ("world_precision", f"Precision@{tm} mm (world)"),
        ("world_recall", f"Recall@{tm} mm (world)"),
        ("paper_scale_mm", "Ground truth's longest edge (mm)"),
        ("gt_clipped", "Ground truth cut to the box (1 = yes)"),
        ("box_size_mm", "Box size (mm)"),
    ]


def _input_error(path, problem: str):
    from x2recon.errors import X2ReconInputError

    return X2ReconInputError(path, problem)


class X2BoneReconLogic:
    """Nodes of ``scene`` → x2recon calls → nodes added to ``scene``."""

    def __init__(self, scene):
        self.scene = scene
        #: how each X-ray of the last reconstruction was placed (``x2recon.io.xray.Placement``, or None for a
        #: geometry the node carried): the panel shows it, so an assumed geometry is never silent
        self.placements: list = []
        #: why the last reconstruction's X-ray may be outside what the model was trained on (empty: nothing found)
        self.ood_warnings: list = []

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def bundled_files() -> dict:
        """``parameter -> path`` of the installed bundled files the panel starts with (bone model,
        detector, template library), so *Reconstruct* works without training."""
        from x2recon.slicer.bundled import panel_defaults

        return panel_defaults("X2BoneRecon")

    @staticmethod
    def model_config(model_path) -> dict:
        """The checkpoint's config (read without loading the weights); errors name the file."""
        from x2recon.nn.checkpoint import CheckpointError, read_config

        if model_path is None or str(model_path).strip() in ("", "."):
            raise _input_error(None, "choose a model file (.safetensors); the bundled bone model is not installed")
        cfg = read_config(model_path)
        if cfg.get("network") not in ("x2b", "x2b2") or "model" not in cfg:
            raise CheckpointError(model_path, f"network {cfg.get('network')!r} is not an X2B/X2B2 bone model")
        return cfg

    def xrays(self, cfg: dict, model_path, xray_node, lateral_node=None, view=None, lateral_view=None) -> list:
        """The ``XRay`` inputs the model in ``cfg`` needs, from the nodes; clear errors for missing or
        surplus views.  ``view``/``lateral_view`` are used only for nodes without a geometry attribute
        (``lateral_view`` defaults to ``LAT`` when ``view`` is given)."""
        kind = cfg["model"].get("kind", cfg.get("network"))
        if xray_node is None:
            raise _input_error(None, "choose an X-ray volume node")
        if kind == "x2b2" and lateral_node is None:
            views = cfg["model"].get("views") or ["AP", "LAT"]
            raise _input_error(model_path, f"is an X2B2 model: it needs a frontal ({views[0]}) and a lateral "
                                           f"({views[-1]}) X-ray; choose the lateral X-ray")
        if kind != "x2b2" and lateral_node is not None:
            raise _input_error(model_path, "is an X2B (single-view) model: it takes one X-ray; clear the lateral X-ray")
        out = [xray_node_to_xray(xray_node, view)]
        if lateral_node is not None:
            if lateral_view is None and view is not None:
                lateral_view = "LAT"
            out.append(xray_node_to_xray(lateral_node, lateral_view))
        return out

    @staticmethod
    def check_resolution(resolution: int) -> int:
        from x2recon.x2b.reconstruct import upsampling_steps

        upsampling_steps(int(resolution))  # ValueError names the allowed values
        return int(resolution)

    # ------------------------------------------------------------------ reconstruct (in this process)
    def reconstruct(self, xray_node, model_path, lateral_node=None, resolution: int = 256, threshold: float | None = None,
                    device: str = "auto", view=None, lateral_view=None, faces: int = 0, progress=None, cancel=None,
                    name: str | None = None):
        """Reconstruct the bones and add them as a model node in world (RAS) coordinates.

        ``threshold``: occupancy τ (``None``: the model's, 0.2); ``progress(fraction, message)`` and
        ``cancel() -> bool`` are passed to ``x2recon.x2b.reconstruct`` (cancel raises ``CancelledError``).
        An empty ``model_path`` means the bundled bone model.
        """
        from x2recon.resources import DEFAULT_BONE_MODEL
        from x2recon.slicer.bundled import or_bundled

        model_path = or_bundled(model_path, DEFAULT_BONE_MODEL)
        cfg = self.model_config(model_path)
        xrays = self.xrays(cfg, model_path, xray_node, lateral_node, view, lateral_view)
        self.placements = [x.placement for x in xrays]
        self.check_resolution(resolution)
        from x2recon.nn.checkpoint import load_model
        from x2recon.x2b.reconstruct import reconstruct, resolve_device

        dev = resolve_device(device)
        model, cfg = load_model(model_path, dev)
        rec = reconstruct(model, xrays, resolution=int(resolution), threshold=threshold, device=dev, faces=int(faces),
                          progress=progress, cancel=cancel)
        self.ood_warnings = []  # why the X-ray may not look like what the model was trained on (shown by the panel)
        if (cfg.get("dataset") or {}).get("build", {}).get("isocenter") == "thorax":
            from x2recon.x2b.confidence import training_likeness_warnings

            self.ood_warnings = training_likeness_warnings(xrays[0])
        for w in self.ood_warnings:
            log.warning("X2BoneRecon: the X-ray may be outside what the model was trained on: %s", w)
        log.info("X2BoneRecon: %d triangles in %.1f s on %s, mean confidence %.3f", len(rec.mesh.faces), rec.seconds,
                 dev, rec.mean_confidence)
        return self.add_reconstruction(rec.mesh, xray_node, rec.geometry, cfg, name)

    def add_reconstruction(self, mesh, xray_node, geometry, cfg: dict | None = None, name: str | None = None):
        """A reconstructed mesh (LPS mm) → model node ``"<X-ray> bones"`` with normals, bone colour,
        its geometry (for the box size of later comparisons) and the model's structures as attributes; a mesh
        carrying the per-vertex confidence (``vertex_attributes["confidence"]``) is coloured by it."""
        node = mesh_to_model_node(np.asarray(mesh.vertices), np.asarray(mesh.faces), self.scene,
                                  name or f"{xray_node.GetName()} bones", color=BONE_COLOR,
                                  normals=np.asarray(mesh.vertex_normals))
        node.SetAttribute(GEOMETRY_ATTRIBUTE, geometry.to_json())
        node.SetAttribute(XRAY_ATTRIBUTE, xray_node.GetID())
        structures = ((cfg or {}).get("dataset") or {}).get("build", {}).get("structures")
        if structures:
            node.SetAttribute(STRUCTURES_ATTRIBUTE, ",".join(structures) if isinstance(structures, list) else str(structures))
        disp = node.GetDisplayNode()
        disp.SetVisibility2D(True)  # outline in the slice views
        from x2recon.x2b.confidence import CONFIDENCE_ARRAY

        confidence = getattr(mesh, "vertex_attributes", {}).get(CONFIDENCE_ARRAY)
        if confidence is not None:
            self.show_confidence(node, confidence)
        return node

    # ------------------------------------------------------------------ reconstruct (background process)
    def reconstruct_command(self, xray_node, model_path, out_dir, lateral_node=None, resolution: int = 256,
                            threshold: float | None = None, device: str = "auto", view=None, lateral_view=None,
                            faces: int = 0, python: str | None = None, refine: str = "none", detector=None,
                            templates=None, registration: str = "gbcpd", conf: float = 0.25) -> tuple[list[str], Path]:
        """Check the inputs, write the X-ray(s) and their geometry into ``out_dir``, and return the
        ``x2recon reconstruct`` command the panel runs in the background and the mesh it will write.

        ``python`` is the interpreter (Slicer's ``PythonSlicer``); the command prints progress lines
        (``parse_progress_line``); ``load_reconstruction`` adds its result to the scene.
        ``refine="template"``: X2BR with the ``detector`` weights and the ``templates`` library
        (``registration``: gbcpd, bcpd or cpd); ``load_x2br`` then adds its results.  An empty model,
        detector or template path means the bundled one (``x2recon.slicer.bundled``).
        """
        from x2recon.io.image import write_png16
        from x2recon.io.xray import write_geometry
        from x2recon.resources import DEFAULT_BONE_MODEL
        from x2recon.slicer.bundled import or_bundled

        model_path = or_bundled(model_path, DEFAULT_BONE_MODEL)
        if refine == "template":
            detector, templates = or_bundled(detector, "detector"), or_bundled(templates, "templates")
        cfg = self.model_config(model_path)
        xrays = self.xrays(cfg, model_path, xray_node, lateral_node, view, lateral_view)
        self.placements = [x.placement for x in xrays]
        self.check_resolution(resolution)
        if threshold is not None and not 0 < float(threshold) < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = [(XRAY_PNG, XRAY_JSON, "--xray", "--geometry"), (LATERAL_PNG, LATERAL_JSON, "--lateral", "--lateral-geometry")]
        args: list[str] = []
        for x, (png, js, opt_img, opt_geom) in zip(xrays, files):
            write_png16(np.round(np.clip(x.image, 0, 1) * 65535).astype(np.uint16), out / png)
            write_geometry(x.geometry, out / js)
            args += [opt_img, str(out / png), opt_geom, str(out / js)]
        if refine not in ("none", "template"):
            raise ValueError(f"refine must be 'none' or 'template', got {refine!r}")
        if refine == "template":
            for what, path in (("detector weights", detector), ("template library", templates)):
                if path is None or not str(path).strip() or not Path(path).exists():
                    raise _input_error(path, f"refining with a template needs the {what}; not found")
        mesh = out / MESH_FILE
        import shutil

        for old in (mesh, out / X2B_MESH_FILE, out / DETECTIONS_FILE, out / PARTS_DIR):
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()  # never load a previous run's result
        cmd = [python or sys.executable, "-m", "x2recon.cli", "reconstruct", *args, "--model", str(model_path),
               "--out", str(mesh), "--resolution", str(int(resolution)), "--device", str(device)]
        if threshold is not None:
            cmd += ["--threshold", repr(float(threshold))]
        if faces:
            cmd += ["--faces", str(int(faces))]
        if refine == "template":
            cmd += ["--refine", "template", "--detector", str(detector), "--templates", str(templates),
                    "--registration", str(registration), "--conf", repr(float(conf))]
        return cmd + ["--progress-lines", "--quiet"], mesh

    def load_reconstruction(self, mesh_path, xray_node, model_path=None, name: str | None = None):
        """The background process's mesh (LPS mm) → model node, as ``reconstruct`` adds it (the
        geometry is the one written beside it by ``reconstruct_command``)."""
        from x2recon.geometry import ProjectionGeometry
        from x2recon.io.mesh import read_mesh, read_vertex_scalar
        from x2recon.x2b.confidence import CONFIDENCE_ARRAY

        mesh_path = Path(mesh_path)
        mesh = read_mesh(mesh_path)
        confidence = read_vertex_scalar(mesh_path, CONFIDENCE_ARRAY)  # .ply/.vtk carry it (reconstruct_command: .ply)
        if confidence is not None and len(confidence) == len(mesh.vertices):
            mesh.vertex_attributes[CONFIDENCE_ARRAY] = confidence
        summary = mesh_path.with_name(mesh_path.name.split(".")[0] + "_confidence.json")  # written by reconstruct
        self.ood_warnings = json.loads(summary.read_text()).get("ood_warnings", []) if summary.is_file() else []
        for w in self.ood_warnings:
            log.warning("X2BoneRecon: the X-ray may be outside what the model was trained on: %s", w)
        geometry = ProjectionGeometry.from_json(mesh_path.with_name(XRAY_JSON))
        cfg = None
        if model_path:
            try:
                cfg = self.model_config(model_path)
            except ValueError:
                cfg = None
        return self.add_reconstruction(mesh, xray_node, geometry, cfg, name)

    def load_x2br(self, mesh_path, xray_node, model_path=None, name: str | None = None) -> dict:
        """An X2BR run's results → nodes: the coarse X2B model, the refined template as one model
        (hidden; what *Compare* scores) and one model per structure in its own colour, and each
        detection as a closed curve (its box) on the X-ray's detector plane.  Returns them by role."""
        from x2recon.geometry import ProjectionGeometry
        from x2recon.io.mesh import read_mesh

        mesh_path = Path(mesh_path)
        folder = mesh_path.parent
        geometry = ProjectionGeometry.from_json(folder / XRAY_JSON)
        base = name or f"{xray_node.GetName()} bones"
        x2b = self.load_reconstruction(folder / X2B_MESH_FILE, xray_node, model_path, f"{base} (X2B)")
        refined = self.add_reconstruction(read_mesh(mesh_path), xray_node, geometry, None, f"{base} (X2BR)")
        refined.GetDisplayNode().SetVisibility(False)
        x2b.GetDisplayNode().SetVisibility(False)
        refined.SetAttribute(X2BR_ATTRIBUTE, refined.GetID())
        parts = []
        for f in sorted((folder / PARTS_DIR).glob("*.ply")):
            m = read_mesh(f)
            node = mesh_to_model_node(np.asarray(m.vertices), np.asarray(m.faces), self.scene, f"{base}: {f.stem}",
                                      color=structure_color(f.stem), normals=np.asarray(m.vertex_normals))
            node.SetAttribute(X2BR_ATTRIBUTE, refined.GetID())
            node.SetAttribute("x2recon.structure", f.stem)
            node.GetDisplayNode().SetVisibility2D(True)
            parts.append(node)
        dets = []
        if (folder / DETECTIONS_FILE).is_file():
            from x2recon.x2br.detection.detections import read_detections

            dets = [{"name": d.name, "confidence": d.confidence, "box": [d.x0, d.y0, d.x1, d.y1]}
                    for d in read_detections(folder / DETECTIONS_FILE)]
        curves = self.show_detections(dets, geometry, xray_node, refined.GetID())
        return {"x2b": x2b, "x2br": refined, "parts": parts, "detections": curves}

    @staticmethod
    def placement_lines(placements) -> list[str]:
        """Log lines saying how each X-ray was placed; an assumed geometry is flagged and its override named."""
        lines = []
        for role, p in zip(("X-ray", "lateral X-ray"), placements):
            if p is None:
                lines.append(f"{role}: geometry from the node's {GEOMETRY_ATTRIBUTE} attribute")
            else:
                text = p.text().splitlines()
                lines += [f"{role}: {text[0]}"] + text[1:]
        return [ln.replace("--pixel-spacing MM --sdd MM --sod MM, or --geometry FILE.json",
                           f"the volume's spacing, or a geometry JSON in the node's {GEOMETRY_ATTRIBUTE} attribute "
                           "(CLI: --pixel-spacing/--sdd/--sod/--geometry)") for ln in lines]

    def show_reconstruction_box(self, geometry, xray_node=None):
        """The reconstruction box's outline as the X-ray sees it (the hull of its 8 projected corners), a
        closed curve on the detector plane: a wrongly placed X-ray shows the box off the chest."""
        from scipy.spatial import ConvexHull

        from x2recon.slicer.mrml import lps_ras_points

        lo, hi = geometry.box_bounds()
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        px = np.asarray(geometry.project(corners), float).reshape(-1, 2)
        hull = px[ConvexHull(px).vertices]
        ras = lps_ras_points(geometry.pixel_to_world(hull[:, 0], hull[:, 1]))
        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsClosedCurveNode", "reconstruction box")
        node.SetCurveTypeToLinear()
        for p in ras:
            node.AddControlPoint(*map(float, p))
        node.SetLocked(True)
        for i in range(node.GetNumberOfControlPoints()):
            node.SetNthControlPointLabel(i, "")
        if xray_node is not None:
            node.SetAttribute(XRAY_ATTRIBUTE, xray_node.GetID())
        return node

    def show_detections(self, detections: list[dict], geometry, xray_node=None, group: str | None = None) -> list:
        """Detections (``{"name", "confidence", "box": [x0, y0, x1, y1]}`` in the X-ray's continuous pixel
        coordinates, ``ProjectionGeometry.project``'s convention, as ``x2recon.drr.boxes``) → one
        closed-curve markup per box, on the detector plane in world (RAS) coordinates, named
        ``"<class> <confidence>"``, coloured as the structure."""
        from x2recon.slicer.mrml import lps_ras_points

        nodes = []
        for d in detections:
            x0, y0, x1, y1 = (float(v) for v in d["box"])
            corners = geometry.pixel_to_world(np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1]))
            ras = lps_ras_points(corners)
            node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsClosedCurveNode", f"{d['name']} {d['confidence']:.2f}")
            node.SetCurveTypeToLinear()
            for p in ras:
                node.AddControlPoint(*map(float, p))
            node.SetLocked(True)
            for i in range(node.GetNumberOfControlPoints()):
                node.SetNthControlPointLabel(i, "")
            disp = node.GetDisplayNode()
            if disp is not None:
                disp.SetSelectedColor(*structure_color(d["name"]))
                disp.SetPointLabelsVisibility(False)
            if group is not None:
                node.SetAttribute(X2BR_ATTRIBUTE, group)
            if xray_node is not None:
                node.SetAttribute(XRAY_ATTRIBUTE, xray_node.GetID())
            nodes.append(node)
        return nodes

    def compare_methods(self, model_nodes: dict, reference_node, structures=None, n_points: int = 100_000,
                        tau: float = 0.02, table_node=None):
        """Several reconstructions (label → model node, e.g. ``{"X2B": …, "X2BR": …}``) against one
        ground truth → one table: a ``Metric`` column and a column per label (the papers' rows side by
        side)."""
        import vtk

        if not model_nodes:
            raise _input_error(None, "choose at least one reconstructed model node")
        gt = self.reference_mesh(reference_node, structures)
        columns = {label: self.scores(model_node_to_mesh(node), gt, node, n_points=n_points, tau=tau)[0]
                   for label, node in model_nodes.items()}
        if table_node is None:
            table_node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{' vs '.join(model_nodes)} vs "
                                                                          f"{reference_node.GetName()} metrics")
        table = table_node.GetTable()
        table.Initialize()
        col_m = vtk.vtkStringArray()
        col_m.SetName("Metric")
        rows = metric_rows(tau, next(iter(columns.values()))["world_fscore_tau"])
        for _, label in rows:
            col_m.InsertNextValue(label)
        table.AddColumn(col_m)
        for label, m in columns.items():
            c = vtk.vtkDoubleArray()
            c.SetName(label)
            for key, _ in rows:
                c.InsertNextValue(float(m[key]))
            table.AddColumn(c)
        table_node.SetUseColumnTitleAsColumnHeader(True)
        table_node.SetAttribute("x2recon.reference", reference_node.GetID())
        table_node.SetLocked(True)
        table_node.Modified()
        return table_node

    #: ``(fraction, message)`` from a progress line of ``x2recon reconstruct``, else ``None``.
    parse_progress_line = staticmethod(parse_progress_line)

    # ------------------------------------------------------------------ compare with ground truth
    def reference_mesh(self, reference_node, structures=None):
        """The ground truth as a watertight mesh in LPS mm.

        A model node is taken as it is.  A segmentation node: the union of its segments — all of them,
        or with ``structures`` (TotalSegmentator names or groups, e.g. ``"ribs,vertebrae"``) only the
        segments whose ID or name is one of those — meshed on its own grid as the dataset builder
        meshes labels (so the comparison matches the papers' ground truth).
        """
        if reference_node is None:
            raise _input_error(None, "choose a ground-truth segmentation or model node")
        if reference_node.IsA("vtkMRMLModelNode"):
            return model_node_to_mesh(reference_node)
        if not reference_node.IsA("vtkMRMLSegmentationNode"):
            raise _input_error(reference_node.GetName(), "is neither a segmentation nor a model node")
        from x2recon.mesh.extract import MeshError, mask_to_mesh

        name = reference_node.GetName()
        ids = segment_ids(reference_node)
        if not ids:
            raise _input_error(name, "the segmentation has no segments")
        if structures is not None and str(structures).strip():
            from x2recon.structures import resolve_structures

            wanted = set(resolve_structures(structures))
            names = segment_totalseg_names(reference_node)
            ids = [sid for sid in ids if names[sid] in wanted]
            if not ids:
                have = [n or reference_node.GetSegmentation().GetSegment(s).GetName() for s, n in names.items()]
                raise _input_error(name, f"no segment is one of the structures {structures!r} (segments: {have[:8]})")
        mask = segmentation_to_mask_volume(reference_node, self.scene, ids)
        if not mask.array.any():
            raise _input_error(name, "the chosen segments are empty")
        try:
            return mask_to_mesh(mask.array, mask.affine, name=name)
        except MeshError as e:
            raise _input_error(name, e.problem) from None

    def compare(self, model_node, reference_node, structures=None, n_points: int = 100_000, tau: float = 0.02,
                box_size: float | None = None, max_distance: float | None = None, table_node=None):
        """Score ``model_node`` against ``reference_node`` in the paper and world protocols → table node
        (one row per metric, protocol and units in the labels), and show the distance from each of the
        model's vertices to the reference surface on the model (point array ``"Distance (mm)"``, colour
        map, legend).

        The reconstruction box comes from the model's geometry attribute (as ``x2recon evaluate``: the
        ground truth is cut to it, the world IoUs are scored inside it); a model without one is scored
        whole, as ``x2recon compare`` does.  ``box_size``: the box edge in mm whose 0.02 is the world
        F-score threshold (default: the geometry's, else 384 mm); ``max_distance``: top of the colour
        range in mm (default: the 95th percentile of the distances).
        """
        if model_node is None:
            raise _input_error(None, "choose the reconstructed model node")
        pred = model_node_to_mesh(model_node)
        gt = self.reference_mesh(reference_node, structures)
        m, d = self.scores(pred, gt, model_node, n_points=n_points, tau=tau, box_size=box_size)
        table = self.metrics_table(m, model_node, reference_node, tau, table_node)
        self.show_distance_map(model_node, d, max_distance)
        return table

    def scores(self, pred, gt, model_node, n_points: int = 100_000, tau: float = 0.02, box_size: float | None = None):
        """``(metrics, distances)``: ``x2recon.metrics.protocol.score`` in both protocols as one flat row
        (``paper_*``, ``world_*``, maxe/maye/maze, ``gt_clipped``) plus the surface distances (mm) and box
        size, and each vertex's distance to ``gt`` (the heat map)."""
        from x2recon.metrics.mesh import vertex_distances
        from x2recon.metrics.protocol import WORLD_TAU_OF_BOX, flat_row, score

        geometry = self.geometry_of(model_node)
        box = geometry.box_bounds() if geometry is not None else None
        edge = float(box_size) if box_size is not None else self.box_size_of(model_node)
        m = flat_row(score(pred, gt, n_points=int(n_points), tau=tau, tau_mm=WORLD_TAU_OF_BOX * edge, box=box))
        m["gt_clipped"] = float(m["gt_clipped"])
        d = vertex_distances(pred.vertices, gt)
        m.update(mean_distance_mm=float(d.mean()), max_distance_mm=float(d.max()), box_size_mm=edge)
        return m, d

    @staticmethod
    def geometry_of(model_node):
        """The imaging geometry a reconstructed model node carries (attribute ``x2recon.geometry``), else None."""
        from x2recon.geometry import ProjectionGeometry

        text = model_node.GetAttribute(GEOMETRY_ATTRIBUTE)
        return ProjectionGeometry.from_json(text) if text else None

    @classmethod
    def box_size_of(cls, model_node) -> float:
        """The reconstruction box edge of the model's geometry, else the chest default (384 mm)."""
        from x2recon.geometry import CHEST_DEFAULTS

        geometry = cls.geometry_of(model_node)
        if geometry is not None:
            return geometry.box_size
        log.info("X2BoneRecon: %s has no geometry; the world F-score threshold uses the default %g mm box",
                 model_node.GetName(), CHEST_DEFAULTS["box_size"])
        return float(CHEST_DEFAULTS["box_size"])

    def metrics_table(self, metrics: dict, model_node, reference_node, tau: float = 0.02, table_node=None):
        """A table node with the metrics: columns ``Metric`` and ``Value``; which nodes were compared
        is in its name and attributes."""
        import vtk

        name = f"{model_node.GetName()} vs {reference_node.GetName()}"
        if table_node is None:
            table_node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} metrics")
        table = table_node.GetTable()
        table.Initialize()
        col_m, col_v = vtk.vtkStringArray(), vtk.vtkDoubleArray()
        col_m.SetName("Metric")
        col_v.SetName("Value")
        for key, label in metric_rows(tau, metrics["world_fscore_tau"]):
            col_m.InsertNextValue(label)
            col_v.InsertNextValue(float(metrics[key]))
        table.AddColumn(col_m)
        table.AddColumn(col_v)
        table_node.SetUseColumnTitleAsColumnHeader(True)
        table_node.SetColumnDescription("Value", name)
        table_node.SetAttribute("x2recon.reconstruction", model_node.GetID())
        table_node.SetAttribute("x2recon.reference", reference_node.GetID())
        table_node.SetLocked(True)  # results, not inputs
        table_node.Modified()
        return table_node

    table_values = staticmethod(metrics_table_values)

    # ------------------------------------------------------------------ heat map
    def distance_color_node(self):
        """Slicer's ColdToHotRainbow (or Viridis) colour table when the scene has it, else this
        module's own cold-to-hot table (made once per scene)."""
        for nid in DISTANCE_COLOR_NODE_IDS:
            node = self.scene.GetNodeByID(nid)
            if node is not None:
                return node
        for name in DISTANCE_COLOR_NODE_NAMES + (FALLBACK_COLOR_NAME,):
            node = self.scene.GetFirstNodeByName(name)
            if node is not None and node.IsA("vtkMRMLColorNode"):
                return node
        node = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", FALLBACK_COLOR_NAME)
        node.SetTypeToUser()
        n = 256
        node.SetNumberOfColors(n)
        stops = np.array([[0.0, 0.0, 0.0, 1.0], [0.25, 0.0, 1.0, 1.0], [0.5, 0.0, 1.0, 0.0],
                          [0.75, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])  # blue → cyan → green → yellow → red
        x = np.linspace(0, 1, n)
        rgb = np.stack([np.interp(x, stops[:, 0], stops[:, c]) for c in (1, 2, 3)], 1)
        for i, (r, g, b) in enumerate(rgb):
            node.SetColor(i, f"{i}", float(r), float(g), float(b), 1.0)
        node.SetAttribute("Category", "X2Recon")
        return node

    def show_distance_map(self, model_node, distances, max_distance: float | None = None):
        """Distances (one per point, mm) as the model's active scalars, coloured from 0 to
        ``max_distance`` (default: their 95th percentile, at least 1 mm), with a colour legend."""
        import slicer
        import vtk

        d = np.asarray(distances, dtype=np.float64)
        set_point_scalars(model_node, DISTANCE_ARRAY, d)
        top = float(max_distance) if max_distance else max(1.0, float(np.ceil(np.percentile(d, 95))) if d.size else 1.0)
        disp = model_node.GetDisplayNode()
        if disp is None:
            disp = self.scene.AddNewNodeByClass("vtkMRMLModelDisplayNode")
            model_node.SetAndObserveDisplayNodeID(disp.GetID())
        disp.SetActiveScalar(DISTANCE_ARRAY, vtk.vtkAssignAttribute.POINT_DATA)
        disp.SetAndObserveColorNodeID(self.distance_color_node().GetID())
        disp.SetScalarRangeFlag(slicer.vtkMRMLDisplayNode.UseManualScalarRange)
        disp.SetScalarRange(0.0, top)
        disp.SetScalarVisibility(True)
        self.add_color_legend(disp, DISTANCE_ARRAY)
        return disp

    def show_confidence(self, model_node, confidence):
        """The per-vertex confidence (``x2recon.x2b.confidence``) as the model's active point scalars, coloured on
        the fixed 0–1 scale (cold: the network is unsure where the surface is; hot: a decisive boundary) with a
        legend; *Compare*'s distance map replaces it."""
        import slicer
        import vtk

        set_point_scalars(model_node, CONFIDENCE_TITLE, np.asarray(confidence, np.float64))
        disp = model_node.GetDisplayNode()
        disp.SetActiveScalar(CONFIDENCE_TITLE, vtk.vtkAssignAttribute.POINT_DATA)
        disp.SetAndObserveColorNodeID(self.distance_color_node().GetID())
        disp.SetScalarRangeFlag(slicer.vtkMRMLDisplayNode.UseManualScalarRange)
        disp.SetScalarRange(0.0, 1.0)
        disp.SetScalarVisibility(True)
        self.add_color_legend(disp, CONFIDENCE_TITLE)
        return disp

    def add_color_legend(self, display_node, title: str):
        """A colour legend for ``display_node`` (the Colors module's), or ``None`` where this MRML has
        no colour legend node class."""
        import slicer

        cls = getattr(slicer, "vtkMRMLColorLegendDisplayNode", None)
        if cls is None:
            return None
        if not self.scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
            self.scene.RegisterNodeClass(cls())  # a bare scene (the application's Colors module registers it)
        color_logic = getattr(slicer, "vtkSlicerColorLogic", None)
        legend = None
        if color_logic is not None and hasattr(color_logic, "AddDefaultColorLegendDisplayNode"):
            legend = color_logic.AddDefaultColorLegendDisplayNode(display_node)
        if legend is None:
            displayable = display_node.GetDisplayableNode()
            for i in range(displayable.GetNumberOfDisplayNodes()):
                dn = displayable.GetNthDisplayNode(i)
                if dn is not None and dn.IsA("vtkMRMLColorLegendDisplayNode"):
                    legend = dn
                    break
            else:
                legend = self.scene.AddNewNodeByClass("vtkMRMLColorLegendDisplayNode")
                legend.SetAndObservePrimaryDisplayNode(display_node)
                displayable.AddAndObserveDisplayNodeID(legend.GetID())
        legend.SetTitleText(title)
        legend.SetLabelFormat("%.1f")
        legend.SetVisibility(True)
        return legend
