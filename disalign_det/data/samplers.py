"""A training loader whose whole sampling state is a function of (seed, iteration), so that a
resumed run replays exactly the batches of an uninterrupted one, with any number of data-loader
workers and any mix of aspect ratios.

detectron2 groups images by orientation in the iteration (``AspectRatioGroupedDataset``, after the
workers): which images wait in the other orientation's bucket at a checkpoint is not saved, and a
resume that skips ``iterations x batch`` indices of the sampler stream loses or repeats them. Here
the grouping happens on indices, in the main process, before any image is loaded:

* :class:`GroupedBatchSampler` reads this process's infinite index stream (``TrainingSampler``,
  ``RepeatFactorTrainingSampler``: each rank its own shard, as detectron2 does) and puts each index
  in the bucket of its image's orientation (``width > height`` or not, from the dataset dicts,
  as detectron2 decides it); a full bucket is the next batch. Resuming at iteration ``i`` replays
  the index stream from its start and drops the first ``i`` batches: only integers are handled
  (about a second per million indices), no image is read.
* With workers, every image's random augmentations (flip, resize choice) are drawn from RNGs seeded
  for that image's place in the run, ``(seed, rank, iteration, slot in batch)``
  (:class:`SeededMapDataset`), so they do not depend on which worker maps it, how far the worker
  got, or whether the run was resumed. Without workers the mapper keeps drawing from the main
  process's RNGs, which the checkpoint restores (and which keeps the data of
  ``NUM_WORKERS 0`` runs with one orientation bit-identical to detectron2's loader).

Differences from detectron2's grouping, all with the same batches in distribution (full batches of
one orientation, consecutive in the sampler stream):

* detectron2 assigns a bucket after mapping, in the order images come back from the workers (with
  workers, a chunked interleaving of the stream); here it is exactly the stream order.
* A mapper returning ``None`` is replaced by another image of the same orientation, drawn from the
  sample's own seed (detectron2's ``MapDataset`` draws any image from a per-process RNG).
* With workers the augmentations come from per-image seeds, not from one RNG stream per worker.
"""

import contextlib
import json
import logging
import os
import random

import numpy as np
import torch
from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm

__all__ = [
    "GroupedBatchSampler",
    "SeededMapDataset",
    "ResumableTrainLoader",
    "orientation_group_ids",
    "build_resumable_train_loader",
    "LOG_BATCHES_ENV",
]

logger = logging.getLogger(__name__)

#: When set to a file path, :class:`ResumableTrainLoader` appends one JSON line per batch it
#: hands to the trainer: ``{"iter": i, "rank": r, "image_ids": [...]}`` (for tests and audits).
LOG_BATCHES_ENV = "DISALIGN_DET_LOG_BATCHES"


