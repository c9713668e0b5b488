"""X2BoneRecon: bones from one or two X-rays (X2B / X2B2 occupancy networks) inside 3D Slicer.

The panel is thin: every computation is in the headless ``x2recon`` package, reached through
``X2BoneReconLib.logic.X2BoneReconLogic`` (MRML in, MRML out).  Heavy imports (torch, timm, the
networks) happen on first use, after missing dependencies are installed with the user's consent.
*Reconstruct* runs ``x2recon reconstruct`` as a background process (PythonSlicer), so the
application stays responsive; its progress lines move the progress bar, *Cancel* stops it, and
its mesh is added as a model node in the X-ray's world coordinates.  *Compare with ground truth*
fills a table with the papers' metrics and colours the model by the distance to the ground truth.
"""

import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Union

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
except ImportError:  # Slicer < 5.2 has no parameter node wrapper: the panel works without saved settings
    parameterNodeWrapper = None

# Loaded from a clone (Slicer → Application Settings → Modules → Additional module paths) and x2recon
# not installed: the package is the x2recon/ folder beside the module folders.
if importlib.util.find_spec("x2recon") is None and (Path(__file__).resolve().parent.parent / "x2recon").is_dir():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from X2BoneReconLib.logic import X2BoneReconLogic
from x2recon.slicer import process as slicer_process
from x2recon.slicer.process import python_slicer
from x2recon.slicer.widget import PanelWidget

REQUIREMENTS = Path(__file__).parent / "Resources" / "requirements.txt"
#: Import names of what reconstruction and comparison need (torchvision: timm imports it).
REQUIRED_MODULES = ("torch", "torchvision", "timm", "safetensors", "SimpleITK", "scipy", "trimesh", "igl", "skimage",
                    "tqdm", "pyfqmr")
#: Refine with template (X2BR) only: the YOLO detector's package, installed when that option is used.
REFINE_REQUIREMENTS = Path(__file__).parent / "Resources" / "requirements-x2br.txt"
REFINE_MODULES = ("ultralytics",)
REFINE_QUESTION = (
    "Refine with template (X2BR) runs a YOLO detector from the ultralytics package, which is not installed. "
    "ultralytics is licensed under AGPL-3.0 (X2Recon itself is Apache-2.0). Install it now?\n"
    "Your PyTorch (torch, torchvision) is kept as it is. Without ultralytics, reconstruct without "
    "'Refine with template'."
)


