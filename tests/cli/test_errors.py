"""The error contract of every command (README "Errors") and the converters' destination rules.

Each case runs the command (its main() in-process where cheap, the script itself where the
process matters) and checks: exit status 2, exactly one stderr line `error: ...` naming the key
or file, and every file that existed before unchanged (hashed before and after).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import safetensors.numpy

import eval_jax
import train_jax
from flax_gpt2v.training import options
from flax_gpt2v.evaluation.benchmark import main as benchmark_main
from flax_gpt2v.hf.checkpoint import NATIVE_WEIGHTS, export_hf, is_hf, is_native
from flax_gpt2v.errors import run_cli
from flax_gpt2v.config import TRAINING_KEYS, ConfigError
from helpers import ROOT, perturbed_lm

# No progress bars (they go to stderr) and never the network.
QUIET = {**os.environ, "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}


def load_script(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


TO_TORCH, FROM_TORCH = load_script("convert/to_torch.py"), load_script("convert/from_torch.py")


def tree(root) -> dict:
    """{relative path: sha256 of the file, or 'dir'} of everything under root but the data cache
    (write_config's cache_dir, which a run may fill before it fails)."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [n for n in dirs if not (d == str(root) and n == "cache")]
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), root)] = "dir"
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                out[os.path.relpath(os.path.join(d, name), root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def one_error_line(err: str, *names: str, progress: bool = False) -> str:
    """The error line; with progress, the progress bars of data preparation may precede it (in-process
    they cannot be turned off; the subprocess tests turn them off and see one line)."""
    lines = err.replace("\r", "\n").splitlines()
    if progress:
        before = "\n".join(lines[:-1])
        assert not any(w in before for w in ("Traceback", "error", "Error")), err
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def fails_cleanly(capsys, root, main, argv, *names, progress=False) -> str:
    """main(argv) exits 2 with one `error:` line naming `names`, and nothing under root (a directory
    or a list of them) changes."""
    roots = root if isinstance(root, list) else [root]
    before = [tree(r) for r in roots]
    assert main([str(a) for a in argv]) == 2
    line = one_error_line(capsys.readouterr().err, *names, progress=progress)
    assert [tree(r) for r in roots] == before
    return line


def script_fails_cleanly(root, script, argv, *names, env=QUIET) -> str:
    before = tree(root)
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, argv)], capture_output=True,
                       text=True, cwd=ROOT, env=env)
    assert p.returncode == 2, p.stderr[-3000:]
    line = one_error_line(p.stderr, *names)
    assert tree(root) == before
    return line


# ---------------------------------------------------------------- converters

@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """A small native checkpoint with tokenizer files."""
    path = tmp_path_factory.mktemp("src") / "native"
    perturbed_lm("dd-both").save(path)
    for name, text in (("vocab.json", '{"a": 0}'), ("merges.txt", "#version: 0.2\n")):
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="module")
def orbax_dir(tmp_path_factory):
    """A real Orbax CheckpointManager directory, as the trainer writes it."""
    import orbax.checkpoint as ocp
    path = tmp_path_factory.mktemp("orbax") / "checkpoints"
    with ocp.CheckpointManager(str(path)) as manager:
        manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.ones(3, np.float32)})))
        manager.wait_until_finished()
    return path


