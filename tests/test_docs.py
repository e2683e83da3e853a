"""The README stays a short user's guide, links in README.md and docs/ resolve, and docs/results/
is what benchmarks/make_docs.py makes of the stored result files, every table with its provenance."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def make_docs():
    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "benchmarks" / "make_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def test_readme_is_at_most_400_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 400


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_to_files(path):
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        if not (path.parent / target.split("#")[0]).is_file():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: {broken}"


def test_results_pages_are_up_to_date(make_docs, tmp_path):
    make_docs.write_pages(tmp_path)
    made = {p.name: p.read_text() for p in tmp_path.glob("*.md")}
    stored = {p.name: p.read_text() for p in (DOCS / "results").glob("*.md")}
    assert sorted(made) == sorted(stored), "run: python benchmarks/make_docs.py"
    stale = [name for name in made if made[name] != stored[name]]
    assert not stale, f"stale pages {stale}; run: python benchmarks/make_docs.py"


def test_readme_headline_table_is_generated(make_docs):
    readme = (ROOT / "README.md").read_text()
    assert make_docs.readme_with_headlines(readme, make_docs.headline_table()) == readme, \
        "run: python benchmarks/make_docs.py"


def test_every_generated_table_names_its_source_and_commit():
    for page in sorted((DOCS / "results").glob("*.md")):
        if page.name == "index.md":
            continue  # the headline table: each figure links to the page that states its provenance
        source = None
        for line in page.read_text().splitlines():
            if line.startswith("## "):
                source = None  # a new section needs its own provenance
            elif line.startswith("Source: "):
                source = line
            elif line.startswith("|---"):
                assert source is not None, f"{page.name}: a table without a Source line"
                assert "`benchmarks/results/" in source and "commit" in source, f"{page.name}: {source}"


def test_provenance_never_calls_uncommitted_code_clean(make_docs):
    dirty = {"git_commit": "a" * 40, "git_dirty": "True", "device_name": "cpu", "timestamp": "2026-01-01T00:00"}
    clean = dict(dirty, git_dirty="False")
    assert "uncommitted code" in make_docs.provenance("`x.csv`", [dirty]) and "(clean)" not in \
        make_docs.provenance("`x.csv`", [dirty])
    assert "(clean)" in make_docs.provenance("`x.csv`", [clean])
    assert "commit not recorded" in make_docs.provenance("`x.csv`", [{}])
