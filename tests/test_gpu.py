"""The ``gpu`` tier (``pytest -m gpu``): identity at init, a stage-two step, the evaluation and the
export on CUDA, for the softmax, the cosine and (detectron2 main) the sigmoid / federated
classifiers. Skipped without CUDA; ``DISALIGN_TEST_DEVICE=cpu`` runs the same tests on the CPU
(``DISALIGN_TEST_DEVICE=cuda:1`` picks another GPU). ``scripts/gpu_check.sh`` runs this tier.

On the device, in float32: the stage-two model at init gives the stage one's detections (scores
within 1e-5: the box classifier is the same matmul in both; masks: the stock mask head's 1x1 conv
may run in TF32 on an Ampere+ GPU, ours is a matmul, so pasted masks agree on >= 99% of the
pixels). Under autocast (float16 on CUDA, bfloat16 on the CPU) the bounds of tests/test_device.py
hold with u the unit roundoff of that dtype. Every parameter and buffer (GRW weights, NorCal
counts, the federated loss's weights, the calibration) stays on the device through a training
step, and the evaluation of device outputs equals that of their CPU copies.
"""

import copy
import os

import pytest
import torch
from device_common import (
    VAL,
    classifier_params,
    device_batch,
    model_pair,
    move_calibration,
    on_device,
    outputs_with_hook,
    rect_dataset,
    same_detections,
    train_step,
)

