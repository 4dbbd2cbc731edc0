"""``GET /docs``: the API reference as plain HTML rendered from the OpenAPI schema, readable offline.

FastAPI's Swagger UI and ReDoc load their JavaScript from a CDN, so on a planner host without internet
they render a blank page, and no installed package ships those assets. This page needs neither: every
path, its parameters (type, bounds, default, description) and its responses, straight from
``app.openapi()``; the machine-readable schema stays at ``/openapi.json``.
"""

from __future__ import annotations

import html
from typing import Any

_BOUNDS = (
    ("minimum", ">="),
    ("exclusiveMinimum", ">"),
    ("maximum", "<="),
    ("exclusiveMaximum", "<"),
    ("minLength", "len >="),
    ("maxLength", "len <="),
)


def _type(schema: dict[str, Any]) -> str:
    if "anyOf" in schema:
        return " | ".join(_type(s) for s in schema["anyOf"])
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    return str(schema.get("type", "object"))


def _constraints(schema: dict[str, Any]) -> str:
    parts = []
    for sub in [schema, *schema.get("anyOf", [])]:
        parts += [f"{op} {sub[key]}" for key, op in _BOUNDS if key in sub]
        if "pattern" in sub:
            parts.append(f"pattern {sub['pattern']}")
    if "default" in schema:
        parts.append(f"default {schema['default']!r}")
    return ", ".join(parts)


def _parameters(op: dict[str, Any]) -> str:
    rows = []
    for p in op.get("parameters", []):
        schema = p.get("schema", {})
        desc = p.get("description") or schema.get("description") or ""
        rows.append(
            f"<tr><td><code>{html.escape(p['name'])}</code>{' *' if p.get('required') else ''}</td>"
            f"<td>{html.escape(p['in'])}</td><td>{html.escape(_type(schema))}</td>"
            f"<td>{html.escape(_constraints(schema))}</td><td>{html.escape(desc)}</td></tr>"
        )
    if "requestBody" in op:
        body = op["requestBody"]
        schema = next(iter(body.get("content", {}).values()), {}).get("schema", {})
        rows.append(
            f"<tr><td>(body){' *' if body.get('required') else ''}</td><td>body</td>"
            f"<td>{html.escape(_type(schema))}</td><td></td>"
            f"<td>{html.escape(body.get('description', ''))}</td></tr>"
        )
    if not rows:
        return "<p>No parameters.</p>"
    head = "<tr><th>name</th><th>in</th><th>type</th><th>bounds, default</th><th>description</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _responses(op: dict[str, Any]) -> str:
    items = [
        f"<li><b>{html.escape(str(code))}</b> {html.escape(r.get('description', ''))}</li>"
        for code, r in sorted(op.get("responses", {}).items())
    ]
    return f"<ul>{''.join(items)}</ul>"


def render_docs(openapi: dict[str, Any]) -> str:
    info = openapi.get("info", {})
    sections = []
    for path, ops in openapi.get("paths", {}).items():
        for method, op in ops.items():
            title = f"{method.upper()} {path}"
            summary = op.get("summary", "")
            sections.append(
                f'<h2 id="{html.escape(method + path)}"><code>{html.escape(title)}</code> '
                f"{html.escape(summary)}</h2>"
                f"<p>{html.escape(op.get('description', ''))}</p>{_parameters(op)}{_responses(op)}"
            )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(info.get("title", "API"))}: API reference</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}} h2{{font-size:1.1em}}
code{{background:#eee}}</style></head><body>
<h1>{html.escape(info.get("title", "API"))} {html.escape(info.get("version", ""))}: API reference</h1>
<p>{html.escape(info.get("description", ""))}</p>
<p>Parameters marked * are required. The machine-readable schema is <a href="/openapi.json">/openapi.json</a>
(load it into any OpenAPI viewer); this page is rendered from it on the server so it reads without internet
access. The dashboard is at <a href="/">/</a>.</p>
{"".join(sections)}
</body></html>"""
