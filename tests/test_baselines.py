"""Baselines normalised as their weights were trained: exact ImageNet-1k tags, each model fed its own
input statistics (train, predict, features), input sizes from the model, loud or skipped missing weights."""
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from usfmae_lib import classifiers, mae
from usfmae_lib import finetune as ft

HALF = (0.5, 0.5, 0.5)


def _weights_file(tmp_path, tag, drop=("head.", "fc.")):
    """A hand-made weights file of the tag's shapes (random values: only the shapes must be right)."""
    with torch.device("meta"):  # shapes only: no slow random init of the full model
        shapes = {k: v.shape for k, v in timm.create_model(tag, pretrained=False).state_dict().items()}
    gen = torch.Generator().manual_seed(0)

    def tensor(key, shape):
        if key.endswith("num_batches_tracked"):
            return torch.zeros(shape, dtype=torch.long)
        if key.endswith("running_var"):  # batch norm variances stay positive
            return torch.rand(shape, generator=gen) + 0.5
        return torch.randn(shape, generator=gen)

    state = {k: tensor(k, s) for k, s in shapes.items() if not k.startswith(drop)}
    path = tmp_path / f"{tag}.safetensors"
    save_file(state, str(path))
    return path, state


def _expected(images, mean, std):
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def _capture(model):
    """Inputs the model's forward receives, with the mode it was in."""
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].detach().float().clone())))
    return seen


def _images(n=3, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.fixture(scope="module")
def vit_b(tmp_path_factory):
    path, state = _weights_file(tmp_path_factory.mktemp("vit"), classifiers.TIMM_NAMES["vit-b"])
    model, init, weights_id = classifiers.build_classifier("vit-b", 2, 32, weights=path)
    return model, init, weights_id, path, state


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = mae.build_model(mae.CPU_CONFIG, img_size=32, depth=2)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-last.pth"
    torch.save({"model": model.state_dict(), "params": {"model": mae.CPU_CONFIG, "img_size": 32,
                                                        "model_overrides": {"depth": 2}}}, path)
    return path


# ---------------------------------------------------------------------------- (a) input statistics
def test_vit_b_is_fed_the_half_mean_std_of_its_tag_in_predict_and_features(vit_b):
    model, init, _, path, state = vit_b
    cfg = timm.models.get_pretrained_cfg(classifiers.TIMM_NAMES["vit-b"])
    assert tuple(cfg.mean) == HALF and tuple(cfg.std) == HALF  # the tag's own statistics
    assert classifiers.input_stats(model).mean == HALF and classifiers.input_stats(model).std == HALF
    assert torch.equal(model.state_dict()["blocks.3.mlp.fc1.weight"], state["blocks.3.mlp.fc1.weight"])  # loaded
    images = _images()
    seen = _capture(model)
    ft.predict(model, images, torch.device("cpu"))
    assert len(seen) == 1 and not seen[0][0]
    torch.testing.assert_close(seen[0][1], _expected(images, HALF, HALF))
    assert not torch.allclose(seen[0][1], _expected(images, classifiers.IMAGENET_MEAN, classifiers.IMAGENET_STD))
    # features: the trunk is fed through forward_features, with the same statistics
    fed = []
    handle = model.patch_embed.register_forward_pre_hook(lambda m, args: fed.append(args[0].detach().float().clone()))
    ft.features(model, images, torch.device("cpu"))
    handle.remove()
    torch.testing.assert_close(fed[0], _expected(images, HALF, HALF))


def test_train_feeds_inputs_normalised_with_the_model_statistics(mae_checkpoint):
    """White images, augmented (rotation, flips, crops: black outside the image): every training input is
    (1 - 0.5) / 0.5 = 1 or (0 - 0.5) / 0.5 = -1 with a model carrying vit-b's statistics, never ImageNet's
    2.2 / -2.1. (A tiny ViT carrying them: train reads only input_stats(model); vit-b's are checked above.)"""
    model, _, _ = classifiers.build_classifier("scratch", 2, 32, checkpoint=mae_checkpoint)
    classifiers.set_input_stats(model, classifiers.tag_input_stats(classifiers.TIMM_NAMES["vit-b"]))
    white = torch.full((4, 3, 32, 32), 255, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1])
    data = ft.Data(split=None, img_size=32, images={"train": white, "val": white},
                   labels={"train": labels, "val": labels})
    cfg = ft.TrainConfig(lr=1e-6, epochs=1, batch_size=4, patience=0, img_size=32, crop_scale=(1.5, 2.0))
    seen = _capture(model)
    ft.train(model, data, cfg, seed=0, device="cpu", positive=1, log=None)
    training = [x for mode, x in seen if mode]
    assert len(training) == 1
    values = training[0].flatten()
    assert torch.all((values.abs() - 1).abs() < 1e-5)  # every value is +1 or -1
    assert (values < 0).any() and (values > 0).any()  # zoom-out padding and image both present
    # validation inside train goes through predict: the same statistics
    torch.testing.assert_close([x for mode, x in seen if not mode][0], torch.ones(4, 3, 32, 32))


