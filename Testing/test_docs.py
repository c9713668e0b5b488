"""The user documentation names only what exists: README.md, docs/*.md and training/README.md.

Every relative link (and its #anchor) resolves to a file in the repository, every repository path named
in code resolves, every ``x2recon <command>`` shown exists and every ``--option`` given to it is one its
parser accepts (the parser is built, nothing is run); the README stays a front page (≤ 250 lines), and
no page points outside the repository or carries development history ("issue N")."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, REPO / "training" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: Top-level folders a repository path in the docs starts with (anything else — runs/, ds/, /data — is
#: a user's file in an example).
REPO_ROOTS = {".ci", "docs", "Resources", "Testing", "training", "x2recon", "X2DatasetBuilder", "X2BoneRecon",
              "SpiderCT"}
#: Characters that make a token a placeholder or a pattern, not a path.
PLACEHOLDER = set("<>*{}$…|[]")

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\]]|\n)*?\]\(([^)\s]+)\)")
INLINE = re.compile(r"`([^`]+)`")


def rel(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


def split_page(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(the prose with fenced blocks blanked, [(language, code) of each fenced block])."""
    blocks = [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)]
    return FENCE.sub("", text), blocks


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (not - or _), spaces → hyphens."""
    h = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return h.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = split_page(page.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", prose, re.M)}


def code_texts(page: Path) -> list[str]:
    """Inline code spans and shell code blocks of ``page`` (a span may wrap over a line break)."""
    prose, blocks = split_page(page.read_text(encoding="utf-8"))
    spans = [" ".join(m.group(1).split()) for m in INLINE.finditer(prose)]
    return spans + [code for lang, code in blocks if lang in ("", "bash", "sh", "console")]


# ---------------------------------------------------------------------------------------- links, paths
@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_resolves(page):
    prose, _ = split_page(page.read_text(encoding="utf-8"))
    bad = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(REPO):
            bad.append(f"{target}: outside the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {rel(dest)}")
    assert not bad, f"{rel(page)}: {bad}"


def repository_paths(text: str) -> set[str]:
    """Tokens of ``text`` that name a file or folder of the repository (repo-root relative)."""
    found = set()
    for token in re.split(r"[\s\"'`(),;=]+", text):
        token = token.split("::")[0].rstrip(".:")
        if "/" not in token or PLACEHOLDER & set(token) or token.startswith(("/", "~", "http")):
            continue
        if token.split("/")[0] in REPO_ROOTS:
            found.add(token)
    return found


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_repository_path_exists(page):
    named = set().union(*(repository_paths(t) for t in code_texts(page)))
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"{rel(page)} names paths that do not exist: {missing}"


def test_the_path_finder_sees_paths_and_skips_examples():
    found = repository_paths("python training/cross_patient.py --out study --bundle x2recon/resources/models "
                             "runs/x2b/best.safetensors <clone>/SpiderCT $X2RECON_SHARED_DATA/xray Testing/test_docs.py::x")
    assert found == {"training/cross_patient.py", "x2recon/resources/models", "Testing/test_docs.py"}


# ------------------------------------------------------------------------------- commands and options
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


@pytest.fixture(scope="module")
def cli_parser() -> argparse.ArgumentParser:
    from x2recon.cli import build_parser

    return build_parser()


def commands(code: str) -> list[list[str]]:
    """Each ``x2recon …`` (or ``-m x2recon.cli …``) invocation in ``code`` as its words after the program:
    line continuations joined, comments dropped, split at ``&&``, ``;`` and pipes."""
    code = re.sub(r"\\\n", " ", code)
    out = []
    for line in code.splitlines():
        line = re.sub(r"(^|\s)#.*", "", line)
        for part in re.split(r"&&|;|\|", line):
            words = part.split()
            for i, w in enumerate(words):
                if w == "x2recon" or (w == "x2recon.cli" and i > 0 and words[i - 1] == "-m"):
                    out.append(words[i + 1:])
                    break
    return out


def check_command(parser: argparse.ArgumentParser, words: list[str]) -> str | None:
    """None when the subcommand exists and each --option is accepted, else what is wrong."""
    if not words or PLACEHOLDER & set(words[0]) or words[0].endswith((":", ",")):
        return None  # `x2recon` alone, `x2recon <command> --help`, a message quoted (`x2recon build, pid 12 …`)
    if not words[0].startswith("-"):
        sub = _subparsers(parser)
        if words[0] not in sub:
            return f"no command {words[0]!r}"
        parser, words = sub[words[0]], words[1:]
        deeper = _subparsers(parser)
        if deeper and words and not words[0].startswith("-"):
            if words[0] not in deeper:
                return f"no sub-command {words[0]!r} (has {sorted(deeper)})"
            parser, words = deeper[words[0]], words[1:]
    for w in words:
        option = w.strip("[]").split("=")[0].rstrip(",")
        if option.startswith("--") and len(option) > 2 and option not in parser._option_string_actions:
            return f"{parser.prog} has no option {option}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_command_and_option_exists(page, cli_parser):
    bad = []
    for code in code_texts(page):
        for words in commands(code):
            problem = check_command(cli_parser, words)
            if problem:
                bad.append(f"x2recon {' '.join(words)}: {problem}")
    assert not bad, f"{rel(page)}: {bad}"


def test_the_command_check_catches_what_does_not_exist(cli_parser):
    code = ("x2recon demo --resolution 64 && x2recon reconstruct --xray a.png --modle m.safetensors\n"
            "torchrun --standalone -m x2recon.cli train x2b --data ds \\\n    --batch-size 8  # --not-checked\n"
            "x2recon trian x2b\nx2recon template biuld --data ds\n")
    problems = [check_command(cli_parser, w) for w in commands(code)]
    assert problems[0] is None and problems[2] is None
    assert "has no option --modle" in problems[1]
    assert problems[3] == "no command 'trian'" and "no sub-command 'biuld'" in problems[4]


# ----------------------------------------------------------------------------------------- the pages
def test_readme_is_a_front_page_that_reaches_every_doc():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(text)}
    unreached = [rel(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not unreached, f"README links no page {unreached}"


def test_readme_installs_torch_before_the_package_on_a_cpu():
    """The CPU route installs torch and torchvision together from PyTorch's CPU index before the first
    ``pip install -e .`` (else pip pulls the multi-GB CUDA build, or a torchvision of another index)."""
    text = README.read_text(encoding="utf-8")
    cpu = text.index("download.pytorch.org/whl/cpu")
    assert text.index("pip install -e .") > cpu
    line = text[text.rindex("\n", 0, cpu):text.index("\n", cpu)]
    assert "torch torchvision" in line


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_no_page_points_outside_the_repository_or_carries_history(page):
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text and "shared/DESIGN" not in text
    assert not re.search(r"\bissues? \d+", text, re.I), re.search(r".{40}\bissues? \d+.{20}", text, re.I | re.S)
