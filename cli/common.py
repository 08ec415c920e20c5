"""What every ``ldreg`` command shares: how it fails, and how it reads a spec file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import typer


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr, ``ldreg: error: ...`` (whatever the message's own line
    breaks), then exit with ``code``."""
    line = " ".join(str(message).split())
    print(f"ldreg: error: {line}", file=sys.stderr)
    raise typer.Exit(code)


def read_mapping(path: Path, what: str = "spec file") -> dict[str, Any]:
    """A YAML (or JSON) file holding a mapping; any other content is a clear error
    (exit 2, as for a bad command line)."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        fail(f"{what} not found: {path}", 2)
    except (OSError, yaml.YAMLError) as exc:
        fail(f"cannot read {what} {path}: {exc}", 2)
    if not isinstance(doc, dict):
        fail(f"{what} {path} must hold a mapping of fields, found {type(doc).__name__}", 2)
    return doc
