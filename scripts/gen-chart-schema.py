#!/usr/bin/env python3
"""Keep the Helm chart's values schema in step with the service's settings.

``helm/infogrowth/values.schema.json`` is hand-written except ``properties.config`` and the
``$defs`` named ``settings.*``: those are generated here from :class:`infogrowth.config.Settings`,
so a bad ``config`` value (unknown key, wrong type, value out of range) fails at ``helm install``
with the same rules the service applies at start.

    .venv/bin/python scripts/gen-chart-schema.py          # rewrite the schema
    .venv/bin/python scripts/gen-chart-schema.py --check  # exit 1 when it is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "helm" / "infogrowth" / "values.schema.json"
PREFIX = "settings."
CONFIG_DESCRIPTION = (
    "Service settings (infogrowth.config.Settings) rendered into /etc/infogrowth/config.yaml. "
    "The chart sets kafka.bootstrap_servers, kafka.drain_timeout_s, kafka.instance_id, serve.* "
    "and snapshot.directory itself."
)


def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                out[key] = "#/$defs/" + PREFIX + value[len("#/$defs/") :]
            else:
                out[key] = _rewrite_refs(value)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return node


def settings_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """(the schema of ``config``, the ``$defs`` it refers to), refs renamed to ``settings.*``."""
    sys.path.insert(0, str(ROOT / "consumer"))
    from infogrowth.config import Settings

    raw = _rewrite_refs(Settings.model_json_schema(mode="validation"))
    defs = {PREFIX + name: value for name, value in raw.pop("$defs", {}).items()}
    raw.pop("title", None)
    raw["description"] = CONFIG_DESCRIPTION
    return raw, defs


def render(current: dict[str, Any]) -> dict[str, Any]:
    config, defs = settings_schema()
    out = json.loads(json.dumps(current))
    out["properties"]["config"] = config
    kept = {k: v for k, v in out.get("$defs", {}).items() if not k.startswith(PREFIX)}
    out["$defs"] = {**kept, **dict(sorted(defs.items()))}
    return out


def dumps(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args()
    text = SCHEMA.read_text(encoding="utf-8")
    wanted = dumps(render(json.loads(text)))
    if args.check:
        if text != wanted:
            print(
                f"{SCHEMA.relative_to(ROOT)} is out of date with infogrowth.config.Settings: "
                "run `make chart-schema`",
                file=sys.stderr,
            )
            return 1
        return 0
    if text != wanted:
        SCHEMA.write_text(wanted, encoding="utf-8")
        print(f"updated {SCHEMA.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