class X2BoneRecon(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "X2 Bone Recon"
        self.parent.categories = ["Reconstruction.X2Recon"]
        self.parent.dependencies = []
        self.parent.contributors = ["X2Recon developers"]
        self.parent.helpText = (
            "Reconstructs bone from one X-ray with an X2B model, or from a frontal and a lateral X-ray with an X2B2 "
            "model: the structures the model was trained on (the bundled default, <tt>skeleton</tt>, gives all bone "
            "as one surface; the bundled <tt>demo</tt> model ribs, vertebrae and costal cartilages). The bundled "
            "models are research demos trained on two patients or fewer, not clinical models.<br>"
            "<b>Reconstruct</b>: choose the X-ray volume node (a DRR from X2DatasetBuilder carries its geometry; "
            "other radiographs (choose their view) are placed from their lung fields, and the log says what was assumed and how to give "
            "the real spacing and distances) and the model file (.safetensors; it starts with the bundled model, and "
            "X2BR's detector and template library with the bundled ones, so nothing needs training first). The bone "
            "model appears in the 3D view in the X-ray's world coordinates, so it overlays the CT a DRR was made "
            "from. <b>Refine with template</b> (X2BR) needs the ultralytics package (AGPL-3.0), installed on first "
            "use after asking.<br>"
            "<b>Compare with ground truth</b>: choose a segmentation (all segments, or the named structures) or a "
            "model: the table lists IoU, IoU(vox), Chamfer-L1 and F-score in the papers' protocol (each ground truth "
            "scaled to a longest edge of 1, F-score@0.02) and in world units (mm, F-score at 0.02 × the box edge), "
            "normal consistency, per-axis errors after ICP and surface distances (mm); the model is coloured by each "
            "vertex's distance to the ground truth, with a colour legend.<br>"
            "The same runs without Slicer: <tt>x2recon reconstruct --xray AP.png --model skeleton --out bones.stl</tt>, "
            "<tt>x2recon compare bones.stl gt.stl --protocol paper</tt>."
        )
        self.parent.acknowledgementText = (
            "Methods follow X2BR (bone reconstruction from a single X-ray: X2B occupancy network, metrics as "
            "Occupancy Networks, Mescheder et al., CVPR 2019). Encoders: timm (Apache-2.0). Nothing is downloaded: "
            "models and pretrained backbones are files you choose."
        )


if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class X2BoneReconParameterNode:
        """Panel settings, saved with the scene (bound to the .ui widgets by SlicerParameterName)."""

        xrayVolume: Union[slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLVectorVolumeNode]
        view: Annotated[str, Choice(["from node", "AP", "PA", "LAT"])] = "from node"
        lateralVolume: Union[slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLVectorVolumeNode]
        modelPath: Path
        resolution: Annotated[str, Choice(["32", "64", "128", "256", "512"])] = "256"
        threshold: Annotated[float, WithinRange(0.0, 0.99)] = 0.0  # 0: the model's τ
        faces: Annotated[int, WithinRange(0, 10_000_000)] = 0
        device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
        refine: bool = False
        detectorPath: Path
        templatesPath: Path
        registration: Annotated[str, Choice(["gbcpd", "bcpd", "cpd"])] = "gbcpd"
        reconstruction: slicer.vtkMRMLModelNode
        reference: Union[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLModelNode]
        structures: str = ""
        samplePoints: Annotated[int, WithinRange(1000, 1_000_000)] = 100_000
        maxDistance: Annotated[float, WithinRange(0.0, 1000.0)] = 0.0  # 0: automatic


def ensure_dependencies(testing: bool = False) -> bool:
    """Install what reconstruction needs after asking (in ``testing`` mode: without asking); see
    ``x2recon.slicer.process.ensure_dependencies`` (torch and torchvision only through PyTorchUtils)."""
    return slicer_process.ensure_dependencies(REQUIREMENTS, REQUIRED_MODULES, testing=testing, requester="X2BoneRecon")


def ensure_refine_dependencies(testing: bool = False) -> bool:
    """ultralytics for *Refine with template*, after a question that names its licence; asked only when a
    reconstruction with that option starts."""
    return slicer_process.ensure_dependencies(REFINE_REQUIREMENTS, REFINE_MODULES, testing=testing,
                                              requester="X2BoneRecon (Refine with template)", question=REFINE_QUESTION)


class X2BoneReconWidget(PanelWidget, ScriptedLoadableModuleWidget, VTKObservationMixin):
    parameterNodeClass = X2BoneReconParameterNode if parameterNodeWrapper is not None else None
    requirements, requiredModules = REQUIREMENTS, REQUIRED_MODULES

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self._run = None  # (mesh path, X-ray node, model path, X2BR?) of the running reconstruction
        self._x2b_node = None  # the coarse X2B model of the last X2BR run (compared beside the X2BR model)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.setupPanel(X2BoneReconLogic)
        self.ui.reconstructButton.connect("clicked(bool)", self.onReconstruct)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.xraySelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGui)
        self.ui.reconstructionSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGui)
        self.ui.referenceSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGui)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.updateGui)
        self.initializeParameterNode()
        self.updateGui()

    def defaultParameters(self, parameters):
        if not parameters.xrayVolume:  # prefer an X-ray that carries its geometry (a DRR)
            volumes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
            xrays = [v for v in volumes if v.GetAttribute("x2recon.geometry")]
            if xrays:
                parameters.xrayVolume = xrays[0]

    def updateGui(self, *args):
        PanelWidget.updateGui(self)
        idle = not self.busy
        has_model_file = bool(self.chosenFile(self.ui.modelPathLineEdit))
        self.ui.reconstructButton.enabled = idle and self.ui.xraySelector.currentNode() is not None and has_model_file
        self.ui.compareButton.enabled = (idle and self.ui.reconstructionSelector.currentNode() is not None
                                         and self.ui.referenceSelector.currentNode() is not None)

    # ------------------------------------------------------------------ settings
    def settings(self) -> dict:
        view = self.ui.viewComboBox.currentText
        threshold = self.ui.thresholdSpinBox.value
        return dict(
            lateral_node=self.ui.lateralSelector.currentNode(),
            resolution=int(self.ui.resolutionComboBox.currentText),
            threshold=None if threshold <= 0 else float(threshold),
            device=self.ui.deviceComboBox.currentText,
            view=None if view == "from node" else view,
            faces=int(self.ui.facesSpinBox.value),
            refine="template" if self.ui.refineCheckBox.checked else "none",
            detector=self.chosenFile(self.ui.detectorPathLineEdit) or None,
            templates=self.chosenFile(self.ui.templatesPathLineEdit) or None,
            registration=self.ui.registrationComboBox.currentText,
        )

    # ------------------------------------------------------------------ reconstruct (background process)
    def onReconstruct(self):
        if not self.ensureDependencies():
            return
        if self.ui.refineCheckBox.checked and not ensure_refine_dependencies():
            self.log("Refine with template needs ultralytics, which was not installed: reconstruct without it, "
                     "or install it when asked")
            return
        xray = self.ui.xraySelector.currentNode()
        model_path = self.chosenFile(self.ui.modelPathLineEdit)

        def command(work):
            cmd, mesh = self.logic.reconstruct_command(xray, model_path, work, python=python_slicer(), **self.settings())
            for line in self.logic.placement_lines(self.logic.placements):  # an assumed geometry is said, not silent
                self.log(line)
            from x2recon.geometry import ProjectionGeometry

            # the box the network reconstructs, drawn on the X-ray: a wrong placement shows at once
            self.logic.show_reconstruction_box(ProjectionGeometry.from_json(Path(mesh).with_name("xray.json")), xray)
            return cmd, (mesh, xray, model_path, self.ui.refineCheckBox.checked)

        self.startInWorkFolder("x2recon_recon_", "reconstruction", command)

    def onProcessFinished(self, code: int):
        mesh, xray, model_path, refined = self._run
        if code != 0 or not Path(mesh).is_file():
            self.reportFailure(code)
            return
        with slicer.util.tryWithErrorDisplay("Could not load the reconstruction.", waitCursor=True):
            if refined:
                nodes = self.logic.load_x2br(mesh, xray, model_path)
                node = nodes["x2br"]
                self._x2b_node = nodes["x2b"]
                self.log(f"X2BR: {len(nodes['detections'])} detections, {len(nodes['parts'])} structures")
            else:
                node = self.logic.load_reconstruction(mesh, xray, model_path)
                self._x2b_node = None
                for w in self.logic.ood_warnings:  # read from reconstruct's <stem>_confidence.json: never silent
                    self.log(f"WARNING: the X-ray may be outside what the model was trained on: {w}")
            self.ui.reconstructionSelector.setCurrentNode(node)
            self.log(f"{node.GetName()}: {node.GetPolyData().GetNumberOfPolys():,} triangles in world coordinates")
            slicer.util.resetThreeDViews()

    def onProcessCancelled(self):
        self.log("reconstruction cancelled")

    # ------------------------------------------------------------------ compare
    def onCompare(self):
        if not self.ensureDependencies():
            return
        model = self.ui.reconstructionSelector.currentNode()
        reference = self.ui.referenceSelector.currentNode()
        max_distance = self.ui.maxDistanceSpinBox.value
        with slicer.util.tryWithErrorDisplay("The comparison failed.", waitCursor=True):
            x2b = getattr(self, "_x2b_node", None)
            if x2b is not None and model.GetAttribute("x2recon.x2br.refine") and slicer.mrmlScene.IsNodePresent(x2b):
                # an X2BR result: X2B and X2BR side by side (the papers' Tables 1–3 rows)
                table = self.logic.compare_methods({"X2B": x2b, "X2BR": model}, reference,
                                                   structures=self.ui.structuresLineEdit.text.strip() or None,
                                                   n_points=int(self.ui.samplePointsSpinBox.value))
                self.ui.metricsTableView.setMRMLTableNode(table)
                self.log(f"{table.GetName()}: X2B and X2BR columns")
                return
            table = self.logic.compare(model, reference, structures=self.ui.structuresLineEdit.text.strip() or None,
                                       n_points=int(self.ui.samplePointsSpinBox.value),
                                       max_distance=max_distance if max_distance > 0 else None)
            self.ui.metricsTableView.setMRMLTableNode(table)
            values = self.logic.table_values(table)
            self.log(f"{table.GetName()}: " + " | ".join(
                f"{k} {v:.4g}" for k, v in values.items() if k in ("IoU (paper)", "Chamfer-L1 (paper, unit box)",
                                                                    "IoU (world)", "Chamfer-L1 (world, mm)", "NC",
                                                                    "Mean surface distance (mm)")))
            model.GetDisplayNode().SetVisibility(True)


