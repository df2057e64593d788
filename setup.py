"""setuptools reads everything from setup.cfg except the long description (the PyPI page), built here.

The page is README.md, whose links to the repository's own files (``docs/methods.md#...``) are
relative: they work on a repository host, but PyPI resolves them against its project page, where
they lead nowhere, and no repository URL is fixed to make them absolute. On PyPI each such link
becomes its text plus the file it points to, so the reader still learns where to look.
"""

from __future__ import annotations

import re
from pathlib import Path

from setuptools import setup

# [text](target) and ![alt](target) whose target has no scheme (https:, mailto:) and is not an
# anchor of the page itself (#section).
RELATIVE_LINK = re.compile(r"(!?)\[([^\]\n]*)\]\((?![A-Za-z][A-Za-z0-9+.-]*:|#)([^)\s]+)\)")


def pypi_description(markdown: str) -> str:
    """``markdown`` with every relative link replaced by ``text (`path`)``; an image by ``alt (`path`)``."""

    def plain(match: re.Match) -> str:
        text, path = match.group(2), match.group(3).split("#")[0]
        if text.strip("`") == path:
            return f"`{path}` (in the lomix repository)"
        return f"{text} (`{path}` in the lomix repository)"

    return RELATIVE_LINK.sub(plain, markdown)


if __name__ == "__main__":
    setup(long_description=pypi_description(Path(__file__).with_name("README.md").read_text(encoding="utf-8")))