def test_force_replaces_only_the_converters_files(native, tmp_path, capsys):
    dst = tmp_path / "hf"
    assert TO_TORCH([str(native), str(dst)]) == 0
    assert (dst / "modeling_dd_gpt2.py").exists()
    # The user's own files beside the export, and a directory.
    (dst / "README.md").write_text("my notes")
    (dst / "eval").mkdir()
    (dst / "eval" / "results.json").write_text("{}")
    theirs = {k: v for k, v in tree(dst).items() if k in ("README.md", "eval", "eval/results.json")}

    # A gpt2 export replaces the dd one: its modeling file is stale (the converter's own file), removed.
    gpt2 = tmp_path / "gpt2-native"
    perturbed_lm("gpt2").save(gpt2)
    assert TO_TORCH([str(gpt2), str(dst), "--force", "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    after = tree(dst)
    assert {k: after.get(k) for k in theirs} == theirs
    assert not (dst / "modeling_dd_gpt2.py").exists() and not (dst / "vocab.json").exists()
    assert json.loads((dst / "config.json").read_text())["model_type"] == "gpt2"
    assert not [n for n in os.listdir(dst) if n.startswith(".")]  # no temporary directory left
    assert is_hf(dst)

    back = tmp_path / "back"
    assert FROM_TORCH([str(dst), str(back)]) == 0
    (back / "notes.txt").write_text("keep me")
    assert FROM_TORCH([str(dst), str(back), "--force"]) == 0
    assert (back / "notes.txt").read_text() == "keep me" and is_native(back)


# convert/to_torch.py in a process that SIGKILLs itself at the `at`-th file operation under `watched`.
KILL_AT = """
import os, runpy, shutil, signal, sys
calls = [0]
def killing(op):
    def call(*args, **kwargs):
        if any(str(a).startswith({watched!r}) for a in args):
            calls[0] += 1
            if calls[0] == {at}:
                os.kill(os.getpid(), signal.SIGKILL)
        return op(*args, **kwargs)
    return call
for module, name in ((os, "mkdir"), (os, "rename"), (os, "replace"), (os, "remove"), (os, "link"), (shutil, "rmtree")):
    setattr(module, name, killing(getattr(module, name)))
sys.argv = ["convert/to_torch.py", *{argv!r}]
runpy.run_path("convert/to_torch.py", run_name="__main__")
"""


@pytest.mark.slow
def test_force_killed_at_any_point_leaves_the_old_checkpoint_or_the_new(native, tmp_path):
    gpt2 = tmp_path / "gpt2-native"
    perturbed_lm("gpt2").save(gpt2)
    old, new = tmp_path / "old", tmp_path / "new"
    assert TO_TORCH([str(native), str(old)]) == 0
    (old / "README.md").write_text("my notes")  # the user's own files, kept by a replacement
    (old / "eval").mkdir()
    (old / "eval" / "results.json").write_text("{}")
    shutil.copytree(old, new)
    assert TO_TORCH([str(gpt2), str(new), "--force"]) == 0
    states = {"old": tree(old), "new": tree(new)}
    assert states["old"] != states["new"]
    seen = []
    for at in range(1, 100):
        out = tmp_path / f"kill-{at}"
        shutil.copytree(old, out / "hf")
        script = KILL_AT.format(watched=str(out), at=at, argv=[str(gpt2), str(out / "hf"), "--force"])
        p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=QUIET, capture_output=True, text=True)
        assert p.returncode in (0, -signal.SIGKILL), p.stderr[-3000:]
        now = tree(out / "hf")
        match = [name for name, state in states.items() if state == now]
        assert match, f"killed at file operation {at}: neither the old checkpoint nor the new: {sorted(now)}"
        seen.append(match[0])
        if p.returncode == 0:
            break
    assert seen[0] == "old" and seen[-1] == "new" and len(seen) > 2, seen


def make_run(root):
    """A training run's directory: run_config.json, checkpoints/, best/, hf/ and the final model."""
    run = root / "run"
    perturbed_lm("gpt2").save(run)
    perturbed_lm("gpt2", seed=1).save(run / "best")
    export_hf(run / "best", run / "hf")
    (run / "run_config.json").write_text(json.dumps({"model": {}, "train": {}}))
    (run / "checkpoints" / "10").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
    return run


def test_converters_refuse_a_training_run_and_its_insides(tmp_path, capsys):
    run = make_run(tmp_path)
    fails_cleanly(capsys, tmp_path, TO_TORCH, [run / "best", run, "--force"], run / "best", "inside the destination")
    fails_cleanly(capsys, tmp_path, FROM_TORCH, [run / "hf", run, "--force"], run / "hf", "inside the destination")
    # The run as destination of another model, and a directory inside it.
    other = tmp_path / "other"
    perturbed_lm("gpt2", seed=2).save(other)
    fails_cleanly(capsys, tmp_path, TO_TORCH, [other, run / "hf", "--force"], "inside the training run")
    fails_cleanly(capsys, tmp_path, TO_TORCH, [other, run / "new", "--force"], "inside the training run")
    (run / "run_config.json").unlink()  # checkpoints/ alone marks a run too
    hf = tmp_path / "hf-elsewhere"
    assert TO_TORCH([str(other), str(hf)]) == 0
    capsys.readouterr()
    fails_cleanly(capsys, tmp_path, FROM_TORCH, [hf, run, "--force"], run, "training run", "checkpoints")


def test_converters_refuse_source_and_other_checkpoints(native, orbax_dir, tmp_path, capsys):
    hf = tmp_path / "hf"
    assert TO_TORCH([str(native), str(hf)]) == 0
    capsys.readouterr()
    cases = [
        (TO_TORCH, [native, native, "--force"], "same directory"),
        (TO_TORCH, [native, native / "hf", "--force"], "inside the source"),
        (TO_TORCH, [native, tmp_path.parent, "--force"], "inside the destination"),
        # Over a checkpoint of the other kind: a native one, an HF one.
        (TO_TORCH, [native, tmp_path / "native-copy", "--force"], "another kind of checkpoint"),
        (FROM_TORCH, [hf, tmp_path / "hf-dst", "--force"], "another kind of checkpoint"),
        (TO_TORCH, [native, tmp_path / "bin", "--force"], "pytorch_model.bin"),
        (TO_TORCH, [native, orbax_dir, "--force"], "Orbax checkpoint"),
        (TO_TORCH, [native, orbax_dir / "1" / "state", "--force"], "inside the Orbax checkpoint"),
        # Files the converter would write, but not a checkpoint's.
        (FROM_TORCH, [hf, tmp_path / "project", "--force"], "config.json"),
    ]
    perturbed_lm("gpt2").save(tmp_path / "native-copy")
    assert TO_TORCH([str(native), str(tmp_path / "hf-dst")]) == 0
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text("{}")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"weights")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "config.json").write_text('{"mine": 1}')
    capsys.readouterr()
    for main, argv, message in cases:
        fails_cleanly(capsys, [tmp_path, native, orbax_dir], main, argv, message)


