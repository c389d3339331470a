"""Paths: keeping a path read from data inside its root, and making config paths absolute.

The bottom layer (standard library only), so every reader and every stage uses the same two rules:

- `contained_path(root, name)`: an image name read from a data file is joined onto its root and must
  stay inside it. ``../`` that climbs out of the root, or an absolute path, is refused with
  `PathOutsideRoot` (unless the caller allows absolute paths, for files that list them). The check is
  lexical (``os.path.normpath``): it never touches the disk, so it is the same on the driver and on
  every worker. A symbolic link *inside* the root is followed when the image is opened: whoever can
  put links into the root controls the root, a data file cannot.
- `absolute_path(value)`: a path from the config made absolute against the current directory, once,
  on the driver; a URI (``s3://...``) is kept as it is.
"""

from __future__ import annotations

import os
import posixpath


class PathOutsideRoot(ValueError):
    """A path read from data that would leave its root (``../``) or is absolute where that is not allowed."""

    def __init__(self, name: str, root: str, reason: str):
        self.name, self.root, self.reason = name, root, reason
        super().__init__(f"{name!r} {reason}")


def is_uri(path: str) -> bool:
    return "://" in str(path)


def contained_path(root: str | os.PathLike, name: str, allow_absolute: bool = False) -> str:
    """`name` joined onto `root`, normalised, guaranteed to lie inside `root`.

    A local root gives an absolute path; a URI root gives a URI. An empty root keeps the name relative
    (normalised), but it still may not climb above where it starts. An absolute name (``/x``, ``~/x``,
    or a URI) is refused unless `allow_absolute`; then it is used as it is.
    """
    root = os.fspath(root)
    text = str(name)
    if is_uri(text) or os.path.isabs(text) or text.startswith("~"):
        if not allow_absolute:
            raise PathOutsideRoot(text, root, "is an absolute path; image paths must be relative to their root "
                                  "(data.allow_absolute_image_paths allows absolute paths)")
        return text if is_uri(text) else os.path.abspath(os.path.expanduser(text))
    relative = posixpath.normpath(text.replace("\\", "/"))
    if relative == ".." or relative.startswith("../"):
        shown = root or "the root"
        raise PathOutsideRoot(text, root, f"leaves its root {shown}")
    if not root:
        return relative
    if is_uri(root):
        # os.path would collapse "s3://" to "s3:/", so URIs are joined by hand.
        return root.rstrip("/") + "/" + ("" if relative == "." else relative)
    return os.path.normpath(os.path.join(os.path.abspath(os.path.expanduser(root)), relative))


def absolute_path(value: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """A config path made absolute (``~`` expanded) against `base` (default: the current directory).

    A URI is returned unchanged. The result is not resolved through symbolic links, so it names the
    same place the user wrote.
    """
    text = os.fspath(value)
    if is_uri(text):
        return text
    text = os.path.expanduser(text)
    if not os.path.isabs(text):
        text = os.path.join(os.fspath(base) if base is not None else os.getcwd(), text)
    return os.path.normpath(text)
