"""Figures a reader relies on: notebook 06's confusion grid and label-efficiency plot
(usfmae_lib/results.py) and notebook 03's loss curve. Fast: no notebook is executed."""
import re
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from usfmae_lib import results as res  # noqa: E402
from usfmae_lib import runner  # noqa: E402
from usfmae_lib.datasets import MMOTU_CLASSES  # noqa: E402

MODELS = ["usf-mae", "scratch", "vit-b", "resnet-50", "vgg-19"]
CLASSES = {"bus-bra": ["benign", "malignant"], "mmotu-2d": list(MMOTU_CLASSES), "gist514": ["leiomyoma", "GIST"]}
NOTEBOOK_03 = Path(__file__).resolve().parents[1] / "notebooks" / "03_mae_pretraining.py"


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _matrices(classes=CLASSES, models=MODELS):
    rng = np.random.default_rng(0)
    out = {}
    for d, names in classes.items():
        for m in models:
            k = len(names)
            counts = rng.integers(0, 20, (k, k)) + np.diag(rng.integers(10, 150, k))
            out[(d, m)] = pd.DataFrame(counts, index=names, columns=names)
    return out


def _boxes(labels, renderer):
    return [t.get_window_extent(renderer) for t in labels if t.get_text()]


def _overlap(boxes) -> bool:
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_confusion_grid_is_datasets_by_models_with_readable_labels_and_bounded_size():
    fig = res.plot_confusion_grid(_matrices())
    panels = [ax for ax in fig.axes if ax.get_subplotspec() is not None and ax.get_label() != "<colorbar>"]
    assert len(panels) == 15 and panels[0].get_subplotspec().get_geometry()[:2] == (3, 5)
    width, height = fig.get_size_inches() * 200  # the paper profile's dpi
    assert width <= 3600 and height <= 2400 and width / height < 2.5  # was 15 panels in one row: 15:1
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    mmotu = panels[5]  # row 2, first column: the 8 long class names
    names = [" ".join(t.get_text().split()) for t in mmotu.get_yticklabels()]
    assert all(f"{i + 1}. {n}" == names[i] for i, n in enumerate(MMOTU_CLASSES)), names
    for ax in panels:
        assert not _overlap(_boxes(ax.get_yticklabels(), renderer)), ax.get_ylabel()
        assert not _overlap(_boxes(ax.get_xticklabels(), renderer)), ax.get_ylabel()
        assert min(t.get_fontsize() for t in ax.get_xticklabels()) >= 7
    assert not _overlap(_boxes([ax.title for ax in panels[:5]], renderer))  # model titles side by side
    # more models than the paper: the grid grows by columns, each panel keeps its size
    one = {"bus-bra": CLASSES["bus-bra"]}
    five, six = (res.plot_confusion_grid(_matrices(one, models)).get_size_inches() for models in (MODELS, MODELS + ["x"]))
    assert six[1] == five[1] and 0 < six[0] - five[0] < five[0] / 4


def test_confusion_grid_marks_a_cell_that_was_not_run():
    mats = _matrices()
    del mats[("gist514", "vgg-19")]
    fig = res.plot_confusion_grid(mats)
    assert any(t.get_text() == "not run" for ax in fig.axes for t in ax.texts)


def _curve(fractions, seeds, same=False):
    rng = np.random.default_rng(1)
    return pd.DataFrame([dict(dataset=d, model=m, fraction=f, seed=s,
                              f1=0.42 if same else 0.3 + 0.5 * f + rng.normal(0, 0.02))
                         for d in ("bus-bra", "mmotu-2d") for m in ("usf-mae", "scratch")
                         for f in fractions for s in range(seeds)])


def test_label_efficiency_ticks_are_the_fractions_run_in_percent():
    fig = res.plot_label_efficiency(_curve([0.01, 0.1, 0.25, 1.0], 3))
    fig.canvas.draw()
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1%", "10%", "25%", "100%"]
        assert not [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]  # no 3x10^-1
    fig = res.plot_label_efficiency(_curve([0.25, 1.0], 1))
    fig.canvas.draw()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["25%", "100%"]


