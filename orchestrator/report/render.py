"""How the report's numbers are written, and the document rendered twice: to HTML and to Markdown.

`pct` / `pp` / `pct_pm`: every POPE value is the parquet's fraction times 100 with two decimals, deltas
signed in percentage points, nothing else. `Document` holds headings, paragraphs, `Table`s, images and
folded blocks, and renders them to one self-contained HTML page (PNGs embedded as base64 data URIs) and
to Markdown (PNG links).
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

METRIC_LABELS = {"accuracy": "accuracy", "precision": "precision", "recall": "recall", "f1": "F1",
                 "yes_ratio": "yes-ratio"}
WITHOUT, WITH, DELTA, SPREAD = "✗", "✓", "Δ (✓ − ✗)", "spread (max − min)"


def pct(value: Any) -> str:
    """A fraction as percent with two decimals ("" for a missing value)."""
    return "" if value is None or pd.isna(value) else f"{100 * float(value):.2f}"


def pp(value: Any) -> str:
    """A difference of fractions in percentage points, signed."""
    return "" if value is None or pd.isna(value) else f"{100 * float(value):+.2f}"


def pct_pm(mean: Any, std: Any, count: int) -> str:
    """A mean in percent, "± std" beside it when it is a mean over several evaluations."""
    if count > 1 and not pd.isna(std):
        return f"{pct(mean)} ± {100 * float(std):.2f}"
    return pct(mean)


def format_number(value: Any, digits: int = 4) -> str:
    """A cell: "" for a missing value, yes/no for a bool, `digits` decimals (significant digits when very
    large or small) for a float, the value itself otherwise."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.{digits}f}"
    return str(value)


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    row_classes: list[str] = field(default_factory=list)
    caption: str = ""
    left: int = 1                    # how many leading columns are text (left-aligned)


@dataclass
class Document:
    """Blocks rendered twice: to HTML (self-contained) and to Markdown."""

    out_dir: Path
    blocks: list[tuple] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)

    def heading(self, level: int, text: str, anchor: str | None = None) -> None:
        self.blocks.append(("h", level, text, anchor))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, table: Table) -> None:
        self.blocks.append(("table", table))

    def image(self, path: Path, alt: str) -> None:
        self.images.append(path)
        self.blocks.append(("img", path, alt))

    def pre(self, text: str, summary: str) -> None:
        self.blocks.append(("pre", text, summary))

    # rendering
    def html(self, title: str) -> str:
        parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                 f"<style>{_CSS}</style></head><body>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                _, level, text, anchor = block
                ident = f" id=\"{html.escape(anchor)}\"" if anchor else ""
                parts.append(f"<h{level}{ident}>{html.escape(text)}</h{level}>")
            elif kind == "p":
                parts.append(f"<p>{_inline_html(block[1])}</p>")
            elif kind == "table":
                parts.append(_table_html(block[1]))
            elif kind == "img":
                data = base64.b64encode(block[1].read_bytes()).decode("ascii")
                parts.append(f"<figure><img alt=\"{html.escape(block[2])}\" src=\"data:image/png;base64,{data}\">"
                             f"<figcaption>{html.escape(block[2])} ({html.escape(block[1].name)})</figcaption></figure>")
            elif kind == "pre":
                parts.append(f"<details><summary>{html.escape(block[2])}</summary><pre>{html.escape(block[1])}</pre>"
                             "</details>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def markdown(self) -> str:
        parts = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                parts.append("#" * block[1] + " " + block[2])
            elif kind == "p":
                parts.append(block[1])
            elif kind == "table":
                parts.append(_table_md(block[1]))
            elif kind == "img":
                parts.append(f"![{block[2]}]({block[1].relative_to(self.out_dir).as_posix()})")
            elif kind == "pre":
                parts.append(f"<details><summary>{block[2]}</summary>\n\n```\n{block[1]}\n```\n\n</details>")
        return "\n\n".join(parts) + "\n"


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222;
line-height:1.4;padding:0 1em}
h1{border-bottom:2px solid #08519c}h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:0.6em 0 1.2em 0;font-size:0.92em}
th,td{border:1px solid #ccc;padding:3px 8px}th{background:#f0f4f8}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.delta td{background:#f7fbff;font-style:italic}tr.spread td{background:#fbfbfb;color:#555}
tr.published td{background:#f3f3f3;color:#555}tr.published td:first-child{font-style:italic}
tr.group-start td{border-top:2px solid #888}
caption{caption-side:bottom;text-align:left;color:#555;font-size:0.9em;padding-top:4px}
figure{margin:1em 0}img{max-width:100%}figcaption{color:#555;font-size:0.9em}
pre{background:#f6f8fa;padding:0.8em;overflow:auto;font-size:0.85em}code{background:#f6f8fa;padding:0 3px}
"""


def _inline_html(text: str) -> str:
    """HTML-escaped text with `code` spans (the only markup the report's paragraphs use)."""
    pieces = text.split("`")
    return "".join(html.escape(p) if i % 2 == 0 else f"<code>{html.escape(p)}</code>" for i, p in enumerate(pieces))


def _table_html(table: Table) -> str:
    lines = ["<table>"]
    if table.caption:
        lines.append(f"<caption>{_inline_html(table.caption)}</caption>")
    lines.append("<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in table.headers) + "</tr></thead><tbody>")
    for index, row in enumerate(table.rows):
        css = table.row_classes[index] if index < len(table.row_classes) else ""
        cells = "".join(f"<td>{html.escape(str(c))}</td>" if i < table.left else
                        f"<td class=\"num\">{html.escape(str(c))}</td>" for i, c in enumerate(row))
        lines.append(f"<tr class=\"{css}\">{cells}</tr>" if css else f"<tr>{cells}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table_md(table: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in table.headers) + " |",
             "|" + "|".join("---" if i < table.left else "---:" for i in range(len(table.headers))) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    if table.caption:
        lines += ["", f"*{table.caption}*"]
    return "\n".join(lines)


def slug(text: str) -> str:
    """`text` as a file-name part or an HTML anchor: runs of other characters become "-"."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"
