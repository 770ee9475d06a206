"""report_to: W&B (offline, read back from the run file wandb-core writes), TensorBoard, all/none, missing packages."""
import glob
import json
import os
import struct
import sys

import pytest

from flax_gpt2v.training import options, reporting, trainer as tr
from flax_gpt2v.config import ConfigError

import helpers as t


@pytest.mark.parametrize("value, names", [
    ("wandb", ["wandb"]), (["tensorboard"], ["tensorboard"]), ("all", ["tensorboard", "wandb"]),
    (["all"], ["tensorboard", "wandb"]), ("none", []), (["none"], []), ([], []),
    (["wandb", "tensorboard", "wandb"], ["wandb", "tensorboard"]),
])
def test_report_to_values_as_in_hf(value, names):
    assert reporting.resolve_report_to(value) == names


@pytest.mark.parametrize("value", ["mlflow", ["none", "wandb"], ["all", "wandb"], 3, [1]])
def test_report_to_errors_name_the_key(value):
    with pytest.raises(ConfigError, match="config key 'report_to'"):
        options.resolve_options({"report_to": value}, {"model_type": "gpt2", "n_positions": 64})


def wandb_records(path):
    """The protobuf records of a `.wandb` run file: wandb's LevelDB-style log (a 7-byte file header,
    then 32 KiB blocks of chunks, each with a 7-byte header: crc32c, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(run_file):
    """(run record, config, {step: {tag: value}}) of one offline run file."""
    records = wandb_records(run_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(items.pop("_step"), {}).update(
                {k: v for k, v in items.items() if not k.startswith("_")})
    return run, config, history


def tb_scalars(tb_dir):
    """{step: {tag: value}} from the TensorBoard event files (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in glob.glob(os.path.join(tb_dir, "events.out.tfevents.*")):
        data, pos = open(path, "rb").read(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            pos += 16 + length
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(event.step, {})[v.tag] = v.simple_value
    return out


def expected_tags(out):
    """metrics.jsonl in HF's tag names."""
    expected = {}
    for m in t.read_metrics(out):
        expected.setdefault(m["step"], {}).update(reporting.hf_tags(m))
    return expected


def test_wandb_offline_and_tensorboard_get_every_metric(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_PROJECT", "reporting-test")
    (tmp_path / "wandb-dir").mkdir()
    out = tmp_path / "run"
    cfg = t.tiny_config("gpt2", out, run_name="tiny-wandb", report_to="all", max_steps=6, logging_steps=2,
                        eval_steps=3, save_steps=3)
    lines = []
    tr.train(cfg, prepared=t.corpus(), log=lines.append)
    assert not [m for m in lines if m.startswith("report_to")], lines

    run_files = glob.glob(str(tmp_path / "wandb-dir" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(run_files) == 1
    run, config, history = wandb_run(run_files[0])
    assert run.display_name == "tiny-wandb" and run.project == "reporting-test"
    saved = json.loads((out / "run_config.json").read_text())
    assert config["model"] == saved["model"] and config["train"] == saved["train"]
    assert config["train"]["report_to"] == ["tensorboard", "wandb"]
    expected = expected_tags(out)
    assert sorted(expected) == [2, 3, 4, 6]
    assert {"train/loss", "train/epoch", "train/learning_rate", "eval/loss", "eval/perplexity"} <= \
        set(expected[6])
    assert history == expected
    tb = tb_scalars(out / "tb")
    assert tb.keys() == expected.keys()
    for step, tags in expected.items():
        assert tb[step] == pytest.approx(tags, rel=1e-6)  # TensorBoard stores float32

    # Resuming in the same output_dir continues the same W&B run.
    tr.train({**cfg, "max_steps": 8}, prepared=t.corpus(), log=lambda m: None)
    runs = [wandb_run(f) for f in glob.glob(str(tmp_path / "wandb-dir" / "wandb" / "offline-run-*" / "run-*.wandb"))]
    assert len(runs) == 2 and {r[0].run_id for r in runs} == {run.run_id}
    assert max(max(r[2]) for r in runs) == 8


def test_missing_package_is_one_line_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "run"
    lines = []
    summary = tr.train(t.tiny_config("gpt2", out, report_to=["wandb"], max_steps=2, warmup_steps=1,
                                     eval_steps=2, save_steps=2),
                       prepared=t.corpus(), log=lines.append)
    notes = [m for m in lines if m.startswith("report_to")]
    assert notes == ["report_to wandb: wandb is not installed (pip install wandb); not reporting there"]
    assert summary["step"] == 2 and [m["step"] for m in t.read_metrics(out)] == [2, 2]
