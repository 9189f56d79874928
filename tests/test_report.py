"""The report `usfmae reproduce` writes (DIR/index.html, usfmae_lib/report.py), provenance in index.md and
in each step's folder, and the PDF show_figure writes beside each PNG (issue 30)."""

import argparse
import base64
import io
import json
import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from conftest import statuses
from usfmae_lib import provenance, report, runner, study

STEPS = ("a_first", "b_second")
OLD, NEW = "a" * 40, "b" * 40


def png_bytes(width: int = 6, height: int = 4) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def make_out(out: Path, commits=(OLD, NEW)) -> tuple[list, dict]:
    """A study folder as reproduce leaves it, made by hand: per step an executed notebook (a markdown
    image given by a file path, a displayed PNG, a pandas table as HTML, printed text), a figure as PNG
    and PDF, a table, and a provenance.json whose commit is the step's in `commits` (None: no file).
    Returns reproduce's records and this process's provenance record."""
    current = provenance.record(profile="smoke")
    table = pd.DataFrame({"dataset": ["bus-bra", "mmotu"], "f1": [0.81, 0.79]})
    for step, commit in zip(STEPS, commits):
        folder = out / step
        folder.mkdir(parents=True)
        (folder / "fig.png").write_bytes(png_bytes())
        (folder / "fig.pdf").write_bytes(b"%PDF-1.4 not really\n")
        (folder / "data").mkdir()
        (folder / "data" / "on_disk.png").write_bytes(png_bytes(5, 5))  # data: not a figure of the step
        (folder / "table.csv").write_text(table.to_csv(index=False))
        nb = nbformat.v4.new_notebook()
        nb.metadata["language_info"] = {"name": "python"}
        nb.cells = [
            nbformat.v4.new_markdown_cell(f"# Step {step}\n\nA figure shown by its path: ![on disk](data/on_disk.png)"),
            nbformat.v4.new_code_cell("show_figure(fig, step_dir / 'fig.png')", outputs=[nbformat.v4.new_output(
                "display_data", data={"image/png": base64.b64encode(png_bytes()).decode(), "text/plain": "<Image>"})],
                execution_count=1),
            nbformat.v4.new_code_cell("table", outputs=[nbformat.v4.new_output(
                "execute_result", data={"text/html": table.to_html(), "text/plain": str(table)}, execution_count=2)],
                execution_count=2),
            nbformat.v4.new_code_cell("print('done')", outputs=[nbformat.v4.new_output("stream", text="done\n")],
                                      execution_count=3),
        ]
        nbformat.write(nb, folder / f"{step}.ipynb")
        if commit is not None:
            (folder / "provenance.json").write_text(json.dumps({**current, "commit": commit, "dirty": False}))
    return [(step, "ran", 1.5) for step in STEPS], current


def img_sources(html: str) -> list[str]:
    return re.findall(r"<img\b[^>]*?\bsrc=\"([^\"]*)\"", html)


def test_report_is_self_contained_with_provenance_and_difference_note(tmp_path):
    records, current = make_out(tmp_path)
    path = report.write_report(tmp_path, "smoke", records, current=current)
    assert path == tmp_path / "index.html"
    html = path.read_text()
    assert "<title>usfmae report: profile smoke</title>" in html
    # the provenance block on top, before the first step
    assert "Provenance" in html and provenance.commit_label(current) in html
    assert html.index("Provenance") < html.index('id="step-a_first"') < html.index('id="step-b_second"')
    # the steps made by different commits, each named with its commit
    assert "Not every step was made by the code and environment above" in html
    row = {step: re.search(rf"<td[^>]*>{step}</td>\s*<td[^>]*>(\w+)</td>", html) for step in STEPS}
    assert row["a_first"] and row["a_first"][1] == OLD[:12]
    assert row["b_second"] and row["b_second"][1] == NEW[:12]
    # every image inline: two displayed figures and the one a markdown cell gave by its path
    sources = img_sources(html)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources), sources
    assert sum(base64.b64decode(s.split(",", 1)[1]) == png_bytes(5, 5) for s in sources) == 2
    # the pandas table rendered as a table, printed text kept, the code visible
    assert html.count('class="dataframe"') == 2 and "bus-bra" in html
    assert "show_figure" in html and "done" in html
    # nothing fetched from the network: no script at all, no remote stylesheet or image
    assert not re.search(r"<script\b[^>]*\bsrc=", html)
    assert not re.search(r"<link\b[^>]*\bhref=\"https?:", html)
    # the steps' table: a PNG and its PDF are one figure; links to the executed notebooks
    assert re.search(r"a_first</a></td>\s*<td[^>]*>ran</td>\s*<td[^>]*>1.5</td>\s*<td[^>]*>1</td>\s*<td[^>]*>1</td>", html)
    assert 'href="a_first/a_first.ipynb"' in html and 'href="a_first/fig.pdf"' in html


