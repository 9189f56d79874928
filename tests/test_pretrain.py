"""MAE pretraining: store, augmentation, schedule, checkpoints, exact resume, DDP, NaN stop.

Everything runs on a tiny PNG tree (48 images, 32 px) and a micro MAE (2 + 1 blocks, width 48)
so that the file takes well under a minute and a half on 2 busy cores.
"""
import math
import os
import signal
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from usfmae_lib import UsfmaeError, cli, mae, pretrain, store

MICRO = dict(embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
RUN = dict(model=mae.CPU_CONFIG, model_overrides=MICRO, img_size=32, batch_size=8, epochs=2,
           log_every=1, workers=0, seed=3)
N_IMAGES = 48


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Micro models gain nothing from threads, and on a shared machine OpenMP threads that wait
    for each other make every step ~10x slower; subprocesses get OMP_NUM_THREADS=1 too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scan(rng, size=40) -> np.ndarray:
    """A fake scan: speckled grey blobs on black."""
    img = np.zeros((size, size), np.uint8)
    for _ in range(3):
        cv2.circle(img, tuple(int(v) for v in rng.integers(4, size - 4, 2)), int(rng.integers(3, 12)),
                   int(rng.integers(60, 255)), -1)
    img = np.clip(img * rng.uniform(0.6, 1.0, img.shape), 0, 255).astype(np.uint8)
    return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory):
    """A miniature of notebook 02's output: clean/<dataset>/*.png + index.csv (40 px: packing resizes)."""
    root = tmp_path_factory.mktemp("clean")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IMAGES):
        dataset = ("busi", "echo")[i % 2]
        rel = f"{dataset}/img_{i:03d}.png"
        (root / dataset).mkdir(exist_ok=True)
        cv2.imwrite(str(root / rel), _scan(rng))
        rows.append(dict(path=rel, dataset=dataset, anatomy=("breast", "heart")[i % 2], source=rel, frame=0))
    pd.DataFrame(rows).to_csv(root / "index.csv", index=False)
    return root


@pytest.fixture(scope="module")
def store_dir(clean_tree, tmp_path_factory):
    return store.pack_store(clean_tree, tmp_path_factory.mktemp("store") / "store", 32, progress=False)


def _weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# ---------------------------------------------------------------------------- store
def test_pack_store_is_indexed_idempotent_resumable_and_skips_bad_files(clean_tree, tmp_path):
    src = tmp_path / "clean"
    src.mkdir()
    for f in clean_tree.rglob("*"):
        if f.is_file():
            (src / f.relative_to(clean_tree)).parent.mkdir(parents=True, exist_ok=True)
            (src / f.relative_to(clean_tree)).write_bytes(f.read_bytes())
    (src / "busi" / "img_000.png").write_bytes(b"not a png")  # a corrupt file is skipped, not fatal
    out = store.pack_store(src, tmp_path / "store", 32, shard_size=20, progress=False)
    index = pd.read_parquet(out / "index.parquet")
    assert len(index) == N_IMAGES - 1 and set(index.dataset) == {"busi", "echo"}
    assert set(index.anatomy) == {"breast", "heart"}
    assert pd.read_csv(out / "rejects.csv").path.tolist() == ["busi/img_000.png"]
    assert len(list(out.glob("shard_?????.npy"))) == len(list(out.glob("shard_?????_grey.npy"))) == 3
    assert index["grey"].all()  # grey scans: one channel each
    arr = np.load(out / "shard_00000_grey.npy", mmap_mode="r")
    assert arr.dtype == np.uint8 and arr.shape[1:] == (32, 32)
    row = index.iloc[5]  # the stored pixels are the PNG's, resized to 32 px
    want = cv2.resize(cv2.imread(str(src / row.path)), (32, 32), interpolation=cv2.INTER_AREA)[..., 0]
    np.testing.assert_array_equal(np.load(out / f"shard_{row.shard:05d}_grey.npy")[row.row], want)

    stamp = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    store.pack_store(src, out, 32, shard_size=20, progress=False)  # up to date: nothing rewritten
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == stamp
    (out / "store.json").unlink()  # as if killed while writing the second shard
    (out / "shard_00001.npy").unlink()
    store.pack_store(src, out, 32, shard_size=20, progress=False)
    assert (out / "shard_00000.npy").stat().st_mtime_ns == stamp["shard_00000.npy"]  # kept
    assert (out / "shard_00001.npy").exists() and store.store_is_current(src, out, 32)


