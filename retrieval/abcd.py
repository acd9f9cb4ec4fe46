"""Render the ABCD retailer policy guidelines into Markdown knowledge-base documents.

Source: ABCD, the Action-Based Conversations Dataset (ASAPP Research, MIT
license), files ``guidelines.json`` (10 flows, 55 subflows of agent policy) and
``kb.json`` (the action sequence each subflow requires). One document is written
per subflow, with a title, front matter naming the source and license, the
flow's description, the policy steps and the required actions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from chatbot.errors import RetrievalError

LICENSE_NOTE = "ABCD (Action-Based Conversations Dataset), ASAPP Research, MIT license"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("<or>", ", or").replace(">", "")).replace(" ,", ",").strip()


def render_abcd_guidelines(src_dir: Path, out_dir: Path) -> list[Path]:
    """Write one Markdown file per ABCD subflow into ``out_dir``; return the paths written.

    Subflow titles in ``guidelines.json`` are matched to the snake-case subflow
    names of ``ontology.json`` (same order within each flow) to attach the
    ``kb.json`` action sequence.

    Raises:
        DocumentNotFoundError: ``guidelines.json`` is missing.
        RetrievalError: the flows or subflows of the files do not line up.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    guidelines = json.loads((src_dir / "guidelines.json").read_text())
    ontology = json.loads((src_dir / "ontology.json").read_text()) if (src_dir / "ontology.json").exists() else None
    kb = json.loads((src_dir / "kb.json").read_text()) if (src_dir / "kb.json").exists() else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for flow, spec in guidelines.items():
        flow_key = _slug(flow)
        subflows = list(spec["subflows"].items())
        keys: list[str | None] = [None] * len(subflows)
        if ontology is not None:
            names = ontology["intents"]["subflows"].get(flow_key)
            if names is None or len(names) != len(subflows):
                raise RetrievalError(f"flow {flow!r}: guidelines has {len(subflows)} subflows, ontology {names}")
            keys = list(names)
        for (title, sub), key in zip(subflows, keys):
            lines = [
                "---",
                f"title: {json.dumps(title + ' (' + flow + ')')}",
                f"source: {json.dumps('ABCD guidelines.json: ' + flow + ' / ' + title)}",
                f"license: {json.dumps(LICENSE_NOTE)}",
                f"flow: {flow_key}",
                f"subflow: {key or _slug(title)}",
                "---",
                f"# {title} ({flow})",
                "",
                f"Topic: {flow}, {spec.get('description', '').strip()}.",
                "",
            ]
            for line in sub.get("instructions", []):
                lines.append(_clean(line))
            if sub.get("instructions"):
                lines.append("")
            lines.append("## Policy steps")
            lines.append("")
            for i, action in enumerate(sub.get("actions", []), 1):
                lines.append(f"{i}. {_clean(action.get('text', ''))}")
                for s in action.get("subtext", []):
                    lines.append(f"   - {_clean(s)}")
            if key and key in kb:
                lines += ["", "## Required actions", "", ", ".join(a.replace("-", " ") for a in kb[key]) + "."]
            path = out_dir / f"{flow_key}__{key or _slug(title)}.md"
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            written.append(path)
    return written