def test_renormalise_turns_imagenet_normalised_into_the_model_statistics():
    from usfmae_lib.store import augment_batch
    images = _images(2, 16)
    x = augment_batch(images.permute(0, 2, 3, 1), torch.zeros(2, 8), None, 16)  # ImageNet-normalised, no aug
    half = classifiers.InputStats(HALF, HALF, "test")
    torch.testing.assert_close(ft.renormalise(x, half), _expected(images, HALF, HALF), atol=1e-5, rtol=1e-5)
    assert ft.renormalise(x, classifiers.IMAGENET_STATS) is x  # ImageNet models: untouched, bit for bit as before


def test_resnet_50_is_fed_imagenet_statistics_of_its_tag(tmp_path):
    path, state = _weights_file(tmp_path, classifiers.TIMM_NAMES["resnet-50"])
    model, init, _ = classifiers.build_classifier("resnet-50", 2, 32, weights=path)
    assert torch.equal(model.state_dict()["layer2.0.conv2.weight"], state["layer2.0.conv2.weight"])
    assert classifiers.input_stats(model).mean == classifiers.IMAGENET_MEAN and classifiers.input_stats(model).std == classifiers.IMAGENET_STD
    assert classifiers.input_stats(model).source == "pretrained_cfg of resnet50.tv_in1k"
    images = _images()
    seen = _capture(model)
    ft.predict(model, images, torch.device("cpu"))
    torch.testing.assert_close(seen[0][1], _expected(images, classifiers.IMAGENET_MEAN, classifiers.IMAGENET_STD))


@pytest.mark.parametrize("name", ["usf-mae", "scratch"])
def test_usf_mae_and_scratch_are_fed_imagenet_statistics(mae_checkpoint, name):
    model, _, _ = classifiers.build_classifier(name, 2, 32, checkpoint=mae_checkpoint)
    assert classifiers.input_stats(model) == classifiers.IMAGENET_STATS
    images = _images()
    seen = _capture(model)
    ft.predict(model, images, torch.device("cpu"))
    torch.testing.assert_close(seen[0][1], _expected(images, classifiers.IMAGENET_MEAN, classifiers.IMAGENET_STD))


def test_normalise_keeps_its_old_call_and_takes_statistics_or_a_model(vit_b):
    images = _images(2, 8)
    cpu = torch.device("cpu")
    torch.testing.assert_close(ft.normalise(images, cpu), _expected(images, classifiers.IMAGENET_MEAN, classifiers.IMAGENET_STD))
    torch.testing.assert_close(ft.normalise(images, cpu, vit_b[0]), _expected(images, HALF, HALF))
    torch.testing.assert_close(ft.normalise(images, cpu, classifiers.InputStats(HALF, HALF, "t")), _expected(images, HALF, HALF))


# ---------------------------------------------------------------------------- (b) tags
def test_default_tags_are_imagenet_1k_weights_the_paper_names():
    expected = {"vit-b": ("vit_base_patch16_224.augreg_in1k", HALF, HALF),
                "resnet-50": ("resnet50.tv_in1k", classifiers.IMAGENET_MEAN, classifiers.IMAGENET_STD),
                "vgg-19": ("vgg19.tv_in1k", classifiers.IMAGENET_MEAN, classifiers.IMAGENET_STD)}  # plain VGG-19, not vgg19_bn
    for name, (tag, mean, std) in expected.items():
        assert classifiers.TIMM_NAMES[name] == tag and classifiers.timm_tag(tag) == tag
        assert tag in timm.list_pretrained(tag.partition(".")[0] + "*")
        assert classifiers.in1k_only(tag), tag
        stats = classifiers.tag_input_stats(tag)
        assert (stats.mean, stats.std) == (mean, std)
        assert tag in classifiers._expected_imagenet_file(tag) and f"Hugging Face timm/{tag}" in classifiers._expected_imagenet_file(tag)
    # what the untagged names resolved to before: not ImageNet-1k-only, or another recipe
    assert not classifiers.in1k_only("vit_base_patch16_224")  # augreg2_in21k_ft_in1k
    assert not classifiers.in1k_only("resnet50.fb_ssl_yfcc100m_ft_in1k")
    assert classifiers.timm_tag("resnet50") == "resnet50.a1_in1k"