DEVICE = os.environ.get("DISALIGN_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not DEVICE, reason="no CUDA device (DISALIGN_TEST_DEVICE=cpu runs this tier on the CPU)"
    ),
]
DEVICE_TYPE = torch.device(DEVICE or "cpu").type
# float16 on CUDA: the dtype with the overflow risk; the CPU's autocast runs bfloat16.
AMP_DTYPE = torch.float16 if DEVICE_TYPE == "cuda" else torch.bfloat16
AMP = dict(device_type=DEVICE_TYPE, dtype=AMP_DTYPE)
U = torch.finfo(AMP_DTYPE).eps / 2  # its unit roundoff (twice round-to-nearest's bound)
DETECT = ["TEST.DETECTIONS_PER_IMAGE", "1000", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.2"]


@pytest.fixture(scope="module")
def rects(tmp_path_factory):
    return rect_dataset(str(tmp_path_factory.mktemp("rects")))


@pytest.mark.parametrize("classifier", classifier_params())
def test_identity_at_init_on_device(rects, classifier):
    cfg1, m1, cfg2, m2 = model_pair(classifier, DEVICE, DETECT)
    assert not on_device(m1, DEVICE) and not on_device(m2, DEVICE)
    m1.eval(), m2.eval()
    batch = device_batch(cfg1, train=False, num=3)
    with torch.no_grad():
        out1, out2 = m1(batch), m2(batch)
    assert out2[0]["instances"].scores.device.type == DEVICE_TYPE
    total = same_detections(out1, out2, score_rtol=1e-5, min_mask_agree=0.99)
    assert total >= 5, "the stage-one model must predict something for this test to mean anything"

    amp = outputs_with_hook(m1, batch, m1.roi_heads.box_predictor, AMP)
    amp2 = outputs_with_hook(m2, batch, m2.roi_heads.box_predictor, AMP)
    (z1, _), (z2, _) = amp[1], amp2[1]
    assert z1.dtype == AMP_DTYPE and z2.dtype == torch.float32
    assert torch.equal(z2, z1.float())  # the calibrated logits at init, bit for bit
    same_detections(amp[0], amp2[0], score_rtol=U, min_common=0.95, min_mask_agree=0.99)


@pytest.mark.parametrize("classifier", classifier_params())
def test_stage_two_step_on_device(rects, classifier):
    _, m1, cfg2, m2 = model_pair(classifier, DEVICE)
    stage_one = {k: v.clone() for k, v in m1.state_dict().items()}
    move_calibration(m2)
    m2.train()
    batch = device_batch(cfg2, train=True, num=2)
    ref_losses, ref_grads = train_step(copy.deepcopy(m2), batch, amp=False, autocast=AMP)
    losses, grads = train_step(m2, batch, amp=True, autocast=AMP)
    for k, v in losses.items():
        assert v.device.type == DEVICE_TYPE and v.dtype == torch.float32, k
        assert torch.isfinite(v) and torch.isfinite(ref_losses[k]), k
        torch.testing.assert_close(v, ref_losses[k], rtol=0.10, atol=0)  # tests/test_device.py
    for n, g in grads.items():
        assert torch.isfinite(g).all(), n
        cos = torch.nn.functional.cosine_similarity(g.flatten(), ref_grads[n].flatten(), dim=0)
        assert cos >= 0.98, (n, cos.item())

    # An optimizer step on the device: only the calibration moves, nothing leaves the device.
    from disalign_det.engine import Trainer
    from disalign_det.modeling import is_calibration_parameter

    before = {k: v.clone() for k, v in m2.state_dict().items()}
    optimizer = Trainer.build_optimizer(cfg2, m2)
    optimizer.step()
    states = [t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
    assert states and all(t.device.type == DEVICE_TYPE for t in states)
    assert not on_device(m2, DEVICE)
    moved = [k for k, v in m2.state_dict().items() if not torch.equal(v, before[k])]
    assert moved and all(is_calibration_parameter(k) for k in moved), moved
    for k, v in m2.state_dict().items():
        if not is_calibration_parameter(k):
            assert torch.equal(v, stage_one[k]), k


@pytest.mark.parametrize("classifier", classifier_params("softmax", "sigmoid"))
def test_evaluation_on_device(rects, classifier, tmp_path):
    from detectron2.data import build_detection_test_loader

    from disalign_det.engine import Trainer

    _, _, cfg2, m2 = model_pair(classifier, DEVICE, ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.2"])
    m2.eval()
    loader = build_detection_test_loader(cfg2, VAL)
    results = []
    for copy_to_cpu in (False, True):
        evaluator = Trainer.build_evaluator(cfg2, VAL, str(tmp_path / str(copy_to_cpu)))
        evaluator.reset()
        for inputs in loader:
            with torch.no_grad():
                outputs = m2(inputs)
            assert outputs[0]["instances"].pred_boxes.device.type == DEVICE_TYPE
            if copy_to_cpu:
                outputs = [{"instances": o["instances"].to("cpu")} for o in outputs]
            evaluator.process(inputs, outputs)
        results.append(evaluator.evaluate())
    assert results[0] == results[1]
    assert results[0]["bbox"]["AP"] >= 0 and results[0]["segm"]["AP"] >= 0


@pytest.mark.parametrize("classifier", classifier_params("softmax", "cosine", "sigmoid"))
def test_export_on_device(rects, classifier, tmp_path):
    from common import load_script
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    em = load_script("tools/export_model.py")
    try:
        em.export_api()
    except RuntimeError as e:
        pytest.skip(str(e))
    _, _, cfg2, m2 = model_pair(classifier, DEVICE, DETECT)
    move_calibration(m2)
    m2.eval()
    records = DatasetCatalog.get(VAL)
    inputs = [em.prepare_input(cfg2, read_image(r["file_name"], format="BGR")) for r in records]
    path, _, _ = em.export(cfg2, m2, inputs[0], str(tmp_path))
    loaded = torch.jit.load(path, map_location=DEVICE)
    comparisons = []
    for inp in inputs[1:]:  # not the traced image
        eager = em.run_eager(m2, inp)
        exported = em.run_exported(loaded, inp)
        assert exported.scores.device.type == DEVICE_TYPE
        comparisons.append(em.compare_instances(eager.to("cpu"), exported.to("cpu")))
    worst = em.summarize(comparisons)
    assert worst["detections"] > 0 and worst["ok"], worst


def test_rng_state_of_a_checkpoint_restores_the_device_generator():
    """The RNG state a checkpoint stores restores the draws on the device too (RoI sampling and
    the federated loss draw on the device)."""
    from disalign_det.engine.checkpoint import get_rng_state, set_rng_state

    torch.randn(1, device=DEVICE)  # initialises the device's generator
    state = get_rng_state()
    first = torch.randperm(1000, device=DEVICE)
    set_rng_state(state)
    assert torch.equal(torch.randperm(1000, device=DEVICE), first)
    assert ("cuda" in state) == (DEVICE_TYPE == "cuda")
