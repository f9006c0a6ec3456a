"""Import paths of a user's own code, ``"package.module:attribute"``; no torch.

A peer config names a user's model factory (``model = "package.module:factory"``) and data
loader (``data = "python:package.module:loader"``) by import path. This module tells the two
forms apart from the built-in names without importing anything (so a config is checked before
torch loads) and resolves a path to the callable it names, with one typed error for each way
that can fail.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from peer.errors import PeerError

#: ``package.module:attribute``: dotted Python identifiers, one colon, a dotted attribute.
IMPORT_PATH_PATTERN = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*"
    r"(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class ImportPathError(PeerError, ValueError):
    """An import path that is malformed, does not import, or does not name a callable."""


def is_user_model(name: str) -> bool:
    """Whether ``name`` names a user's model factory rather than a built-in model.

    The built-in names ("mlp", "cnn", "scatter") never contain ':'; the import-path form
    ``"package.module:factory"`` always does. A malformed path is still a user model here;
    :func:`check_import_path` says what is wrong with it.
    """
    return ":" in name


def check_import_path(path: str, what: str) -> tuple[str, str]:
    """(module, attribute) of ``path``; ImportPathError naming ``what`` when malformed."""
    if not IMPORT_PATH_PATTERN.match(path):
        raise ImportPathError(f"{what}: {path!r} is not an import path; expected "
                              "'package.module:name' (dotted module, one colon, the name)")
    module, _, attribute = path.partition(":")
    return module, attribute


def load_callable(path: str, what: str) -> Callable[..., Any]:
    """The callable ``path`` names, imported now; ImportPathError when the module does not
    import (the cause is chained and named), lacks the name, or the name is not callable."""
    module_name, attribute = check_import_path(path, what)
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # any error of the user's module: report it, typed, with cause
        raise ImportPathError(f"{what}: cannot import module {module_name!r} of {path!r}: "
                              f"{type(exc).__name__}: {exc} (is its directory on "
                              "PYTHONPATH?)") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ImportPathError(f"{what}: module {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ImportPathError(f"{what}: {path!r} is a {type(target).__name__}, not callable")
    return target
