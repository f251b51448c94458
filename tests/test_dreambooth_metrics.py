"""Training logs (sd_jax.dreambooth.metrics): TensorBoard event files read back through the
TFRecord framing and tensorboardX's protos, the progress bar and the run summary."""

from __future__ import annotations

import io
import json
import re
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from sd_jax.dreambooth.metrics import MetricsLogger, Progress, RunSummary, to_uint8_rgb, truncate_jsonl


def read_events(logdir: Path) -> list[event_pb2.Event]:
    """All events of every event file in ``logdir``: records of u64 length, u32 masked CRC of the
    length, data, u32 masked CRC of the data (checked)."""
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
            assert header_crc == masked_crc32c(header)
            body = data[pos + 12:pos + 12 + length]
            (body_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
            assert len(body) == length and body_crc == masked_crc32c(body)
            events.append(event_pb2.Event.FromString(body))
            pos += 16 + length
    return events


def values(events, tag):
    """(step, summary value) of every event value with ``tag``."""
    return [(e.step, v) for e in events for v in e.summary.value if v.tag == tag]


def test_scalars_images_text_are_written_and_read_back(tmp_path):
    logger = MetricsLogger(tmp_path, flush_every=2)
    for step in (1, 2, 3):
        logger.scalars(step, {"train/loss": 0.5 / step, "train/prior_loss": jnp.float32(0.25),
                              "train/lr": np.float64(5e-6), "perf/images_per_s": 12, "skipped": None})
    pil = Image.fromarray(np.full((16, 24, 3), 200, np.uint8))
    float_img = np.linspace(0, 1, 8 * 8 * 3, dtype=np.float32).reshape(8, 8, 3)
    logger.images(3, "samples/sks_dog", [pil, float_img])
    logger.text(3, "config", "lr: 5e-6")
    logger.close()

    events = read_events(tmp_path)
    loss = values(events, "train/loss")
    assert [s for s, _ in loss] == [1, 2, 3]
    np.testing.assert_allclose([v.simple_value for _, v in loss], [0.5, 0.25, 0.5 / 3], rtol=1e-6)
    assert [v.simple_value for _, v in values(events, "train/prior_loss")] == [0.25] * 3
    assert values(events, "train/lr")[0][1].simple_value == pytest.approx(5e-6)
    assert values(events, "skipped") == []
    (step, img0), = values(events, "samples/sks_dog/0")
    assert step == 3 and (img0.image.height, img0.image.width) == (16, 24)
    decoded = np.asarray(Image.open(io.BytesIO(img0.image.encoded_image_string)).convert("RGB"))
    assert decoded.shape == (16, 24, 3) and (decoded == 200).all()
    (_, img1), = values(events, "samples/sks_dog/1")
    decoded = np.asarray(Image.open(io.BytesIO(img1.image.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, to_uint8_rgb(float_img))
    assert any(v.tag.startswith("config") for e in events for v in e.summary.value)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["train/loss"] == 0.25


def test_resumed_logger_keeps_earlier_events_and_purges(tmp_path):
    """A second writer in the same second does not overwrite the first file; ``purge_step``
    writes the SessionLog START that makes TensorBoard drop the first run's later steps."""
    with MetricsLogger(tmp_path) as first:
        first.scalars(5, {"loss": 1.0})
    with MetricsLogger(tmp_path, purge_step=3) as resumed:
        resumed.scalars(3, {"loss": 2.0})
    events = read_events(tmp_path)
    assert sorted((s, v.simple_value) for s, v in values(events, "loss")) == [(3, 2.0), (5, 1.0)]
    starts = [e.step for e in events if e.HasField("session_log")
              and e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [3]


def test_resumed_logger_rewrites_metrics_jsonl_without_duplicate_steps(tmp_path):
    """After kill-and-resume from step 3, metrics.jsonl held steps 3..5 twice; now each step once, in order,
    and a line torn by the kill is dropped."""
    with MetricsLogger(tmp_path) as first:
        for step in range(1, 6):
            first.scalars(step, {"train/loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')                     # SIGKILL mid-write
    with MetricsLogger(tmp_path, purge_step=3) as resumed:
        for step in range(3, 7):
            resumed.scalars(step, {"train/loss": 10.0 + step})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["train/loss"] for r in rows] == [1.0, 2.0, 13.0, 14.0, 15.0, 16.0]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert truncate_jsonl(tmp_path / "metrics.jsonl", 100) == 0 and truncate_jsonl(tmp_path / "none", 1) == 0


def test_disabled_logger_writes_nothing(tmp_path):
    logdir = tmp_path / "logs"
    logger = MetricsLogger(logdir, enabled=False)
    logger.scalars(1, {"loss": 1.0})
    logger.images(1, "x", [np.zeros((4, 4, 3), np.uint8)])
    logger.text(1, "t", "hello")
    logger.close()
    assert not logdir.exists()


def test_bad_values_are_clear_errors(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        with pytest.raises(ValueError, match="'loss'"):
            logger.scalars(1, {"loss": np.ones(3)})
        with pytest.raises(ValueError, match="shape"):
            logger.images(1, "x", [np.zeros((4, 4, 2), np.uint8)])
    with pytest.raises(ValueError, match="flush_every"):
        MetricsLogger(tmp_path, flush_every=0)


def test_to_uint8_rgb_modes():
    gray = np.full((3, 5), 0.5, np.float32)
    assert to_uint8_rgb(gray).shape == (3, 5, 3) and to_uint8_rgb(gray)[0, 0, 0] == 128
    rgba = Image.new("RGBA", (5, 3), (10, 20, 30, 0))
    assert to_uint8_rgb(rgba)[0, 0].tolist() == [10, 20, 30]
    assert to_uint8_rgb(np.array([[[2.0, -1.0, 0.25]]]))[0, 0].tolist() == [255, 0, 64]


def test_progress_bar_shows_eta_and_postfix():
    buf = io.StringIO()
    bar = Progress(total=10, initial=4, file=buf, mininterval=0)
    bar.update(1, {"loss": np.float32(0.123456), "step": 5})
    bar.update(2, {"loss": 0.1})
    assert bar.n == 7
    bar.close()
    out = buf.getvalue()
    assert "7/10" in out and "loss=0.1" in out and "<" in out  # "elapsed<remaining"
    assert "loss=0.1235" in out and "step=5" in out


def test_run_summary_excludes_first_step():
    times = iter([0.0, 10.0, 11.0, 12.0, 13.5])  # start; compile step 10 s; then 1, 1, 1.5 s
    summary = RunSummary(images_per_step=4, clock=lambda: next(times))
    summary.tick()
    summary.tick()
    summary.tick(loss=jnp.float32(0.2))
    summary.tick(loss=0.125)
    d = summary.as_dict()
    assert d["steps"] == 4 and d["wall_time_s"] == 13.5
    assert d["mean_step_s"] == pytest.approx(3.5 / 3)
    assert d["images_per_s"] == pytest.approx(4 / (3.5 / 3))
    assert d["final_loss"] == 0.125 and d["peak_rss_bytes"] > 10 * 2**20
    table = summary.table()
    for text in ("steps", "wall time", "13.5 s", "mean s/step", "1.1667", "images/s", "final loss", "0.125",
                 "peak host memory"):
        assert text in table, text
    assert re.search(r"peak host memory \(RSS\)\s+[\d.]+ [KMG]iB", table), table
    # several steps per tick (e.g. at each log interval)
    times = iter([0.0, 5.0, 9.0])
    s = RunSummary(images_per_step=2, clock=lambda: next(times))
    s.tick(10)
    s.tick(10)
    assert s.steps == 20 and s.mean_step_s == pytest.approx(0.4)
