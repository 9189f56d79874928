"""docs/fidelity.md, the paper's methods statement by statement, checked against what the study
runs: every parameter its table names is in that notebook's parameters cell, the paper and
official profiles hold the values it states, every sentence of sections 2.1-2.8 is accounted for,
and (where the paper's text is at hand) every quote is the paper's own words. And Fig. 3, drawn
from a run's own records (results.pipeline_config / draw_pipeline)."""
import json
import re
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from usfmae_lib import parameters, results as res, runner  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIDELITY = REPO / "docs" / "fidelity.md"
PAPER = REPO.parent / "shared" / "docs" / "seeds" / "usf-mae-paper.md"  # not in a user's clone: those checks skip
REF = re.compile(r"\b(2\.\d)\.(\d+)\b")


def _table(heading: str) -> list[list[str]]:
    """The rows (cells, stripped) of the first markdown table after `heading`, past its header."""
    lines = FIDELITY.read_text().split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows[2:]


def _rows() -> list[dict]:
    names = ["refs", "quote", "official_code", "step", "parameter", "paper", "official", "why"]
    rows = [dict(zip(names, cells)) for cells in _table("## The table")]
    assert all(len(r) == len(names) for r in rows), "a row of the table has the wrong number of cells"
    return rows


def _effective(profile: str, step: str) -> tuple[dict, dict]:
    """(the notebook's parameters cell, those values with the profile's file applied)."""
    notebook = next((REPO / "notebooks").glob(f"{step}_*.py"))
    defaults = parameters.notebook_parameters(runner.read_notebook(notebook), notebook.name)
    params_file = next((REPO / "params" / profile).glob(f"{step}_*.yaml"))
    return defaults, {**defaults, **(yaml.safe_load(params_file.read_text()) or {})}


def _value(cell: str):
    assert cell.startswith("`") and cell.endswith("`"), f"a value must be YAML in backticks: {cell!r}"
    return yaml.safe_load(cell.strip("`"))


def test_every_parameter_of_the_table_is_in_its_notebook_and_both_profiles_hold_its_values():
    rows = [r for r in _rows() if r["parameter"] != "—"]
    assert len(rows) >= 55, len(rows)
    checked = set()
    for row in rows:
        name = row["parameter"].strip("`")
        for profile in ("paper", "official"):
            defaults, values = _effective(profile, row["step"])
            assert name in defaults, f"{name} is not in notebook {row['step']}'s parameters cell"
            assert values[name] == _value(row[profile]), \
                f"params/{profile}/{row['step']}: {name} is {values[name]!r}, docs/fidelity.md says {row[profile]}"
        checked.add(name)
    # each switch this page was written for is in it
    assert {"pos_embed", "blr_scaling", "deduplicate", "remove_leakage", "cleaner", "select_per",
            "mmotu_selection", "gist_splits"} <= checked


def test_every_sentence_of_the_methods_is_a_row_or_listed_as_no_method_once():
    covered: dict[str, set] = {}
    for row in _rows():
        for section, number in REF.findall(row["refs"]):
            covered.setdefault(section, set()).add(int(number))
    no_method = _table("## Sentences that state no method")
    total = methods = 0
    for section, count, numbers, _ in no_method:
        listed = {int(n) for n in numbers.split(", ")}
        every = set(range(1, int(count) + 1))
        assert not listed & covered.get(section, set()), f"{section}: a sentence both a method and not"
        assert listed | covered.get(section, set()) == every, \
            f"{section}: sentences {sorted(every - listed - covered.get(section, set()))} are nowhere"
        total, methods = total + int(count), methods + len(every - listed)
    assert sorted(covered) == [s for s, *_ in no_method]
    intro = FIDELITY.read_text().split("## The table")[0]
    assert f"{total} in all" in intro and f"{methods} state a method" in intro and f"other {total - methods}" in intro


def _paper_sections() -> dict[str, str]:
    text = PAPER.read_text()
    body = text[text.index("### 2.1."):text.index("## 3. Results")]
    sections, current = {}, None
    for line in body.splitlines():
        m = re.match(r"#+ (2\.\d)\.", line)
        if m:
            current = m.group(1)
            continue
        if (line.startswith(("### 3)", "**Table 1**", "<b>", "Summary of collected", "Dataset Name", "**Figure", "$$"))
                or "\t" in line):
            continue
        sections.setdefault(current, []).append(line.strip())
    return {k: " ".join(x for x in v if x) for k, v in sections.items()}


