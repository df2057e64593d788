"""README.md and docs/*.md: relative links reach a file and heading of the repository; the PyPI page
(README through setup.py's `pypi_description`) keeps no relative link, since PyPI cannot resolve one."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")


def setup_module_under_test():
    spec = importlib.util.spec_from_file_location("lomix_setup_script", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() runs only as __main__
    return module


def prose(text: str) -> str:
    """``text`` without fenced code blocks (a ``# comment`` there is no heading, a ``[x](y)`` no link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(path: Path) -> set[str]:
    """The heading anchors a repository host gives ``path``: lowercase, punctuation dropped except
    - and _, spaces as -, a repeated heading suffixed -1, -2."""
    seen: dict[str, int] = {}
    result = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", prose(path.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text())) if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", t)]


def test_anchor_slugs_follow_the_hosts_rule(tmp_path):
    # Reference: anchors GitHub gives these headings, written out by hand.
    page = "# Methods\n## Task routing: Poly, MHR, MHR-z, MHR-mu\n"
    page += "## Test-time rerouting (`lomix eval --reroute-steps`)\n"
    page += "```\n# not a heading\n```\n## Methods\n"
    path = tmp_path / "p.md"
    path.write_text(page)
    assert anchors(path) == {
        "methods",
        "task-routing-poly-mhr-mhr-z-mhr-mu",
        "test-time-rerouting-lomix-eval---reroute-steps",
        "methods-1",
    }


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_heading_of_the_repository(doc):
    links = relative_links(doc)
    for target in links:
        file, _, anchor = target.partition("#")
        resolved = (doc.parent / file).resolve() if file else doc
        assert resolved.exists(), f"{doc.name}: {target} -> no such file"
        assert ROOT in resolved.parents, f"{doc.name}: {target} leaves the repository"
        if anchor:
            assert resolved.suffix == ".md" and anchor in anchors(resolved), f"{doc.name}: {target} -> no such heading"


def test_the_pypi_description_has_no_relative_link_and_names_every_target():
    readme = (ROOT / "README.md").read_text()
    page = setup_module_under_test().pypi_description(readme)
    assert relative_links(ROOT / "README.md"), "the README links its docs: the check below must see them"
    left = [t for t in LINK.findall(page) if not re.match(r"(https?:|#)", t)]
    assert left == []
    for target in relative_links(ROOT / "README.md"):
        if not target.startswith("#"):
            assert f"`{target.partition('#')[0]}`" in page
    # absolute links are kept as written
    absolute = [t for t in LINK.findall(readme) if t.startswith("https:")]
    assert absolute and [t for t in LINK.findall(page) if t.startswith("https:")] == absolute


def test_the_pypi_description_rewrites_links_and_images_to_text():
    rewrite = setup_module_under_test().pypi_description
    assert rewrite("see [the methods](docs/methods.md#topk) and [x](https://a.b/c)") == (
        "see the methods (`docs/methods.md` in the lomix repository) and [x](https://a.b/c)"
    )
    assert rewrite("[`docs/cli.md`](docs/cli.md)") == "`docs/cli.md` (in the lomix repository)"
    assert rewrite("![plot](b/p.png) [up](#top)") == "plot (`b/p.png` in the lomix repository) [up](#top)"
