"""The pipeline's ``report.md``, assembled from the sections each stage writes (:meth:`Stage.report
<edgedistill.stages.base.Stage.report>`): the seed's three tables filled with measured numbers, the claims, plots,
samples, and a table of the stages' wall times.

Every section is read from the files the stages wrote (``teacher/heldout_eval.json``, each student's
``train_summary.json``, the export manifests, ``bench/bench.json``), so a report can be rebuilt without rerunning
anything. Host numbers are labelled as this host's; target numbers are labelled projections. This module knows no
stage: it sorts and joins what the stages give it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from edgedistill.bench.claims import MISSING, number
from edgedistill.bench.report import markdown_table
from edgedistill.files import atomic_write_text
from edgedistill.stages.base import Layout, Section, Upstream, read_json

TITLE = "# edgedistill pipeline report"


def assemble(sections: Iterable[Section]) -> list[str]:
    """The report's lines: the title, then the sections in ``order``, one blank line between parts. A preamble
    paragraph (no heading) stands alone; sections that share a heading join under its first place."""
    parts: list[list[str]] = []
    by_heading: dict[str, list[str]] = {}
    for section in sorted(sections, key=lambda s: s.order):
        if section.heading is None:
            parts.append(list(section.lines))
        elif section.heading in by_heading:
            by_heading[section.heading] += section.lines  # the part already placed grows
        else:
            by_heading[section.heading] = [f"## {section.heading}", "", *section.lines]
            parts.append(by_heading[section.heading])
    lines = [TITLE]
    for part in parts:
        lines += ["", *part]
    return lines


def stage_lines(layout: Layout) -> list[str]:
    """The stages' status and wall time from ``pipeline.json`` (the report itself is being written)."""
    recorded = read_json(layout.manifest).get("stages", {})
    stages = {name: record for name, record in recorded.items() if name != "report"}
    rows = [[name, rec.get("status", MISSING), number(rec.get("seconds"), 0, " s")] for name, rec in stages.items()]
    rows.append(["report", "writing this file", MISSING])
    total = sum(record.get("seconds") or 0 for record in stages.values())
    return [
        markdown_table(["stage", "status", "wall time"], rows),
        "",
        f"Stages before the report: {number(total / 60, 1)} minutes of wall time on this host.",
    ]


def write_report(upstream: Upstream) -> Path:
    """Write ``report.md`` from every stage's sections and the stages' table; returns its path."""
    sections = [section for stage in upstream.stages for section in stage.report(upstream)]
    sections.append(Section(float("inf"), "Stages", stage_lines(upstream.layout)))
    atomic_write_text(upstream.layout.report, "\n".join(assemble(sections)) + "\n")
    return upstream.layout.report
