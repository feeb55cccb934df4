"""The resumable training loader (``disalign_det.data.samplers``): batches of one orientation,
full, in stream order as detectron2's grouping forms them, a pure function of (seed, iteration) so
that a resume replays the tail exactly, with per-rank shards and worker-independent augmentations.
"""

import disalign_det  # noqa: F401  isort:skip

import itertools

import numpy as np
import pytest
import torch
from detectron2.data.common import AspectRatioGroupedDataset
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from detectron2.utils import comm

from disalign_det.data.samplers import (
    GroupedBatchSampler,
    build_resumable_train_loader,
    orientation_group_ids,
)
from disalign_det.engine import ResumableSampler

N = 40


def _dicts(n=N, seed=0):
    """Dataset dicts of mixed orientation (about 1/3 landscape; some square, which detectron2
    groups with portrait)."""
    rng = np.random.RandomState(seed)
    sizes = [(64, 48), (48, 64), (64, 64)]
    return [
        dict(zip(("width", "height"), sizes[rng.randint(3)]), image_id=i, file_name=f"{i}.jpg")
        for i in range(n)
    ]


def _take(batch_sampler, k):
    return list(itertools.islice(iter(batch_sampler), k))


def _indices(batches):
    return [[i for i, _ in b] for b in batches]


def _grouped(sampler, dicts, batch_size, start=0):
    bs = GroupedBatchSampler(sampler, orientation_group_ids(dicts), batch_size, seed=7)
    bs.start = start
    return bs


