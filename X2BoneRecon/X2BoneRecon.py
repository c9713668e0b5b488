"""X2BoneRecon: bones from one or two X-rays (X2B / X2B2 occupancy networks) inside 3D Slicer.

The panel is thin: every computation is in the headless ``x2recon`` package, reached through
``X2BoneReconLib.logic.X2BoneReconLogic`` (MRML in, MRML out).  Heavy imports (torch, timm, the
networks) happen on first use, after missing dependencies are installed with the user's consent.
*Reconstruct* runs ``x2recon reconstruct`` as a background process (PythonSlicer), so the
application stays responsive; its progress lines move the progress bar, *Cancel* stops it, and
its mesh is added as a model node in the X-ray's world coordinates.  *Compare with ground truth*
fills a table with the papers' metrics and colours the model by the distance to the ground truth.
"""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Union

import qt
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

from X2BoneReconLib.logic import X2BoneReconLogic
from x2recon.slicer import process as slicer_process
from x2recon.slicer.process import LineBuffer, kill_process_tree, python_slicer, x2recon_root

REQUIREMENTS = Path(__file__).parent / "Resources" / "requirements.txt"
#: Import names of what reconstruction and comparison need.
REQUIRED_MODULES = ("torch", "timm", "safetensors", "SimpleITK", "scipy", "trimesh", "igl", "skimage", "tqdm", "pyfqmr")


