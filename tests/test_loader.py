"""StreamingDataLoader: exact and elastic mid-epoch resumption, its state_dict, batches as
torch's, and len() (its workers' transport: test_workers.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.datasets import write_indexed
from tests.loader_helpers import (
    flat,
    key_of,
    keys_collate,
    make_loader,
    make_sample_loader,
    run_epoch,
    write,
)
from tests.resume_helpers import assert_resumes, json_roundtrip
from wdsfs import StreamingDataLoader, StreamingWebDataset
from wdsfs.errors import StateMismatchError

pytestmark = pytest.mark.torch
ROOT = Path(__file__).resolve().parent.parent


def resume_helper(root, cache, *, before, after, checkpoint, env_before=None, env_after=None):
    """Run `before` loader(s) to `checkpoint` batches, save, resume with `after`; return keys."""
    loader = make_loader(root, cache, **before)
    first = run_epoch(loader, stop_after=checkpoint)
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = make_loader(root, cache, **after)
    resumed.load_state_dict(state)
    second = flat(run_epoch(resumed))
    if state["finished"]:  # a checkpoint at the end of an epoch resumes at the next one
        assert resumed.dataset.epoch == state["epoch"] + 1
        assert sorted(second) == sorted(flat(first))
        second = []
    return flat(first), second


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    counts=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    batch_size=st.integers(1, 4),
    num_workers=st.sampled_from([0, 1, 2, 3]),
    shuffle=st.booleans(),
    data=st.data(),
)
def test_resume_same_config_is_identical(
    tmp_path_factory, counts, batch_size, num_workers, shuffle, data
):
    root = tmp_path_factory.mktemp("ds")
    expected = write(root, counts)
    config = {"num_workers": num_workers, "batch_size": batch_size, "shuffle": shuffle}

    def make(state):
        loader = make_loader(root, root / "cache", **config)
        if state is not None:
            loader.load_state_dict(state)
        return loader

    full = run_epoch(make(None))
    assert sorted(flat(full)) == sorted(expected)
    # stopped and resumed once or twice, anywhere: the batches of the uninterrupted epoch
    stops = data.draw(st.lists(st.integers(0, max(len(full) - 1, 0)), min_size=1, max_size=2))
    assert_resumes(
        make,
        stops,
        get_state=lambda loader: loader.state_dict(),
        roundtrip=json_roundtrip(dict, dict),
        expected=full,
    )


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    counts=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    batch_size=st.integers(1, 4),
    workers=st.tuples(st.sampled_from([0, 1, 2, 3]), st.sampled_from([0, 1, 2, 3])),
    fraction=st.floats(0, 1),
)
def test_elastic_num_workers_is_exactly_once(
    tmp_path_factory, counts, batch_size, workers, fraction
):
    root = tmp_path_factory.mktemp("ds")
    expected = write(root, counts)
    config = {"num_workers": workers[0], "batch_size": batch_size}
    checkpoint = int(fraction * len(run_epoch(make_loader(root, root / "cache", **config))))
    before, after = resume_helper(
        root,
        root / "cache",
        before={"num_workers": workers[0], "batch_size": batch_size},
        after={"num_workers": workers[1], "batch_size": batch_size},
        checkpoint=checkpoint,
    )
    assert sorted(before + after) == sorted(expected)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    counts=st.lists(st.integers(0, 9), min_size=1, max_size=5),
    pack_size=st.integers(1, 4),
    workers=st.tuples(st.sampled_from([1, 2, 3]), st.sampled_from([0, 1, 2])),
    shuffle=st.booleans(),
    data=st.data(),
)
def test_a_state_taken_inside_a_pack_resumes_exactly(
    tmp_path_factory, counts, pack_size, workers, shuffle, data
):
    root = tmp_path_factory.mktemp("ds")
    expected = write(root, counts)
    cache = root / "cache"
    config = {"num_workers": workers[0], "pack_size": pack_size, "shuffle": shuffle}
    full = list(make_sample_loader(root, cache, **config))
    assert sorted(full) == sorted(expected)
    checkpoint = data.draw(st.integers(0, len(full)))
    loader = make_sample_loader(root, cache, **config)
    before = run_epoch(loader, stop_after=checkpoint)
    state = json.loads(json.dumps(loader.state_dict()))

    same = make_sample_loader(root, cache, **config)
    same.load_state_dict(state)
    assert before + list(same) == full  # same order, mid-pack or not

    elastic = make_sample_loader(root, cache, **{**config, "num_workers": workers[1]})
    elastic.load_state_dict(state)
    assert sorted(before + list(elastic)) == sorted(expected)


def _per_rank(monkeypatch, root, world_size, fn):
    out = []
    for rank in range(world_size):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        out.append(fn(rank))
    return out


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    counts=st.lists(st.integers(0, 8), min_size=1, max_size=7),
    worlds=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    num_workers=st.sampled_from([0, 2]),
    checkpoints=st.lists(st.integers(0, 12), min_size=3, max_size=3),
)
def test_elastic_world_size_is_exactly_once(
    tmp_path_factory, counts, worlds, num_workers, checkpoints
):
    from wdsfs.loader import merge_state_dicts

    monkeypatch = pytest.MonkeyPatch()
    try:
        root = tmp_path_factory.mktemp("ds")
        expected = write(root, counts)
        cache = root / "cache"
        config = {"num_workers": num_workers, "batch_size": 2}
        delivered = []

        def first(rank):
            loader = make_loader(root, cache, **config)
            delivered.extend(flat(run_epoch(loader, stop_after=checkpoints[rank])))
            return loader.state_dict()

        merged = merge_state_dicts(_per_rank(monkeypatch, root, worlds[0], first))

        def second(rank):
            loader = make_loader(root, cache, **config)
            loader.load_state_dict(merged)
            return flat(run_epoch(loader))

        after = [k for keys in _per_rank(monkeypatch, root, worlds[1], second) for k in keys]
        if merged["finished"]:  # every rank had finished: the resumed run is the next epoch
            assert sorted(delivered) == sorted(after) == sorted(expected)
        else:
            assert sorted(delivered + after) == sorted(expected)
    finally:
        monkeypatch.undo()


def test_state_is_small_and_json(tmp_path):
    write(tmp_path / "ds", [50] * 20)
    loader = make_loader(
        tmp_path / "ds", tmp_path / "c", num_workers=2, batch_size=8, buffer_size=10
    )
    run_epoch(loader, stop_after=40)
    size = len(json.dumps(loader.state_dict()))
    assert size < 4000, size


def test_end_of_epoch_checkpoint_starts_the_next_epoch(tmp_path):
    expected = write(tmp_path / "ds", [3, 4])
    loader = make_loader(tmp_path / "ds", tmp_path / "c", num_workers=1, batch_size=2)
    assert sorted(flat(run_epoch(loader))) == sorted(expected)
    state = loader.state_dict()
    assert state["finished"] and state["epoch"] == 0
    resumed = make_loader(tmp_path / "ds", tmp_path / "c", num_workers=1, batch_size=2)
    resumed.load_state_dict(state)
    assert resumed.dataset.epoch == 1
    again = flat(run_epoch(resumed))
    assert sorted(again) == sorted(expected)


def test_state_from_another_dataset_is_refused(tmp_path):
    write(tmp_path / "a", [3, 3])
    write(tmp_path / "b", [3, 4])
    loader = make_loader(tmp_path / "a", tmp_path / "c", num_workers=0, batch_size=2)
    run_epoch(loader, stop_after=1)
    other = make_loader(tmp_path / "b", tmp_path / "c", num_workers=0, batch_size=2)
    with pytest.raises(StateMismatchError, match="another dataset"):
        other.load_state_dict(loader.state_dict())
    reseeded = make_loader(tmp_path / "a", tmp_path / "c", num_workers=0, batch_size=2, seed=99)
    with pytest.raises(StateMismatchError, match="seed"):
        reseeded.load_state_dict(loader.state_dict())
    with pytest.raises(StateMismatchError):
        other.load_state_dict({"format": "something else"})


def test_default_collate_batches_are_untouched(tmp_path):
    write(tmp_path / "ds", [5])
    ds = StreamingWebDataset(
        str(tmp_path / "ds"), decode={"cls": "int", "txt": "text"}, cache_dir=str(tmp_path / "c")
    )
    batches = list(StreamingDataLoader(ds, batch_size=2, num_workers=1))
    assert [b["cls"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert set(batches[0]) == {"__key__", "__url__", "txt", "cls", "json", "bin"}


_DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    from wdsfs import StreamingDataLoader, StreamingWebDataset, gather_state_dict
    root, out, phase = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ds = StreamingWebDataset(root, shuffle=True, seed=11, buffer_size=4,
                             cache_dir=os.path.join(out, "cache"))
    loader = StreamingDataLoader(ds, batch_size=3, num_workers=2,
                                 collate_fn=lambda s: [x["__key__"] for x in s])
    keys = []
    if phase == "first":
        for i, batch in enumerate(loader):
            keys += batch
            if i == 2 + rank:
                break
        state = gather_state_dict(loader)
        if rank == 0:
            with open(os.path.join(out, "state.json"), "w") as f:
                json.dump(state, f)
    else:
        with open(os.path.join(out, "state.json")) as f:
            loader.load_state_dict(json.load(f))
        for batch in loader:
            keys += batch
    with open(os.path.join(out, f"{phase}-{rank}.json"), "w") as f:
        json.dump(keys, f)
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_torch_distributed_checkpoint_then_resume_on_one_process(tmp_path):
    from tests.servers import free_port

    expected = write(tmp_path / "ds", [7, 6, 5, 4, 3])
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    for phase, nproc in (("first", 2), ("second", 1)):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), str(tmp_path / "ds"), str(tmp_path), phase],
                env={**env, "RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(r)},
                cwd=ROOT,
            )
            for r in range(nproc)
        ]
        assert [p.wait(timeout=120) for p in procs] == [0] * nproc
    before = [k for r in range(2) for k in json.loads((tmp_path / f"first-{r}.json").read_text())]
    after = json.loads((tmp_path / "second-0.json").read_text())
    assert 0 < len(before) < len(expected)
    assert sorted(before + after) == sorted(expected)


@pytest.mark.parametrize(
    ("batch_size", "drop_last"), [(None, False), (1, False), (4, False), (4, True), (7, True)]
)
def test_without_workers_batches_are_torchs_and_so_is_the_random_stream(
    tmp_path, batch_size, drop_last
):
    import torch
    from torch.utils.data import DataLoader

    root = tmp_path / "ds"
    write(root, [5, 3, 6])

    def epoch(loader_class, **kwargs):
        dataset = StreamingWebDataset(
            str(root), shuffle=True, seed=1, cache_dir=str(tmp_path / "c")
        )
        loader = loader_class(dataset, batch_size=batch_size, drop_last=drop_last, **kwargs)
        torch.manual_seed(0)
        batches = [
            [s["__key__"] for s in b] if isinstance(b, list) else b["__key__"] for b in loader
        ]
        return batches, torch.rand(1).item()

    collate = None if batch_size is None else list
    assert epoch(StreamingDataLoader, collate_fn=collate) == epoch(DataLoader, collate_fn=collate)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    counts=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    batch_size=st.sampled_from([None, 1, 3]),
    drop_last=st.booleans(),
    num_workers=st.sampled_from([0, 1, 2, 3]),
    world_size=st.sampled_from([1, 2, 3]),
    equalize=st.sampled_from([None, "drop", "repeat"]),
)
def test_len_is_the_number_of_batches_each_rank_yields(
    tmp_path_factory, monkeypatch, counts, batch_size, drop_last, num_workers, world_size, equalize
):
    root = tmp_path_factory.mktemp("ds")
    write_indexed(root, counts)
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    for rank in range(world_size):
        monkeypatch.setenv("RANK", str(rank))
        dataset = StreamingWebDataset(str(root), equalize=equalize, cache_dir=str(root / "c"))
        loader = StreamingDataLoader(
            dataset,
            batch_size=batch_size,
            drop_last=drop_last and batch_size is not None,
            num_workers=num_workers,
            collate_fn=keys_collate if batch_size is not None else key_of,
        )
        try:
            batches = list(loader)
        except ValueError as exc:  # "repeat" where a reader has nothing to repeat
            assert "to repeat" in str(exc)
            with pytest.raises(ValueError, match="to repeat"):
                len(loader)
            continue
        assert len(loader) == len(batches), rank
        samples = sum(map(len, batches)) if batch_size is not None else len(batches)
        assert len(dataset) == samples or (drop_last and batch_size is not None)


def test_len_without_sample_counts_is_a_type_error_until_an_epoch_was_read(tmp_path):
    write(tmp_path / "ds", [3, 4])
    dataset = StreamingWebDataset(str(tmp_path / "ds"), cache_dir=str(tmp_path / "c"))
    loader = StreamingDataLoader(dataset, batch_size=2, num_workers=2, collate_fn=keys_collate)
    for sized in (dataset, loader):
        with pytest.raises(TypeError, match=r"not known yet.*wdsfs index .*ds"):
            len(sized)
    assert sum(len(batch) for batch in loader) == 7  # list() and tqdm treat it as unsized
    assert len(dataset) == 7 and len(loader) == 4  # each worker's partial batch: 2 + 2


def test_len_of_a_dataset_alone_under_distributed_needs_the_loader(tmp_path, monkeypatch):
    write_indexed(tmp_path, [3, 4, 5])
    dataset = StreamingWebDataset(str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert len(dataset) == 12  # one process: every sample, whatever DataLoader reads it
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TypeError, match="StreamingDataLoader"):
        len(StreamingWebDataset(str(tmp_path), cache_dir=str(tmp_path / "c")))
    ranked = StreamingWebDataset(str(tmp_path), cache_dir=str(tmp_path / "c"))
    loader = StreamingDataLoader(ranked, batch_size=None, num_workers=0)
    assert len(ranked) == len(loader) == 4  # rank 1 of 2 reads shard 1