def test_export_refuses_non_finite_and_non_float_weights(tmp_path, capsys):
    for name, bad in (("nan", np.nan), ("inf", np.inf)):
        src = tmp_path / name
        lm = perturbed_lm("gpt2")
        lm.params["transformer"]["h"]["mlp"]["c_fc"]["bias"][1, 3] = bad  # layer 1 of the stacked layers
        lm.save(src)
        fails_cleanly(capsys, tmp_path, TO_TORCH, [src, tmp_path / f"{name}-hf"], "transformer/h/mlp/c_fc/bias",
                      "non-finite")
    src = tmp_path / "int"
    perturbed_lm("gpt2").save(src)
    weights = safetensors.numpy.load_file(src / NATIVE_WEIGHTS)
    weights["transformer/wpe/embedding"] = weights["transformer/wpe/embedding"].astype(np.int32)
    safetensors.numpy.save_file(weights, src / NATIVE_WEIGHTS)
    fails_cleanly(capsys, tmp_path, TO_TORCH, [src, tmp_path / "int-hf"], "transformer/wpe/embedding", "int32")


def test_converter_usage_and_filesystem_errors(native, tmp_path, capsys):
    fails_cleanly(capsys, tmp_path, TO_TORCH, [], "required: src, dst")
    fails_cleanly(capsys, tmp_path, TO_TORCH, [tmp_path / "missing", tmp_path / "out"], tmp_path / "missing")
    (tmp_path / "a-file").write_text("x")
    fails_cleanly(capsys, tmp_path, TO_TORCH, [native, tmp_path / "a-file", "--force"], tmp_path / "a-file")
    fails_cleanly(capsys, tmp_path, TO_TORCH, [native, tmp_path / "a-file" / "hf"], tmp_path / "a-file")


# ---------------------------------------------------------------- train_jax.py

