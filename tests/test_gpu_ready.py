"""GPU readiness on a CPU: the precision rule of both trainings, the fp16 + GradScaler path, and a
fine-tuning grid shared by several processes (each run trained once, a killed share resumed)."""
import json
import multiprocessing as mp
import time

import pandas as pd
import pytest
import torch

from usfmae_lib import UsfmaeError, amp, classifiers, mae, parameters, safety
from usfmae_lib import finetune as ft
from usfmae_lib.datasets import load_split
from test_finetune import count_optimiser_steps


@pytest.fixture(scope="module")
def tiny_data(clean_tree):
    split = load_split("folder", clean_tree, positive="busi", seed=0)
    return ft.prepare_data(split, 32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = mae.build_model(mae.CPU_CONFIG, img_size=32, depth=2)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-last.pth"
    torch.save({"model": model.state_dict(),
                "params": {"model": mae.CPU_CONFIG, "img_size": 32, "model_overrides": {"depth": 2}}}, path)
    return path


# ============================================================================ the precision rule
@pytest.mark.parametrize("precision, has_bf16, expected", [
    ("auto", True, torch.bfloat16), ("bf16", True, torch.bfloat16), ("fp16", True, torch.float16),
    ("auto", False, torch.float16), ("bf16", False, torch.float16), ("fp32", True, None), ("fp32", False, None)])
def test_a_gpu_gets_bf16_or_fp16_without_it_and_a_cpu_fp32(monkeypatch, precision, has_bf16, expected):
    monkeypatch.setattr(amp, "bf16_supported", lambda device: has_bf16)
    with amp.cpu_as_gpu():  # the GPU's column of the rule, on this CPU
        assert amp.autocast_dtype(precision, "cpu") == expected
    assert amp.autocast_dtype(precision, "cpu") is None  # a CPU computes in fp32 whatever is asked
    with pytest.raises(UsfmaeError, match="precision must be one of"):
        amp.autocast_dtype("half", "cpu")


def test_pretraining_and_fine_tuning_share_the_rule():
    from usfmae_lib import pretrain

    assert pretrain.amp is amp and ft.amp is amp
    with pytest.raises(UsfmaeError, match="precision must be one of"):
        pretrain.resolve_params(precision="half")


def test_fine_tuning_on_a_device_without_bf16_steps_through_a_grad_scaler(tiny_data, checkpoint, monkeypatch):
    """The fp16 path: autocast in fp16, the loss scaled, a step whose fp16 gradients overflowed skipped
    and the scale lowered, the other steps taken; the run says it computed in fp16 + GradScaler."""
    monkeypatch.setattr(amp, "bf16_supported", lambda device: False)  # a pre-Ampere GPU
    made = amp.grad_scaler
    scalers = []

    def huge_start(device, dtype):  # start at a scale that overflows fp16, so the skip path runs too
        scaler = made(device, dtype)
        if scaler.is_enabled():
            scaler._init_scale = 2.0 ** 24
        scalers.append(scaler)
        return scaler

    monkeypatch.setattr(amp, "grad_scaler", huge_start)
    steps, autocast_dtypes = count_optimiser_steps(monkeypatch), []
    torch.manual_seed(0)
    model, _, _ = classifiers.build_classifier("usf-mae", len(tiny_data.split.classes), 32, checkpoint=checkpoint)
    model.head.register_forward_hook(lambda m, i, o: autocast_dtypes.append(o.dtype) if m.training else None)
    cfg = ft.TrainConfig(epochs=4, patience=0, batch_size=8, img_size=32)
    with amp.cpu_as_gpu():
        result = ft.train(model, tiny_data, cfg, seed=0, positive=tiny_data.split.positive, log=None, precision="auto")
    assert result["computed_in"] == "fp16 autocast + GradScaler"
    assert set(autocast_dtypes) == {torch.float16}  # the forward ran in fp16
    (scaler,) = scalers
    assert scaler.is_enabled()
    history = pd.DataFrame(result["history"])
    assert history["grad_scale"].iloc[-1] < 2.0 ** 24  # overflowed steps lowered the scale ...
    assert 0 < len(steps) < result["steps_run"]  # ... and were skipped; the others stepped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp32_runs_keep_their_identity_and_fp16_runs_get_their_own(tiny_data, tmp_path, monkeypatch):
    """A run finished in fp32 before precision was a knob is reused; the same run in another precision
    is another run (its numbers differ)."""
    cfg = ft.TrainConfig(epochs=1, patience=0, batch_size=8, img_size=32, max_steps=1)
    kw = dict(n_bootstrap=5, log=None, mae_config=mae.CPU_CONFIG)
    row = ft.finetune_run(tiny_data, "scratch", cfg, 0, tmp_path, **kw)
    stored = json.loads((tmp_path / row["run"] / "metrics.json").read_text())
    assert "precision" not in stored["identity"] and row["computed_in"] == "fp32"
    assert stored["provenance"]["torch"] == torch.__version__.split("+")[0] or stored["provenance"]["torch"]
    assert row["commit"] == stored["row"]["commit"]
    monkeypatch.setattr(amp, "bf16_supported", lambda device: False)
    with amp.cpu_as_gpu():
        fp16 = ft.finetune_run(tiny_data, "scratch", cfg, 0, tmp_path, **kw)
    stored = json.loads((tmp_path / fp16["run"] / "metrics.json").read_text())
    assert stored["identity"]["precision"] == "fp16 autocast + GradScaler" == fp16["computed_in"]


# ============================================================================ shares of a grid
def test_shards_take_their_own_share_first_then_the_rest():
    assert ft.shard_order(7, None) == list(range(7))
    assert ft.shard_order(7, (1, 3)) == [0, 3, 6, 1, 2, 4, 5]
    assert ft.shard_order(7, (3, 3)) == [2, 5, 0, 1, 3, 4, 6]
    for n in (1, 2, 3, 5):  # every share together is every task, once
        owns = [ft.shard_order(11, (i, n))[:len(range(i - 1, 11, n))] for i in range(1, n + 1)]
        assert sorted(t for own in owns for t in own) == list(range(11))
    assert parameters.parse_shard("2/4") == (2, 4) and parameters.parse_shard(None) is None
    for bad in ("0/2", "3/2", "1-2", "a/b"):
        with pytest.raises(UsfmaeError, match="I/N"):
            parameters.parse_shard(bad)


def test_a_claimed_task_is_left_for_later_then_waited_for(tmp_path):
    """run_shared's first pass skips a task another process holds; its second pass waits for it."""
    lock = tmp_path / "held.lock"
    calls = []

    def run(task, wait):
        if task == "held":
            with safety.claim(lock, "test", wait) as mine:
                calls.append((task, wait, mine))
                return "done" if mine else None
        calls.append((task, wait, True))
        return task.upper()

    holder = mp.get_context("spawn").Process(target=_hold, args=(str(lock), 1.5))
    holder.start()
    deadline = time.time() + 30
    while not lock.exists() or "pid" not in lock.read_text():
        assert time.time() < deadline and holder.is_alive()
        time.sleep(0.05)
    t0 = time.time()
    out = ft.run_shared(["a", "held", "b"], run, shard=(1, 2))
    holder.join()
    assert out == ["A", "done", "B"]
    assert calls[:3] == [("a", False, True), ("b", False, True), ("held", False, False)]  # own share a, b first
    assert calls[3] == ("held", True, True) and time.time() - t0 > 0.5  # then waited for the holder


def _hold(lock, seconds):
    with safety.claim(lock, "holder", True):
        time.sleep(seconds)


def test_shards_share_the_study_folder_but_a_whole_run_does_not(tmp_path):
    with safety.folder_lock(tmp_path, "shard 1/2", shared=True):
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_try_lock, args=(str(tmp_path), True, q))
        p.start()
        p.join()
        assert q.get() == "held"  # a second shard joins
        p = ctx.Process(target=_try_lock, args=(str(tmp_path), False, q))
        p.start()
        p.join()
        assert "being written by another run" in q.get()  # an unsharded run into the same folder stops


def _try_lock(folder, shared, q):
    safety.GRACE_S = 0.2
    try:
        with safety.folder_lock(folder, "other", shared=shared):
            q.put("held")
    except UsfmaeError as err:
        q.put(str(err))
