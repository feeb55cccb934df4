"""tools/demo.py runs stage one, DisAlign from its checkpoint, then evaluation-only runs at the
LVIS-like detection budget, and reuses finished stages (the runs themselves are faked here: the
real ones are what tests/test_train_net.py covers)."""

import json
import os

from tools import demo


def test_demo_pipeline_commands(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(cmd, log_path, name, **kwargs):
        calls.append(cmd)
        out = cmd[cmd.index("OUTPUT_DIR") + 1]
        with open(os.path.join(out, "metrics_final.json"), "w") as f:
            json.dump({"bbox": {"AP": 1.0, "APr": 2.0, "APc": 3.0, "APf": 4.0}}, f)
        return 0

    monkeypatch.setattr(demo, "stream_child", fake_run)
    assert demo.main(["--out", str(tmp_path)]) == 0
    assert len(calls) == 4
    stage_one, stage_two, eval_one, eval_two = calls
    assert stage_one[3].endswith("mask_rcnn_synth.yaml") and "--eval-only" not in stage_one
    s1_weights = os.path.join(str(tmp_path), "stage1", "model_final.pth")
    assert stage_two[3].endswith("disalign_synth.yaml") and "--eval-only" not in stage_two
    assert stage_two[stage_two.index("MODEL.WEIGHTS") + 1] == s1_weights
    for cmd, weights in ((eval_one, s1_weights), (eval_two, "disalign")):
        assert "--eval-only" in cmd
        assert cmd[cmd.index("TEST.DETECTIONS_PER_IMAGE") + 1] == "15"
        assert weights in cmd[cmd.index("MODEL.WEIGHTS") + 1]
    assert "| + DisAlign (stage two) | 1.0 | 2.0 | 3.0 | 4.0 |" in capsys.readouterr().out

    # A second run reuses every finished stage.
    calls.clear()
    assert demo.main(["--out", str(tmp_path)]) == 0
    assert calls == []