class X2BoneRecon(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "X2 Bone Recon"
        self.parent.categories = ["Reconstruction.X2Recon"]
        self.parent.dependencies = []
        self.parent.contributors = ["X2Recon developers"]
        self.parent.helpText = (
            "Reconstructs the bones (ribs, vertebrae, costal cartilages — what the model was trained on) from one "
            "X-ray with an X2B model, or from a frontal and a lateral X-ray with an X2B2 model.<br>"
            "<b>Reconstruct</b>: choose the X-ray volume node (a DRR from X2DatasetBuilder carries its geometry; "
            "for other radiographs choose their view, which places them in the default chest geometry) and the model "
            "file (.safetensors). The bone model appears in the 3D view in the X-ray's world coordinates, so it "
            "overlays the CT a DRR was made from.<br>"
            "<b>Compare with ground truth</b>: choose a segmentation (all segments, or the named structures) or a "
            "model: the table lists IoU, Chamfer-L1 and F-score@0.02 (in units of the reconstruction box, as the "
            "papers), normal consistency, per-axis errors after ICP and surface distances (mm); the model is "
            "coloured by each vertex's distance to the ground truth, with a colour legend.<br>"
            "The same runs without Slicer: <tt>x2recon reconstruct --xray AP.png --model m.safetensors --out bones.stl</tt>."
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
    ``x2recon.slicer.process.ensure_dependencies`` (torch through PyTorchUtils when installed)."""
    return slicer_process.ensure_dependencies(REQUIREMENTS, REQUIRED_MODULES, testing=testing, requester="X2BoneRecon")


class X2BoneReconWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._process = None
        self._lines = None
        self._timer = None
        self._job = None  # (work folder, mesh path, X-ray node, model path, X2BR?) of the running reconstruction
        self._x2b_node = None  # the coarse X2B model of the last X2BR run (compared beside the X2BR model)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/X2BoneRecon.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = X2BoneReconLogic(slicer.mrmlScene)

        self._timer = qt.QTimer()
        self._timer.setInterval(250)
        self._timer.connect("timeout()", self.pollProcess)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.reconstructButton.connect("clicked(bool)", self.onReconstruct)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.xraySelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGui)
        self.ui.reconstructionSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGui)
        self.ui.referenceSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGui)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.updateGui)
        self.initializeParameterNode()
        self.updateGui()

    def cleanup(self):
        self.onCancel()
        self.removeObservers()
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self.ui)

    def enter(self):
        self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self):
        if parameterNodeWrapper is None or self._parameterNode is not None:
            return
        node = slicer.mrmlScene.GetSingletonNode("X2BoneRecon", "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "X2BoneRecon")
            node.SetSingletonTag("X2BoneRecon")
        self._parameterNode = X2BoneReconParameterNode(node)
        if not self._parameterNode.xrayVolume:  # prefer an X-ray that carries its geometry (a DRR)
            volumes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
            xrays = [v for v in volumes if v.GetAttribute("x2recon.geometry")]
            if xrays:
                self._parameterNode.xrayVolume = xrays[0]
        self._parameterNode.connectGui(self.ui)
        self.updateGui()

    def onSceneStartClose(self, caller, event):
        self.onCancel()
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self.ui)
            self._parameterNode = None

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def updateGui(self, *args):
        idle = self._process is None
        has_model_file = bool(self.chosenFile(self.ui.modelPathLineEdit))
        self.ui.reconstructButton.enabled = idle and self.ui.xraySelector.currentNode() is not None and has_model_file
        self.ui.cancelButton.enabled = not idle
        self.ui.compareButton.enabled = (idle and self.ui.reconstructionSelector.currentNode() is not None
                                         and self.ui.referenceSelector.currentNode() is not None)

    # ------------------------------------------------------------------ settings
    @staticmethod
    def chosenFile(pathLineEdit) -> str:
        """The file in a path line edit, or "" (the parameter node's unset Path shows as ".")."""
        p = pathLineEdit.currentPath.strip()
        return "" if p in ("", ".") else p

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

    def log(self, text: str):
        self.ui.statusTextEdit.appendPlainText(text)

    # ------------------------------------------------------------------ reconstruct (background process)
    def onReconstruct(self):
        if not ensure_dependencies():
            return
        xray = self.ui.xraySelector.currentNode()
        model_path = self.chosenFile(self.ui.modelPathLineEdit)
        work = tempfile.mkdtemp(prefix="x2recon_recon_")
        try:
            with slicer.util.tryWithErrorDisplay("Could not start the reconstruction.", waitCursor=True):
                cmd, mesh = self.logic.reconstruct_command(xray, model_path, work, python=python_slicer(),
                                                           **self.settings())
                proc = qt.QProcess()
                proc.setProcessChannelMode(qt.QProcess.MergedChannels)
                env = qt.QProcessEnvironment.systemEnvironment()
                root = x2recon_root()  # where x2recon lies (the extension's scripted-modules dir)
                if root:
                    old = env.value("PYTHONPATH")
                    env.insert("PYTHONPATH", os.pathsep.join(p for p in (root, old) if p))
                env.insert("PYTHONUNBUFFERED", "1")
                proc.setProcessEnvironment(env)
                self._process, self._lines = proc, LineBuffer()
                self._job = (work, mesh, xray, model_path, self.ui.refineCheckBox.checked)
                self.ui.progressBar.maximum = 100
                self.ui.progressBar.value = 0
                self.log(" ".join(cmd))
                proc.start(cmd[0], cmd[1:])
                if not proc.waitForStarted(10000):
                    self._process = None
                    raise RuntimeError(f"{cmd[0]} did not start: {proc.errorString()}")
                self._timer.start()
        finally:
            if self._process is None:  # not started: nothing will clean the work folder later
                shutil.rmtree(work, ignore_errors=True)
                self._job = None
        self.updateGui()

    def pollProcess(self):
        """Timer tick: show new output lines, move the progress bar, load the model when the process ends."""
        if self._process is None:
            self._timer.stop()
            return
        data = self._process.readAllStandardOutput().data()
        lines = self._lines.feed(bytes(data).decode(errors="replace") if data else "")
        finished = self._process.state() == qt.QProcess.NotRunning
        if finished:
            rest = self._process.readAllStandardOutput().data()
            lines += self._lines.feed(bytes(rest).decode(errors="replace") if rest else "") + self._lines.flush()
        for line in lines:
            parsed = self.logic.parse_progress_line(line)
            if parsed:
                fraction, message = parsed
                self.ui.progressBar.value = int(round(100 * fraction))
                self.ui.progressBar.setFormat(f"%p% {message}")
            elif line.strip():
                self.log(line)
        if finished:
            code = self._process.exitCode()
            self._timer.stop()
            self._process = None
            self.onProcessFinished(code)
            self.updateGui()

    def onProcessFinished(self, code: int):
        work, mesh, xray, model_path, refined = self._job
        self._job = None
        try:
            if code != 0 or not Path(mesh).is_file():
                self.log(f"reconstruction failed (exit code {code})")
                slicer.util.errorDisplay("The reconstruction failed; the panel's log shows why.")
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
                self.ui.reconstructionSelector.setCurrentNode(node)
                self.log(f"{node.GetName()}: {node.GetPolyData().GetNumberOfPolys():,} triangles in world coordinates")
                slicer.util.resetThreeDViews()
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def onCancel(self):
        if self._process is None:
            return
        pid = int(self._process.processId())
        self._timer.stop()
        if pid > 0:
            kill_process_tree(pid, timeout=3.0)
        self._process.kill()
        self._process.waitForFinished(3000)
        self._process = None
        if self._job is not None:
            shutil.rmtree(self._job[0], ignore_errors=True)
            self._job = None
        self.ui.progressBar.value = 0
        self.ui.progressBar.setFormat("%p%")
        self.log("reconstruction cancelled")
        self.updateGui()

    # ------------------------------------------------------------------ compare
    def onCompare(self):
        if not ensure_dependencies():
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
                f"{k} {v:.4g}" for k, v in values.items() if k in ("IoU", "Chamfer-L1 (box units)", "F-score@0.02",
                                                                    "NC", "Mean surface distance (mm)")))
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
        from x2recon.io.volume import Volume
        from x2recon.nn.checkpoint import save_checkpoint
        from x2recon.x2b.network import X2BConfig, build_model
        from x2recon.x2b.reconstruct import OccupancyField
        from x2recon.slicer.mrml import drr_to_volume_node, lps_ras_points, xray_node_to_xray

        n = 64
        z, y, x = np.mgrid[:n, :n, :n]
        ct = np.full((n, n, n), -1000, np.int16)
        ct[(x - 32) ** 2 + (y - 32) ** 2 < 26**2] = 40  # body
        ct[((x - 32) ** 2 + (y - 40) ** 2 < 5**2) & (z > 4) & (z < 60)] = 700  # a spine of sorts
        vol = Volume(ct, (3.0, 3.0, 3.0), (-96.0, -96.0, -96.0), np.eye(3))
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
        self.assertAlmostEqual(values["IoU"], 1.0, places=6)
        self.assertLess(values["Max surface distance (mm)"], 1e-6)
        self.delayDisplay("X2BoneRecon self-test passed")
