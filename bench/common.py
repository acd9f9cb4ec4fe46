"""What every benchmark script shares: writing its result file (the epilogue of ``bench/*.py``).

Benchmarks print the baseline beside ours (ratios in one run) and write the same figures as JSON, so a result
can be committed and compared across machines.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_result(path: str | Path, result: dict, indent: int = 2) -> Path:
    """Write ``result`` as JSON to ``path`` (parent folders created; values JSON cannot encode become strings) and
    say so on stdout. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=indent, default=str))
    print(f"wrote {path}")
    return path