def orientation_group_ids(dataset_dicts):
    """``(N,)`` int8 array: 0 for landscape images (``width > height``), 1 otherwise (portrait
    and square), the two groups of detectron2's ``AspectRatioGroupedDataset``."""
    ids = np.empty(len(dataset_dicts), dtype=np.int8)
    for i, d in enumerate(dataset_dicts):
        if "width" not in d or "height" not in d:
            raise ValueError(
                f"Dataset dict {i} (file_name={d.get('file_name')!r}) has no 'width'/'height': "
                "DATALOADER.ASPECT_RATIO_GROUPING needs both; add them to the dataset or set "
                "DATALOADER.ASPECT_RATIO_GROUPING False."
            )
        ids[i] = 0 if d["width"] > d["height"] else 1
    return ids


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of ``batch_size`` indices of one group, from an infinite per-process index stream.

    Yields ``[(index, sample_seed), ...]`` lists (``sample_seed`` feeds :class:`SeededMapDataset`).
    Batch ``n`` of the output is a pure function of the wrapped sampler's seed and ``n``: set
    :attr:`start` to ``i`` to begin with batch ``i`` of an uninterrupted run.

    Args:
        sampler: infinite sampler of this process's dataset indices, deterministic from its seed.
        group_ids: ``(N,)`` group of each dataset index, or None for one group (no grouping).
        batch_size (int): images per batch on this process.
        seed (int): base of the per-sample seeds (the sampler's seed).
        rank (int): this process's rank (mixed into the per-sample seeds).
    """

    def __init__(self, sampler, group_ids, batch_size, *, seed, rank=0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sampler = sampler
        self.group_ids = None if group_ids is None else np.asarray(group_ids)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.start = 0

    def sample_seed(self, batch, slot):
        """The 32-bit seed of the image at ``slot`` of batch ``batch`` on this rank."""
        seq = np.random.SeedSequence([self.seed % 2**63, self.rank, batch, slot])
        return int(seq.generate_state(1)[0])

    def __iter__(self):
        buckets = {}
        n = 0
        start = self.start  # read once: the trainer may set it only before the first batch
        group_ids = self.group_ids
        for idx in self.sampler:
            idx = int(idx)
            g = 0 if group_ids is None else int(group_ids[idx])
            bucket = buckets.setdefault(g, [])
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                buckets[g] = []
                if n >= start:
                    yield [(i, self.sample_seed(n, j)) for j, i in enumerate(bucket)]
                n += 1


@contextlib.contextmanager
def _seeded_rngs(seed):
    """Seed Python's, numpy's and torch's (CPU) global RNGs for one sample; in the main process
    restore them afterwards, so that the trainer's own draws are unaffected."""
    in_worker = torch.utils.data.get_worker_info() is not None
    if not in_worker:
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if not in_worker:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class SeededMapDataset(torch.utils.data.Dataset):
    """Applies ``mapper`` to ``dataset[index]`` for keys ``(index, sample_seed)``.

    With ``seeded=True`` (data-loader workers) the mapper's random draws come from RNGs seeded with
    ``sample_seed``. A mapper returning ``None`` (an image to skip) is retried on another index of
    the same group, drawn from ``sample_seed``, so the batch keeps one orientation."""

    def __init__(self, dataset, mapper, group_ids=None, *, seeded):
        self.dataset = dataset
        self.mapper = mapper
        self.seeded = seeded
        if group_ids is None:
            group_ids = np.zeros(len(dataset), dtype=np.int8)
        group_ids = np.asarray(group_ids)
        self._group_ids = group_ids
        self._members = {int(g): np.flatnonzero(group_ids == g) for g in np.unique(group_ids)}

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, sample_seed = key
        ctx = _seeded_rngs(sample_seed) if self.seeded else contextlib.nullcontext()
        with ctx:
            fallback = random.Random(sample_seed)
            members = self._members[int(self._group_ids[index])]
            cur, retries = int(index), 0
            while True:
                data = self.mapper(self.dataset[cur])
                if data is not None:
                    return data
                retries += 1
                if retries == 3:
                    logger.warning(
                        "The mapper returned None for %d images in a row (last index %d).",
                        retries,
                        cur,
                    )
                cur = int(members[fallback.randrange(len(members))])


class ResumableTrainLoader:
    """Iterable over the batches of a ``DataLoader`` driven by a :class:`GroupedBatchSampler`.

    The ``DataLoader`` iterator (which starts the workers and reads the sampler) is created on the
    first batch, not by ``iter()`` (detectron2 v0.6's ``SimpleTrainer`` calls ``iter()`` in its
    constructor, before ``resume_or_load`` sets :attr:`GroupedBatchSampler.start`)."""

    def __init__(self, loader):
        self.loader = loader
        self.batch_sampler = loader.batch_sampler
        self.dataset = loader.dataset

    def __iter__(self):
        log_path = os.environ.get(LOG_BATCHES_ENV)
        it = self.batch_sampler.start
        rank = self.batch_sampler.rank
        for batch in self.loader:
            if log_path:
                ids = [d.get("image_id") for d in batch]
                with open(log_path, "a") as f:
                    f.write(json.dumps({"iter": it, "rank": rank, "image_ids": ids}) + "\n")
            it += 1
            yield batch


def build_resumable_train_loader(
    dataset,
    *,
    mapper,
    sampler,
    total_batch_size,
    aspect_ratio_grouping=True,
    num_workers=0,
    collate_fn=None,
    generator=None,
    **kwargs,
):
    """Like detectron2's ``build_detection_train_loader`` (same arguments), with exact resumes:
    returns a :class:`ResumableTrainLoader` whose ``batch_sampler.start`` selects the first batch.

    Args:
        dataset (list[dict]): dataset dicts (with ``width``/``height`` for grouping).
        mapper (callable): dataset dict -> model input dict (or None to skip the image).
        sampler: infinite per-process index sampler (``TrainingSampler``...).
        generator (torch.Generator or None): the DataLoader's generator (workers' base seed).
        kwargs: more arguments of ``torch.utils.data.DataLoader`` (``pin_memory``,
            ``prefetch_factor``, ...), as detectron2 main's ``build_detection_train_loader`` takes.
    """
    if not isinstance(dataset, list):
        raise TypeError(
            f"build_resumable_train_loader needs a list of dataset dicts, got {type(dataset)}"
        )
    world_size = comm.get_world_size()
    if total_batch_size <= 0 or total_batch_size % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total_batch_size}) must be a positive multiple of the "
            f"number of processes ({world_size})."
        )
    group_ids = orientation_group_ids(dataset) if aspect_ratio_grouping else None
    seed = getattr(sampler, "_seed", None)
    if seed is None:
        seed = comm.shared_random_seed()
    batch_sampler = GroupedBatchSampler(
        sampler, group_ids, total_batch_size // world_size, seed=seed, rank=comm.get_rank()
    )
    mapped = SeededMapDataset(
        DatasetFromList(dataset, copy=False), mapper, group_ids, seeded=num_workers > 0
    )
    loader = torch.utils.data.DataLoader(
        mapped,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator if collate_fn is None else collate_fn,
        worker_init_fn=worker_init_reset_seed,
        generator=generator,
        **kwargs,
    )
    return ResumableTrainLoader(loader)
