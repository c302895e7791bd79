"""metrics.jsonl and TensorBoard get the same scalars of every logged step, and a resume drops the lines an
interrupted run logged after its checkpoint."""
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dpo_ds.metrics import MetricsWriter

pytestmark = pytest.mark.unit


def _tensorboard_scalars(run_dir):
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_every_scalar_reaches_metrics_jsonl_and_tensorboard(tmp_path):
    logged = {3: {"loss": 0.6931, "rewards/accuracies": 0.5, "lr": 1e-3, "note": "not a number"},
              6: {"loss": 0.55, "rewards/accuracies": 0.75, "lr": 5e-4, "note": "x"}}
    writer = MetricsWriter(str(tmp_path), enabled=True)
    for step, metrics in logged.items():
        writer.write(step, metrics)
    writer.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": step, **metrics} for step, metrics in logged.items()]
    scalars = _tensorboard_scalars(tmp_path)
    assert set(scalars) == {"loss", "rewards/accuracies", "lr"}
    for tag, points in scalars.items():
        assert [step for step, _ in points] == list(logged)
        assert [value for _, value in points] == pytest.approx([logged[step][tag] for step in logged], rel=1e-6)


def test_a_resumed_writer_drops_lines_after_its_step(tmp_path):
    first = MetricsWriter(str(tmp_path), enabled=True)
    for step in (1, 2, 3, 4):
        first.write(step, {"loss": float(step)})
    first.close()
    resumed = MetricsWriter(str(tmp_path), enabled=True, after_step=2)
    resumed.write(3, {"loss": 30.0})
    resumed.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}]
