"""Backends: lower a program into an artifact directory and run it.

``lower(name, program, directory, progress)`` writes the backend's files into ``directory`` and returns the
manifest's ``backend`` record. The torch backend is the ``program.pt2`` that every artifact carries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import BackendError
from ..program import Program


def lower(name: str, program: Program, directory: Path, progress: Any = None) -> dict[str, Any]:
    if name == "torch":
        return {"name": "torch", "program": "program.pt2"}
    raise BackendError(f"backend {name!r} is not available in this version of headsmith",
                       "use --backend torch")
