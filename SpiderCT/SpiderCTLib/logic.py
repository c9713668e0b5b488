"""SpiderCTLogic: a frontal + lateral X-ray pair (volume nodes) and a SPIDER model file → a CT volume
node (HU) and a segmentation node; the reconstruction against a ground-truth CT and segmentation →
a metrics table (SPIDER's PSNR, SSIM, Dice, HD95, Chamfer).

MRML in, MRML out; imports no Qt and nothing that needs the Slicer application, so it runs (and is
tested) with the real MRML of the ``slicer-core`` wheel.  Nodes are read and written through
``x2recon.slicer.mrml`` (the project's one RAS ↔ LPS boundary); torch, the network and the metrics are
imported on first use, never when the module loads.

The reconstruction runs as a background process (the panel starts it with
``x2recon.slicer.process.BackgroundJob``; tests with ``subprocess``): ``reconstruct_command`` checks
the inputs, writes them into a work folder and returns
the command line; ``load_results`` adds what it wrote to the scene.

* X-ray pair: ``x2recon spider`` itself.  Each X-ray node is written as a 16-bit PNG plus its geometry
  JSON (``x2recon.spider.inference.write_xray``, as X2BoneRecon passes X-rays to ``x2recon reconstruct``):
  nodes with an ``x2recon.geometry`` attribute (DRRs made by X2DatasetBuilder) keep their geometry,
  other radiographs get the model's training geometry of their view, centred at the origin — as the
  CLI does for an image file without a geometry file.
* CT (research): the CT node (and, for the isocentre, its segmentation) is written to the work folder
  and ``x2recon spider --from-ct`` renders the model's two DRRs with the dataset builder's renderer and
  training geometry (``x2recon.spider.inference.render_pair_from_ct``), writes them, then reconstructs
  from them in the same process.  Rendering is not done in Slicer's process: it
  takes seconds for a full chest CT on a CPU (longer at the training detector size), would freeze the
  application and load torch into it; in the background process it is cancellable with the rest and
  its result (the two DRRs) is loaded as X-ray nodes beside the CT.

Display: the CT gets a CT window (``WINDOWS``) in the slice views and volume rendering with Slicer's
CT preset (``VOLUME_RENDERING_PRESETS``).  Volume rendering needs a volume rendering logic: the
application's (``slicer.modules.volumerendering.logic()``) or one passed in.  The ``slicer-core`` wheel
has the ``vtkSlicerVolumeRenderingLogic`` class but no share directory, hence no presets, and no
``slicer.modules``: there the rendering nodes are only made when a logic is passed, with this module's
own bone transfer function, and nothing renders (no views).  The segmentation gets closed surfaces for
the 3D view (the binary labelmap → closed surface conversion rule is registered when the MRML in use has
none registered, as in the bare wheel).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from x2recon.slicer.mrml import (
    metrics_table_values,
    GEOMETRY_ATTRIBUTE,
    drr_to_volume_node,
    segment_ids,
    segment_totalseg_names,
    segments_to_label_volume,
    structure_color,
    volume_node_to_volume,
    volume_to_volume_node,
    xray_node_to_xray,
)
from x2recon.slicer.process import parse_progress_line

log = logging.getLogger(__name__)

#: CT windows (width, level) in HU offered by the panel.
WINDOWS = {"bone": (1500.0, 300.0), "soft tissue": (400.0, 40.0), "lung": (1500.0, -600.0)}
#: Slicer's volume rendering presets tried in this order (the first the logic has is used).
VOLUME_RENDERING_PRESETS = ("CT-Bone", "CT-Bones", "CT-Chest-Contrast-Enhanced")
#: Files of a run in its work folder.
CT_FILE, LABELS_FILE = "ct.nii", "labels.nii"
FRONTAL_PNG, LATERAL_PNG = "frontal.png", "lateral.png"
INPUT_CT_FILE, INPUT_LABELS_FILE = "input_ct.nii", "input_labels.nii"
#: Node attributes: the label sidecar (JSON) on a reconstructed segmentation; on a reconstructed CT,
#: its segmentation's node ID and the model file.
LABELS_ATTRIBUTE = "x2recon.labels"
SEGMENTATION_ATTRIBUTE = "x2recon.segmentation"
MODEL_ATTRIBUTE = "x2recon.model"
#: Segment tag naming the model class a segment holds.
CLASS_TAG = "x2recon.class"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")

def _input_error(path, problem: str):
    from x2recon.errors import X2ReconInputError

    return X2ReconInputError(path, problem)


@dataclass
class SpiderJob:
    """One background reconstruction: its work folder and the files it reads and writes."""

    folder: Path
    ct: Path  # the CT the process writes
    labels: Path | None  # its labelmap (None: a volume-only model)
    frontal: Path  # the X-ray pair (PNG + <stem>.json): inputs, or on the CT path outputs
    lateral: Path
    name: str  # base name of the result nodes
    from_ct: bool = False
    model: str = ""


def metric_rows(structures) -> list[tuple[str, str]]:
    """``(key, label)`` of a metrics table's rows: PSNR and SSIM, each structure's Dice, HD95 and
    Chamfer distance, then their means (units in the labels)."""
    rows = [("psnr", "PSNR (dB)"), ("ssim", "SSIM")]
    for s in structures:
        rows += [(f"dice:{s}", f"{s} Dice"), (f"hd95:{s}", f"{s} HD95 (mm)"), (f"chamfer:{s}", f"{s} Chamfer (mm)")]
    return rows + [("mean_dice", "Mean Dice"), ("mean_hd95", "Mean HD95 (mm)"), ("mean_chamfer", "Mean Chamfer (mm)")]


class SpiderCTLogic:
    """Nodes of ``scene`` → x2recon calls → nodes added to ``scene``."""

    def __init__(self, scene):
        self.scene = scene

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def bundled_files() -> dict:
        """``parameter -> path`` of the installed bundled files the panel starts with (the SPIDER
        model), so *Reconstruct* works without training."""
        from x2recon.slicer.bundled import panel_defaults

        return panel_defaults("SpiderCT")

    @staticmethod
    def model_config(model_path) -> dict:
        """The checkpoint's config (read without loading the weights); errors name the file."""
        from x2recon.nn.checkpoint import CheckpointError, read_config

        if model_path is None or str(model_path).strip() in ("", "."):
            raise _input_error(None, "choose a SPIDER model file (.safetensors); no SPIDER model is bundled in this "
                                     "installation (x2recon/resources/models/spider_skeleton.safetensors)")
        cfg = read_config(model_path)
        if cfg.get("network") != "spider" or "model" not in cfg:
            raise CheckpointError(model_path, f"network {cfg.get('network')!r} is not a SPIDER model "
                                              "(two X-rays → CT); X2B/X2B2 bone models belong in X2BoneRecon")
        return cfg

    @staticmethod
    def views(cfg: dict) -> list[str]:
        """[frontal, lateral] view names the model was trained on (e.g. PA, LAT)."""
        return [str(v).upper() for v in cfg["model"].get("views") or ["PA", "LAT"]]

    @staticmethod
    def class_names(cfg: dict) -> list[str]:
        """The model's segmentation classes (label i+1 is class i); empty for a volume-only model."""
        m = cfg["model"]
        return [] if m.get("decoder") == "volume-only" else list(m.get("classes") or [])

    def xray(self, node, view: str, cfg: dict):
        """An X-ray node → ``XRay`` for ``view``: the node's geometry attribute, else the model's
        training geometry of that view (centred at the origin), as the CLI treats a file without one."""
        from dataclasses import replace

        from x2recon.errors import X2ReconInputError
        from x2recon.spider.inference import training_geometry

        if node.GetAttribute(GEOMETRY_ATTRIBUTE):
            return xray_node_to_xray(node)
        x = xray_node_to_xray(node, view)  # the image as X2BoneRecon reads it; geometry replaced below
        H, W = x.image.shape
        try:
            g = training_geometry(cfg, view, size=(W, H))
        except X2ReconInputError as e:
            raise _input_error(node.GetName(), e.problem) from None
        return replace(x, geometry=g)

    def xray_pair(self, cfg: dict, model_path, frontal_node, lateral_node) -> list:
        """The model's [frontal, lateral] ``XRay`` pair from the nodes; clear errors for a missing or
        repeated view and for a pair that does not share one reconstruction box or is not orthogonal."""
        views = self.views(cfg)
        if frontal_node is None:
            raise _input_error(None, f"choose the frontal ({views[0]}) X-ray volume node")
        if lateral_node is None:
            raise _input_error(None, f"choose the lateral ({views[1]}) X-ray volume node")
        if frontal_node is lateral_node:
            raise _input_error(frontal_node.GetName(), "is chosen as both the frontal and the lateral X-ray; "
                                                       "SPIDER needs two orthogonal X-rays")
        xrays = [self.xray(frontal_node, views[0], cfg), self.xray(lateral_node, views[1], cfg)]
        from types import SimpleNamespace

        from x2recon.spider.inference import check_pair

        check_pair(SimpleNamespace(cfg=SimpleNamespace(views=views)), xrays)  # what x2recon spider checks
        return xrays

    @staticmethod
    def check_settings(resolution, device: str, precision: str, chunk: int) -> None:
        if int(resolution) < 2:
            raise ValueError(f"resolution must be at least 2, got {resolution}")
        if not (device in ("auto", "cpu", "cuda") or str(device).startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if int(chunk) < 0:
            raise ValueError(f"chunk must be 0 (the default) or a number of points, got {chunk}")

    # ------------------------------------------------------------------ the background command
    def reconstruct_command(self, model_path, out_dir, frontal_node=None, lateral_node=None, ct_node=None,
                            ct_labels_node=None, resolution: int = 128, device: str = "auto",
                            precision: str = "auto", chunk: int = 0, python: str | None = None,
                            name: str | None = None) -> tuple[list[str], SpiderJob]:
        """Check the inputs, write them into ``out_dir`` and return the background command and its job.

        With ``ct_node`` (research), the model's DRR pair is rendered from that CT in the background
        process (isocentre: the centre of the model's structures in ``ct_labels_node`` — a segmentation
        with TotalSegmentator names, or a labelmap in TotalSegmentator ids — else the CT's centre);
        otherwise ``frontal_node`` and ``lateral_node`` are the X-rays.  ``python``: the interpreter
        (Slicer's ``PythonSlicer``); ``chunk``: points per network evaluation (0: the CLI's default).
        The command prints ``X2RECON_PROGRESS <percent> <message>`` lines (``parse_progress_line``).
        An empty ``model_path`` means the bundled SPIDER model (``x2recon.slicer.bundled``).
        """
        from x2recon.slicer.bundled import or_bundled

        model_path = or_bundled(model_path, "spider")
        cfg = self.model_config(model_path)
        self.check_settings(resolution, device, precision, chunk)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        classes = self.class_names(cfg)
        job = SpiderJob(out, out / CT_FILE, (out / LABELS_FILE) if classes else None, out / FRONTAL_PNG,
                        out / LATERAL_PNG, "", ct_node is not None, str(model_path))
        for old in (job.ct, out / LABELS_FILE, out / "labels.labels.json", job.frontal, job.lateral,
                    job.frontal.with_suffix(".json"), job.lateral.with_suffix(".json")):
            if old.exists():
                old.unlink()  # never load a previous run's result
        if ct_node is None:
            from x2recon.spider.inference import write_xray

            xrays = self.xray_pair(cfg, model_path, frontal_node, lateral_node)
            for x, png in zip(xrays, (job.frontal, job.lateral)):
                write_xray(x, png)
            job.name = name or f"{frontal_node.GetName()} SPIDER"
        else:
            if not cfg.get("dataset", {}).get("build"):
                raise _input_error(model_path, "the checkpoint does not record its dataset's geometry, so its "
                                               "DRRs cannot be rendered from a CT; give the X-ray pair")
            self.write_input_ct(ct_node, ct_labels_node, out)
            job.name = name or f"{ct_node.GetName()} SPIDER"
        spider = ["spider", "--pa", str(job.frontal), "--pa-geometry", str(job.frontal.with_suffix(".json")),
                  "--lat", str(job.lateral), "--lat-geometry", str(job.lateral.with_suffix(".json")),
                  "--model", str(model_path), "--out", str(job.ct), "--resolution", str(int(resolution)),
                  "--device", str(device), "--precision", str(precision)]
        if job.labels is not None:
            spider += ["--labels", str(job.labels)]
        if int(chunk) > 0:
            spider += ["--chunk", str(int(chunk))]
        if ct_node is not None:  # the pair is rendered from the CT first, into job.frontal / job.lateral
            spider += ["--from-ct", str(out / INPUT_CT_FILE)]
            if (out / INPUT_LABELS_FILE).is_file():
                spider += ["--from-ct-labels", str(out / INPUT_LABELS_FILE)]
        spider += ["--progress-lines", "--quiet"]
        return [python or sys.executable, "-m", "x2recon.cli", *spider], job

    def write_input_ct(self, ct_node, labels_node, out: Path) -> None:
        """The CT node (and its labels, TotalSegmentator ids on the CT's grid) as uncompressed NIfTI in
        ``out`` for the background process (world coordinates, parent transforms applied)."""
        from x2recon.io.volume import write_volume

        if ct_node.IsA("vtkMRMLLabelMapVolumeNode") or not ct_node.IsA("vtkMRMLScalarVolumeNode"):
            raise _input_error(ct_node.GetName(), "is not a CT (a scalar volume node in HU)")
        try:
            ct = volume_node_to_volume(ct_node)
        except ValueError as e:
            raise _input_error(ct_node.GetName(), str(e)) from None
        if min(ct.array.shape) < 2:
            raise _input_error(ct_node.GetName(), f"is not a CT: {ct.shape_xyz} voxels")
        write_volume(ct, out / INPUT_CT_FILE, compress=False)
        labels_path = out / INPUT_LABELS_FILE
        if labels_path.exists():
            labels_path.unlink()
        if labels_node is None:
            return
        if labels_node.IsA("vtkMRMLSegmentationNode"):
            from x2recon.slicer.mrml import segmentation_to_labelmap_volume

            try:
                labels, unknown = segmentation_to_labelmap_volume(labels_node, ct_node, self.scene)
            except ValueError as e:
                raise _input_error(labels_node.GetName(), str(e)) from None
            if unknown:
                log.info("SpiderCT: segments without a TotalSegmentator name ignored: %s", unknown[:8])
        else:
            labels = volume_node_to_volume(labels_node)
            labels = labels.with_array(labels.array.astype(np.uint16 if labels.array.max() > 255 else np.uint8))
        write_volume(labels, labels_path, compress=False)

    #: ``(fraction, message)`` from a progress line of ``x2recon spider``, else ``None``.
    parse_progress_line = staticmethod(parse_progress_line)

    # ------------------------------------------------------------------ results → nodes
    def load_results(self, job: SpiderJob, window: str = "bone", volume_rendering: bool = True, vr_logic=None,
                     show: bool = True) -> dict:
        """What a finished job wrote → nodes: ``{"ct", "segmentation" (None for a volume-only model),
        "xrays" (the rendered DRR pair on the CT path, else []), "volume_rendering" (display node or
        None)}``.  The CT gets ``window`` in the slice views and, with ``volume_rendering``, a
        volume rendering (see the module doc: needs a volume rendering logic)."""
        import SimpleITK as sitk

        from x2recon.io.volume import Volume, read_labelmap

        if not Path(job.ct).is_file():
            raise _input_error(job.ct, "the reconstruction wrote no CT (its log says why)")
        ct = Volume.from_sitk(sitk.ReadImage(str(job.ct)), job.ct)
        ct_node = self.add_ct_node(ct, f"{job.name} CT", window)
        if job.model:
            ct_node.SetAttribute(MODEL_ATTRIBUTE, str(job.model))
        seg_node = None
        if job.labels is not None:
            from x2recon.spider.inference import labels_sidecar

            if not Path(job.labels).is_file():
                raise _input_error(job.labels, "the reconstruction wrote no labelmap (its log says why)")
            sidecar = json.loads(labels_sidecar(job.labels).read_text())
            seg_node = self.add_segmentation_node(read_labelmap(job.labels), sidecar, f"{job.name} segmentation",
                                                  ct_node)
            ct_node.SetAttribute(SEGMENTATION_ATTRIBUTE, seg_node.GetID())
        xray_nodes = []
        if job.from_ct:
            from x2recon.io.xray import read_xray

            for png in (job.frontal, job.lateral):
                x = read_xray(png)
                xray_nodes.append(self.add_xray_node(x, f"{job.name} DRR {x.geometry.name or png.stem}"))
        vr = None
        if show:
            self.show_in_slice_views(ct_node)
            if volume_rendering:
                vr = self.show_volume_rendering(ct_node, vr_logic)
        return {"ct": ct_node, "segmentation": seg_node, "xrays": xray_nodes, "volume_rendering": vr}

    def add_xray_node(self, xray, name: str):
        """An ``XRay`` → a single-slice volume node on its detector plane carrying its geometry (as the
        DRR nodes of X2DatasetBuilder, so X2BoneRecon and this module can take it as an input)."""
        from types import SimpleNamespace

        display = np.rint(np.clip(xray.image, 0, 1) * 65535).astype(np.uint16)
        return drr_to_volume_node(SimpleNamespace(display=display, geometry=xray.geometry), self.scene, name)

    def add_ct_node(self, ct, name: str, window: str = "bone"):
        """A CT ``Volume`` (LPS, HU) → scalar volume node (RAS) with a CT window."""
        node = volume_to_volume_node(ct, self.scene, name)
        self.set_window(node, window)
        return node

    @staticmethod
    def set_window(ct_node, window: str = "bone") -> None:
        """Fixed CT window ``WINDOWS[window]`` (width, level in HU) on the node's display."""
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {', '.join(WINDOWS)}, got {window!r}")
        disp = ct_node.GetDisplayNode()
        if disp is None:
            ct_node.CreateDefaultDisplayNodes()
            disp = ct_node.GetDisplayNode()
        w, lev = WINDOWS[window]
        disp.SetAutoWindowLevel(False)
        disp.SetWindowLevel(w, lev)

    def add_segmentation_node(self, labels, sidecar: dict, name: str, reference_node=None):
        """A labelmap ``Volume`` (LPS) + its sidecar (``{"labels": {"1": name}, "members": …}``) →
        segmentation node: one segment per label present, named and coloured by class (tag
        ``x2recon.class``), on ``reference_node``'s geometry, with closed surfaces for the 3D view.
        The sidecar is kept in the node's ``x2recon.labels`` attribute (``compare`` reads it)."""
        import slicer

        names = {int(k): str(v) for k, v in (sidecar.get("labels") or {}).items()}
        top = int(max([int(labels.array.max())] + list(names)))
        lab = volume_to_volume_node(labels, self.scene, "__x2recon_tmp_labels", "vtkMRMLLabelMapVolumeNode")
        colors = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", "__x2recon_tmp_label_names")
        ensure_closed_surface_rules()  # before the segmentation is made: it copies the rules it finds
        seg = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        try:
            colors.SetTypeToUser()
            colors.SetNumberOfColors(top + 1)
            colors.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
            for k in range(1, top + 1):
                nm = names.get(k, f"label {k}")
                colors.SetColor(k, nm, *structure_color(nm), 1.0)
            lab.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
            seg.CreateDefaultDisplayNodes()
            if reference_node is not None:
                seg.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
            if labels.array.any() and not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lab, seg):
                raise ValueError(f"{name}: importing the labelmap into a segmentation failed")
        finally:
            disp = lab.GetDisplayNode()
            self.scene.RemoveNode(lab)
            if disp is not None and self.scene.IsNodePresent(disp):
                self.scene.RemoveNode(disp)
            self.scene.RemoveNode(colors)
        segm = seg.GetSegmentation()
        by_name = {v: k for k, v in names.items()}
        for sid in segment_ids(seg):
            s = segm.GetSegment(sid)
            value = s.GetLabelValue() if hasattr(s, "GetLabelValue") else by_name.get(s.GetName(), 0)
            cls = names.get(int(value), s.GetName())
            s.SetTag(CLASS_TAG, cls)
            s.SetColor(*structure_color(cls))  # exact (the import went through an 8-bit colour table)
        seg.SetAttribute(LABELS_ATTRIBUTE, json.dumps({"format": sidecar.get("format", "x2recon.labels/1"),
                                                       "labels": {str(k): v for k, v in names.items()},
                                                       "members": sidecar.get("members") or {}}))
        if segm.GetNumberOfSegments():
            if not seg.CreateClosedSurfaceRepresentation():
                log.warning("SpiderCT: %s: no closed surfaces (no conversion rule)", name)
        if seg.GetDisplayNode() is not None:
            seg.GetDisplayNode().SetVisibility(True)
        return seg

    # ------------------------------------------------------------------ display
    def show_in_slice_views(self, ct_node) -> int:
        """The CT as the background of every slice view (and the active volume); returns how many
        slice views there are (none in a bare scene).  The segmentation shows by itself."""
        sel = self.scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
        if sel is not None:
            sel.SetActiveVolumeID(ct_node.GetID())
            sel.SetReferenceActiveVolumeID(ct_node.GetID())
        n = 0
        for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            comp = self.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            comp.SetBackgroundVolumeID(ct_node.GetID())
            n += 1
        return n

    def show_volume_rendering(self, ct_node, vr_logic=None, presets=VOLUME_RENDERING_PRESETS):
        """Volume rendering of the CT with the first of ``presets`` the logic has (else this module's
        bone transfer function); ``vr_logic`` defaults to the application's.  Returns the volume
        rendering display node, or ``None`` where there is no volume rendering logic (the
        ``slicer-core`` wheel without one passed in)."""
        if vr_logic is None:
            try:
                import slicer

                vr_logic = slicer.modules.volumerendering.logic()
            except (ImportError, AttributeError):
                log.info("SpiderCT: no volume rendering module here; the CT is shown in the slice views only")
                return None
        disp = vr_logic.GetFirstVolumeRenderingDisplayNode(ct_node) if hasattr(
            vr_logic, "GetFirstVolumeRenderingDisplayNode") else None
        if disp is None:
            disp = vr_logic.CreateDefaultVolumeRenderingNodes(ct_node)
        prop_node = disp.GetVolumePropertyNode()
        preset = next((p for p in (vr_logic.GetPresetByName(n) for n in presets) if p is not None), None)
        if preset is not None:
            prop_node.Copy(preset)
        else:
            bone_transfer_functions(prop_node.GetVolumeProperty())
        disp.SetVisibility(True)
        return disp

    # ------------------------------------------------------------------ compare with ground truth
    def prediction_labels(self, seg_node, ct_node):
        """The reconstructed segmentation → (labelmap ``Volume`` on the CT's grid with the model's label
        values, ``{label: class}``, ``{class: TotalSegmentator names}``).  Classes and members come from
        the node's ``x2recon.labels`` attribute (set by ``load_results``); a segmentation without it
        counts its segments' names as the classes, in order."""
        info = json.loads(seg_node.GetAttribute(LABELS_ATTRIBUTE) or "{}")
        names = {int(k): v for k, v in (info.get("labels") or {}).items()}
        members = info.get("members") or {}
        segm = seg_node.GetSegmentation()
        sids = segment_ids(seg_node)
        cls = {sid: segment_class(segm.GetSegment(sid)) for sid in sids}
        if not names:
            names = {k: cls[sid] for k, sid in enumerate(sids, 1)}
        value_of = {v: k for k, v in names.items()}
        chosen = [sid for sid in sids if cls[sid] in value_of]
        if not chosen:
            from x2recon.io.volume import Volume

            ref = volume_node_to_volume(ct_node)
            return Volume(np.zeros(ref.array.shape, np.uint8), ref.spacing, ref.origin, ref.direction), names, members
        vol = segments_to_label_volume(seg_node, self.scene, chosen, ct_node)
        lut = np.zeros(len(chosen) + 1, np.uint8 if max(names) < 256 else np.uint16)
        for i, sid in enumerate(chosen, 1):
            lut[i] = value_of[cls[sid]]
        return vol.with_array(lut[vol.array]), names, members

    def ground_truth_labels(self, node, wanted: set[str]):
        """A ground-truth segmentation or labelmap node → (labelmap ``Volume`` on its own grid,
        ``{id: name}``).  Segments are named by TotalSegmentator name (matched by ID or name) or by
        their own name (a model class such as ``thoracic``); only those in ``wanted`` are exported.
        A labelmap's ids are named by its colour table when those names are in ``wanted``, else read as
        TotalSegmentator ids."""
        name = node.GetName()
        if node.IsA("vtkMRMLSegmentationNode"):
            ts = segment_totalseg_names(node)
            segm = node.GetSegmentation()
            named = {sid: ts[sid] or segm.GetSegment(sid).GetName().strip().replace(" ", "_") for sid in ts}
            ids = [sid for sid in named if named[sid] in wanted]
            if not ids:
                raise _input_error(name, f"no segment is one of the model's structures (segments: "
                                         f"{[segm.GetSegment(s).GetName() for s in list(ts)[:8]]})")
            vol = segments_to_label_volume(node, self.scene, ids)
            return vol, {k: named[sid] for k, sid in enumerate(ids, 1)}
        if not node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise _input_error(name, "is neither a segmentation nor a labelmap volume node")
        vol = volume_node_to_volume(node)
        values = [int(v) for v in np.unique(vol.array) if v != 0]
        colors = node.GetDisplayNode().GetColorNode() if node.GetDisplayNode() is not None else None
        names = {}
        if colors is not None:
            names = {v: colors.GetColorName(v) for v in values if v < colors.GetNumberOfColors()}
            names = {v: n.strip().replace(" ", "_") for v, n in names.items() if n}
        if not any(n in wanted for n in names.values()):
            from x2recon.structures import totalseg_v2

            names = {v: n for v, n in totalseg_v2().items() if v in values}
        return vol, names

    def compare(self, ct_node, seg_node=None, gt_ct_node=None, gt_labels_node=None, table_node=None):
        """The reconstruction (CT node, and segmentation node for the structures) against a ground-truth
        CT and/or segmentation (or labelmap) node → table node of SPIDER's metrics (``metric_rows``):
        PSNR and SSIM over the HU window [−1024, 3071], per structure Dice, HD95 and Chamfer (mm),
        their means.  The ground truth is resampled onto the reconstruction's grid and its structures
        are mapped to the model's classes by name (``x2recon.spider.inference.compare``; a class joins the
        TotalSegmentator names listed in the label sidecar's ``members``)."""
        from x2recon.spider.inference import compare

        if ct_node is None:
            raise _input_error(None, "choose the reconstructed CT volume node")
        if gt_ct_node is None and gt_labels_node is None:
            raise _input_error(None, "choose a ground-truth CT and/or segmentation")
        if gt_labels_node is not None and seg_node is None:
            raise _input_error(None, "choose the reconstructed segmentation to compare with the ground-truth "
                                     "segmentation")
        pred_ct = volume_node_to_volume(ct_node)
        gt_ct = volume_node_to_volume(gt_ct_node) if gt_ct_node is not None else None
        pred_labels = names = members = gt_labels = gt_names = None
        if gt_labels_node is not None:
            pred_labels, names, members = self.prediction_labels(seg_node, ct_node)
            wanted = set(names.values()) | {m for ms in members.values() for m in ms}
            gt_labels, gt_names = self.ground_truth_labels(gt_labels_node, wanted)
        m = compare(pred_ct, pred_labels, names or {}, gt_ct, gt_labels, gt_names, members)
        values = {"psnr": m["psnr"], "ssim": m["ssim"]}
        structures = list(m["structures"]) if gt_labels_node is not None else []
        for s in structures:
            for k in ("dice", "hd95", "chamfer"):
                values[f"{k}:{s}"] = m["structures"][s][k]
        for k in ("dice", "hd95", "chamfer"):
            values[f"mean_{k}"] = m["mean"][k]
        rows = [(k, lab) for k, lab in metric_rows(structures)
                if (gt_ct is not None or k not in ("psnr", "ssim")) and (gt_labels_node is not None or k in ("psnr", "ssim"))]
        gt_name = " + ".join(n.GetName() for n in (gt_ct_node, gt_labels_node) if n is not None)
        return self.metrics_table(rows, values, ct_node, gt_name, m, table_node,
                                  [n for n in (gt_ct_node, gt_labels_node) if n is not None])

    def metrics_table(self, rows, values: dict, ct_node, gt_name: str, raw: dict, table_node=None, gt_nodes=()):
        """Columns ``Metric`` and ``Value``; which nodes were compared is in the name and attributes."""
        import vtk

        name = f"{ct_node.GetName()} vs {gt_name}"
        if table_node is None:
            table_node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} metrics")
        table = table_node.GetTable()
        table.Initialize()
        col_m, col_v = vtk.vtkStringArray(), vtk.vtkDoubleArray()
        col_m.SetName("Metric")
        col_v.SetName("Value")
        for key, label in rows:
            col_m.InsertNextValue(label)
            col_v.InsertNextValue(float(values[key]))
        table.AddColumn(col_m)
        table.AddColumn(col_v)
        table_node.SetUseColumnTitleAsColumnHeader(True)
        dr = raw.get("data_range")
        finite = isinstance(dr, (int, float)) and np.isfinite(dr)
        table_node.SetColumnDescription("Value", name + (f"; PSNR/SSIM over a {dr:g} HU range" if finite else ""))
        table_node.SetAttribute("x2recon.reconstruction", ct_node.GetID())
        table_node.SetAttribute("x2recon.reference", ",".join(n.GetID() for n in gt_nodes))
        if raw.get("missing"):
            table_node.SetAttribute("x2recon.missing", json.dumps(raw["missing"]))
        table_node.SetLocked(True)  # results, not inputs
        table_node.Modified()
        return table_node

    table_values = staticmethod(metrics_table_values)


