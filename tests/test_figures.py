"""Figures a reader relies on: notebook 06's confusion grid and label-efficiency plot
(usfmae_lib/results.py), notebook 03's loss curve, notebook 01's anatomy panels and scans
(usfmae_lib/curation.py) and notebook 02's figures (usfmae_lib/preprocess/figures.py), and how
notebooks 01 and 02 save and show them. Fast: no notebook is executed."""
import ast
import builtins
import re
from pathlib import Path
from types import SimpleNamespace

import cv2
import matplotlib
import numpy as np
import pandas as pd
import pytest
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from usfmae_lib import pretrain  # noqa: E402
from usfmae_lib import curation  # noqa: E402
from usfmae_lib import parameters  # noqa: E402
from usfmae_lib import preprocess as pp  # noqa: E402
from usfmae_lib import results as res  # noqa: E402
from usfmae_lib.datasets import MMOTU_CLASSES  # noqa: E402

MODELS = ["usf-mae", "scratch", "vit-b", "resnet-50", "vgg-19"]
CLASSES = {"bus-bra": ["benign", "malignant"], "mmotu-2d": list(MMOTU_CLASSES), "gist514": ["leiomyoma", "GIST"]}
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK_03 = NOTEBOOKS / "03_mae_pretraining.py"


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


def _run_loss_cell(tmp_path, n_steps: int, **params):
    log = pd.DataFrame(dict(step=np.arange(1, n_steps + 1), epoch=np.linspace(0, 1, n_steps),
                            loss=np.linspace(1, 0.5, n_steps), lr=1e-3, images_per_s=10.0))
    assert "pretrain.plot_loss_curve(" in NOTEBOOK_03.read_text()  # the notebook draws it with this function
    return pretrain.plot_loss_curve(log, params["model"], params["model_overrides"], params["img_size"],
                                    params["mask_ratio"])


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
    paper = yaml.safe_load((parameters.REPO_ROOT / "params" / "paper" / "03_mae_pretraining.yaml").read_text())
    fig = _run_loss_cell(tmp_path, 2, model=paper["model"], img_size=paper["img_size"], mask_ratio=paper["mask_ratio"],
                         model_overrides=paper.get("model_overrides") or {})
    fig.canvas.draw()
    title, frame = fig.axes[0].title.get_window_extent(), fig.bbox
    assert paper["model"] in fig.axes[0].get_title()
    assert frame.x0 <= title.x0 and title.x1 <= frame.x1 and title.y1 <= frame.y1, (title, frame)


# ------------------------------------------------------------------------------------ notebooks 01 and 02
@pytest.mark.parametrize("name", ["01_curation", "02_preprocessing"])
def test_notebook_saves_each_figure_through_show_figure_and_imports_what_it_calls(name):
    """A figure shown once, as the saved file (study.show_figure); no drawing in the notebook;
    every name a cell calls is imported or defined (02 once called display without importing it)."""
    source = (NOTEBOOKS / f"{name}.py").read_text()
    code = "\n".join(line for line in source.splitlines() if not line.startswith("#"))
    assert ".savefig(" not in code and "plt." not in code and "imshow" not in code
    assert code.count("study.show_figure(") >= 3
    tree = ast.parse(code)
    bound = {a.asname or a.name.split(".")[0] for node in ast.walk(tree)
             if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
    bound |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    bound |= {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert not called - bound - set(dir(builtins)), called - bound - set(dir(builtins))


@pytest.mark.parametrize("name", ["01_curation", "02_preprocessing"])
def test_headings_describe_the_content_not_the_bug_tracker(name):
    headings = re.findall(r"^# #+ (.+)$", (NOTEBOOKS / f"{name}.py").read_text(), flags=re.M)
    assert headings and not [h for h in headings if re.search(r"\bissues?\b", h, flags=re.I)]


def test_anatomy_panels_are_shares_on_one_linear_scale():
    manifest = pd.DataFrame({"anatomy": ["heart"] * 6 + ["liver"] * 3 + ["lung"]})
    fig = curation.plot_images_per_anatomy(SimpleNamespace(manifest=manifest))
    run, paper = fig.axes[:2]
    assert run.get_xscale() == paper.get_xscale() == "linear"
    assert run.get_xlim() == paper.get_xlim() and run.get_xlim()[1] <= 1.0
    bars = [p.get_width() for p in run.patches]
    assert sorted(bars) == pytest.approx([0.1, 0.3, 0.6])  # shares of this run's 10 frames
    assert sum(p.get_width() for p in paper.patches) == pytest.approx(1.0)
    assert any("60.0% (6)" in t.get_text() for t in run.texts)  # the count is still there


def test_grey_scans_are_drawn_grey_on_a_fixed_scale_and_colour_stays_colour():
    grey = np.stack([np.full((8, 8), 40, np.uint8)] * 3, axis=-1)  # a dim grey scan as RGB
    colour = grey.copy()
    colour[0, 0] = (255, 0, 0)
    fig, (a, b) = plt.subplots(1, 2)
    curation.draw_scan(a, grey)
    curation.draw_scan(b, colour)
    (ga,), (cb,) = a.get_images(), b.get_images()
    assert ga.get_array().ndim == 2 and ga.get_cmap().name == "gray" and ga.get_clim() == (0, 255)
    assert cb.get_array().ndim == 3


def test_cleaning_settings_shown_are_those_that_differ_from_the_defaults():
    changes = pp.config_changes(pp.make_config(image_size=64, ocr=False))
    assert changes.set_index("parameter")["value"].to_dict() == {"ocr": False, "image_size": 64}
    assert changes.set_index("parameter")["default"].to_dict() == {"ocr": True, "image_size": 224}
    assert pp.config_changes(pp.CleanConfig()).empty


def test_fig2_has_a_row_for_an_unannotated_still(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        img = np.clip(rng.normal(90, 30, (64, 80)), 0, 255).astype(np.uint8)
        if i == 0:
            cv2.line(img, (10, 10), (60, 10), 255, 1)  # a mark: the annotated pick
        paths.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(paths[-1]), img)
    fig = pp.plot_annotation_removal(paths[:1], pp.make_config(ocr=False), unannotated=paths[1:])
    rows = fig.axes[0].get_subplotspec().get_geometry()[0]
    assert rows == 2 and len(fig.axes) == 6
    assert fig.axes[3].get_title().startswith("no annotation, largest mask of 2:")
    assert all(im.get_cmap().name == "gray" and im.get_clim() == (0, 255) for ax in fig.axes for im in ax.get_images())