def test_label_efficiency_keeps_equal_lines_visible_and_shows_the_seed_spread():
    fig = res.plot_label_efficiency(_curve([0.1, 1.0], 3, same=True))
    ax = fig.axes[0]
    lines = [c.lines[0] for c in ax.containers]  # one errorbar container per model
    assert len(lines) == 2
    (xa, ya), (xb, yb) = ((np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)) for line in lines)
    assert np.allclose(ya, yb) and not np.allclose(xa, xb)  # same values, shifted sideways
    assert lines[0].get_marker() != lines[1].get_marker() and lines[0].get_linestyle() != lines[1].get_linestyle()
    assert all(c.has_yerr for c in ax.containers)  # 3 seeds: min-max bars
    one_seed = res.plot_label_efficiency(_curve([0.1, 1.0], 1))
    assert not any(c.has_yerr for c in one_seed.axes[0].containers)


def test_label_efficiency_legend_counts_the_runs_of_every_panel():
    """Quick: 5 folds x 1 seed on BUS-BRA, 3 seeds on MMOTU-2D's one split: the legend says 3-5."""
    curve = _curve([0.1, 1.0], 5)
    curve = curve[(curve["dataset"] == "bus-bra") | (curve["seed"] < 3)]
    fig = res.plot_label_efficiency(curve)
    texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert texts and all("min-max of 3-5 runs" in t for t in texts), texts


def _loss_cell() -> str:
    cells = re.split(r"\n# %%[^\n]*\n", NOTEBOOK_03.read_text())
    (cell,) = [c for c in cells if c.startswith('log = pd.read_csv(step_dir / "log.csv")')]
    return cell


def _run_loss_cell(tmp_path, n_steps: int, **params):
    pd.DataFrame(dict(step=np.arange(1, n_steps + 1), epoch=np.linspace(0, 1, n_steps), loss=np.linspace(1, 0.5, n_steps),
                      lr=1e-3, images_per_s=10.0)).to_csv(tmp_path / "log.csv", index=False)
    scope = dict(pd=pd, plt=plt, step_dir=tmp_path, norm_pix_loss=False, warmup_fraction=0.05, summary=dict(steps=n_steps),
                 **params)
    plt.close("all")  # the cell's first figure is the loss curve
    exec(_loss_cell(), scope)
    return plt.figure(plt.get_fignums()[0])


@pytest.mark.parametrize("n_steps, legend", [(3, ["per step (3 steps)"]), (1, ["per step (1 step)"]),
                                             (500, ["per step", "running mean of 10 steps"])])
def test_loss_curve_legend_fits_the_number_of_steps(tmp_path, n_steps, legend, capsys):
    fig = _run_loss_cell(tmp_path, n_steps, model="mae_vit_tiny", img_size=32, mask_ratio=0.25,
                         model_overrides={"depth": 6})
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == legend
    assert fig.axes[0].get_title() == "reconstruction loss, 32 px, mask 25%\nmae_vit_tiny, depth=6"  # the model trained
    assert not re.search(r"\b1 steps\b", capsys.readouterr().out)


def test_loss_curve_title_fits_in_the_figure_for_the_paper_model(tmp_path):
    """The paper profile's ViT-B name with its override once ran off both edges of the figure."""
    paper = yaml.safe_load((runner.REPO_ROOT / "params" / "paper" / "03_mae_pretraining.yaml").read_text())
    fig = _run_loss_cell(tmp_path, 2, model=paper["model"], img_size=paper["img_size"], mask_ratio=paper["mask_ratio"],
                         model_overrides=paper.get("model_overrides") or {})
    fig.canvas.draw()
    title, frame = fig.axes[0].title.get_window_extent(), fig.bbox
    assert paper["model"] in fig.axes[0].get_title()
    assert frame.x0 <= title.x0 and title.x1 <= frame.x1 and title.y1 <= frame.y1, (title, frame)