def segment_class(segment) -> str:
    """The model class a segment holds: its ``x2recon.class`` tag, else its name."""
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(CLASS_TAG, value) and str(value) else segment.GetName()


def ensure_closed_surface_rules() -> None:
    """Register the binary labelmap ↔ closed surface conversion rules when they are not registered (the
    application's Segmentations module registers them; the bare MRML of ``slicer-core`` does not).  A
    segmentation copies the factory's rules when it is made, so this runs before making one."""
    import slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    have = {r.GetClassName() for r in factory.GetConverterRules()}
    for cls in ("vtkBinaryLabelmapToClosedSurfaceConversionRule", "vtkClosedSurfaceToBinaryLabelmapConversionRule"):
        if cls not in have and hasattr(slicer, cls):
            factory.RegisterConverterRule(getattr(slicer, cls)())


def bone_transfer_functions(volume_property) -> None:
    """A CT bone rendering (HU): air and soft tissue transparent, bone from 150 HU opaque-ish and
    ivory — used where Slicer's presets are not available."""
    opacity = volume_property.GetScalarOpacity()
    opacity.RemoveAllPoints()
    for hu, a in ((-1024.0, 0.0), (150.0, 0.0), (300.0, 0.15), (700.0, 0.5), (1500.0, 0.8), (3071.0, 0.85)):
        opacity.AddPoint(hu, a)
    color = volume_property.GetRGBTransferFunction()
    color.RemoveAllPoints()
    for hu, rgb in ((-1024.0, (0.0, 0.0, 0.0)), (150.0, (0.55, 0.25, 0.15)), (300.0, (0.88, 0.6, 0.3)),
                    (700.0, (1.0, 0.94, 0.85)), (3071.0, (1.0, 1.0, 1.0))):
        color.AddRGBPoint(hu, *rgb)
    volume_property.ShadeOn()
    volume_property.SetInterpolationTypeToLinear()