def write_config(tmp_path, **keys) -> str:
    cfg = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 64, "block_size": 32,
           "per_device_train_batch_size": 2, "max_steps": 2, "bf16": False, "gradient_checkpointing": False,
           "export_hf": False, "report_to": "none", "cache_dir": str(tmp_path / "cache"),
           "output_dir": str(tmp_path / "run"), **keys}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def text_file(tmp_path, name="train.txt"):
    path = tmp_path / name
    with open(os.path.join(ROOT, "README.md")) as f:
        path.write_text(f.read())
    return path


@pytest.mark.parametrize("key, value, message", [
    ("learning_rate", -1, ">= 0"),
    ("learning_rate", "NaN", "finite"),
    ("seed", -1, "in [0, 2**32)"),
    ("data_seed", -1, "in [0, 2**32)"),
    ("early_stopping_patience", -1, ">= 0"),
    ("adam_beta1", 1.0, "in [0, 1)"),
    ("adam_beta2", -0.1, "in [0, 1)"),
    ("adam_epsilon", 0, "> 0"),
    ("weight_decay", -0.01, ">= 0"),
    ("max_grad_norm", 0, "> 0"),
    ("warmup_steps", 3, "longer than the run (max_steps 2)"),
])
def test_trainer_ranges(key, value, message, tmp_path, capsys):
    config = write_config(tmp_path)
    line = fails_cleanly(capsys, tmp_path, train_jax.main, ["--config", config, f"--{key}", value], f"'{key}'",
                         message)
    assert not (tmp_path / "run").exists(), line


def float_keys():
    """Every float key a run's config takes: the trainer options whose type is float, GPT-2's float
    keys and each variant's (models/variant.py `floats`)."""
    from flax_gpt2v.config import _FLOAT
    from flax_gpt2v.models import VARIANTS

    train = [f.name for f in dataclasses.fields(options.TrainOptions) if isinstance(options.default_of(f), float)]
    model = [(k, None) for k in _FLOAT] + [(k, v.model_type) for v in VARIANTS.values() for k in v.floats]
    return [(k, None) for k in train] + model


@pytest.mark.parametrize("key, model_type", float_keys())
def test_every_float_key_refuses_values_that_are_not_finite(key, model_type):
    """In-process through the config's validation (what train_jax.py runs before writing anything)."""
    for value in (float("nan"), float("inf"), float("-inf")):
        cfg = {"model_type": model_type or "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, key: value}
        with pytest.raises(ConfigError, match=rf"config key '{key}': must be a finite number"):
            options.load_run_config(cfg)


def test_config_files_that_are_not_a_json_object_name_the_file(tmp_path, capsys):
    for name, content in (("latin-1.json", '{"run_name": "caf\xe9"}'.encode("latin-1")), ("empty.json", b""),
                          ("array.json", b"[1, 2]"), ("torn.json", b'{"model_type": "gp')):
        path = tmp_path / name
        path.write_bytes(content)
        fails_cleanly(capsys, tmp_path, train_jax.main, ["--config", path], path)
    # A byte-order mark, as some editors write, is UTF-8 still.
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"model_type": "gpt2"}).encode())
    assert options.load_run_config(str(path))[1]["model_type"] == "gpt2"


def test_rows_that_are_not_text_stop_the_trainer_before_it_writes(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["some text", "more text", None]))
    config = write_config(tmp_path, train_file=str(path), streaming=True)
    line = fails_cleanly(capsys, tmp_path, train_jax.main, ["--config", config], path, "row 3, column 'text'",
                         progress=True)
    assert not (tmp_path / "run").exists(), line


