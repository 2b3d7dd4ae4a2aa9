"""README.md and docs/ stay short, linked, self-contained and in step with the code.

One process, no torchrun: the README's length, every relative link (and its #anchor) in README.md
and docs/*.md, no mention of files outside the repository, docs/settings.md against TRAMConfig's
fields and their docstrings, and the README's quick start run as written.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import os
import re
import subprocess
import sys

import pytest

from tram_dist.config import TRAMConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
DOC_PAGES = sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md"))
MARKDOWN = [README] + DOC_PAGES
README_MAX_LINES = 250
SCANNED = ("README.md", "docs", "tram_dist", "tests", "bench", "examples")

FENCE = re.compile(r"^```.*?^```[^\n]*$", flags=re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", flags=re.M)


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def _prose(text: str) -> str:
    """The markdown outside fenced code blocks and inline code, where links are links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _links(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        prose = _prose(f.read())
    return LINK.findall(prose) + REFERENCE.findall(prose)


def _is_external(target: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) is not None  # http:, https:, mailto:


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text, lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", f.read()), flags=re.M)
    anchors, seen = set(), {}
    for heading in headings:
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_readme_is_short():
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail into docs/ and link it")


def test_docs_pages_exist():
    names = {os.path.basename(p) for p in DOC_PAGES}
    expected = {"how-it-works.md", "settings.md", "stacks-and-precision.md", "trainer-and-cli.md", "launch.md",
                "checkpoints.md", "results.md", "testing.md", "troubleshooting.md"}
    assert expected <= names, sorted(expected - names)
    with open(README, encoding="utf-8") as f:
        linked = {os.path.normpath(t.split("#")[0]) for t in _links(README)}
    unlinked = sorted(n for n in names if os.path.join("docs", n) not in linked)
    assert not unlinked, f"README.md links no docs page {unlinked}"


@pytest.mark.parametrize("page", MARKDOWN, ids=_rel)
def test_relative_links_resolve(page):
    """Every relative link names a file or folder of this repository; an #anchor into a markdown
    file names one of its headings."""
    broken = []
    for target in _links(page):
        if _is_external(target):
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        inside = os.path.commonpath([ROOT, resolved]) == ROOT
        if not inside or not os.path.exists(resolved):
            broken.append(f"{target} (no {_rel(resolved) if inside else resolved})")
        elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {_rel(resolved)})")
    assert not broken, f"{_rel(page)}: broken links {broken}"


def _scanned_files():
    for name in SCANNED:
        top = os.path.join(ROOT, name)
        if os.path.isfile(top):
            yield top
            continue
        for folder, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
            yield from (os.path.join(folder, f) for f in files if not f.endswith((".pyc", ".pt", ".png")))


def _repository_markdown() -> set[str]:
    names = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        names.update(f for f in files if f.endswith(".md"))
    return names


def test_nothing_names_files_outside_the_repository():
    """Every markdown file named anywhere is one of the repository's, and no relative path
    climbs out of it: a user's clone has nothing else."""
    markdown, found = _repository_markdown(), []
    for path in _scanned_files():
        with open(path, encoding="utf-8", errors="ignore") as f:
            text = f.read()
        found += [f"{_rel(path)}: {m.group(0)}" for m in re.finditer(r"[\w-]+\.md\b", text)
                  if m.group(0) not in markdown]
        for m in re.finditer(r"(?<![\w.])(?:\.\./)+[\w.-]+", text):
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), m.group(0)))
            if os.path.commonpath([ROOT, resolved]) != ROOT:
                found.append(f"{_rel(path)}: {m.group(0)}")
    assert not found, found


def _field_docstrings() -> dict[str, str]:
    """The string literal right after each field of TRAMConfig in tram_dist/config.py."""
    with open(os.path.join(ROOT, "tram_dist", "config.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TRAMConfig")
    docs = {}
    for node, after in zip(cls.body, cls.body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            is_doc = (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                      and isinstance(after.value.value, str))
            docs[node.target.id] = after.value.value if is_doc else ""
    return docs


def _first_sentence(doc: str) -> str:
    """Up to the first '.', '!' or '?' followed by a capital, a quote or the end ('et al. 0.01' goes on)."""
    text = " ".join(doc.split())
    m = re.match(r"(.+?[.!?])(?=\s+[A-Z\"'`(]|$)", text)
    return m.group(1) if m else text


def test_settings_doc_covers_every_field():
    with open(os.path.join(DOCS, "settings.md"), encoding="utf-8") as f:
        settings = " ".join(f.read().split())
    docstrings = _field_docstrings()
    fields = [f.name for f in dataclasses.fields(TRAMConfig)]
    assert set(docstrings) == set(fields), (sorted(set(fields) - set(docstrings)), sorted(set(docstrings) - set(fields)))
    undocumented = [name for name in fields if not docstrings[name].strip()]
    assert not undocumented, f"TRAMConfig fields without a docstring in tram_dist/config.py: {undocumented}"
    unnamed = [name for name in fields if f"`{name}`" not in settings]
    assert not unnamed, f"docs/settings.md does not name {unnamed}"
    missing = {name: _first_sentence(docstrings[name]) for name in fields
               if _first_sentence(docstrings[name]) not in settings}
    assert not missing, f"docs/settings.md lacks the first sentence of these fields' docstrings: {missing}"


def test_readme_quick_start_runs():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert section, "README.md has no '## Quick start' section followed by another section"
    code = re.search(r"```python\n(.*?)```", section.group(1), flags=re.S)
    assert code, "README.md's Quick start has no python block"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code.group(1)], capture_output=True, text=True, timeout=240,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, f"the quick start exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    num = r"([-+0-9.eE]+|nan|inf)"
    rows = re.findall(rf"^step (\d+) d={num} grad_norm={num} e_norm={num} loss={num}$", proc.stdout, flags=re.M)
    assert [int(r[0]) for r in rows] == [0, 1, 2], proc.stdout
    for _, d, grad_norm, e_norm, loss in rows:
        values = [float(v) for v in (d, grad_norm, e_norm, loss)]
        assert all(math.isfinite(v) for v in values) and min(values[:3]) > 0, proc.stdout
