"""One rule for the relative paths lomix reads from files it did not write itself (a repository
listing, a library index): a path that could lead outside its folder is refused everywhere."""

from __future__ import annotations

import re


def unsafe_reason(name: str) -> str | None:
    """Why ``name`` (a '/'-separated path relative to a repository) could escape its folder, or None."""
    if not name:
        return "it is empty"
    if "\x00" in name or any(ord(c) < 32 for c in name):
        return "it holds control characters"
    if "\\" in name:
        return "it holds a backslash, a path separator on Windows"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "it is an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "it climbs out of the repository with '..'"
    if "" in parts[:-1] or "." in parts:
        return "it holds empty or '.' path components"
    return None