def test_init_names_the_tag_and_the_file_taken_for_it(vit_b):
    _, init, weights_id, path, _ = vit_b
    tag = classifiers.TIMM_NAMES["vit-b"]
    assert init == f"imagenet-1k {tag} (file: {path}, taken to hold {tag})"
    assert init.startswith("imagenet")  # results.py counts it as ImageNet-initialised
    assert weights_id.startswith(f"{tag}:")


def test_weights_in_the_hugging_face_cache_layout_are_found(tmp_path, monkeypatch):
    from huggingface_hub import constants
    tag = classifiers.TIMM_NAMES["resnet-50"]
    snapshot = tmp_path / f"models--timm--{tag}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / f"models--timm--{tag}" / "refs").mkdir()
    (tmp_path / f"models--timm--{tag}" / "refs" / "main").write_text("0" * 40)
    _, state = _weights_file(tmp_path, tag)
    save_file(state, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert classifiers.find_imagenet_weights(tag) == snapshot / "model.safetensors"
    assert classifiers.imagenet_weights_available("resnet-50")
    assert not classifiers.imagenet_weights_available("vgg-19")  # another tag: another repo, not in this cache
    model, init, _ = classifiers.build_classifier("resnet-50", 2, 32)
    assert init == f"imagenet-1k {tag} (timm cache: {snapshot / 'model.safetensors'})"
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])


# ---------------------------------------------------------------------------- (c) input size
def test_input_size_is_the_requested_else_the_model_own(mae_checkpoint, monkeypatch):
    for name in ("vit-b", "resnet-50", "vgg-19"):
        assert classifiers.input_size(name, 0) == 224  # pretrained_cfg input_size of the tag
        assert classifiers.input_size(name, 96) == 96
    assert classifiers.input_size("usf-mae", 0, mae_checkpoint) == 32  # the checkpoint's pretraining size
    assert classifiers.input_size("scratch", 0, mae_checkpoint) == 32
    assert classifiers.input_size("scratch", 0) == 224 and classifiers.input_size("ultrasam", 0) == 224
    monkeypatch.setitem(classifiers.TIMM_NAMES, "vit-b", "vit_base_patch16_384.augreg_in1k")
    assert classifiers.input_size("vit-b", 0) == 384  # read from the tag, not assumed
    with pytest.raises(ft.UsfmaeError, match="needs --checkpoint"):
        classifiers.input_size("usf-mae", 0)


# ---------------------------------------------------------------------------- (d) missing weights
def test_missing_weights_are_loud_or_skipped(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    tag = classifiers.TIMM_NAMES["resnet-50"]
    assert not classifiers.imagenet_weights_available("resnet-50")
    assert not classifiers.imagenet_weights_available("resnet-50", tmp_path / "nope.pth")
    for name in ("usf-mae", "scratch", "ultrasam"):
        assert classifiers.imagenet_weights_available(name)
    model, init, weights_id = classifiers.build_classifier("resnet-50", 2, 32)
    assert init.startswith("random: no ImageNet weights found") and tag in init
    assert weights_id == f"random:{tag}"
    out = capsys.readouterr().out
    assert "WARNING" in out and "RANDOM" in out and tag in out
    assert classifiers.input_stats(model).mean == classifiers.IMAGENET_MEAN  # still the tag's statistics
    with pytest.raises(classifiers.MissingWeights, match=tag):
        classifiers.build_classifier("resnet-50", 2, 32, missing_weights="skip")
    with pytest.raises(ft.UsfmaeError, match="missing_weights must be one of"):
        classifiers.build_classifier("resnet-50", 2, 32, missing_weights="ignore")
    assert set(classifiers.MISSING_WEIGHTS) == {"random", "skip"}
    assert np.isfinite(ft.predict(model, _images(2), torch.device("cpu"))).all()
