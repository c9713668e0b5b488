"""SpiderCT: a CT volume and its segmentation from two orthogonal X-rays (SPIDER) inside 3D Slicer.

The panel is thin: every computation is in the headless ``x2recon`` package, reached through
``SpiderCTLib.logic.SpiderCTLogic`` (MRML in, MRML out).  Heavy imports (torch, the network) happen on
first use, after missing dependencies are installed with the user's consent.  *Reconstruct* runs
``x2recon spider`` as a background process (PythonSlicer) — on the research path after rendering the
model's DRR pair from a CT node in that process — so the application stays responsive; its progress
lines move the progress bar, *Cancel* stops it and every process it started, and its CT and labelmap
are added as a volume node (CT window in the slice views, volume rendering) and a segmentation node
(3D surfaces).  *Compare with ground truth* fills a table with SPIDER's metrics.
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

from SpiderCTLib.logic import SpiderCTLogic
from x2recon.slicer import process as slicer_process
from x2recon.slicer.process import python_slicer
from x2recon.slicer.widget import PanelWidget

REQUIREMENTS = Path(__file__).parent / "Resources" / "requirements.txt"
#: Import names of what reconstruction and comparison need.
REQUIRED_MODULES = ("torch", "safetensors", "SimpleITK", "scipy", "skimage", "trimesh", "tqdm")
SOURCES = ["X-ray pair", "CT (render DRRs)"]


class SpiderCT(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Spider CT"
        self.parent.categories = ["Reconstruction.X2Recon"]
        self.parent.dependencies = []
        self.parent.contributors = ["X2Recon developers"]
        self.parent.helpText = (
            "Reconstructs a CT volume (HU) and a segmentation of the structures the model was trained on "
            "(vertebrae by region, ribs, …) from a frontal and a lateral X-ray with a SPIDER model.<br>"
            "<b>Reconstruct</b>: choose the frontal (PA or AP, as the model) and lateral X-ray volume nodes — DRRs "
            "from X2DatasetBuilder carry their geometry; other radiographs get the model's training geometry — and "
            "the model file (.safetensors; it starts with the bundled SPIDER model). For research, choose <i>CT (render DRRs)</i>: the module renders the "
            "model's two DRRs from a CT node with the dataset builder's renderer (the isocentre from the CT's "
            "labels when given) and reconstructs from them. The CT appears in the slice views with a CT window and "
            "in volume rendering, the segmentation with 3D surfaces, both on the model's reconstruction box "
            "(384 mm cube around the isocentre), so they overlay the patient's CT.<br>"
            "<b>Compare with ground truth</b>: a CT and/or a segmentation (TotalSegmentator names) or labelmap: "
            "the table lists PSNR and SSIM (over −1024…3071 HU), Dice, HD95 and Chamfer distance (mm) per "
            "structure and their means.<br>"
            "The same runs without Slicer: <tt>x2recon spider --pa pa.png --lat lat.png --model m.safetensors "
            "--out ct.nii.gz --labels seg.nii.gz</tt>."
        )
        self.parent.acknowledgementText = (
            "Method: SPIDER (CT and segmentation from biplanar X-rays: projection-guided sampling of a shared 2D "
            "encoder's features, multiresolution hash encoding, a shared decoder for intensity and labels). "
            "Nothing is downloaded: models are files you choose."
        )


if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class SpiderCTParameterNode:
        """Panel settings, saved with the scene (bound to the .ui widgets by SlicerParameterName)."""

        source: Annotated[str, Choice(["X-ray pair", "CT (render DRRs)"])] = "X-ray pair"
        frontalVolume: Union[slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLVectorVolumeNode]
        lateralVolume: Union[slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLVectorVolumeNode]
        inputCT: slicer.vtkMRMLScalarVolumeNode
        inputLabels: Union[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLLabelMapVolumeNode]
        modelPath: Path
        resolution: Annotated[str, Choice(["32", "64", "128", "256", "512"])] = "128"
        device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
        precision: Annotated[str, Choice(["auto", "fp32", "fp16", "bf16"])] = "auto"
        chunk: Annotated[int, WithinRange(0, 16777216)] = 0  # 0: the CLI's default
        window: Annotated[str, Choice(["bone", "soft tissue", "lung"])] = "bone"
        volumeRendering: bool = True
        reconstructedVolume: slicer.vtkMRMLScalarVolumeNode
        reconstructedSegmentation: slicer.vtkMRMLSegmentationNode
        groundTruthVolume: slicer.vtkMRMLScalarVolumeNode
        groundTruthLabels: Union[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLLabelMapVolumeNode]


def ensure_dependencies(testing: bool = False) -> bool:
    """Install what reconstruction needs after asking (in ``testing`` mode: without asking); see
    ``x2recon.slicer.process.ensure_dependencies`` (torch only through PyTorchUtils)."""
    return slicer_process.ensure_dependencies(REQUIREMENTS, REQUIRED_MODULES, testing=testing, requester="SpiderCT")


class SpiderCTWidget(PanelWidget, ScriptedLoadableModuleWidget, VTKObservationMixin):
    parameterNodeClass = SpiderCTParameterNode if parameterNodeWrapper is not None else None
    requirements, requiredModules = REQUIREMENTS, REQUIRED_MODULES

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self._run = None  # (SpiderJob, input CT node, input labels node) of the running reconstruction

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.setupPanel(SpiderCTLogic)
        self.ui.reconstructButton.connect("clicked(bool)", self.onReconstruct)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.sourceComboBox.connect("currentIndexChanged(int)", self.updateGui)
        self.ui.windowComboBox.connect("currentIndexChanged(int)", self.onWindowChanged)
        for selector in (self.ui.frontalSelector, self.ui.lateralSelector, self.ui.inputCTSelector,
                         self.ui.reconstructedVolumeSelector, self.ui.reconstructedSegmentationSelector,
                         self.ui.groundTruthVolumeSelector, self.ui.groundTruthLabelsSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGui)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.updateGui)
        self.initializeParameterNode()
        self.updateGui()

    def defaultParameters(self, parameters):
        if not parameters.frontalVolume and not parameters.lateralVolume:
            frontal, lateral = self.xraysInScene()  # DRRs carry their geometry, hence their view
            if frontal is not None and lateral is not None:
                parameters.frontalVolume, parameters.lateralVolume = frontal, lateral

    @staticmethod
    def xraysInScene():
        """(first frontal, first lateral) X-ray node of the scene by the view in its geometry attribute."""
        import json

        from x2recon.slicer.mrml import GEOMETRY_ATTRIBUTE

        frontal = lateral = None
        for v in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            text = v.GetAttribute(GEOMETRY_ATTRIBUTE)
            try:
                view = str(json.loads(text).get("name") or "").upper() if text else ""
            except (ValueError, AttributeError):
                continue
            if view in ("PA", "AP") and frontal is None:
                frontal = v
            elif view == "LAT" and lateral is None:
                lateral = v
        return frontal, lateral

    def fromCT(self) -> bool:
        return self.ui.sourceComboBox.currentText == SOURCES[1]

    def updateGui(self, *args):
        from_ct = self.fromCT()
        for w in (self.ui.frontalLabel, self.ui.frontalSelector, self.ui.lateralLabel, self.ui.lateralSelector):
            w.visible = not from_ct
        for w in (self.ui.inputCTLabel, self.ui.inputCTSelector, self.ui.inputLabelsLabel, self.ui.inputLabelsSelector):
            w.visible = from_ct
        PanelWidget.updateGui(self)
        idle = not self.busy
        inputs = (self.ui.inputCTSelector.currentNode() is not None if from_ct else
                  self.ui.frontalSelector.currentNode() is not None and self.ui.lateralSelector.currentNode() is not None)
        self.ui.reconstructButton.enabled = idle and inputs and bool(self.chosenFile(self.ui.modelPathLineEdit))
        has_gt = (self.ui.groundTruthVolumeSelector.currentNode() is not None
                  or self.ui.groundTruthLabelsSelector.currentNode() is not None)
        self.ui.compareButton.enabled = idle and self.ui.reconstructedVolumeSelector.currentNode() is not None and has_gt

    def onWindowChanged(self, *args):
        node = self.ui.reconstructedVolumeSelector.currentNode()
        if node is not None:
            self.logic.set_window(node, self.ui.windowComboBox.currentText)

    # ------------------------------------------------------------------ reconstruct (background process)
    def onReconstruct(self):
        if not self.ensureDependencies():
            return
        from_ct = self.fromCT()
        ct_node = self.ui.inputCTSelector.currentNode() if from_ct else None
        labels_node = self.ui.inputLabelsSelector.currentNode() if from_ct else None

        def command(work):
            cmd, job = self.logic.reconstruct_command(
                self.chosenFile(self.ui.modelPathLineEdit), work,
                frontal_node=None if from_ct else self.ui.frontalSelector.currentNode(),
                lateral_node=None if from_ct else self.ui.lateralSelector.currentNode(),
                ct_node=ct_node, ct_labels_node=labels_node,
                resolution=int(self.ui.resolutionComboBox.currentText), device=self.ui.deviceComboBox.currentText,
                precision=self.ui.precisionComboBox.currentText, chunk=int(self.ui.chunkSpinBox.value),
                python=python_slicer())
            return cmd, (job, ct_node, labels_node)

        self.startInWorkFolder("x2recon_spider_", "reconstruction", command)

    def onProcessFinished(self, code: int):
        job, ct_node, labels_node = self._run
        if code != 0 or not job.ct.is_file():
            self.reportFailure(code)
            return
        with slicer.util.tryWithErrorDisplay("Could not load the reconstruction.", waitCursor=True):
            nodes = self.logic.load_results(job, window=self.ui.windowComboBox.currentText,
                                            volume_rendering=self.ui.volumeRenderingCheckBox.checked)
            ct, seg = nodes["ct"], nodes["segmentation"]
            self.ui.reconstructedVolumeSelector.setCurrentNode(ct)
            self.ui.reconstructedSegmentationSelector.setCurrentNode(seg)
            if ct_node is not None:  # research: the CT (and its labels) are the ground truth
                self.ui.groundTruthVolumeSelector.setCurrentNode(ct_node)
                self.ui.groundTruthLabelsSelector.setCurrentNode(labels_node)
            slicer.util.setSliceViewerLayers(background=ct, fit=True)
            slicer.util.resetThreeDViews()
            n = seg.GetSegmentation().GetNumberOfSegments() if seg is not None else 0
            self.log(f"{ct.GetName()}: {'×'.join(map(str, ct.GetImageData().GetDimensions()))} voxels of "
                     f"{ct.GetSpacing()[0]:.2f} mm; {n} segment(s)"
                     + (f"; DRRs: {', '.join(x.GetName() for x in nodes['xrays'])}" if nodes["xrays"] else ""))

    def onProcessCancelled(self):
        self.log("reconstruction cancelled")

    # ------------------------------------------------------------------ compare
    def onCompare(self):
        if not self.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay("The comparison failed.", waitCursor=True):
            table = self.logic.compare(self.ui.reconstructedVolumeSelector.currentNode(),
                                       self.ui.reconstructedSegmentationSelector.currentNode(),
                                       self.ui.groundTruthVolumeSelector.currentNode(),
                                       self.ui.groundTruthLabelsSelector.currentNode())
            self.ui.metricsTableView.setMRMLTableNode(table)
            values = self.logic.table_values(table)
            self.log(f"{table.GetName()}: " + " | ".join(
                f"{k} {v:.4g}" for k, v in values.items() if k in ("PSNR (dB)", "SSIM", "Mean Dice", "Mean HD95 (mm)")))


class SpiderCTTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: a synthetic chest phantom CT node → the research path (the model's DRR pair
    rendered from it, then reconstructed) with a small random SPIDER in the background process → CT and
    segmentation nodes on the model's box → compared with the phantom."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_reconstruct_from_ct_and_compare()

    def test_reconstruct_from_ct_and_compare(self):
        import numpy as np

        self.assertTrue(ensure_dependencies(testing=True), "x2recon's Python dependencies could not be installed")
        import torch

        from x2recon.dataset.config import BuildConfig
        from x2recon.slicer.phantom import phantom_ct
        from x2recon.slicer.process import BackgroundJob
        from x2recon.nn.checkpoint import save_checkpoint
        from x2recon.spider.network import SpiderConfig, build_spider
        from x2recon.slicer.mrml import volume_to_volume_node

        vol, _ = phantom_ct()
        ct_node = volume_to_volume_node(vol, slicer.mrmlScene, "phantom CT")

        torch.manual_seed(0)
        cfg = SpiderConfig(views=["AP", "LAT"], image_size=32, unet_channels=[8, 16], feature_channels=8, hidden=16,
                           layers=1, classes=["thoracic"], members={"thoracic": ["vertebrae_T7"]}, prefer_tcnn=False,
                           hash=dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4,
                                     per_level_scale=None, finest_resolution=32))
        build = BuildConfig(views=["AP", "LAT"], drr_size=64, box_size=200.0, structures=["vertebrae"]).to_dict()
        logic = SpiderCTLogic(slicer.mrmlScene)
        with tempfile.TemporaryDirectory() as tmp:
            path = save_checkpoint(Path(tmp) / "tiny.safetensors", build_spider(cfg).eval(),
                                   {"network": "spider", "model": cfg.to_dict(), "dataset": {"build": build}})
            cmd, job = logic.reconstruct_command(path, Path(tmp) / "run", ct_node=ct_node, resolution=16,
                                                 device="cpu", python=python_slicer())
            lines, code = BackgroundJob(cmd).wait(timeout=600)  # the panel's runner, polled to the end
            self.assertEqual(code, 0, "\n".join(lines[-40:]))
            self.delayDisplay("Background reconstruction done")
            nodes = logic.load_results(job)
        ct_rec = nodes["ct"]
        self.assertEqual(ct_rec.GetImageData().GetDimensions(), (16, 16, 16))
        self.assertAlmostEqual(ct_rec.GetSpacing()[0], 200.0 / 16, places=6)
        self.assertEqual(len(nodes["xrays"]), 2)
        self.assertIsNotNone(nodes["segmentation"])
        table = logic.compare(ct_rec, None, ct_node)
        values = logic.table_values(table)
        self.assertEqual(list(values), ["PSNR (dB)", "SSIM"])
        self.assertTrue(np.isfinite(values["PSNR (dB)"]))
        self.delayDisplay("SpiderCT self-test passed")