class X2BoneReconTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: a synthetic chest phantom → DRR node → reconstruction with a small random
    network (light backbone) → a model node in the box of the DRR's geometry → compared with itself."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_reconstruct_and_compare()

    def test_reconstruct_and_compare(self):
        import numpy as np

        self.assertTrue(ensure_dependencies(testing=True), "x2recon's Python dependencies could not be installed")
        import torch

        from x2recon.drr.render import render_drr
        from x2recon.geometry import ProjectionGeometry
        from x2recon.slicer.phantom import phantom_ct
        from x2recon.nn.checkpoint import save_checkpoint
        from x2recon.x2b.network import X2BConfig, build_model
        from x2recon.x2b.reconstruct import OccupancyField
        from x2recon.slicer.mrml import drr_to_volume_node, lps_ras_points, xray_node_to_xray

        vol, _ = phantom_ct()
        g = ProjectionGeometry.from_view("AP", vol.corners_world().mean(0), size=(64, 64), box_size=200.0)
        drr_node = drr_to_volume_node(render_drr(vol, g), slicer.mrmlScene, "phantom AP")
        self.delayDisplay("DRR node made")

        torch.manual_seed(0)
        cfg = X2BConfig(backbone="convnext_atto", image_size=64, hidden=32, n_blocks=2, views=["AP"])
        net = build_model(cfg).eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = save_checkpoint(Path(tmp) / "tiny.safetensors", net, {"network": "x2b", "model": cfg.to_dict()})
            field = OccupancyField(net, [xray_node_to_xray(drr_node)], torch.device("cpu"))
            tau = float(np.median(field.prob(np.random.default_rng(0).uniform(-0.5, 0.5, (2000, 3)))))
            logic = X2BoneReconLogic(slicer.mrmlScene)
            model = logic.reconstruct(drr_node, path, resolution=32, threshold=tau, device="cpu")
        self.delayDisplay("Reconstructed")
        b = np.array(model.GetPolyData().GetBounds()).reshape(3, 2)
        lo, hi = g.box_bounds()
        ras = lps_ras_points(np.array([lo, hi]))
        self.assertTrue(np.all(b[:, 0] >= ras.min(0) - 1e-4) and np.all(b[:, 1] <= ras.max(0) + 1e-4))
        table = logic.compare(model, model, n_points=2000)
        values = logic.table_values(table)
        self.assertAlmostEqual(values["IoU (paper)"], 1.0, places=6)
        self.assertLess(values["Max surface distance (mm)"], 1e-6)
        self.delayDisplay("X2BoneRecon self-test passed")
