"""The exported encoder folder (usfmae_lib.model_card): timm loads it alone with one call, with the
weights and head count of the MAE it came from, and its card names the run and what the data was."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from usfmae_lib import UsfmaeError, mae, model_card
from usfmae_lib.pretrain import params_of

TINY = "mae_vit_tiny_patch16_dec128d2b"
# a non-B/16 encoder whose head count is not its config's: a config.json that lost it builds 3 heads
OVERRIDES = {"depth": 2, "num_heads": 6, "decoder_depth": 1}
IMG = 32


def trained_tiny():
    torch.manual_seed(0)
    model = mae.build_model(TINY, img_size=IMG, **OVERRIDES).eval()
    with torch.no_grad():  # nothing at its init values
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def fake_step_dir(tmp_path, synthetic: bool):
    """The outputs of notebooks 01 and 03 that run_facts reads, written by hand (no packing, no training)."""
    out = tmp_path / "out"
    root = tmp_path / ("synthetic" if synthetic else "datasets")
    root.mkdir(parents=True)
    if synthetic:
        (root / "synth.json").write_text("{}")
        (root / "pretrain").mkdir()
    (out / "01_curation").mkdir(parents=True)
    (out / "01_curation" / "summary.json").write_text(json.dumps(dict(
        roots=[str(root)], datasets=5, kept=130, eval_datasets=["BUS-BRA"], duplicates_dropped=2, leakage=0,
        leakage_dropped=0, settings=dict(deduplicate=True, remove_leakage=True))))
    step = out / "03_mae_pretraining"
    (step / "store").mkdir(parents=True)
    (step / "store" / "store.json").write_text(json.dumps(dict(n_images=120, n_heldout=8, n_rejected=1, img_size=IMG)))
    names = ["synth_breast", "synth_heart"] if synthetic else ["BUSI", "EchoNet-Dynamic"]
    pd.DataFrame(dict(dataset=[names[i % 2] for i in range(120)],
                      anatomy=["breast" if i % 2 == 0 else "heart" for i in range(120)])).to_parquet(
        step / "store" / "index.parquet")
    pd.DataFrame(dict(step=[1, 2, 3], epoch=[0.1, 0.2, 0.3], loss=[2.5, 1.5, 1.25], lr=[0, 1e-4, 2e-4],
                      images_per_s=[10.0] * 3)).to_csv(step / "log.csv", index=False)
    return step


def notebook_params():
    # what notebook 03 passes: pretrain.params_of(globals()) of its parameters cell
    namespace = dict(profile="smoke", model=TINY, model_overrides=OVERRIDES, img_size=IMG, mask_ratio=0.25, epochs=2,
                     batch_size=16, lr=1e-3, seed=3, pretrain_seeds=1, out_dir="x")
    return params_of(namespace)


SUMMARY = dict(steps=14, last_step=14, epochs=2, global_batch=16, peak_lr=1e-3, device="cpu", precision_run="fp32",
               checkpoint="ignored")


def test_folder_loads_in_timm_alone_with_the_encoder_weights(tmp_path):
    import timm

    model = trained_tiny()
    step = fake_step_dir(tmp_path, synthetic=True)
    card = model_card.run_facts(step, notebook_params(), "smoke", SUMMARY)
    folder = model_card.export_encoder_folder(model, step / model_card.FOLDER, card)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    elsewhere = tmp_path / "received" / "usfmae-encoder"
    shutil.copytree(folder, elsewhere)  # the folder alone, away from the run and its checkpoints
    shutil.rmtree(tmp_path / "out")

    config = json.loads((elsewhere / "config.json").read_text())
    assert config["num_classes"] == 0 and config["num_features"] == 192 and config["global_pool"] == "token"
    assert config["model_args"] == dict(img_size=IMG, patch_size=16, in_chans=3, embed_dim=192, depth=2,
                                        num_heads=6, mlp_ratio=4.0, qkv_bias=True)
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == [3, IMG, IMG]
    assert pcfg["mean"] == [0.485, 0.456, 0.406] and pcfg["std"] == [0.229, 0.224, 0.225]

    vit = timm.create_model(f"local-dir:{elsewhere}", pretrained=True).eval()  # the documented call
    assert model_card.loading_call(elsewhere) == f'timm.create_model("local-dir:{elsewhere}", pretrained=True)'
    ours = mae.encoder_state_dict(model)
    theirs = vit.state_dict()
    assert set(theirs) == set(ours)  # strict: nothing missing, nothing left over
    for k, v in ours.items():
        assert torch.equal(theirs[k], v), k
    assert vit.num_classes == 0 and len(vit.blocks) == 2 and vit.blocks[0].attn.num_heads == 6
    imgs = torch.randn(2, 3, IMG, IMG)
    n = (IMG // 16) ** 2
    with torch.no_grad():
        expected, mask, _ = model.forward_encoder(imgs, 0.0, noise=torch.arange(float(n)).expand(2, n))
        assert mask.sum() == 0
        torch.testing.assert_close(vit.forward_features(imgs), expected, atol=1e-5, rtol=1e-5)
    data_cfg = timm.data.resolve_data_config({}, model=vit)
    assert data_cfg["input_size"] == (3, IMG, IMG) and tuple(data_cfg["mean"]) == (0.485, 0.456, 0.406)

    # fine-tuning: a fresh head, the encoder as exported
    clf = timm.create_model(f"local-dir:{elsewhere}", pretrained=True, num_classes=3)
    assert clf.head.out_features == 3 and torch.equal(clf.blocks[1].mlp.fc2.weight, ours["blocks.1.mlp.fc2.weight"])

    # a fresh interpreter that imports timm and torch only (no usfmae_lib, no network)
    torch.save(dict(imgs=imgs, expected=expected), tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch, timm
        vit = timm.create_model("local-dir:{elsewhere}", pretrained=True).eval()
        io = torch.load({str(tmp_path / 'io.pt')!r})
        with torch.no_grad():
            torch.testing.assert_close(vit.forward_features(io["imgs"]), io["expected"], atol=1e-5, rtol=1e-5)
        assert not any(m.startswith("usfmae") for m in sys.modules)
        print("ok")
    """)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_card_names_the_run_and_says_synthetic(tmp_path):
    model = trained_tiny()
    step = fake_step_dir(tmp_path, synthetic=True)
    card = model_card.run_facts(step, notebook_params(), "smoke", SUMMARY)
    assert card["data"]["synthetic"] == "all" and card["data"]["n_images"] == 120
    folder = model_card.export_encoder_folder(model, step / model_card.FOLDER, card)
    text = (folder / "README.md").read_text()
    front = text.split("---\n")[1]
    assert "library_name: timm" in front and "license: mit" in front and "- synthetic-data" in front
    from usfmae_lib import provenance
    commit = provenance.commit_label(card["provenance"])
    assert f"profile `smoke`, run folder `{step.parent.name}/{step.name}`, seed 3, commit `{commit}`" in text
    assert str(tmp_path) not in text  # no folder of this machine in a card that travels
    assert "**Synthetic data only.**" in text and "not the paper's USF-MAE" in text and "not for clinical use" in text
    assert "**Provenance**" in text and "parameters hash" in text
    assert 'timm.create_model("local-dir:' in text and "pretrained=True" in text
    assert "120 images packed" in text and "| mask ratio | 0.25 |" in text and "| steps run | 14 |" in text
    assert "last 3 1.7500" in text  # mean loss of the last logged steps
    n_params = sum(v.numel() for v in mae.encoder_state_dict(model).values())
    assert f"{n_params:,} parameters" in text
    assert "measure nothing" in text  # the smoke profile