def test_warmup_longer_than_an_epoch_based_run(tmp_path, capsys):
    config = write_config(tmp_path, train_file=str(text_file(tmp_path)), max_steps=-1, num_train_epochs=1,
                          warmup_steps=10 ** 6)
    assert train_jax.main(["--config", config]) == 2
    one_error_line(capsys.readouterr().err, "'warmup_steps'", "longer than the run", progress=True)


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "latin-1", "extension", "directory"])
def test_trainer_data_errors_name_the_file(case, tmp_path, capsys):
    path = tmp_path / ("train.docx" if case == "extension" else "train.txt")
    if case == "empty":
        path.write_bytes(b"")
    elif case == "binary":
        path.write_bytes(b"PK\x03\x04\x00\x00" * 100)
    elif case == "latin-1":
        path.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 100)
    elif case == "extension":
        path.write_text("text")
    elif case == "directory":
        path.mkdir()
    config = write_config(tmp_path, train_file=str(path))
    fails_cleanly(capsys, tmp_path, train_jax.main, ["--config", config], "train_file", path)


def test_trainer_data_errors_as_a_process(tmp_path):
    # The real script: too small a file (read, tokenized, then found short) and an offline dataset.
    small = tmp_path / "small.txt"
    small.write_text("hello world\n")
    script_fails_cleanly(tmp_path, "train_jax.py", ["--config", write_config(tmp_path, train_file=str(small))],
                         small, "fewer tokens than one block")
    config = write_config(tmp_path, dataset={"path": "flax-gpt2v-tests/no-such-dataset"})
    script_fails_cleanly(tmp_path, "train_jax.py", ["--config", config], "flax-gpt2v-tests/no-such-dataset")


def test_trainer_output_dir_problems(tmp_path, capsys):
    train = text_file(tmp_path)
    (tmp_path / "a-file").write_text("not a directory")
    fails_cleanly(capsys, tmp_path, train_jax.main,
                  ["--config", write_config(tmp_path, train_file=str(train), output_dir=str(tmp_path / "a-file"))],
                  "'output_dir'", tmp_path / "a-file")
    # A run whose run_config.json is junk: not resumed, not overwritten.
    for junk in ("{not json", "[1, 2]"):
        run = tmp_path / "run"
        (run / "checkpoints" / "2").mkdir(parents=True, exist_ok=True)
        (run / "run_config.json").write_text(junk)
        fails_cleanly(capsys, tmp_path, train_jax.main,
                      ["--config", write_config(tmp_path, train_file=str(train))], run / "run_config.json",
                      progress=True)


def test_trainer_read_only_output_dir():
    """A read-only output_dir, as a process. Root writes anywhere, so as root the run drops to the
    user nobody, in a directory of its own outside pytest's private one."""
    as_nobody = []
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv cannot make a directory it cannot write")
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    root = pathlib.Path(tempfile.mkdtemp(prefix="flax-gpt2v-read-only-"))
    ro = root / "ro"
    try:
        root.chmod(0o755)
        (root / "cache").mkdir()
        (root / "cache").chmod(0o777)
        ro.mkdir()
        (ro / "kept.txt").write_text("here before")
        ro.chmod(0o555)
        config = write_config(root, train_file=str(text_file(root)), output_dir=str(ro))
        before = tree(root)
        p = subprocess.run([*as_nobody, sys.executable, os.path.join(ROOT, "train_jax.py"), "--config", config],
                           capture_output=True, text=True, cwd=ROOT, env={**QUIET, "HOME": str(root / "cache")})
        assert p.returncode == 2, p.stderr[-3000:]
        one_error_line(p.stderr, ro, "Permission denied")
        assert tree(root) == before
    finally:
        if ro.exists():
            ro.chmod(0o755)
        shutil.rmtree(root)


def test_readme_option_table_is_generated():
    # The README's table is `python -m flax_gpt2v.training.options --markdown`'s output, so it cannot drift.
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    table = readme.split("<!-- options table: begin -->\n", 1)[1].split("\n<!-- options table: end -->", 1)[0]
    p = subprocess.run([sys.executable, "-m", "flax_gpt2v.training.options", "--markdown"], capture_output=True,
                       text=True, cwd=ROOT, env=QUIET)
    assert p.returncode == 0 and table == p.stdout.rstrip("\n") == options.markdown_table()