def _samplers():
    repeat = torch.tensor([1.0, 2.5, 1.0, 4.0] * (N // 4))
    return {
        "TrainingSampler": lambda: TrainingSampler(N, seed=7),
        "RepeatFactorTrainingSampler": lambda: RepeatFactorTrainingSampler(repeat, seed=7),
    }


@pytest.mark.parametrize("name", list(_samplers()))
def test_batches_are_detectron2_grouping_of_the_stream(name):
    # detectron2's AspectRatioGroupedDataset over the same index stream, mapped in order (what it
    # sees without workers): the same batches, and every batch full and of one orientation.
    dicts = _dicts()
    batches = _indices(_take(_grouped(_samplers()[name](), dicts, 3), 50))
    stream = ({**dicts[i], "idx": i} for i in _samplers()[name]())
    ref = AspectRatioGroupedDataset(stream, 3)
    expected = [[d["idx"] for d in b] for b in itertools.islice(iter(ref), 50)]
    assert batches == expected
    groups = orientation_group_ids(dicts)
    assert all(len(b) == 3 and len({int(groups[i]) for i in b}) == 1 for b in batches)
    assert {int(groups[b[0]]) for b in batches} == {0, 1}


@pytest.mark.parametrize("name", list(_samplers()))
def test_start_replays_the_tail_exactly(name):
    dicts = _dicts()
    full = _take(_grouped(_samplers()[name](), dicts, 2), 60)
    assert _take(_grouped(_samplers()[name](), dicts, 2), 60) == full  # deterministic
    for start in (1, 7, 23):
        assert _take(_grouped(_samplers()[name](), dicts, 2, start), 60 - start) == full[start:]
    # The per-index skip of ResumableSampler (iterations x batch) does not: images waiting in the
    # other orientation's bucket at the checkpoint are lost.
    naive = ResumableSampler(_samplers()[name]())
    naive.start = 23 * 2
    tail = _indices(_take(_grouped(naive, dicts, 2), 10))
    assert tail != _indices(full[23:33])


def test_sample_seeds_differ_per_slot_iteration_and_seed():
    def seeds(seed):
        bs = GroupedBatchSampler(TrainingSampler(N, seed=7), None, 2, seed=seed)
        return [s for b in _take(bs, 30) for _, s in b]

    assert len(set(seeds(7))) == 60
    assert set(seeds(7)).isdisjoint(seeds(8))


def test_no_grouping_takes_consecutive_indices():
    stream = list(itertools.islice(iter(TrainingSampler(N, seed=3)), 40))
    bs = GroupedBatchSampler(TrainingSampler(N, seed=3), None, 4, seed=3)
    assert sum(_indices(_take(bs, 10)), []) == stream


def test_per_rank_shards(monkeypatch):
    # Each rank groups its own shard of the shared stream (positions rank::world_size), as
    # detectron2's samplers shard it, with its own augmentation seeds.
    dicts = _dicts()
    stream = list(itertools.islice(iter(TrainingSampler(N, seed=5)), 400))  # one process
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    per_rank = {}
    for rank in (0, 1):
        monkeypatch.setattr(comm, "get_rank", lambda: rank)
        loader = build_resumable_train_loader(
            dicts, mapper=lambda d: d, sampler=TrainingSampler(N, seed=5), total_batch_size=4
        )
        bs = loader.batch_sampler
        assert bs.batch_size == 2 and bs.rank == rank
        per_rank[rank] = _take(bs, 30)
        shard = stream[rank::2]
        ref = AspectRatioGroupedDataset(({**dicts[i], "idx": i} for i in shard), 2)
        expected = [[d["idx"] for d in b] for b in itertools.islice(iter(ref), 30)]
        assert _indices(per_rank[rank]) == expected
    seeds = [{s for b in per_rank[r] for _, s in b} for r in (0, 1)]
    assert seeds[0].isdisjoint(seeds[1])


def _random_mapper(d):
    # Draws like detectron2's augmentations: numpy (flip, resize choice), Python and torch.
    return {
        "image_id": d["image_id"],
        "draws": (float(np.random.rand()), np.random.randint(1000), torch.rand(()).item()),
    }


def _loader_batches(num_workers, start=0, k=12, mapper=_random_mapper):
    loader = build_resumable_train_loader(
        _dicts(),
        mapper=mapper,
        sampler=TrainingSampler(N, seed=11),
        total_batch_size=2,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
    )
    loader.batch_sampler.start = start
    return list(itertools.islice(iter(loader), k))


def test_worker_augmentations_do_not_depend_on_workers_or_resume():
    one = _loader_batches(num_workers=1)
    two = _loader_batches(num_workers=2)
    assert one == two
    assert _loader_batches(num_workers=2, start=5, k=7) == two[5:]
    draws = [d["draws"] for b in two for d in b]
    assert len(set(draws)) == len(draws)  # not one seed for all


def test_without_workers_mapper_uses_the_global_rngs():
    # In the main process the mapper draws from the global RNGs (restored by the checkpoint), as
    # with detectron2's loader, so runs without workers keep their numbers.
    torch.manual_seed(0)
    np.random.seed(0)
    a = _loader_batches(num_workers=0, k=3)
    torch.manual_seed(0)
    np.random.seed(0)
    b = _loader_batches(num_workers=0, k=3)
    np.random.seed(1)
    c = _loader_batches(num_workers=0, k=3)
    assert a == b and a != c


def test_seeded_mapping_in_main_process_restores_global_rngs():
    loader = build_resumable_train_loader(
        _dicts(),
        mapper=_random_mapper,
        sampler=TrainingSampler(N, seed=11),
        total_batch_size=2,
        generator=torch.Generator().manual_seed(0),  # no draw from the global RNG
    )
    loader.dataset.seeded = True
    np.random.seed(3)
    torch.manual_seed(3)
    next(iter(loader))
    after = np.random.rand(), torch.rand(()).item()
    np.random.seed(3)
    torch.manual_seed(3)
    assert after == (np.random.rand(), torch.rand(()).item())


def test_skipped_image_is_replaced_by_one_of_the_same_orientation():
    dicts = _dicts()
    groups = orientation_group_ids(dicts)
    skip = set(range(0, N, 2))

    def mapper(d):
        return None if d["image_id"] in skip else _random_mapper(d)

    batches = _loader_batches(num_workers=2, k=20, mapper=mapper)
    assert batches == _loader_batches(num_workers=1, k=20, mapper=mapper)
    for b in batches:
        ids = [d["image_id"] for d in b]
        assert not skip.intersection(ids)
        assert len({int(groups[i]) for i in ids}) == 1


def test_missing_size_names_the_config_key():
    dicts = _dicts()
    del dicts[3]["height"]
    with pytest.raises(ValueError, match="DATALOADER.ASPECT_RATIO_GROUPING"):
        build_resumable_train_loader(
            dicts, mapper=_random_mapper, sampler=TrainingSampler(N, seed=1), total_batch_size=2
        )