def test_grey_and_colour_images_come_back_exactly_from_the_store(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "clean" / "mixed"
    src.mkdir(parents=True)
    want = {}
    for i in range(12):  # alternately grey (one channel stored) and colour (three)
        img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        if i % 2 == 0:
            img[..., 1] = img[..., 2] = img[..., 0]
        cv2.imwrite(str(src / f"img_{i:02d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        want[f"mixed/img_{i:02d}.png"] = img
    out = store.pack_store(tmp_path / "clean", tmp_path / "store", 32, shard_size=5, progress=False)
    index = pd.read_parquet(out / "index.parquet")
    assert index["grey"].tolist() == [i % 2 == 0 for i in range(12)]
    meta = store.read_store_meta(out)
    assert meta["n_grey"] == 6 and meta["bytes"] == sum(f.stat().st_size for f in out.glob("shard_*.npy"))
    assert meta["bytes"] < 12 * 32 * 32 * 3  # 6 x 1 + 6 x 3 channels (+ headers) instead of 12 x 3
    ds = store.StoreDataset(out, seed=0, num_patches=4)
    batch = ds.__getitems__([(0, i) for i in range(12)])["images"].numpy()  # [12, 32, 32, 3]
    for i, path in enumerate(index["path"]):
        np.testing.assert_array_equal(batch[i], want[path])


def test_heldout_images_are_kept_out_of_the_store_and_listed(clean_tree, tmp_path):
    # notebook 04 measures reconstruction on these, so none may be packed for pretraining
    out = store.pack_store(clean_tree, tmp_path / "store", 32, progress=False, heldout_per_anatomy=2, seed=3)
    held = pd.read_csv(out / "heldout.csv")
    packed = pd.read_parquet(out / "index.parquet")
    per_anatomy = held.groupby("anatomy").size().to_dict()
    assert per_anatomy == {"breast": 2, "heart": 2}  # 24 images each: a tenth allows 2
    assert not set(held.path) & set(packed.path) and len(held) + len(packed) == N_IMAGES
    assert store.store_is_current(clean_tree, out, 32, heldout_per_anatomy=2, seed=3)
    assert not store.store_is_current(clean_tree, out, 32, heldout_per_anatomy=2, seed=4)
    stamp = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    store.pack_store(clean_tree, out, 32, progress=False, heldout_per_anatomy=2, seed=3)
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == stamp  # same split: untouched
    # a large request is capped at a tenth of each anatomy, so small anatomies still train
    _, capped = store.split_heldout(store.list_sources(clean_tree), 50, seed=0)
    assert capped.groupby("anatomy").size().to_dict() == {"breast": 2, "heart": 2}
    store.pack_store(clean_tree, out, 32, progress=False)  # 0: nothing held out, no stale list
    assert not (out / "heldout.csv").exists() and len(pd.read_parquet(out / "index.parquet")) == N_IMAGES


def test_missing_source_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(UsfmaeError, match="run notebook 02"):
        store.pack_store(tmp_path / "nope", tmp_path / "store", 32)


def test_two_ranks_see_the_batches_of_one_process_with_twice_the_batch():
    one = list(store.EpochSampler(50, 0, 1, seed=1).__iter__())
    ranks = [store.EpochSampler(50, r, 2, seed=1) for r in (0, 1)]
    for sampler in [*ranks]:
        sampler.set_position(0)
    first = [list(s)[:4] for s in ranks]
    assert sorted(first[0] + first[1]) == sorted(one[:8])
    resumed = store.EpochSampler(50, 0, 1, seed=1)
    resumed.set_position(3, start=16)  # epoch 3 from its third batch of 8
    full = store.EpochSampler(50, 0, 1, seed=1)
    full.set_epoch(3)
    assert list(resumed) == list(full)[16:] and all(k[0] == 3 for k in resumed)


# ---------------------------------------------------------------------------- augmentation
def _fixed(scale, angle=0.0, flip=0.0):
    return store.AugmentConfig(rot_degrees=(angle, angle), flip_p=flip, crop_scale=(scale, scale), crop_ratio=(1, 1))


def _denormalise(x):
    return x * torch.tensor(store.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(store.IMAGENET_MEAN).view(1, 3, 1, 1)


def test_zoom_out_really_shrinks_the_image_and_pads_black():
    white = torch.full((3, 64, 64, 3), 255, dtype=torch.uint8)
    u = torch.rand(3, store.N_AUG)
    zoom_out = _denormalise(store.augment_batch(white, u, _fixed(2.0), 64))  # crop area 2x the image
    covered = (zoom_out[:, 0] > 0.5).float().mean(dim=(1, 2))
    assert torch.allclose(covered, torch.full((3,), 0.5), atol=0.04)  # the image fills half the output
    assert (zoom_out[:, :, 0, 0].abs() < 1e-6).all() or (zoom_out[:, :, -1, -1].abs() < 1e-6).all()  # black pad
    zoom_in = _denormalise(store.augment_batch(white, u, _fixed(0.5), 64))
    assert (zoom_in > 0.99).all()  # a crop inside the image: no padding at all
    # a 45 degree rotation of the whole image leaves black corners
    rotated = _denormalise(store.augment_batch(white, u, _fixed(1.0, angle=45), 64))
    assert rotated[:, :, 0, 0].abs().max() < 1e-6 and rotated[:, :, 32, 32].min() > 0.99


def test_flip_and_rotation_move_content_where_expected():
    img = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    img[0, 4:12, 4:12] = 255  # a square in the top-left corner
    u = torch.full((1, store.N_AUG), 0.5)

    def centre(cfg):
        ys, xs = np.nonzero(store.augment_batch(img, u, cfg, 64)[0, 0].numpy() > 0)
        return ys.mean(), xs.mean()

    assert centre(_fixed(1.0)) == pytest.approx((7.5, 7.5), abs=0.5)
    assert centre(_fixed(1.0, flip=1.0)) == pytest.approx((55.5, 55.5), abs=0.5)  # both flips
    y, x = centre(_fixed(1.0, angle=90))
    assert (y, x) == pytest.approx((7.5, 55.5), abs=0.5) or (y, x) == pytest.approx((55.5, 7.5), abs=0.5)


def test_sample_randomness_depends_only_on_seed_epoch_index(store_dir):
    ds = store.StoreDataset(store_dir, seed=5, num_patches=4)
    a = ds.__getitems__([(0, 3), (0, 7), (1, 3)])
    b = ds.__getitems__([(1, 3), (0, 3)])
    assert torch.equal(a["noise"][0], b["noise"][1]) and torch.equal(a["aug"][2], b["aug"][0])
    assert not torch.equal(a["noise"][0], a["noise"][2])  # another epoch, another mask
    assert torch.equal(a["images"][0], a["images"][2])


# ---------------------------------------------------------------------------- schedule and optimiser
def test_lr_schedule_warms_up_linearly_then_follows_a_half_cosine():
    f = [pretrain.lr_factor(s, 10, 100) for s in range(101)]
    assert f[0] == 0 and f[5] == pytest.approx(0.5) and f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5) and f[100] == pytest.approx(0.0, abs=1e-12)
    assert f[40] == pytest.approx(0.5 * (1 + math.cos(math.pi * 30 / 90)))
    assert all(a <= b for a, b in zip(f[:11], f[1:11])) and all(a >= b for a, b in zip(f[10:], f[11:]))
    assert pretrain.lr_factor(100, 10, 100, min_factor=0.1) == pytest.approx(0.1)


def test_official_code_variants_are_parameters():
    p = pretrain.resolve_params(blr_scaling=True, blr_batch=128, lr=1e-3)
    assert pretrain.peak_lr(p, world=1) == pytest.approx(1e-3 * 128 / 256)
    assert pretrain.peak_lr(pretrain.resolve_params(blr_scaling=True), world=4) == pytest.approx(1e-3 * 256 / 256)
    model = mae.build_model(mae.CPU_CONFIG, img_size=32, **MICRO)
    paper = pretrain.build_optimizer(model, pretrain.resolve_params(), 1e-3)
    official = pretrain.build_optimizer(model, pretrain.resolve_params(decay_all=True, betas=[0.9, 0.999]), 1e-3)
    assert paper.param_groups[0]["betas"] == (0.9, 0.95) and official.param_groups[0]["betas"] == (0.9, 0.999)
    no_decay = [g for g in paper.param_groups if g["weight_decay"] == 0]
    assert no_decay and all(q.ndim <= 1 for g in no_decay for q in g["params"])  # biases and norms
    assert [g["weight_decay"] for g in official.param_groups] == [0.01]
    with pytest.raises(UsfmaeError, match="unknown pretraining parameter"):
        pretrain.resolve_params(learning_rate=1)


def test_device_side_augmentation_computes_what_the_loader_side_one_does(store_dir):
    """A GPU run augments uint8 batches on the device, a CPU run in the loader: same loss."""
    p = pretrain.resolve_params(**RUN)
    model = pretrain._build(p)
    keys = [(2, i) for i in (1, 5, 9, 30)]
    on_device = store.StoreDataset(store_dir, p["seed"], 4, pretrain.augment_config(p), out_size=32)
    in_loader = store.StoreDataset(store_dir, p["seed"], 4, pretrain.augment_config(p), augment_here=True, out_size=32)
    a, b = on_device.__getitems__(keys), in_loader.__getitems__(keys)
    assert a["images"].dtype == torch.uint8 and b["images"].shape == (4, 3, 32, 32)
    loss_a = pretrain.batch_loss(model, a, p, torch.device("cpu"), pretrain.augment_config(p))
    loss_b = pretrain.batch_loss(model, b, p, torch.device("cpu"), pretrain.augment_config(p))
    assert torch.equal(loss_a, loss_b)


def test_init_checkpoint_starts_from_a_local_mae_file(tmp_path):
    source = mae.build_model(mae.CPU_CONFIG, img_size=32, **MICRO)
    torch.save({"model": source.state_dict()}, tmp_path / "reference.pth")  # reference MAE layout
    target = mae.build_model(mae.CPU_CONFIG, img_size=32, **MICRO)
    pretrain.load_init_checkpoint(target, tmp_path / "reference.pth")
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    mae.export_encoder(source, tmp_path / "encoder.safetensors")  # encoder only: fresh decoder
    fresh = mae.build_model(mae.CPU_CONFIG, img_size=32, **MICRO)
    decoder_before = fresh.decoder_pred.weight.clone()
    pretrain.load_init_checkpoint(fresh, tmp_path / "encoder.safetensors")
    assert torch.equal(fresh.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert torch.equal(fresh.decoder_pred.weight, decoder_before)
    other = mae.build_model(mae.CPU_CONFIG, img_size=32, **{**MICRO, "embed_dim": 24})
    with pytest.raises(UsfmaeError, match="does not fit"):
        pretrain.load_init_checkpoint(other, tmp_path / "reference.pth")


def test_bench_reports_throughput_flops_and_mfu(capsys):
    from usfmae_lib import bench

    r = bench.bench_pretrain(mae.CPU_CONFIG, img_size=32, batch=4, steps=2, warmup=1, peak_size=256)
    assert r["images_per_s"] > 0 and r["matmul_peak_tflops"] > 0
    assert r["achieved_tflops"] == pytest.approx(mae.mae_flops(mae.CPU_CONFIG, 32, 0.25, 4) / r["step_s"] / 1e12)
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / r["matmul_peak_tflops"])
    assert "images/s" in bench.format_result(r) and "MFU" in bench.format_result(r)


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = pretrain.save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path / "ck.pth")

    def dies_halfway(obj, f):
        Path(f).write_bytes(b"partial")
        raise KeyboardInterrupt  # as a kill during the write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        pretrain.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [f.name for f in tmp_path.iterdir()] == ["ck.pth"]


def test_cli_run_writes_weights_only_checkpoint_that_mae_loads_and_refuses_to_overwrite(clean_tree, tmp_path, capsys):
    args = ["pretrain", "--data", str(clean_tree), "--out", str(tmp_path), "--no-progress",
            "-p", "img_size=32", "-p", "epochs=1", "--batch-size", "16", "--workers", "0", "--log-every", "1"]
    assert cli.main(args) == 0
    run_dir = tmp_path / pretrain.STEP
    ckpt = torch.load(run_dir / "checkpoints" / pretrain.CHECKPOINT, weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "step", "rng", "params"} <= set(ckpt)
    # 2 images per anatomy held out by default (a tenth of 24): 44 packed, 2 full batches of 16
    assert len(pd.read_csv(run_dir / "store" / "heldout.csv")) == 4 and ckpt["params"]["heldout_per_anatomy"] == 20
    assert ckpt["step"] == 2 and ckpt["params"]["model"] == mae.CPU_CONFIG and ckpt["params"]["img_size"] == 32
    assert isinstance(ckpt["rng"][0]["numpy"][1], list)
    model = mae.load_model(run_dir / "checkpoints" / pretrain.CHECKPOINT)
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    log = pd.read_csv(run_dir / "log.csv")
    assert list(log.columns) == ["step", "epoch", "loss", "lr", "images_per_s"] and log.step.tolist() == [1, 2]
    assert (run_dir / "store" / "store.json").exists()
    assert cli.main(args) == 2 and "--resume" in capsys.readouterr().err  # never silently overwrite
    assert cli.main(args + ["--resume"]) == 0  # complete: nothing to do
    assert cli.main(args + ["--resume", "--lr", "0.1"]) == 2 and "lr" in capsys.readouterr().err


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(store_dir, tmp_path, monkeypatch):
    build = mae.build_model

    def build_failing_at_call_6(*a, **k):
        model = build(*a, **k)
        forward, calls = model.forward, []

        def forward_nan(*fa, **fk):
            calls.append(1)
            loss, pred, mask = forward(*fa, **fk)
            return (loss * float("nan") if len(calls) >= 6 else loss), pred, mask

        model.forward = forward_nan
        return model

    monkeypatch.setattr(mae, "build_model", build_failing_at_call_6)
    ckpt_file = tmp_path / "checkpoints" / pretrain.CHECKPOINT
    with pytest.raises(UsfmaeError, match=r"loss became nan at step 6 .*last good checkpoint .*step 4"):
        pretrain.train(store_dir, tmp_path, progress=False, **{**RUN, "checkpoint_every": 2})
    assert torch.load(ckpt_file, weights_only=True)["step"] == 4
    assert all(torch.isfinite(v).all() for v in _weights(ckpt_file).values())


# ---------------------------------------------------------------------------- exact resume
def test_resume_after_sigkill_ends_with_the_weights_of_an_uninterrupted_run(clean_tree, tmp_path, capsys):
    import multiprocessing

    params = {**RUN, "epochs": 5, "checkpoint_every": 3, "workers": 1,  # 6 steps/epoch, 30 steps
              "heldout_per_anatomy": 0}  # the same 48 images as pretrain_store packs
    out = tmp_path / "killed"
    argv = ["--data", str(clean_tree), "--out", str(out), "--no-progress"] + [f"-p{k}={v}" for k, v in params.items()]
    ckpt_file = out / pretrain.STEP / "checkpoints" / pretrain.CHECKPOINT
    # a forked child runs the torchrun entry point (fork: no second torch import to wait for)
    proc = multiprocessing.get_context("fork").Process(target=pretrain.main, args=(argv,))
    proc.start()
    deadline = time.time() + 120
    while not ckpt_file.exists() and proc.is_alive() and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup, no final checkpoint
    proc.join()
    assert proc.exitcode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = torch.load(ckpt_file, weights_only=True)["step"]
    assert 3 <= killed_at < 30

    assert pretrain.main(argv + ["--resume"]) == 0
    assert f"resumed from checkpoints/{ckpt_file.name} at step {killed_at}" in capsys.readouterr().out

    whole = tmp_path / "whole"
    pretrain.train(pretrain_store(clean_tree, whole), whole / pretrain.STEP, progress=False, **{**params, "workers": 0})
    a, b = _weights(ckpt_file), _weights(whole / pretrain.STEP / "checkpoints" / pretrain.CHECKPOINT)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    log = pd.read_csv(out / pretrain.STEP / "log.csv")
    assert log.step.tolist() == list(range(1, 31))  # rows after the checkpoint were replaced, not doubled
    np.testing.assert_allclose(log.loss, pd.read_csv(whole / pretrain.STEP / "log.csv").loss, rtol=1e-5)


def pretrain_store(clean_tree, out) -> Path:
    return store.pack_store(clean_tree, out / pretrain.STEP / "store", RUN["img_size"], progress=False)


# ---------------------------------------------------------------------------- DDP
def _first_step_grads(rank, world, batch_size, store_dir, out_file, init_file):
    """One process of the DDP test: the gradient of the first training batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # spawned processes do not inherit the fixture's setting
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    p = pretrain.resolve_params(**{**RUN, "batch_size": batch_size})
    model = pretrain._build(p)
    _, sampler, loader = pretrain.make_data(store_dir, p, model.patch_embed.num_patches, rank, world)
    sampler.set_position(0)
    net = DistributedDataParallel(model) if world > 1 else model
    loss = pretrain.batch_loss(net, next(iter(loader)), p, torch.device("cpu"), pretrain.augment_config(p))
    loss.backward()
    if rank == 0:
        torch.save({k: q.grad for k, q in model.named_parameters() if q.grad is not None}, out_file)
    if world > 1:
        dist.destroy_process_group()
    torch.set_num_threads(threads)


def test_ddp_two_gloo_processes_give_the_gradient_of_one_process_with_twice_the_batch(store_dir, tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_first_step_grads, args=(2, 4, store_dir, tmp_path / "ddp.pt", tmp_path / "pg"),
                       nprocs=2, start_method="fork")
    _first_step_grads(0, 1, 8, store_dir, tmp_path / "one.pt", None)
    ddp, one = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "one.pt")
    assert set(ddp) == set(one) and len(one) > 10
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], atol=1e-5, rtol=1e-4, msg=k)


# ---------------------------------------------------------------------------- max_steps (the dry run)
def test_max_steps_stops_early_with_the_full_schedule_writes_checkpoint_and_log_and_resumes(store_dir, tmp_path):
    short = pretrain.train(store_dir, tmp_path / "short", progress=False, **{**RUN, "max_steps": 3})
    total = short["steps"]
    assert short["last_step"] == 3 < total and short["precision_run"] == "fp32"  # a CPU: auto falls back to fp32
    ckpt = tmp_path / "short" / "checkpoints" / pretrain.CHECKPOINT
    assert torch.load(ckpt, weights_only=True)["step"] == 3  # written at the stop, as at the end of a run
    log = pd.read_csv(tmp_path / "short" / "log.csv")
    assert log.step.tolist() == [1, 2, 3]
    warmup = int(RUN.get("warmup_fraction", 0.1) * total)  # the lrs of the full run's first steps
    np.testing.assert_allclose(log.lr, [1e-3 * pretrain.lr_factor(s, warmup, total) for s in range(3)], rtol=1e-5)
    again = pretrain.train(store_dir, tmp_path / "short", resume=True, progress=False, **{**RUN, "max_steps": 3})
    assert again["seconds"] == 0.0 and len(pd.read_csv(tmp_path / "short" / "log.csv")) == 3  # done: a no-op
    # the cut run goes on to the end (max_steps may change on resume) and ends where an uncut run ends
    pretrain.train(store_dir, tmp_path / "short", resume=True, progress=False, **RUN)
    pretrain.train(store_dir, tmp_path / "whole", progress=False, **RUN)
    a, b = _weights(ckpt), _weights(tmp_path / "whole" / "checkpoints" / pretrain.CHECKPOINT)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert pd.read_csv(tmp_path / "short" / "log.csv").step.tolist() == list(range(1, total + 1))
    with pytest.raises(UsfmaeError, match="max_steps must be >= 0"):
        pretrain.train(store_dir, tmp_path / "bad", progress=False, **{**RUN, "max_steps": -1})


def test_a_cpu_computes_in_fp32_whatever_precision_asks(store_dir, tmp_path, capsys):
    """Autocast is for CUDA, as the official code's torch.cuda.amp.autocast: its profile's bf16 on a
    CPU runs fp32 (CPU bf16 autocast ran a ViT-B step ~15x slower) and says so."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine autocasts")
    summary = pretrain.train(store_dir, tmp_path, progress=False, **{**RUN, "precision": "bf16", "max_steps": 1})
    assert summary["precision_run"] == "fp32" and summary["device"] == "cpu"
    assert "precision bf16 requested" in capsys.readouterr().out


def test_snapshot_epochs_keep_loadable_models_that_do_not_change_the_run(store_dir, tmp_path):
    """Notebook 07's pretraining-length curve reads these; keeping them changes nothing computed."""
    pretrain.train(store_dir, tmp_path / "snap", progress=False, **{**RUN, "snapshot_epochs": [1, 2]})  # 2: the end
    kept = pretrain.snapshots(tmp_path / "snap" / "checkpoints")
    assert list(kept) == [1]
    raw = torch.load(kept[1], weights_only=True)
    assert raw["epoch"] == 1 and "optimizer" not in raw and raw["params"]["snapshot_epochs"] == [1, 2]
    mae.load_model(kept[1])  # an MAE checkpoint like any other
    pretrain.train(store_dir, tmp_path / "plain", progress=False, **RUN)
    a = _weights(tmp_path / "snap" / "checkpoints" / pretrain.CHECKPOINT)
    b = _weights(tmp_path / "plain" / "checkpoints" / pretrain.CHECKPOINT)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(_weights(kept[1])["blocks.0.attn.qkv.weight"], a["blocks.0.attn.qkv.weight"])


def test_learnable_position_tables_train_and_a_fixed_table_checkpoint_still_loads(store_dir, tmp_path):
    """pos_embed="learnable" (the paper's text, 2.3: "learnable positional encodings", the paper
    profile) trains both tables and keeps them out of weight decay; "fixed" (reference MAE, official
    code, the released weights) never moves them; a released fixed-table file loads either way."""
    sincos = mae.build_model(mae.CPU_CONFIG, img_size=32, **MICRO)  # both kinds start from these tables
    for kind in ("learnable", "fixed"):
        pretrain.train(store_dir, tmp_path / kind, progress=False, **{**RUN, "pos_embed": kind, "max_steps": 2})
        trained = mae.load_model(tmp_path / kind / "checkpoints" / pretrain.CHECKPOINT)  # rebuilt from the recorded recipe
        for name in ("pos_embed", "decoder_pos_embed"):
            table, start = getattr(trained, name), getattr(sincos, name)
            assert table.requires_grad == (kind == "learnable"), (kind, name)
            assert torch.equal(table, start) == (kind == "fixed"), f"{kind} {name} after two steps"
    learnable = mae.build_model(mae.CPU_CONFIG, img_size=32, pos_embed="learnable", **MICRO)
    optimizer = pretrain.build_optimizer(learnable, pretrain.resolve_params(pos_embed="learnable"), 1e-3)
    decay_of = {id(q): g["weight_decay"] for g in optimizer.param_groups for q in g["params"]}
    assert decay_of[id(learnable.pos_embed)] == decay_of[id(learnable.decoder_pos_embed)] == 0  # as timm's ViT
    # a released checkpoint: a bare state dict of a named config with fixed tables (the official format)
    fixed = mae.build_model(mae.CPU_CONFIG, img_size=32)
    torch.save(fixed.state_dict(), tmp_path / "released.pth")
    released = mae.load_model(tmp_path / "released.pth")
    assert not released.pos_embed.requires_grad and torch.equal(released.pos_embed, fixed.pos_embed)
    learnable = mae.build_model(mae.CPU_CONFIG, img_size=32, pos_embed="learnable")
    torch.nn.init.zeros_(learnable.pos_embed)
    pretrain.load_init_checkpoint(learnable, tmp_path / "released.pth")  # and as the start of a learnable run
    assert learnable.pos_embed.requires_grad and torch.equal(learnable.pos_embed, fixed.pos_embed)
    with pytest.raises(UsfmaeError, match="pos_embed must be one of fixed, learnable"):
        pretrain.resolve_params(pos_embed="learned")
    # a run made before pos_embed existed computed with fixed tables: it resumes as fixed, not as learnable
    ckpt_file = tmp_path / "fixed" / "checkpoints" / pretrain.CHECKPOINT
    old = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    del old["params"]["pos_embed"]
    torch.save(old, ckpt_file)
    with pytest.raises(UsfmaeError, match="pos_embed: 'fixed' -> 'learnable'"):
        pretrain.train(store_dir, tmp_path / "fixed", resume=True, progress=False,
                       **{**RUN, "pos_embed": "learnable", "max_steps": 3})
    assert pretrain.train(store_dir, tmp_path / "fixed", resume=True, progress=False,
                          **{**RUN, "max_steps": 3})["last_step"] == 3


def test_notebook_03_hands_its_whole_recipe_to_the_library_in_one_call():
    """pretrain.params_of(globals()) takes every pretraining parameter of notebook 03's parameters
    cell (by DEFAULTS' names) and nothing else (out_dir, pretrain_seeds, ... stay out)."""
    from usfmae_lib import parameters

    cell, _ = parameters.notebook_defaults("03_mae_pretraining")
    params = pretrain.params_of({**cell, "unrelated": 1})
    assert set(params) == set(cell) & set(pretrain.DEFAULTS) and "out_dir" not in params and "unrelated" not in params
    assert set(pretrain.DEFAULTS) - set(params) == {"crop_ratio"}  # the one knob the notebook leaves at its default
    pretrain.resolve_params(**params)  # and they are valid as they stand
