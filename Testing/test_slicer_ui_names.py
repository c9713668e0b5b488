"""Slicer panels without Slicer: every widget the code uses exists in its .ui, every parameter binding
can be connected, and every module the extension lists is complete.

The widget code only runs inside the Slicer application; these static checks catch what would
otherwise fail only there (a renamed widget, a parameter the parameter node wrapper cannot bind).
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def listed_modules() -> list[str]:
    text = (ROOT / "CMakeLists.txt").read_text()
    return re.findall(r"^\s*add_subdirectory\((\w+)\)", text, re.M)


def ui_modules() -> list[str]:
    """Listed modules plus any module folder that has a panel (*/Resources/UI/*.ui)."""
    found = {p.parents[2].name for p in ROOT.glob("*/Resources/UI/*.ui")}
    return sorted(found | set(listed_modules()))


def test_extension_lists_existing_modules():
    mods = listed_modules()
    assert {"X2DatasetBuilder", "X2BoneRecon", "SpiderCT"} <= set(mods)
    for m in mods:
        d = ROOT / m
        for rel in ("CMakeLists.txt", f"{m}.py", f"Resources/UI/{m}.ui", f"Resources/Icons/{m}.png",
                    f"{m}Lib/__init__.py", f"{m}Lib/logic.py", "Testing/CMakeLists.txt", "Testing/Python/CMakeLists.txt"):
            assert (d / rel).is_file(), f"{m}/{rel}"
        cm = (d / "CMakeLists.txt").read_text()
        assert "slicerMacroBuildScriptedModule" in cm and f"set(MODULE_NAME {m})" in cm
        listed = re.findall(r"\$\{MODULE_NAME\}(\S*\.py)", cm)
        for script in listed:
            assert (d / f"{m}{script}").is_file(), script
        # every Python file of the module is listed (else the installed module misses it)
        on_disk = {p.relative_to(d).as_posix() for p in d.glob(f"{m}Lib/*.py")} | {f"{m}.py"}
        assert on_disk <= {f"{m}{s}" for s in listed}, sorted(on_disk - {f"{m}{s}" for s in listed})
        for res in re.findall(r"^\s*(Resources/\S+)", cm, re.M):
            assert (d / res.replace("${MODULE_NAME}", m)).is_file(), res
        assert "slicer_add_python_unittest" in (d / "Testing" / "Python" / "CMakeLists.txt").read_text()


def test_modules_share_code_through_x2recon_only():
    """A module never imports another module's Lib (each is installed on its own); what they share
    (RAS ↔ LPS, background processes) lives in x2recon.slicer.mrml / x2recon.slicer.process."""
    mods = listed_modules()
    for m in mods:
        files = [ROOT / m / f"{m}.py", *sorted((ROOT / m / f"{m}Lib").glob("*.py"))]
        for f in files:
            tree = ast.parse(f.read_text())
            imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            others = {f"{o}Lib" for o in mods if o != m} | {o for o in mods if o != m}
            assert not imported & others, f"{f.relative_to(ROOT)} imports {sorted(imported & others)}"


def test_extension_installs_the_package_and_its_data():
    cm = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"ctkMacroCompilePythonScript\(.*SOURCE_DIR \$\{CMAKE_CURRENT_SOURCE_DIR\}/x2recon", cm, re.S)
    assert "x2recon/resources/*" in cm  # package data (label vocabulary) travels with the code
    assert "${Slicer_EXTENSION_GENERATE_CONFIG}" in cm and "${Slicer_EXTENSION_CPACK}" in cm
    assert (ROOT / "Resources" / "Icons" / "X2Recon.png").is_file()


def parameter_annotations(code: str) -> dict[str, str]:
    """``name -> annotation source`` of the @parameterNodeWrapper class in a module file."""
    out = {}
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list
        ):
            for st in node.body:
                if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                    out[st.target.id] = ast.unparse(st.annotation)
    return out


def _base_type(ann: str) -> str:
    m = re.match(r"(?:typing\.)?Annotated\[\s*([^,]+),", ann)
    return (m.group(1) if m else ann).strip()


def binding_problem(widget_class: str, ann: str) -> str | None:
    """Why Slicer's parameter node wrapper could not bind this widget to this type (its GUI connectors)."""
    base = _base_type(ann)
    rules = {
        "QComboBox": ("Choice(" in ann, "a QComboBox binds only an Annotated[..., Choice([...])] (or an Enum)"),
        "ctkComboBox": ("Choice(" in ann, "a ctkComboBox binds only an Annotated[..., Choice([...])] (or an Enum)"),
        "QSpinBox": (base == "int", "a QSpinBox binds an int"),
        "QSlider": (base == "int", "a QSlider binds an int"),
        "QDoubleSpinBox": (base in ("float", "int"), "a QDoubleSpinBox binds a float"),
        "ctkSliderWidget": (base in ("float", "int"), "a ctkSliderWidget binds a float"),
        "QLineEdit": (base == "str", "a QLineEdit binds a str"),
        "QCheckBox": (base == "bool", "a QCheckBox binds a bool"),
        "ctkPathLineEdit": (base in ("Path", "pathlib.Path"), "a ctkPathLineEdit binds a pathlib.Path"),
        "ctkDirectoryButton": (base in ("Path", "pathlib.Path"), "a ctkDirectoryButton binds a pathlib.Path"),
        "qMRMLNodeComboBox": ("vtkMRML" in base, "a qMRMLNodeComboBox binds a MRML node class (or a Union of them)"),
    }
    if widget_class not in rules:
        return f"no rule for {widget_class} in this test; add one that matches Slicer's guiConnectors"
    ok, why = rules[widget_class]
    return None if ok else f"{why}, not {ann}"


@pytest.mark.parametrize("module", ui_modules())
def test_widget_names_used_in_code_exist_in_ui(module):
    d = ROOT / module
    uis = sorted((d / "Resources" / "UI").glob("*.ui"))
    assert uis, f"{module} has no .ui file"
    names, classes = set(), {}
    for ui in uis:
        tree = ET.parse(ui)  # well-formed XML
        root = tree.getroot()
        assert root.tag == "ui" and root.find("widget") is not None, f"{ui.name}: not a Qt Designer form"
        for w in tree.iter("widget"):
            names.add(w.get("name"))
            classes[w.get("name")] = w.get("class")
        names |= {lay.get("name") for lay in tree.iter("layout")}
        # custom (CTK / MRML / Slicer) widgets must be declared for the form loader
        declared = {c.findtext("class") for c in tree.iter("customwidget")}
        custom = {w.get("class") for w in tree.iter("widget") if re.match(r"(ctk|qMRML|qSlicer)", w.get("class"))}
        assert custom <= declared, f"{ui.name}: undeclared custom widgets {sorted(custom - declared)}"
    code = (d / f"{module}.py").read_text()
    for ref in re.findall(r"resourcePath\([\"']UI/([^\"']+)[\"']\)", code):
        assert (d / "Resources" / "UI" / ref).is_file(), ref
    if "PanelWidget" in code:  # the shared Qt half uses the panel's log, progress bar and Cancel button
        code += (ROOT / "x2recon" / "slicer" / "widget.py").read_text()
    used = set(re.findall(r"\bui\.(\w+)", code))
    missing = used - names
    assert used and not missing, f"{module}.py uses widgets missing from its .ui: {sorted(missing)}"


@pytest.mark.parametrize("module", ui_modules())
def test_parameter_bindings_can_connect(module):
    d = ROOT / module
    params = parameter_annotations((d / f"{module}.py").read_text())
    problems, bound = [], set()
    for ui in sorted((d / "Resources" / "UI").glob("*.ui")):
        for w in ET.parse(ui).iter("widget"):
            for prop in w.findall("property"):
                if prop.get("name") != "SlicerParameterName":
                    continue
                pname = prop.findtext("string")
                bound.add(pname)
                if pname not in params:
                    problems.append(f"{w.get('name')}: parameter {pname!r} is not declared")
                    continue
                why = binding_problem(w.get("class"), params[pname])
                if why:
                    problems.append(f"{w.get('name')} ↔ {pname}: {why}")
                m = re.search(r"Choice\(\s*(\[.*?\])\s*\)", params[pname])
                if m and w.get("class") in ("QComboBox", "ctkComboBox"):
                    items = [i.findtext("property/string") for i in w.findall("item")]
                    choices = ast.literal_eval(m.group(1))
                    if items != [str(c) for c in choices]:
                        problems.append(f"{w.get('name')}: .ui items {items} differ from choices {choices}")
    if params:
        assert bound, f"{module}: a parameter node class but no SlicerParameterName bindings"
    assert not problems, "\n".join(problems)


def test_binding_rules_reject_what_slicer_rejects():
    """The rules above are what makes the binding test able to fail."""
    assert binding_problem("QComboBox", "str") is not None  # Slicer raises: Choice annotation required
    assert binding_problem("QComboBox", "Annotated[str, Choice(['a', 'b'])]") is None
    assert binding_problem("ctkPathLineEdit", "str") is not None
    assert binding_problem("qMRMLNodeComboBox", "Union[slicer.vtkMRMLLabelMapVolumeNode, slicer.vtkMRMLSegmentationNode]") is None
    assert binding_problem("QSpinBox", "Annotated[int, WithinRange(1, 64)]") is None
    assert binding_problem("QSpinBox", "float") is not None
