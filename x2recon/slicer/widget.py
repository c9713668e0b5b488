"""The Qt half the three Slicer panels share (X2DatasetBuilder, X2BoneRecon, SpiderCT).

``PanelWidget`` is mixed into a module's ``ScriptedLoadableModuleWidget`` (with Slicer's
``VTKObservationMixin``): it loads the module's ``.ui``, makes its logic, keeps the parameter node
(``@parameterNodeWrapper`` class) bound to the widgets across scene closes, installs missing
dependencies after asking, and runs one background ``x2recon`` command at a time
(``x2recon.slicer.process.BackgroundJob``) polled by a Qt timer: its lines go to the log, its
``X2RECON_PROGRESS`` lines move the progress bar, *Cancel* stops its process tree.

The panel's ``.ui`` names ``statusTextEdit``, ``progressBar`` and ``cancelButton``.  ``qt`` and
``slicer`` are imported inside the methods: this only runs inside Slicer, but importing it does not
need the application.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .process import BackgroundJob, ensure_dependencies, parse_progress_line


class PanelWidget:
    """Shared set-up, parameter node, dependency prompt and background process of a module's panel."""

    #: the module's ``@parameterNodeWrapper`` class (None: Slicer < 5.2, the panel keeps no settings)
    parameterNodeClass = None
    #: ``Resources/requirements.txt`` of the module and the import names it needs
    requirements: Path | None = None
    requiredModules: tuple[str, ...] = ()
    #: closing the scene cancels the running command (its results would have no scene to go to)
    cancelOnSceneClose = True
    pollMilliseconds = 250

    def setupPanel(self, logic_class) -> None:
        """Load ``Resources/UI/<module>.ui`` into the panel, make the logic, the poll timer and the scene
        observers.  Call from ``setup()`` after ``ScriptedLoadableModuleWidget.setup(self)``."""
        import qt
        import slicer

        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.moduleName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = logic_class(slicer.mrmlScene)
        self._parameterNode = None
        self._job = self._work = self._run = None
        self._timer = qt.QTimer()
        self._timer.setInterval(self.pollMilliseconds)
        self._timer.connect("timeout()", self.pollProcess)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)

    def cleanup(self):
        self.onCancel()
        self.removeObservers()
        if getattr(self, "_parameterNode", None) is not None:
            self._parameterNode.disconnectGui(self.ui)

    def enter(self):
        self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self):
        """Bind the module's singleton parameter node to the widgets (made on first use)."""
        import slicer

        if self.parameterNodeClass is None:  # no saved settings: the fields still start with the bundled files
            self.prefillBundled()
            return
        if self._parameterNode is not None:
            return
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", self.moduleName)
            node.SetSingletonTag(self.moduleName)
        self._parameterNode = self.parameterNodeClass(node)
        self.defaultParameters(self._parameterNode)
        self._parameterNode.connectGui(self.ui)
        self.prefillBundled()
        self.updateGui()

    def defaultParameters(self, parameters) -> None:
        """Fill unset parameters from the scene (e.g. the first suitable input node)."""

    def prefillBundled(self) -> None:
        """Empty model/detector/template fields start with the bundled files (``x2recon.slicer.bundled``),
        so *Reconstruct* works without training; a bound parameter node follows its widget."""
        from .bundled import panel_defaults

        for name, path in panel_defaults(self.moduleName).items():
            edit = getattr(self.ui, f"{name}LineEdit")
            if not self.chosenFile(edit):
                edit.currentPath = str(path)

    def onSceneStartClose(self, caller, event):
        if self.cancelOnSceneClose:
            self.onCancel()
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self.ui)
            self._parameterNode = None

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def updateGui(self, *args):
        self.ui.cancelButton.enabled = self.busy

    # ------------------------------------------------------------------ small shared helpers
    @staticmethod
    def chosenFile(pathLineEdit) -> str:
        """The file or folder in a path line edit, or "" (the parameter node's unset Path shows as ".")."""
        p = pathLineEdit.currentPath.strip()
        return "" if p in ("", ".") else p

    def log(self, text: str):
        self.ui.statusTextEdit.appendPlainText(text)

    def ensureDependencies(self, testing: bool = False) -> bool:
        """Install the module's missing requirements after asking (``process.ensure_dependencies``)."""
        return ensure_dependencies(self.requirements, self.requiredModules, testing=testing,
                                   requester=self.moduleName)

    # ------------------------------------------------------------------ the background command
    @property
    def busy(self) -> bool:
        return getattr(self, "_job", None) is not None

    def startProcess(self, cmd: list[str], shown: str | None = None, determinate: bool = True) -> None:
        """Run ``cmd`` in the background (x2recon on ``PYTHONPATH``, unbuffered); ``shown``: how the log
        shows the command (default: the command); ``determinate`` False: a busy bar until progress comes."""
        self.ui.progressBar.maximum = 100 if determinate else 0
        self.ui.progressBar.value = 0
        self.ui.progressBar.setFormat("%p%")
        self.log(shown or " ".join(map(str, cmd)))
        self._job = BackgroundJob(cmd)
        self._timer.start()
        self.updateGui()

    def startInWorkFolder(self, prefix: str, what: str, command) -> None:
        """Start ``command(work)`` → ``(cmd, run)`` with a fresh work folder; ``run`` (what the results
        need) is kept in ``self._run`` until the process ended.  The work folder is removed when the
        start fails, after ``onProcessFinished`` and on *Cancel*."""
        import slicer

        self._work = tempfile.mkdtemp(prefix=prefix)
        try:
            with slicer.util.tryWithErrorDisplay(f"Could not start the {what}.", waitCursor=True):
                cmd, self._run = command(self._work)
                self.startProcess(cmd)
        finally:
            if not self.busy:
                self._endRun()
        self.updateGui()

    def _endRun(self) -> None:
        work, self._work, self._run = getattr(self, "_work", None), None, None
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)

    def pollProcess(self):
        """Timer tick: pass new output lines on, and end the job when its process ended."""
        if self._job is None:
            self._timer.stop()
            return
        lines, code = self._job.poll()
        for line in lines:
            self.onProcessLine(line)
        if code is not None:
            self._timer.stop()
            self._job = None
            try:
                self.onProcessFinished(code)
            finally:
                self._endRun()
            self.updateGui()

    def onProcessLine(self, line: str) -> None:
        """A progress line moves the bar; any other line goes to the log."""
        parsed = parse_progress_line(line)
        if parsed:
            fraction, message = parsed
            self.ui.progressBar.maximum = 100
            self.ui.progressBar.value = int(round(100 * fraction))
            self.ui.progressBar.setFormat(f"%p% {message}")
        elif line.strip():
            self.log(line)

    def onProcessFinished(self, code: int) -> None:
        """The command ended with exit code ``code``: load its results (``self._run``) here."""

    def reportFailure(self, code: int, what: str = "reconstruction") -> None:
        """The command failed: say so in the log (which holds its output) and in a message box."""
        import slicer

        self.log(f"{what} failed (exit code {code})")
        slicer.util.errorDisplay(f"The {what} failed; the panel's log shows why.")

    def onProcessCancelled(self) -> None:
        """The command was cancelled (its work folder is removed after this)."""

    def onCancel(self):
        if not self.busy:
            return
        self._timer.stop()
        self._job.cancel(timeout=3.0)
        self._job = None
        self.ui.progressBar.maximum = max(self.ui.progressBar.maximum, 1)
        self.ui.progressBar.value = 0
        self.ui.progressBar.setFormat("%p%")
        try:
            self.onProcessCancelled()
        finally:
            self._endRun()
        self.updateGui()
