"""The report a person opens: `DIR/index.html`, written by `usfmae reproduce` after `DIR/index.md`.

One self-contained HTML page that reads top to bottom: the provenance of the run (what index.md
says on top: provenance.folder_markdown), a table of the steps (status, time, figures, tables), then
every executed notebook in order, code, printed text, figures and tables as the notebook showed
them (nbconvert's HTMLExporter, lab template: pandas tables come through as HTML).

Also here, shared with index.md (runner.write_index imports them): what a step's folder holds for a
reader, `step_outputs` (figures, a PNG and its PDF counted once; tables) and `figure_formats`, and
`dry_run_note`. This module imports no runner, and nbconvert only when a report is written.

Self-contained: figures are in the executed notebooks as image/png outputs, so they come inline as
data URIs; an image a markdown cell or an HTML output shows by a file path (relative to the step's
folder, the output folder or notebooks/) is inlined too. No script is fetched: the template's
require.js, MathJax and Mermaid loaders (CDN addresses) are left out, and no widget state is copied
(the notebooks run headless, without widgets). The page opens from disk with no network.
"""

from __future__ import annotations

import base64
import copy
import mimetypes
import re
from pathlib import Path

from usfmae_lib import atomic_write_text, parameters, provenance

FIGURE_SUFFIXES = (".png", ".pdf", ".svg")  # first the format a figure is shown and counted by
TABLE_SUFFIXES = (".csv", ".md", ".tex")
REPORT_NAME = "index.html"
TEMPLATE_NAME = "usfmae_report.html.j2"
# the lab template without the scripts it loads from CDNs (the study's notebooks have no LaTeX, no
# Mermaid diagrams and, run headless, no widgets), and a readable column width
TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}
<style type="text/css">
main { max-width: 1200px; margin: 0 auto; }
.jp-InputArea-editor pre { white-space: pre-wrap; overflow-wrap: anywhere; }  /* long lines wrap, not cut */
.jp-OutputArea-output { overflow-x: auto; }  /* wide tables scroll */
.usfmae-step { border-top: 4px solid var(--jp-border-color1, #999); margin-top: 3em; padding-top: 0.5em; }
</style>
{%- endblock extra_css -%}
"""
_IMAGE_REFERENCES = (re.compile(r"(!\[[^\]]*\]\(\s*<?)([^)\s>]+)"),  # markdown ![alt](path)
                     re.compile(r"""(<img\b[^>]*?\bsrc\s*=\s*["'])([^"']+)""", re.I))  # HTML <img src="path">
_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def write_report(out_dir, profile: str, records, dry_run: bool = False, current: dict | None = None) -> Path:
    """Write DIR/index.html from the executed notebooks of `records` ([(step, status, seconds)], as
    reproduce gathers them) and return its path. `current`: the provenance record on top (by default
    provenance.folder_record's: this process's); each step's provenance.json says what made it."""
    out_dir = Path(out_dir)
    current = current or provenance.folder_record(out_dir, profile, [step for step, *_ in records])
    nb = report_notebook(out_dir, profile, records, dry_run, current)
    html = to_html(nb, out_dir)
    path = out_dir / REPORT_NAME
    atomic_write_text(path, html)
    return path


def to_html(nb, out_dir: Path) -> str:
    """The notebook as one HTML page (lab template, without CDN scripts)."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", template_file=TEMPLATE_NAME,
                            extra_loaders=[DictLoader({TEMPLATE_NAME: TEMPLATE})])
    html, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": nb.metadata.get("title", "usfmae"),
                                                                      "path": str(out_dir)}})
    return html


def report_notebook(out_dir: Path, profile: str, records, dry_run: bool, current: dict):
    """One notebook: a markdown header (title, provenance, steps), then per step a markdown banner and
    the cells of its executed notebook, local images inlined."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    title = f"usfmae report: profile {profile}" + (" (DRY RUN)" if dry_run else "")
    nb.metadata.update(title=title, language_info={"name": "python"},
                       kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"})
    nb.cells.append(_markdown(header(out_dir, profile, records, dry_run, current), "report-header"))
    for step, status, seconds in records:
        executed = out_dir / step / f"{step}.ipynb"
        nb.cells.append(_markdown(step_banner(out_dir, step, status, seconds, executed.is_file()), f"report-{step}"))
        if not executed.is_file():
            continue
        source = nbformat.read(executed, as_version=4)
        for i, cell in enumerate(source.cells):
            cell = copy.deepcopy(cell)
            cell["id"] = f"{step[:50]}-{i}"  # unique in the report (each notebook numbers its own)
            nb.cells.append(inline_images(cell, [out_dir / step, out_dir, parameters.NOTEBOOKS_DIR]))
    return nb


def header(out_dir: Path, profile: str, records, dry_run: bool, current: dict) -> str:
    """The report's first cell: title, provenance (and which steps another run made), the steps' table."""
    lines = [f"# usfmae report: profile `{profile}`" + (" (DRY RUN)" if dry_run else ""), "",
             "Written by `usfmae reproduce" + (" --dry-run" if dry_run else "") + "`: every notebook of the study as it "
             "ran, with its printed text, figures and tables, in order. `index.md` beside this page lists every "
             "figure and table file; links are relative to this folder.", ""]
    if dry_run:
        lines += [dry_run_note(profile), ""]
    lines += [provenance.folder_markdown(out_dir, [step for step, *_ in records], current), "",
              "| step | status | time (s) | figures | tables | executed notebook |", "|---|---|---|---|---|---|"]
    for step, status, seconds in records:
        figures, tables = step_outputs(out_dir / step)
        took = f"{seconds:.1f}" if seconds is not None else "-"
        lines.append(f"| [{step}](#step-{step}) | {status.replace('|', '/')} | {took} | {len(figures)} | {len(tables)} | "
                     f"[{step}.ipynb]({step}/{step}.ipynb) |")
    total = sum(s for _, _, s in records if s is not None)
    lines += ["", f"Total time of the steps listed: {total:.1f} s"]
    return "\n".join(lines)


def step_outputs(step_dir: Path) -> tuple[list[Path], list[Path]]:
    """Figures and tables a step wrote: the files at the top of its folder. Subfolders hold data
    (e.g. the synthetic tree's PNGs and CSVs), which are not figures or tables of the study.
    A figure saved in several formats (show_figure's PNG and PDF) counts once, as its first format
    in FIGURE_SUFFIXES (the PNG); figure_formats(figure) gives the others."""
    files = sorted(p for p in step_dir.glob("*") if p.is_file())
    figures = [p for p in files if p.suffix.lower() in FIGURE_SUFFIXES]
    figures = [p for p in figures if not any(p.with_suffix(s).is_file() for s in
                                             FIGURE_SUFFIXES[:FIGURE_SUFFIXES.index(p.suffix.lower())])]
    tables = [p for p in files if p.suffix.lower() in TABLE_SUFFIXES]
    return figures, tables


def figure_formats(figure: Path) -> list[Path]:
    """The same figure in its other formats, beside it (the PDF beside show_figure's PNG)."""
    return [figure.with_suffix(s) for s in FIGURE_SUFFIXES
            if s != figure.suffix.lower() and figure.with_suffix(s).is_file()]


def dry_run_note(profile: str) -> str:
    """What index.md and index.html say on top of a dry run's outputs."""
    return (f"**A dry run**: the `{profile}` profile's models and code paths for a step or two each, on a small "
            f"synthetic tree (`params/{parameters.DRY_RUN}/` over `params/{profile}/`; docs/dry_run.md). Its numbers "
            "check that the code runs; they measure nothing.")


def step_banner(out_dir: Path, step: str, status: str, seconds, executed: bool) -> str:
    """The markdown cell above a step's notebook: its anchor, status, time and files."""
    figures, tables = step_outputs(out_dir / step)
    took = f", {seconds:.1f} s" if seconds is not None else ""
    lines = [f'<div class="usfmae-step" id="step-{step}"></div>', "",
             f"**Step `{step}`**: {status}{took}. " + (f"Executed notebook: [{step}/{step}.ipynb]({step}/{step}.ipynb)."
                                                       if executed else "No executed notebook.")]
    if figures:
        links = []
        for p in figures:
            rel = p.relative_to(out_dir).as_posix()
            links.append(f"[{p.name}]({rel})" + "".join(f" ([{o.suffix[1:]}]({o.relative_to(out_dir).as_posix()}))"
                                                         for o in figure_formats(p)))
        lines += ["", "Figures: " + ", ".join(links) + "."]
    if tables:
        lines += ["", "Tables: " + ", ".join(f"[{p.name}]({p.relative_to(out_dir).as_posix()})" for p in tables) + "."]
    return "\n".join(lines)


def _markdown(text: str, cell_id: str):
    import nbformat

    cell = nbformat.v4.new_markdown_cell(text)
    cell["id"] = cell_id[:64]
    return cell


def data_uri(path: Path) -> str:
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _inline(text: str, folders) -> str:
    def replace(match):
        ref = match.group(2)
        if re.match(r"^(data|https?|attachment|mailto):", ref, re.I):
            return match.group(0)
        name = ref.split("#")[0].split("?")[0]
        if name.startswith("file://"):
            name = name[len("file://"):]
        for folder in folders:
            candidate = Path(folder) / name  # an absolute name stays itself
            if candidate.is_file() and (mimetypes.guess_type(candidate.name)[0] or "").startswith("image/"):
                return match.group(1) + data_uri(candidate)
        return match.group(0)

    for pattern in _IMAGE_REFERENCES:
        text = pattern.sub(replace, text)
    return text


def inline_images(cell, folders):
    """The cell with every image it shows by a file path (markdown ![](path), HTML <img src="path"> in its
    source or in an HTML or markdown output) replaced by the file's bytes as a data URI, the path
    looked up in `folders` in order; a widget view (nothing to show without a kernel) becomes its text."""
    if cell.cell_type == "markdown":
        cell.source = _inline(cell.source, folders)
    for output in cell.get("outputs", []):
        data = output.get("data", {})
        for kind in ("text/html", "text/markdown"):
            if kind in data:
                text = data[kind] if isinstance(data[kind], str) else "".join(data[kind])
                data[kind] = _inline(text, folders)
        if _WIDGET_VIEW in data:
            del data[_WIDGET_VIEW]
            data.setdefault("text/plain", "")
    return cell