def _sentences(text: str) -> list[str]:
    """The rule docs/fidelity.md states: a sentence ends at '.' or ':' before a capital (or **),
    and "e.g.", "et al.", "i.e." and "Fig." do not end one."""
    for short, plain in ((r"\be\.g\.\s", "eg "), (r"\bet al\.", "et al"), (r"\bi\.e\.", "ie"), (r"Fig\. ", "Fig ")):
        text = re.sub(short, plain, text)
    return [s for s in re.split(r"(?<=[.:])\s+(?=[A-Z*])", text) if len(s) > 3]


@pytest.mark.skipif(not PAPER.exists(), reason=f"the paper's text is not in this checkout ({PAPER})")
def test_quotes_are_the_papers_words_and_the_sentence_counts_are_the_papers():
    paper = re.sub(r"\s+", " ", PAPER.read_text())
    for row in _rows():
        for quote in re.findall(r'"([^"]+)"', row["quote"]):
            assert re.sub(r"\s+", " ", quote) in paper, f"not the paper's words: {quote!r}"
    counts = {section: int(count) for section, count, *_ in _table("## Sentences that state no method")}
    assert {s: len(_sentences(t)) for s, t in _paper_sections().items()} == counts


# ---------------------------------------------------------------------------- Fig. 3
def _run_records(out: Path, mask_ratio=0.25, pos_embed="learnable") -> Path:
    """The records Fig. 3 reads, as notebooks 01, 02, 03 and 05 write them."""
    (out / "01_curation").mkdir(parents=True)
    (out / "01_curation" / "summary.json").write_text(json.dumps(dict(kept=1234, settings=dict(video_fps=3.0))))
    pd.DataFrame(dict(dataset=["a", "b", "c", "BUS-BRA"], is_eval=[False, False, False, True],
                      kept=[1000, 234, 0, 0])).to_csv(out / "01_curation" / "datasets.csv", index=False)
    clean = out / "02_preprocessing" / "clean"
    clean.mkdir(parents=True)
    pd.DataFrame(dict(path=["a/0.png"] * 1234)).to_csv(clean / "index.csv", index=False)
    (clean / "clean_config.json").write_text(json.dumps(dict(cleaner="official", image_size=224)))
    (out / "03_mae_pretraining" / "checkpoints").mkdir(parents=True)
    recipe = dict(model="mae_vit_base_patch16_dec512d8b", model_overrides={"decoder_num_heads": 8}, img_size=224,
                  mask_ratio=mask_ratio, pos_embed=pos_embed, norm_pix_loss=False, epochs=100, batch_size=64)
    torch.save({"model": {}, "params": recipe}, out / "03_mae_pretraining" / "checkpoints" / "checkpoint-last.pth")
    (out / "05_finetuning").mkdir()
    (out / "05_finetuning" / "setup.json").write_text(json.dumps(dict(models=["usf-mae", "vit-b"], head_norm=False)))
    pd.DataFrame(dict(dataset=["bus-bra", "bus-bra", "mmotu-2d"], fold=[1, 2, 0], n_classes=[2, 2, 8],
                      n_train=[1000, 1000, 1000], n_val=[250, 250, 0], n_test=[375, 375, 469],
                      pool=["token"] * 3)).to_csv(out / "05_finetuning" / "results.csv", index=False)
    return out


def _texts(fig) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(Text))


def test_fig3_draws_the_numbers_of_the_run_it_is_given(tmp_path):
    fig = res.draw_pipeline(res.pipeline_config(_run_records(tmp_path / "paper")))
    text = _texts(fig)
    for expected in ("1,234 frames", "from 2 datasets", "videos at 3 frames/s", "1,234 PNG, 224 x 224 px", "cleaner: official",
                     "14 x 14 = 196 patches of 16 px", "25% hidden at random", "147 visible",
                     "12 blocks x 768, 12 heads", "learnable position tables", "8 blocks x 512, 8 heads",
                     "raw pixels", "100 epochs, batch 64", "cls token ->", "linear",
                     "BUS-BRA: 2 classes\n1,625 images, 2 splits", "MMOTU-2D: 8 classes\n1,469 images, 1 split",
                     "ViT-Base"):
        assert expected in text, expected
    plt.close(fig)
    # another run, other boxes: the figure is the run's, not the paper's
    other = res.draw_pipeline(res.pipeline_config(_run_records(tmp_path / "official", 0.75, "fixed")))
    text = _texts(other)
    assert "75% hidden at random" in text and "49 visible" in text and "fixed position tables" in text
    assert "25% hidden" not in text
    plt.close(other)
    # a run without notebook 03's checkpoint says so instead of drawing numbers it does not have
    (tmp_path / "official" / "03_mae_pretraining" / "checkpoints" / "checkpoint-last.pth").unlink()
    bare = res.draw_pipeline(res.pipeline_config(tmp_path / "official"))
    assert "no pretraining checkpoint in this run" in _texts(bare) and "blocks x" not in _texts(bare)
    plt.close(bare)
