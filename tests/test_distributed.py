"""Data-parallel regional training: two local gloo processes follow the one-process trajectory."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adjointhydro import distributed as D
from adjointhydro.models import exphydro
from adjointhydro.regional import train_regional
from adjointhydro.synthetic import TWIN_BOUNDS, make_synthetic_basins


def test_shard_partitions_contiguously():
    items = list(range(11))
    parts = [D.shard(items, r, 3) for r in range(3)]
    assert sum(parts, []) == items
    assert sorted(len(p) for p in parts) == [3, 4, 4]
    assert D.shard([1], 0, 2) == [] and D.shard([1], 1, 2) == [1]  # more processes than items
    assert D.world_size() == 1 and D.rank() == 0 and not D.is_distributed()
    assert D.init_distributed() == (0, 1, torch.device("cpu"))  # no torchrun variables: single process


SPEC = {
    "basins": 6,
    "years": 2,
    "data_seed": 3,
    "method": "euler",
    "train": {
        "train_mask": None,
        "epochs": 3,
        "batch_size": 6,
        "window": 120,
        "warmup": 150,
        "lr": 2e-2,
        "patience": None,
        "hidden": [8],
        "sensitivity": "direct",
        "parameter_bounds": TWIN_BOUNDS,
        "val_every": 1,
    },
}


def test_two_processes_follow_the_single_process_loss_trajectory(tmp_path):
    spec = json.loads(json.dumps(SPEC))
    spec["train"]["parameter_bounds"] = {k: tuple(v) for k, v in TWIN_BOUNDS.items()}
    spec["train"]["out_dir"] = str(tmp_path / "ddp")
    result = tmp_path / "ddp.json"
    D.spawn_local(D.regional_worker, 2, spec, str(result))
    ddp = json.loads(result.read_text())
    assert ddp["world_size"] == 2

    syn = make_synthetic_basins(SPEC["basins"], SPEC["years"], seed=SPEC["data_seed"], method="euler")
    kw = dict(spec["train"])
    kw["out_dir"] = None
    kw["method"] = "euler"
    one = train_regional(exphydro(), syn.dataset, **kw)
    a = np.array([[h["train_loss"], h["val_loss"]] for h in one.history])
    b = np.array([[h["train_loss"], h["val_loss"]] for h in ddp["history"]])
    assert a.shape == b.shape == (3, 2)
    np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-12)
    assert a[-1, 1] < a[0, 1]  # and it learns
    # one writer: rank 0's run folder, complete, no temporary files from a second writer
    run = tmp_path / "ddp"
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "metrics.json").is_file()
    assert not list(run.rglob("*.tmp"))
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ck["config"]["world_size"] == 2 and ck["epoch"] == 3


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_all_reduce_helpers_are_identity_without_a_group():
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(D.all_reduce_sum(t), t)
    p = torch.nn.Parameter(torch.ones(2))
    D.all_reduce_gradients([p])  # no group: nothing happens, no error
    assert p.grad is None
