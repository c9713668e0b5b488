"""Every widget name the module code uses exists in its .ui; every listed module is complete."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def listed_modules() -> list[str]:
    text = (ROOT / "CMakeLists.txt").read_text()
    return re.findall(r"^\s*add_subdirectory\((\w+)\)", text, re.M)


def test_extension_lists_existing_modules():
    mods = listed_modules()
    assert "X2DatasetBuilder" in mods
    for m in mods:
        d = ROOT / m
        for rel in ("CMakeLists.txt", f"{m}.py", f"Resources/UI/{m}.ui", f"Resources/Icons/{m}.png",
                    f"{m}Lib/logic.py", "Testing/Python/CMakeLists.txt"):
            assert (d / rel).is_file(), f"{m}/{rel}"
        cm = (d / "CMakeLists.txt").read_text()
        for script in re.findall(r"\$\{MODULE_NAME\}(\S*\.py)", cm):
            assert (d / f"{m}{script}").is_file(), script


@pytest.mark.parametrize("module", listed_modules())
def test_widget_names_used_in_code_exist_in_ui(module):
    ui = ROOT / module / "Resources" / "UI" / f"{module}.ui"
    tree = ET.parse(ui)  # well-formed XML
    names = {w.get("name") for w in tree.iter("widget")} | {l.get("name") for l in tree.iter("layout")}
    code = (ROOT / module / f"{module}.py").read_text()
    used = set(re.findall(r"\bui\.(\w+)", code))
    missing = used - names
    assert used and not missing, f"{module}.py uses widgets missing from {ui.name}: {sorted(missing)}"
    # parameter-node bindings name real parameters
    params = {p.text for w in tree.iter("widget") for p in w.iter("string")
              if any(pp.get("name") == "SlicerParameterName" for pp in w.findall("property") if p in list(pp.iter()))}
    declared = set(re.findall(r"^\s{8}(\w+):", code, re.M))
    assert params and params <= declared, sorted(params - declared)
