"""The official stage-two schedule scaled to a LazyConfig's batch (disalign_det.lazy.recipe): pure
config arithmetic, on both detectron2 versions (no ViT needed)."""

import pytest
from omegaconf import OmegaConf

from disalign_det.lazy import OFFICIAL_STAGE_TWO, set_stage_two_schedule


def _nodes(batch):
    train = OmegaConf.create({"max_iter": 1, "eval_period": 1, "checkpointer": {"period": 1},
                              "output_dir": "out"})  # fmt: skip
    lr = OmegaConf.create(
        {"scheduler": {"values": [1.0], "milestones": [], "num_updates": 1}, "warmup_length": 0.1}
    )
    loader = OmegaConf.create({"train": {"total_batch_size": batch}, "test": {}})
    return train, lr, loader


@pytest.mark.parametrize(
    "batch, version, expected",
    [
        (16, "v1", (9000, 8000, 1000)),
        (64, "v1", (2250, 2000, 250)),
        (32, "v0.5", (2250, 2000, 500)),
    ],
)
def test_lengths_scale_with_the_batch(batch, version, expected):
    train, lr, loader = _nodes(batch)
    set_stage_two_schedule(train, lr, loader, lvis_version=version)
    iters, step, warmup = expected
    assert train.max_iter == iters and train.eval_period == iters
    assert list(lr.scheduler.milestones) == [step] and list(lr.scheduler["values"]) == [1.0, 0.1]
    assert lr.scheduler.num_updates == iters
    assert lr.warmup_length * iters == pytest.approx(warmup)
    assert train.checkpointer.period == warmup
    assert loader.evaluator.max_dets_per_image == 300
    assert tuple(loader.evaluator.tasks) == ("bbox", "segm")
    # The same number of images as the paper's 16-image schedule.
    assert iters * batch == OFFICIAL_STAGE_TWO[version][0] * 16


def test_unknown_lvis_version_is_refused():
    with pytest.raises(ValueError, match="lvis_version"):
        set_stage_two_schedule(*_nodes(16), lvis_version="v2")