def test_card_of_real_data_says_the_datasets_licences_apply(tmp_path):
    step = fake_step_dir(tmp_path, synthetic=False)
    card = model_card.run_facts(step, {**notebook_params(), "max_steps": 2}, "paper",
                                {**SUMMARY, "last_step": 2})
    assert card["data"]["synthetic"] == "none"
    folder = model_card.export_encoder_folder(trained_tiny(), tmp_path / "enc", card)
    text = (folder / "README.md").read_text()
    assert "license: other" in text and "synthetic-data" not in text and "Synthetic data only" not in text
    assert "their licences apply" in text and "docs/data.md" in text
    assert "Stopped after 2 of the schedule's 14 steps" in text
    assert json.loads((folder / "config.json").read_text())["pretrained_cfg"]["license"] == "other"


def test_head_count_comes_from_a_checkpoint_dict_or_must_be_given(tmp_path):
    model = trained_tiny()
    ckpt = {"model": model.state_dict(), "params": {"model": TINY, "model_overrides": OVERRIDES}}
    assert model_card.encoder_args(ckpt)["num_heads"] == 6
    assert model_card.encoder_args(model.state_dict(), num_heads=6)["depth"] == 2
    with pytest.raises(UsfmaeError, match="head count"):
        model_card.export_encoder_folder(model.state_dict(), tmp_path / "enc", {})


def test_finetuning_results_replace_the_placeholder_once(tmp_path):
    folder = model_card.export_encoder_folder(trained_tiny(), tmp_path / "enc", {"profile": "quick"})
    before = (folder / "README.md").read_text()
    assert "Not added yet" in before
    table = pd.DataFrame([
        dict(model="usf-mae", dataset="bus-bra", metric="f1", mean=71.25, sd=4.0, low=66.0, high=76.5,
             method="t over 5 splits", n_pretrain=3, n_folds=5, n_seeds=1,
             init="usf-mae: 03_mae_pretraining/checkpoints/checkpoint-last.pth"),
        dict(model="scratch", dataset="bus-bra", metric="f1", mean=60.0, sd=5.0, low=55.0, high=65.0,
             method="t over 5 splits", n_pretrain=1, n_folds=5, n_seeds=1, init="random"),
        dict(model="vgg-19", dataset="bus-bra", metric="f1", mean=float("nan"), sd=None, low=None, high=None,
             method=None, n_pretrain=None, n_folds=None, n_seeds=None, init=None),  # a paper-only row
    ])
    model_card.add_finetuning_results(folder, table, note="quick profile", source="06_results/table2.csv")
    model_card.add_finetuning_results(folder, table.iloc[:2], source="06_results/table2.csv")  # a re-run
    text = (folder / "README.md").read_text()
    assert "Not added yet" not in text and text.count("## Fine-tuning results") == 1
    assert "| model | dataset | F1 | sd | runs |" in text
    assert "| this recipe (USF-MAE) | BUS-BRA | 71.2 [66.0, 76.5] | 4.0 | 3 pretraining runs x 5 splits x 1 seed |" \
        in text
    assert "| same architecture, from scratch | BUS-BRA | 60.0 [55.0, 65.0] | 5.0 | 5 splits x 1 seed |" in text
    assert "- BUS-BRA, this recipe (USF-MAE): t over 5 splits" in text
    assert "same architecture, from scratch" in text and "VGG" not in text and "quick profile" not in text
    assert text.split("## Fine-tuning results")[0] == before.split("## Fine-tuning results")[0]
    with pytest.raises(UsfmaeError, match="lacks column"):
        model_card.add_finetuning_results(folder, table.drop(columns=["low"]))
