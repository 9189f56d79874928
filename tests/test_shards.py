"""`usfmae finetune --profile smoke --shard I/N`: shares of notebook 05's grid started together into
one folder give the rows of one unsharded run, each run trained once; a share killed mid-run and
started again finishes the grid with no run trained twice and none missing."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch

from usfmae_lib import mae, parameters

pytestmark = pytest.mark.slow
TABLES = ("results", "sweep", "probe", "label_efficiency")
NOT_METRICS = ("train_seconds", "commit")  # how long a run took, and the code it ran: not its numbers


@pytest.fixture(scope="module")
def grid_args(synth_eval, tmp_path_factory):
    """A small grid of the smoke profile: BUS-BRA's two folds x USF-MAE and scratch x two learning rates,
    a probe and a label fraction (14 runs: 8 of the sweep, its seed-0 runs reused; 2 probes; 4 at half the labels), on 8 images per part, from a tiny untrained MAE checkpoint."""
    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp("ckpt") / "checkpoint-last.pth"
    torch.save({"model": mae.build_model(mae.CPU_CONFIG, img_size=32, depth=2).state_dict(),
                "params": {"model": mae.CPU_CONFIG, "img_size": 32, "model_overrides": {"depth": 2}}}, ckpt)
    return ["finetune", "--profile", "smoke", "-p", f"checkpoint={ckpt}", "-p", f"data_root={synth_eval}",
            "-p", "datasets=[bus-bra]", "-p", "busbra_folds=[1, 2]", "-p", "models=[usf-mae, scratch]",
            "-p", "probe_models=[usf-mae]", "-p", "label_fractions=[0.5, 1.0]", "-p", "lrs=[0.001, 0.0003]",
            "-p", "max_images=8"]


def _start(args, out: Path, shard: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "usfmae_lib.cli", *args, "--out", str(out), *(["--shard", shard] if shard else [])]
    log = open(out.parent / f"{out.name}-{(shard or 'all').replace('/', 'of')}-{time.time_ns()}.log", "w")
    return subprocess.Popen(cmd, cwd=parameters.REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: killed below as a job scheduler would


def _finish(proc: subprocess.Popen, timeout: float = 600) -> None:
    assert proc.wait(timeout) == 0, Path(proc.stdout.name if proc.stdout else "").read_text() if proc.stdout else proc.args


def _trained(out: Path) -> Counter:
    path = out / "05_finetuning" / "runs" / "trained.jsonl"
    return Counter(json.loads(line)["run"] for line in path.read_text().splitlines()) if path.exists() else Counter()


def _tables(out: Path) -> dict:
    return {name: pd.read_csv(out / "05_finetuning" / f"{name}.csv").drop(columns=list(NOT_METRICS), errors="ignore")
            for name in TABLES}


@pytest.fixture(scope="module")
def unsharded(grid_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "whole"
    _finish(_start(grid_args, out))
    return out


def test_two_shards_started_together_give_the_rows_of_one_run(grid_args, unsharded, tmp_path):
    out = tmp_path / "shared"
    shards = [_start(grid_args, out, "1/2"), _start(grid_args, out, "2/2")]
    for proc in shards:
        _finish(proc)
    whole, shared = _tables(unsharded), _tables(out)
    for name in TABLES:
        pd.testing.assert_frame_equal(shared[name], whole[name], check_exact=True, obj=name)  # every metric equal
    trained = _trained(out)
    assert set(trained) == set(_trained(unsharded)) and max(trained.values()) == 1  # every run, each once
    assert len(trained) == 14
    pids = Counter(json.loads(line)["pid"] for line in (out / "05_finetuning/runs/trained.jsonl").read_text().splitlines())
    assert len(pids) == 2 and min(pids.values()) >= 4  # both shares trained a part of the grid
    assert {p.name for p in (out / "05_finetuning").glob("*.ipynb")} == {"05_finetuning.shard1of2.ipynb",
                                                                         "05_finetuning.shard2of2.ipynb"}


def test_a_killed_shard_started_again_leaves_no_run_twice_and_none_missing(grid_args, unsharded, tmp_path):
    out = tmp_path / "killed"
    first, second = _start(grid_args, out, "1/2"), _start(grid_args, out, "2/2")
    deadline = time.time() + 300
    while sum(_trained(out).values()) < 4:  # mid-run: the grid has begun and is far from done
        assert time.time() < deadline and second.poll() is None, "the grid did not start"
        time.sleep(0.2)
    os.killpg(second.pid, signal.SIGKILL)  # the share and its notebook (the kernel follows its parent)
    second.wait()
    assert sum(_trained(out).values()) < len(_trained(unsharded))
    again = _start(grid_args, out, "2/2")
    _finish(first)
    _finish(again)
    trained = _trained(out)
    assert set(trained) == set(_trained(unsharded)), "a run is missing"
    assert max(trained.values()) == 1, f"trained twice: {[r for r, n in trained.items() if n > 1]}"
    whole, killed = _tables(unsharded), _tables(out)
    for name in TABLES:
        pd.testing.assert_frame_equal(killed[name], whole[name], check_exact=True, obj=name)