def test_no_difference_note_when_every_step_matches(tmp_path):
    records, current = make_out(tmp_path, commits=(None, None))
    for step in STEPS:
        (tmp_path / step / "provenance.json").write_text(json.dumps({**current, "made": "earlier"}))
    text = runner.write_index(tmp_path, "smoke", records, current=current).read_text()
    assert provenance.markdown_block(current) in text
    assert "Not every step" not in text and "No `provenance.json`" not in text


def test_index_md_has_provenance_block_differences_and_pdf_beside_png(tmp_path):
    records, current = make_out(tmp_path, commits=(OLD, None))
    index = runner.write_index(tmp_path, "smoke", records, current=current)
    text = index.read_text()
    assert text.index(provenance.markdown_block(current)) < text.index("| step | status |")
    assert "Not every step was made by the code and environment above" in text
    assert re.search(rf"^\| a_first \| {OLD[:12]} \|", text, flags=re.M), text
    assert "No `provenance.json` (the step failed, or ran before provenance was recorded): b_second." in text
    assert statuses(index) == {"a_first": "ran", "b_second": "ran"}  # the provenance table is not a step row
    assert "- figure: [a_first/fig.png](a_first/fig.png) ([pdf](a_first/fig.pdf))" in text
    assert "figure: [a_first/fig.pdf]" not in text
    assert "| ran | 1.5 | 1 | 1 |" in text  # one figure (PNG + PDF), one table


def test_differences_markdown_groups_steps_by_what_differs():
    base = provenance.record(profile="smoke")
    table = provenance.differences_markdown({
        "one": {**base, "commit": OLD, "dirty": False},
        "two": {**base, "commit": OLD, "dirty": True, "torch": "9.9"},
        "three": {**base, "commit": OLD, "dirty": False},
        "none": None})
    lines = table.splitlines()
    assert lines[0] == "| step(s) | commit | torch |"
    assert f"| one, three | {OLD[:12]} | {base['torch']} |" in lines
    assert f"| two | {OLD[:12]}+dirty | 9.9 |" in lines
    assert provenance.differences_markdown({"one": base, "two": {**base, "made": "later"}}) == ""


