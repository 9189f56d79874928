"""Notebook 04 (usfmae_lib/reconstruction.py): reconstructions, mask-ratio sweep, attention, headless run."""


import cv2
import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from usfmae_lib import UsfmaeError, parameters, reconstruction, runner  # noqa: E402
from usfmae_lib.mae import build_model  # noqa: E402
from usfmae_lib.preprocess import normalize as loader_normalize  # noqa: E402

SIZE = 64  # 4 x 4 patches of 16 px
CONFIG = "mae_vit_tiny_patch16_dec128d2b"
OVERRIDES = dict(depth=2, decoder_depth=1)  # small and fast; recorded in the checkpoint's params
ANATOMIES = ("breast", "liver")


def _scan(rng: np.random.Generator) -> np.ndarray:
    """A uint8 RGB image with some structure (a dark fan, bright blobs, speckle)."""
    img = np.zeros((SIZE, SIZE), np.float32)
    cv2.ellipse(img, (SIZE // 2, 0), (SIZE, SIZE), 0, 45, 135, 0.4, -1)
    for _ in range(3):
        c = tuple(int(v) for v in rng.integers(8, SIZE - 8, 2))
        cv2.circle(img, c, int(rng.integers(3, 9)), float(rng.uniform(0.6, 1.0)), -1)
    img = np.clip(img * rng.gamma(4.0, 0.25, img.shape), 0, 1)
    return np.repeat((img * 255).astype(np.uint8)[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory, make_recon_out):
    """OUT with a tiny clean tree (2 anatomies x 3 images) and a random tiny checkpoint where
    notebook 03 leaves one."""
    rng = np.random.default_rng(0)
    scans = {anatomy: [_scan(rng) for _ in range(3)] for anatomy in ANATOMIES}
    return make_recon_out(tmp_path_factory.mktemp("out"), scans, CONFIG, SIZE, OVERRIDES)


@pytest.fixture(scope="module")
def batch(out_dir):
    clean = out_dir / reconstruction.DEFAULT_CLEAN_DIR
    index = reconstruction.pick_images(reconstruction.read_index(clean), 3, seed=0)
    images = reconstruction.load_images(clean, index.path, SIZE)
    return index, images, reconstruction.normalize_images(images)


def _model(norm_pix_loss=False):
    torch.manual_seed(1)
    return build_model(CONFIG, img_size=SIZE, norm_pix_loss=norm_pix_loss, **OVERRIDES).eval()


def test_unnormalize_round_trip_and_same_normalisation_as_the_loader():
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    x = reconstruction.normalize_images(images)
    assert x.shape == (2, 3, SIZE, SIZE)
    np.testing.assert_allclose(x[0].numpy(), loader_normalize(images[0]), atol=1e-6)  # training's numbers
    np.testing.assert_allclose(reconstruction.unnormalize(x), images / 255.0, atol=1e-6)
    assert reconstruction.unnormalize(x * 0 + 100).max() == 1.0  # out-of-range predictions are clipped for display


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_pasted_back_visible_patches_equal_the_original_exactly(batch, norm_pix_loss):
    _, images, imgs = batch
    model = _model(norm_pix_loss)
    res = reconstruction.reconstruct(model, imgs, 0.5, reconstruction.patch_noise(len(imgs), model.num_patches, seed=3))
    pixel_mask = model.unpatchify(res["mask"].unsqueeze(-1).expand(-1, -1, 16 * 16 * 3))  # [N, 3, S, S], 1 hidden
    visible = pixel_mask == 0
    assert visible.any() and (~visible).any()
    assert torch.equal(res["pasted"][visible], imgs[visible])  # bit-exact
    assert torch.equal(res["pasted"][~visible], res["recon"][~visible])
    assert torch.equal(res["masked_input"][~visible], torch.zeros_like(imgs)[~visible])
    shown = reconstruction.unnormalize(res["pasted"])
    vis_px = visible[:, 0].numpy()
    np.testing.assert_allclose(shown[vis_px], images[vis_px] / 255.0, atol=1e-6)
    # per-image objective averages to the model's own loss (equal numbers of hidden patches)
    with torch.no_grad():
        loss, _, _ = model(imgs, 0.5, reconstruction.patch_noise(len(imgs), model.num_patches, seed=3))
    assert float(res["objective"].mean()) == pytest.approx(float(loss), rel=1e-5)


def test_norm_pix_visible_stats_never_read_hidden_patches(batch):
    _, _, imgs = batch
    model = _model(norm_pix_loss=True)
    noise = reconstruction.patch_noise(len(imgs), model.num_patches, seed=0)
    res = reconstruction.reconstruct(model, imgs, 0.5, noise, "visible")
    hidden = res["mask"].bool()
    # brighten and stretch the hidden patches only: the encoder does not see them, so an honest
    # reconstruction (stats from visible patches) must not change; the oracle one does
    changed = model.patchify(imgs).clone()
    changed[hidden] = changed[hidden] * 3 + 1
    changed = model.unpatchify(changed)
    again = reconstruction.reconstruct(model, changed, 0.5, noise, "visible")
    assert torch.allclose(again["recon"], res["recon"], atol=1e-5)
    oracle_a = reconstruction.reconstruct(model, imgs, 0.5, noise, "oracle")["recon"]
    oracle_b = reconstruction.reconstruct(model, changed, 0.5, noise, "oracle")["recon"]
    assert not torch.allclose(oracle_a, oracle_b, atol=1e-3)
    with pytest.raises(UsfmaeError, match="norm_pix_stats"):
        reconstruction.reconstruct(model, imgs, 0.5, noise, "guess")


def test_sweep_has_one_row_per_ratio_and_anatomy_and_nested_masks(batch):
    index, _, imgs = batch
    model = _model()
    ratios = [0.1, 0.25, 0.5, 0.75, 0.9]
    per_image, table = reconstruction.mask_ratio_sweep(model, imgs, index.anatomy, ratios, seed=0, batch_size=4,
                                              paths=index.path)
    assert len(per_image) == len(ratios) * len(imgs)
    assert len(table) == len(ratios) * (len(ANATOMIES) + 1)
    for ratio in ratios:
        rows = table[table.mask_ratio == ratio]
        assert sorted(rows.anatomy) == sorted([*ANATOMIES, reconstruction.ALL])
        assert rows.set_index("anatomy").n_images.to_dict() == {"breast": 3, "liver": 3, reconstruction.ALL: 6}
        pooled = rows[rows.anatomy == reconstruction.ALL].mse.item()
        assert pooled == pytest.approx(per_image[per_image.mask_ratio == ratio].mse.mean())
    assert (table.mse > 0).all() and (table.baseline_mse > 0).all()
    # deterministic, independent of batching
    again, _ = reconstruction.mask_ratio_sweep(model, imgs, index.anatomy, [0.25, 0.9], seed=0, batch_size=1)
    same = per_image[per_image.mask_ratio.isin([0.25, 0.9])].reset_index(drop=True)
    pd.testing.assert_frame_equal(same.drop(columns="path"), again.drop(columns="path"), atol=1e-6)
    # one noise serves all ratios: what is hidden at 25% is hidden at 90% too
    noise = reconstruction.patch_noise(len(imgs), model.num_patches, 0)
    m25 = reconstruction.reconstruct(model, imgs, 0.25, noise)["mask"]
    m90 = reconstruction.reconstruct(model, imgs, 0.9, noise)["mask"]
    assert (m90[m25.bool()] == 1).all() and m90.sum() > m25.sum()
    verdicts = reconstruction.verdict_table(per_image, 0.25, [0.25, 0.9]).set_index("comparison")
    assert verdicts.loc["MAE error at 25% vs at 90%", "verdict"] in ("lower error", "higher error",
                                                                     "no clear difference", "not judged: the model "
                                                                     "does not beat the flat fill at both ratios")
    with pytest.raises(UsfmaeError, match="strictly between"):
        reconstruction.mask_ratio_sweep(model, imgs, index.anatomy, [0.0, 0.5])


def test_attention_rows_sum_to_one_and_reproduce_the_fused_block(batch):
    _, _, imgs = batch
    model = _model()
    attn = reconstruction.last_layer_attention(model, imgs)
    tokens = 1 + model.num_patches
    assert attn.shape == (len(imgs), model.blocks[-1].attn.num_heads, tokens, tokens)
    torch.testing.assert_close(attn.sum(dim=-1), torch.ones(attn.shape[:-1]), atol=1e-5, rtol=0)
    maps = reconstruction.cls_attention_maps(attn)
    assert maps.shape == (len(imgs), 4, 4)
    torch.testing.assert_close(maps.sum(dim=(1, 2)) + attn[:, :, 0, 0].mean(dim=1), torch.ones(len(imgs)))

    # the recomputed weights are the ones the fused kernel used: attn @ v -> proj = module output
    block_attn = model.blocks[-1].attn
    seen = {}
    handle = block_attn.register_forward_hook(lambda m, i, o: seen.update(x=i[0], out=o))
    order = torch.arange(model.num_patches, dtype=torch.float32).expand(len(imgs), -1)
    with torch.no_grad():
        model.forward_encoder(imgs, 0.0, order)
        n, t, d = seen["x"].shape
        v = block_attn.qkv(seen["x"]).reshape(n, t, 3, block_attn.num_heads, -1).permute(2, 0, 3, 1, 4)[2]
        mixed = (attn @ v).transpose(1, 2).reshape(n, t, d)
        torch.testing.assert_close(block_attn.proj(mixed), seen["out"], atol=1e-5, rtol=1e-4)
    handle.remove()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "usf-mae.pth"
    with pytest.raises(UsfmaeError, match=str(missing)):
        reconstruction.load_inspection_model(str(missing), tmp_path)
    with pytest.raises(UsfmaeError, match="run notebook 02"):
        reconstruction.read_index(tmp_path / "clean")


def test_bare_state_dict_checkpoint_loads_with_inferred_config(tmp_path):
    """The released USF-MAE weights are a bare state dict: config and size come from shapes."""
    model = build_model(CONFIG, img_size=SIZE)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    loaded, info = reconstruction.load_inspection_model(str(tmp_path / "bare.pth"), tmp_path, device="cpu")
    assert info["img_size"] == SIZE and info["depth"] == 12 and not info["norm_pix_loss"]
    assert not loaded.training


def test_pick_images_is_seeded_per_anatomy(out_dir):
    index = reconstruction.read_index(out_dir / reconstruction.DEFAULT_CLEAN_DIR)
    a = reconstruction.pick_images(index, 2, seed=5)
    assert a.groupby("anatomy").size().to_dict() == {"breast": 2, "liver": 2}
    pd.testing.assert_frame_equal(a, reconstruction.pick_images(index.iloc[::-1], 2, seed=5))  # row order is irrelevant
    assert len(reconstruction.pick_images(index, 10, seed=5)) == len(index)


def test_figures_and_headless_interactive_view(batch, out_dir):
    index, images, imgs = batch
    model = _model()
    res = reconstruction.reconstruct(model, imgs[:2], 0.75, reconstruction.patch_noise(2, model.num_patches, 0))
    figs = {stage: reconstruction.plot_walkthrough(res, stage, 0, 16) for stage in reconstruction.WALKTHROUGH_STAGES}
    assert list(figs) == ["patches", "mask", "encoder_input", "decoder_input", "decoder_output", "loss"]
    with pytest.raises(UsfmaeError, match="unknown walkthrough stage"):
        reconstruction.plot_walkthrough(res, "attention")
    # the loss map's colour scale starts at 0: a dark patch is a small error, not the smallest one
    loss_image = figs["loss"].axes[0].images[0]
    assert loss_image.get_clim()[0] == 0
    # the encoder's input is drawn as a sequence with the cls token and a position index per visible patch
    encoder_labels = [t.get_text() for t in figs["encoder_input"].axes[0].texts]
    assert encoder_labels.count("cls") >= 1
    visible = [str(int(k)) for k in res["ids_keep"][0]]
    assert [t for t in encoder_labels if t.isdigit()] == visible  # in the encoder's (shuffled) order
    # the decoder's input: every position, mask tokens where patches were hidden
    assert sum(t.get_text() == "M" for t in figs["decoder_input"].axes[0].texts) == int(res["mask"][0].sum())
    path = reconstruction.save_figure(reconstruction.plot_reconstructions(res, ["a", "b"]), out_dir / "x" / "panels.png")
    assert cv2.imread(str(path)) is not None
    view = reconstruction.interactive_view(model, out_dir / reconstruction.DEFAULT_CLEAN_DIR, index, 0.5, 0, interactive=True)
    assert isinstance(view, plt.Figure)  # no Jupyter frontend here: a static figure
    plt.close("all")


def test_interactive_view_names_the_image_above_the_row_whatever_its_length(out_dir, tmp_path):
    src = out_dir / reconstruction.DEFAULT_CLEAN_DIR / reconstruction.read_index(out_dir / reconstruction.DEFAULT_CLEAN_DIR).path.iloc[0]
    name = "synth_breast_images_" + "a_long_scan_name_" * 6 + "000001.png"
    (tmp_path / name).write_bytes(src.read_bytes())
    fig = reconstruction.interactive_view(_model(), tmp_path, pd.DataFrame(dict(path=[name], anatomy=["breast"])), 0.5, 0)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    image = fig.axes[0].get_window_extent(renderer)
    assert fig.axes[0].yaxis.label.get_window_extent(renderer).height <= image.height  # was name + MSE, upright
    title = fig._suptitle.get_window_extent(renderer)
    assert title.width <= fig.bbox.width and "breast: synth_breast_images_" in fig._suptitle.get_text()
    plt.close(fig)


def test_notebook_runs_headless_under_the_smoke_profile(out_dir):
    result = runner.run_notebook(parameters.NOTEBOOKS_DIR / "04_reconstruction.ipynb",
                                 [parameters.PARAMS_DIR / "smoke" / "04_reconstruction.yaml"],
                                 out_dir=out_dir, progress=False)
    step = result.step_dir
    for name in ("reconstructions_mask25.png", "reconstructions_mask75.png", "mask_ratio_sweep.png",
                 "attention_last_layer.png", "interactive_view_static.png"):
        assert cv2.imread(str(step / name)) is not None, name
    assert not [p.name for p in step.rglob("*") if p.name.lower().count(".png") > 1]  # one extension per file
    table = pd.read_csv(step / "mask_ratio_sweep.csv")
    assert len(table) == 3 * (len(ANATOMIES) + 1)  # smoke ratios x (anatomies + all)
    assert len(pd.read_csv(step / "sweep" / "per_image.csv")) == 3 * 2 * len(ANATOMIES)  # 2 per anatomy


def test_interactive_view_builds_widgets_in_a_jupyter_frontend(batch, out_dir, monkeypatch):
    ipywidgets = pytest.importorskip("ipywidgets")
    index, _, _ = batch
    monkeypatch.setattr(reconstruction, "frontend_available", lambda: True)
    view = reconstruction.interactive_view(_model(), out_dir / reconstruction.DEFAULT_CLEAN_DIR, index, 0.5, 0, interactive=True)
    assert isinstance(view, ipywidgets.VBox)
    picker, ratio, seed_box = view.children[0].children
    assert len(picker.options) == len(index)
    ratio.value = 0.9  # redraws without error
    seed_box.value = 7
    plt.close("all")


def test_inpainting_baseline_keeps_visible_pixels_and_fills_smooth_holes():
    """OpenCV's inpainting of the hidden patches: visible pixels come back exactly, and on a smooth
    ramp (where diffusion from the border is right) the holes are filled far better than flat."""
    ramp = np.tile(np.linspace(20, 230, SIZE).astype(np.uint8), (SIZE, 1))
    images = np.repeat(ramp[None, ..., None], 3, axis=3)                   # [1, S, S, 3]
    imgs = reconstruction.normalize_images(images)
    g = SIZE // 16
    mask = torch.zeros(1, g * g)
    mask[0, [5, 6, 9]] = 1                                                  # three inner patches hidden
    filled = reconstruction.inpaint_hidden(imgs, mask, 16)
    hidden = np.kron(mask.numpy().reshape(g, g), np.ones((16, 16))) > 0
    out = np.rint(reconstruction.unnormalize(filled)[0] * 255)
    assert (out[~hidden] == images[0][~hidden]).all()
    inpaint_err = np.abs(out[hidden] - images[0][hidden]).mean()
    flat_err = np.abs(images[0][~hidden].mean() - images[0][hidden]).mean()
    assert inpaint_err < flat_err / 4, (inpaint_err, flat_err)


def test_reconstruct_reports_the_inpainting_error_on_hidden_patches_only(batch):
    _, _, imgs = batch
    model = _model()
    res = reconstruction.reconstruct(model, imgs[:2], 0.5, reconstruction.patch_noise(2, model.num_patches, 1))
    target = model.patchify(imgs[:2])
    per_patch = ((model.patchify(res["inpainted"]) - target) ** 2).mean(dim=-1)
    expected = (per_patch * res["mask"]).sum(dim=1) / res["mask"].sum(dim=1)
    torch.testing.assert_close(res["inpaint_mse"], expected)
    assert (res["inpaint_mse"] > 0).all()


def test_verdict_table_pairs_images_and_says_no_clear_difference_inside_the_interval():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        anatomy = "liver" if i < 20 else "thyroid"
        base = 1 + rng.random()
        # liver: the model is clearly better than inpainting; thyroid: a tie up to noise
        mse = base - (0.3 if anatomy == "liver" else 0.0) + 0.01 * rng.standard_normal()
        rows.append(dict(mask_ratio=0.25, image=i, anatomy=anatomy, mse=mse, objective=mse,
                         baseline_mse=base + 0.5, inpaint_mse=base))
        rows.append(dict(mask_ratio=0.75, image=i, anatomy=anatomy, mse=mse + 0.2, objective=mse,
                         baseline_mse=base + 0.6, inpaint_mse=base + 0.3))
    per_image = pd.DataFrame(rows)
    table = reconstruction.verdict_table(per_image, 0.25, [0.25, 0.75]).set_index(["comparison", "dataset"])
    assert table.loc[("MAE vs OpenCV inpainting at 25%", "liver"), "verdict"] == "lower error"
    assert table.loc[("MAE vs OpenCV inpainting at 25%", "thyroid"), "verdict"] == "no clear difference"
    assert table.loc[("MAE vs flat fill at 25%", "all"), "verdict"] == "lower error"
    assert table.loc[("MAE error at 25% vs at 75%", "all"), "verdict"] == "lower error"
    assert table.loc[("MAE vs flat fill at 25%", "liver"), "n"] == 20
    smoke = reconstruction.verdict_table(per_image, 0.25, [0.25, 0.75], profile="smoke")
    assert set(smoke.verdict) == {"too small to judge"}


def test_checkpoint_falls_back_to_the_shipped_teaching_model(tmp_path):
    """A run without a checkpoint of its own (or checkpoint='teaching') shows the shipped teaching MAE."""
    from usfmae_lib import teaching

    for choice in ("", "teaching"):
        model, info = reconstruction.load_inspection_model(choice, tmp_path, device="cpu")
        assert "teaching" in info["checkpoint"] and info["trained_mask_ratio"] == teaching.RECIPE["mask_ratio"]
        assert info["patch_size"] == teaching.RECIPE["model_overrides"]["patch_size"]