def test_train_help_lists_every_option_once(capsys):
    # Every key the trainer reads has its line: a new option without one fails here.
    read = TRAINING_KEYS - options.IGNORED_KEYS
    described = [key for _, rows in options.SECTIONS for key, _, _ in rows]
    assert sorted(described) == sorted(read)
    assert train_jax.main(["--help"]) == 0
    out = capsys.readouterr().out
    for key in read:
        assert out.count(f"  --{key} ") == 1, key
    for f in dataclasses.fields(options.TrainOptions):
        assert f"  --{f.name} {json.dumps(options.default_of(f))}\n      {f.metadata['help']}" in out
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_jax.py"), "--help"], capture_output=True,
                       text=True, cwd=ROOT, env=QUIET)
    assert p.returncode == 0 and p.stdout.strip() == out.strip()


# ---------------------------------------------------------------- eval_jax.py, benchmark.py

def test_eval_on_a_checkpoint_whose_keys_do_not_match(tmp_path, capsys):
    ck = tmp_path / "ck"
    perturbed_lm("gpt2").save(ck)
    weights = safetensors.numpy.load_file(ck / NATIVE_WEIGHTS)
    del weights["transformer/h/ln_2/bias"]
    safetensors.numpy.save_file(weights, ck / NATIVE_WEIGHTS)
    fails_cleanly(capsys, tmp_path, eval_jax.main, ["--checkpoint", ck, "--generate", "a"],
                  "missing 1 key(s): transformer/h/ln_2/bias")
    # A config that says three layers where the weights hold two.
    perturbed_lm("gpt2").save(ck, overwrite=True)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    fails_cleanly(capsys, tmp_path, eval_jax.main, ["--checkpoint", ck, "--generate", "a"],
                  "transformer/h/ln_1/scale expected (3, 32) got (2, 32)")


def test_eval_with_a_junk_run_config(tmp_path, capsys):
    ck = tmp_path / "run"
    perturbed_lm("gpt2").save(ck)  # no tokenizer files: the run's data keys name the tokenizer
    for junk in ("{not json", '{"train": [1]}'):
        (ck / "run_config.json").write_text(junk)
        fails_cleanly(capsys, tmp_path, eval_jax.main, ["--checkpoint", ck, "--generate", "a"],
                      ck / "run_config.json")


def test_eval_sizes_that_are_not_positive(tmp_path, capsys):
    # Not silently the run's block size, or the model's (0 is falsy).
    for key, value in (("--block_size", "0"), ("--block_size", "-3"), ("--batch_size", "0")):
        line = fails_cleanly(capsys, tmp_path, eval_jax.main, ["--checkpoint", tmp_path / "ck", key, value], key)
        assert line == f"error: argument {key}: must be a positive integer, got {value}"


def test_eval_and_benchmark_filesystem_errors_as_processes(tmp_path):
    script_fails_cleanly(tmp_path, "eval_jax.py", ["--compare", tmp_path / "no-run"], tmp_path / "no-run")
    script_fails_cleanly(tmp_path, "benchmark.py", ["--config", tmp_path / "missing.json"], "missing.json")
    script_fails_cleanly(tmp_path, "convert/from_torch.py", [tmp_path / "missing", tmp_path / "out"],
                         tmp_path / "missing")


def test_benchmark_usage_error_is_one_line(tmp_path, capsys):
    fails_cleanly(capsys, tmp_path, benchmark_main, ["--config", "dd-both", "--batch", "0"], "--batch")


def test_run_cli_keeps_tracebacks_for_bugs(capsys):
    def raising(e):
        def main(argv):
            raise e
        return main

    # Not the project's errors: bugs, whose traceback the user must see.
    for bug in (ValueError("a bug"), KeyError("x"), OSError(9, "Bad file descriptor")):
        with pytest.raises(type(bug)):
            run_cli(raising(bug))
    assert capsys.readouterr().err == ""
    for expected, line in ((PermissionError(13, "Permission denied", "/x/y"), "error: /x/y: Permission denied"),
                           (OSError(28, "No space left on device"), "error: No space left on device"),
                           (ConfigError("config key 'k': bad\n  value"), "error: config key 'k': bad value")):
        assert run_cli(raising(expected)) == 2
        assert capsys.readouterr().err == line + "\n"