def test_show_figure_writes_a_pdf_beside_the_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdfs = []
    for name in ("one", "two"):
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [1, 0])
        study.show_figure(fig, tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pdfs.append((tmp_path / f"{name}.pdf").read_bytes())
    assert pdfs[0].startswith(b"%PDF") and pdfs[0] == pdfs[1]  # no creation date: same figure, same bytes
    figures, _ = runner.step_outputs(tmp_path)
    assert [p.name for p in figures] == ["one.png", "two.png"]
    assert runner.figure_formats(figures[0]) == [tmp_path / "one.pdf"]


NOTEBOOK = '''# %% tags=["parameters"]
profile = "smoke"
out_dir = "outputs/smoke"
value = 1

# %%
from pathlib import Path
import pandas as pd
step_dir = Path(out_dir) / "{step}"
step_dir.mkdir(parents=True, exist_ok=True)
pd.DataFrame({{"value": [value]}})
'''


def test_reproduce_records_provenance_and_writes_the_report(tmp_path, monkeypatch, capsys):
    """Each step that runs writes its provenance.json; a skipped step keeps the one of the run that made
    it, which index.md and index.html then set apart; the CLI's last line names the report."""
    monkeypatch.setattr(runner, "_code_fingerprint", lambda: "code-v1")
    notebooks, params = tmp_path / "notebooks", tmp_path / "params" / "smoke"
    notebooks.mkdir()
    params.mkdir(parents=True)
    for step in STEPS:
        (notebooks / f"{step}.py").write_text(NOTEBOOK.format(step=step))
        (params / f"{step}.yaml").write_text("profile: smoke\nvalue: 1\n")

    def reproduce():
        return runner.reproduce("smoke", tmp_path / "out", steps=STEPS, notebooks_dir=notebooks, params_dir=tmp_path / "params",
                                progress=False)

    out = reproduce().parent
    first = {step: json.loads((out / step / "provenance.json").read_text()) for step in STEPS}
    assert first["a_first"]["profile"] == "smoke" and first["a_first"]["params_hash"]
    assert first["a_first"]["params_hash"] == first["b_second"]["params_hash"]  # same values, out_dir left out
    assert "Not every step" not in (out / "index.md").read_text()
    assert (out / "index.html").is_file()
    # a_first made by another commit, then skipped: it keeps that provenance, and the index says so
    (out / "a_first" / "provenance.json").write_text(json.dumps({**first["a_first"], "commit": OLD, "dirty": False}))
    (params / "b_second.yaml").write_text("profile: smoke\nvalue: 2\n")
    index = reproduce()
    assert statuses(index) == {"a_first": "skipped (unchanged)", "b_second": "ran"}
    assert json.loads((out / "a_first" / "provenance.json").read_text())["commit"] == OLD
    assert json.loads((out / "b_second" / "provenance.json").read_text())["params_hash"] != first["b_second"]["params_hash"]
    text = index.read_text()
    assert "Not every step was made by the code and environment above" in text
    assert re.search(rf"^\| a_first \| {OLD[:12]} \|", text, flags=re.M), text
    html = (out / "index.html").read_text()
    assert "Not every step was made" in html and html.count('class="dataframe"') == 2

    monkeypatch.setattr(runner, "reproduce", lambda *args, **kwargs: index)
    capsys.readouterr()
    runner._reproduce_cli(argparse.Namespace(steps=list(STEPS), overrides=[], profile="smoke", out=None, force=False,
                                             dry_run=False))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert str(out / "index.html") in last and str(index) in last


def test_a_failed_step_leaves_no_provenance_and_a_report(tmp_path, monkeypatch):
    """run_notebook removes a step's provenance.json before running it: a failed run's outputs are not the last
    successful run's. The report is written all the same, with the failing cell's traceback."""
    monkeypatch.setattr(runner, "_code_fingerprint", lambda: "code-v1")
    notebooks, params = tmp_path / "notebooks", tmp_path / "params" / "smoke"
    notebooks.mkdir()
    params.mkdir(parents=True)
    (notebooks / "a_first.py").write_text(NOTEBOOK.format(step="a_first") + "\n# %%\nassert value == 1, 'asked to fail'\n")
    (params / "a_first.yaml").write_text("profile: smoke\nvalue: 2\n")
    (tmp_path / "out" / "a_first").mkdir(parents=True)
    (tmp_path / "out" / "a_first" / "provenance.json").write_text("{}")
    with pytest.raises(Exception, match="asked to fail"):
        runner.reproduce("smoke", tmp_path / "out", steps=("a_first",), notebooks_dir=notebooks,
                         params_dir=tmp_path / "params", progress=False)
    assert not (tmp_path / "out" / "a_first" / "provenance.json").exists()
    assert "No `provenance.json` (the step failed" in (tmp_path / "out" / "index.md").read_text()
    assert "asked to fail" in (tmp_path / "out" / "index.html").read_text()
