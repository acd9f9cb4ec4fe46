"""What every command module shares: the settings and JSON output."""

from __future__ import annotations

import json
from pathlib import Path


def settings(**overrides):
    """:class:`~chatbot.config.Settings` from the environment, with the command line's non-None ``overrides``.

    Raises:
        pydantic.ValidationError: a setting is out of range (``main`` prints it and exits 2).
    """
    from chatbot.config import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` (parents created) and say so on stdout."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, default=str))
    print(f"wrote {path}")
