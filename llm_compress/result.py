"""What every stage returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageResult:
    """Output paths (inside the stage's directory) and JSON-able metrics of one stage; ``compute``: the processes
    and devices it ran on (None: this process, on the call's device)."""

    outputs: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    compute: dict[str, Any] | None = None
