"""flax_gpt2v/durable.py: a write leaves the old file or the new one and no temporary file; a derived
file read back damaged is missing."""
import json
import os

import pytest

from flax_gpt2v import durable


def test_a_failed_write_keeps_the_old_file_and_names_the_users_path(tmp_path):
    path = tmp_path / "summary.json"
    durable.write_json(path, {"step": 1})

    def fail(f):
        f.write('{"step": 2, "lo')
        raise KeyboardInterrupt  # a stop in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        durable.write_file(path, fail)
    assert json.loads(path.read_text()) == {"step": 1} and os.listdir(tmp_path) == ["summary.json"]
    with pytest.raises(FileNotFoundError) as err:
        durable.write_text(tmp_path / "no-such-dir" / "out.json", "{}")
    assert err.value.filename == str(tmp_path / "no-such-dir" / "out.json")


def test_a_damaged_derived_file_is_missing(tmp_path):
    path, lines = tmp_path / "summary.json", []
    assert durable.read_derived_json(path, lines.append) is None and not lines  # missing: nothing to say
    for damaged, why in ((b"", "empty"), (b'{"step": 2, "lo', "JSONDecodeError"), (b"\xff\xfe", "UnicodeDecodeError"),
                         (b"[1, 2]", "not a JSON object")):
        path.write_bytes(damaged)
        assert durable.read_derived_json(path, lines.append) is None
        assert lines.pop().startswith(f"{path} is damaged ({why}") and not lines


def test_move_into_replaces_each_file_whole(tmp_path):
    (tmp_path / "tokenizer.json").write_text("old")
    (tmp_path / "kept.txt").write_text("mine")

    def write(staging):
        os.mkdir(staging)
        with open(os.path.join(staging, "tokenizer.json"), "w") as f:
            f.write("new")

    assert durable.move_into(str(tmp_path), write) == ["tokenizer.json"]
    assert sorted(os.listdir(tmp_path)) == ["kept.txt", "tokenizer.json"]
    assert (tmp_path / "tokenizer.json").read_text() == "new"
