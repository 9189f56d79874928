"""`usfmae check gpu --dry`: the device check's paths, shrunk, on this CPU in CI (under 90 s)."""
import json
import time

from usfmae_lib import cli
from usfmae_lib.gpu_check import BASELINES


def test_the_dry_check_runs_every_part_of_the_gpu_check(tmp_path, capsys):
    t0 = time.time()
    rc = cli.main(["check", "gpu", "--dry", "--out", str(tmp_path)])
    seconds = time.time() - t0
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0 and record["ok"], (record["errors"], printed)
    assert seconds < 90, f"the dry check took {seconds:.0f} s; CI gives it 90"
    # bench: the paper's step eager and compiled, with MFU against the measured peak
    assert [b["compile"] for b in record["bench"]] == [False, True]
    assert all(b["dtype"] == "bfloat16" and 0 < b["mfu"] and b["images_per_s"] > 0 for b in record["bench"])
    # pretraining through pretrain.train, bf16 autocast (the GPU's rule on this CPU), the loss falls,
    # and the loader's rate is measured beside the model's
    pre = record["pretrain"]
    assert pre["precision"] == "bf16 autocast" and pre["loss_falls"] and pre["loader_images_per_s"] > 0
    # every Table 2 model fine-tuned in bf16, the fp16 + GradScaler path run, USF-MAE from the released layout
    tuned = {(f["model"], f["computed_in"]) for f in record["finetune"]}
    assert {m for m, _ in tuned} == set(BASELINES)
    assert all((m, "bf16 autocast") in tuned for m in BASELINES)
    assert ("usf-mae", "fp16 autocast + GradScaler") in tuned
    assert all(f["finite"] and f["steps"] >= 1 for f in record["finetune"])
    usf = next(f for f in record["finetune"] if f["model"] == "usf-mae")
    assert "USF-MAE_released_layout.pth" in usf["init"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "DRY" in table and "Result: ok." in table and "| ultrasam | bf16 | bf16 autocast |" in table
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("usfmae-gpu-check-")]  # scratch files removed


def test_the_full_check_refuses_a_machine_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert cli.main(["check", "gpu", "--out", str(tmp_path)]) == 2
    assert "usfmae check gpu --dry" in capsys.readouterr().err
