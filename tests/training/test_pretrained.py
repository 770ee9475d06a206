"""Training started from a pretrained checkpoint (`model_name_or_path`, flax_gpt2v/pretrained.py),
checked against transformers' own GPT2LMHeadModel, its save_pretrained files and its
resize_token_embeddings, and against huggingface_hub's cache layout."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from http.server import BaseHTTPRequestHandler

import jax
import numpy as np
import pytest
import torch
import transformers

import flax_gpt2v as fg
from flax_gpt2v.hf import checkpoint
from flax_gpt2v.data import pipeline as data
from flax_gpt2v.training import pretrained
from flax_gpt2v.training import options, trainer as tr
from flax_gpt2v.config import ConfigError
from flax_gpt2v.hf.keymap import flatten_params, torch_to_flax_params
from helpers import (FP32_TOL, ROOT, TESTS, TINY, corpus, openai_config, read_metrics, reference_gpt2, save_layout,
                     serving, tiny_config, write_small_tokenizer)

# Chosen once: the trainer's fp32 chunked loss against transformers' loss on the same rows.
LOSS_RTOL = 1e-5
ADDED = {  # model_type + variant keys -> the parameters a GPT-2 checkpoint lacks, as the log groups them
    ("rotating-head-gpt2", "lr", False): ["transformer/h/attn/rope/frequencies"],
    ("rotating-head-gpt2", "gp", True): ["transformer/h/attn/rope/layer_norm/bias",
                                         "transformer/h/attn/rope/layer_norm/scale"],
    ("dd-gpt2",): ["transformer/h/attn/baseline", "transformer/h/attn/diffusion_param",
                   "transformer/h/attn/drift_param"],
    ("parallel-gpt2",): ["transformer/bottleneck/bias", "transformer/bottleneck/kernel"],
    ("duo-predict-gpt2",): [],
}
VARIANT_KEYS = {"rotating-head-gpt2": ("rotatinghead", "use_norm"), "parallel-gpt2": ()}


def hf_gpt2(path, vocab=257, seed=0, **kw):
    """A GPT2LMHeadModel of TINY's sizes saved by transformers' save_pretrained; its weights
    perturbed so that every one matters."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=TINY["n_positions"], n_embd=TINY["n_embd"],
                                     n_layer=TINY["n_layer"], n_head=TINY["n_head"], resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab - 1, eos_token_id=vocab - 1,
                                     **kw)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def cfg_from(ckpt, out, **kw):
    """test_train's tiny run, started from `ckpt`; TINY's sizes repeat the checkpoint's."""
    return tiny_config(kw.pop("model_type", "gpt2"), out, model_name_or_path=str(ckpt), **{"warmup_steps": 1, **kw})


def test_step_zero_is_the_transformers_checkpoint(tmp_path):
    """A run from transformers' save_pretrained files: its first loss is transformers' loss on the
    same rows, and its initial parameters are the checkpoint's, bit for bit."""
    ckpt, out = tmp_path / "gpt2", tmp_path / "run"
    model = hf_gpt2(ckpt)
    lines = []
    tr.train(cfg_from(ckpt, out, max_steps=2, logging_steps=1, eval_steps=2, save_steps=2), prepared=corpus(),
             log=lines.append)
    assert any(f"initialised from {ckpt} (gpt2" in line and "no added parameters" in line for line in lines), lines
    c = corpus()
    rows = c.train[data.BatchSchedule(len(c.train), 8, 0).indices(0)]
    with torch.no_grad():
        expected = model(torch.from_numpy(rows).long(), labels=torch.from_numpy(rows).long()).loss.item()
    first = next(m for m in read_metrics(out) if m["step"] == 1)
    assert first["loss"] == pytest.approx(expected, rel=LOSS_RTOL)

    cfg = options.load_run_config(cfg_from(ckpt, out, vocab_size=257))[1]
    params = pretrained.initial_params({"model_name_or_path": str(ckpt)}, cfg, fg.init(cfg, seed=1).params, 0,
                                       lambda m: None)
    state = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for key, value in flatten_params(torch_to_flax_params(state, cfg)).items():
        np.testing.assert_array_equal(flatten_params(params)[key], value, err_msg=key)
    ids = np.random.default_rng(0).integers(0, 257, (2, 20))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(fg.LM(cfg, params)(ids)), ref, **FP32_TOL)


@pytest.mark.parametrize("variant", list(ADDED), ids=lambda v: "-".join(map(str, v)))
def test_gpt2_checkpoint_into_a_variant(variant, tmp_path):
    """GPT-2's weights go into the variant unchanged; the parameters GPT-2 lacks keep the
    variant's own initialisation and are listed in the log."""
    model_type, *values = variant
    keys = dict(zip(VARIANT_KEYS.get(model_type, ()), values))
    if model_type == "parallel-gpt2":
        keys["bottleneck_method"] = "concat"
    ckpt = tmp_path / "gpt2"
    hf_gpt2(ckpt)
    cfg = options.load_run_config(cfg_from(ckpt, tmp_path / "run", model_type=model_type, vocab_size=257, **keys))[1]
    assert {k: cfg[k] for k in keys} == keys
    fresh = fg.init(cfg, seed=3).params
    lines = []
    params = flatten_params(pretrained.initial_params({"model_name_or_path": str(ckpt)}, cfg, fresh, 0,
                                                      lines.append))
    src = flatten_params(checkpoint.load_hf_dir(ckpt)[1])
    for key, value in params.items():
        np.testing.assert_array_equal(value, src[key] if key in src else flatten_params(fresh)[key], err_msg=key)
    added = sorted(k for k in params if k not in src)
    assert added == ADDED[variant]
    assert len(lines) == 1 and (", ".join(ADDED[variant]) if added else "no added parameters") in lines[0]


def test_rotating_head_from_gpt2_trains(tmp_path):
    ckpt, out = tmp_path / "gpt2", tmp_path / "run"
    hf_gpt2(ckpt)
    lines = []
    tr.train(cfg_from(ckpt, out, model_type="rotating-head-gpt2", rotatinghead="lr", use_norm=False,
                      max_steps=3, eval_steps=3, save_steps=3), prepared=corpus(), log=lines.append)
    assert any("added parameters, initialised as in a new rotating-head-gpt2 (rotatinghead=lr" in line
               and "transformer/h/attn/rope/frequencies" in line for line in lines), lines
    assert fg.load(out).config["model_type"] == "rotating-head-gpt2"
    assert np.isfinite(read_metrics(out)[-1]["eval_loss"])


@pytest.mark.parametrize("source, target, lost", [
    (dict(model_type="dd-gpt2"), dict(model_type="gpt2"), "drift_param"),
    (dict(model_type="rotating-head-gpt2", rotatinghead="lr"), dict(rotatinghead="gp"), "rope/frequencies"),
    (dict(model_type="parallel-gpt2", bottleneck_method="concat"), dict(bottleneck_method="mean"), "bottleneck"),
])
def test_a_checkpoint_parameter_is_never_dropped(source, target, lost, tmp_path):
    ckpt = tmp_path / "src"
    fg.init({**TINY, "vocab_size": 257, **source}).save(ckpt)  # a native checkpoint
    cfg = {**cfg_from(ckpt, tmp_path / "run", model_type=source["model_type"]), **target}
    with pytest.raises(ConfigError, match=f"config key 'model_type': .*{lost}.*never drop any") as e:
        options.load_run_config(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("source, target", [
    (dict(model_type="rotating-head-gpt2", rotatinghead="gp"), dict(model_type="gpt2")),
    (dict(model_type="duo-predict-gpt2"), dict(model_type="gpt2")),
    (dict(model_type="parallel-gpt2", bottleneck_method="mean"), dict(model_type="dd-gpt2")),
])
def test_a_variant_without_parameters_of_its_own_starts_only_its_own_type(source, target, tmp_path):
    # Nothing of these checkpoints would be dropped, but the variant itself would be.
    ckpt = tmp_path / "src"
    fg.init({**TINY, "vocab_size": 257, **source}).save(ckpt)
    cfg = cfg_from(ckpt, tmp_path / "run", **target)
    with pytest.raises(ConfigError, match=f"config key 'model_type': a {source['model_type']} checkpoint .* "
                                          "starts only a") as e:
        options.load_run_config(cfg)
    assert "\n" not in str(e.value)


def test_same_variant_keeps_the_checkpoints_variant_keys(tmp_path):
    ckpt = tmp_path / "src"
    fg.init({**TINY, "vocab_size": 257, "model_type": "rotating-head-gpt2", "rotatinghead": "lr",
             "use_norm": True, "base_frequency": 500.0}).save(ckpt)
    cfg = {k: v for k, v in cfg_from(ckpt, tmp_path / "run", model_type="gpt2").items()
           if k not in ("model_type", "n_layer")}
    model_cfg = options.load_run_config(cfg)[1]
    assert (model_cfg["model_type"], model_cfg["rotatinghead"], model_cfg["use_norm"],
            model_cfg["base_frequency"]) == ("rotating-head-gpt2", "lr", True, 500.0)


@pytest.mark.parametrize("override, key", [
    (dict(n_layer=4), "n_layer"), (dict(n_embd=64, n_head=8), "n_embd"), (dict(n_positions=32), "n_positions"),
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon"), (dict(n_inner=64), "n_inner"),
    (dict(config_name="gpt2-medium"), "config_name"),
])
def test_contradicting_size_names_the_key(override, key, tmp_path):
    ckpt = tmp_path / "gpt2"
    hf_gpt2(ckpt)
    cfg = {k: v for k, v in cfg_from(ckpt, tmp_path / "run").items() if k not in TINY or k.endswith("pdrop")}
    assert options.load_run_config({**cfg, "n_inner": 4 * TINY["n_embd"]})[1]["n_layer"] == TINY["n_layer"]
    with pytest.raises(ConfigError, match=f"^config key '{key}': .* contradicts the checkpoint {ckpt}"):
        options.load_run_config({**cfg, **override})


def test_config_name_is_a_preset_for_training_from_scratch():
    cfg = options.load_run_config({"config_name": "gpt2", "model_type": "dd-gpt2"})[1]
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"]) == (12, 768, 12)
    with pytest.raises(ConfigError, match="config key 'config_name': unknown preset 'gpt3'"):
        options.load_run_config({"config_name": "gpt3"})
    # The project's experiment files train from scratch at gpt2-medium's sizes, as the original did.
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        raw = json.load(open(os.path.join(ROOT, "configs", name)))
        assert "model_name_or_path" not in raw, name


def _hub_cache(root, repo, files_from):
    """huggingface_hub's cache layout: <root>/models--org--name/{refs/main, snapshots/<rev>/...}."""
    base = root / ("models--" + repo.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(files_from, base / "snapshots" / rev)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    return base / "snapshots" / rev


def test_cached_hub_id_resolves_offline_with_its_tokenizer(tmp_path, monkeypatch):
    """A Hub id in huggingface_hub's cache, offline: its config gives the sizes, its tokenizer
    (300 tokens, + <|MASK|>) the vocabulary, and the embedding grows by the mask's row."""
    from huggingface_hub import constants

    ckpt = tmp_path / "gpt2"
    hf_gpt2(ckpt, vocab=300)
    texts = [open(os.path.join(ROOT, "README.md")).read()]
    write_small_tokenizer(ckpt, texts, vocab_size=300)
    snapshot = _hub_cache(tmp_path / "hub", "org/tiny-gpt2", ckpt)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model_raw, cfg, _, train = options.load_run_config({"model_name_or_path": "org/tiny-gpt2"})
    assert (cfg["model_type"], cfg["n_layer"], cfg["n_embd"], cfg["n_positions"]) == ("gpt2", 2, 32, 64)
    assert train["tokenizer_name"] == str(snapshot)
    assert options.load_run_config({"model_name_or_path": "org/tiny-gpt2",
                               "tokenizer_name": "gpt2"})[3]["tokenizer_name"] == "gpt2"
    (tmp_path / "train.txt").write_text(texts[0])
    prepared = data.prepare_data({**train, "train_file": str(tmp_path / "train.txt"), "block_size": 16},
                                 str(tmp_path / "cache"), log=lambda m: None)
    assert (prepared.tokenizer.source, prepared.tokenizer.vocab_size) == (str(snapshot), 301)
    cfg = options.fit_to_tokenizer(model_raw, train, prepared.tokenizer)
    lines = []
    params = pretrained.initial_params(train, cfg, fg.init(cfg).params, 0, lines.append)
    assert params["transformer"]["wte"]["embedding"].shape == (384, 32)
    assert any("resized from 300 to 301 rows" in line for line in lines), lines


def test_recipe_from_the_published_gpt2_layout(tmp_path, monkeypatch):
    """The README recipe on a Hub id cached in the OpenAI gpt2 repos' layout (pytorch_model.bin only,
    GPT2Model key names, attention buffers, old config keys) with its tokenizer: rotating heads
    train from it; in a gpt2 model its weights give transformers' logits."""
    from huggingface_hub import constants

    model = reference_gpt2(0, vocab_size=300)
    src = tmp_path / "src"
    save_layout(src, model.state_dict(), openai_config(model.config), "openai-bin")
    text = open(os.path.join(ROOT, "README.md")).read()
    write_small_tokenizer(src, [text], vocab_size=300)
    _hub_cache(tmp_path / "hub", "openai-community/gpt2", src)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "train.txt").write_text(text)
    run = {"model_name_or_path": "openai-community/gpt2", "model_type": "rotating-head-gpt2", "rotatinghead": "lr",
           "train_file": str(tmp_path / "train.txt"), "block_size": 16, "per_device_train_batch_size": 4,
           "max_steps": 2, "warmup_steps": 1, "eval_steps": 2, "save_steps": 2, "logging_steps": 1, "bf16": False,
           "gradient_checkpointing": False, "export_hf": False, "report_to": "none", "seed": 0,
           "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "hub")}
    lines = []
    tr.train(run, log=lines.append)
    text_log = "\n".join(lines)
    assert "initialised from openai-community/gpt2 (gpt2" in text_log
    assert "rotating-head-gpt2 (rotatinghead=lr" in text_log and "transformer/h/attn/rope/frequencies" in text_log
    assert "embeddings resized from 300 to 301 rows" in text_log
    trained = fg.load(tmp_path / "run")
    assert (trained.config["n_inner"], trained.config["layer_norm_epsilon"], trained.config["vocab_size"]) == \
        (40, 1e-3, 301)

    cfg = options.load_run_config({"model_name_or_path": "openai-community/gpt2", "vocab_size": 301})[1]
    params = pretrained.initial_params({"model_name_or_path": "openai-community/gpt2"}, cfg, fg.init(cfg).params,
                                       0, lambda m: None)
    ids = np.random.default_rng(1).integers(0, 300, (2, 24))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    # The added <|MASK|> row only adds a column: the old tokens' logits are transformers'.
    np.testing.assert_allclose(np.asarray(fg.LM(cfg, params)(ids))[..., :300], ref, **FP32_TOL)


class DownloadHub:
    """A stand-in Hub on 127.0.0.1 serving one model repository from a directory: just the
    endpoints huggingface_hub's snapshot_download calls (revision info, file tree, resolve)."""
    SHA = "c" * 40

    def __init__(self, repo, directory):
        files = {f: open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory))}
        self.downloaded = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status, body, content_type="application/json", **headers):
                self.send_response(status)
                for k, v in {"Content-Type": content_type, **headers}.items():
                    self.send_header(k.replace("_", "-"), v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?")[0]
                if path == f"/api/models/{repo}/revision/main":
                    siblings = [{"rfilename": f} for f in files]
                    return self.send(200, json.dumps({"id": repo, "sha": hub.SHA, "siblings": siblings}).encode())
                if path == f"/api/models/{repo}/tree/{hub.SHA}":
                    tree = [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                            for f, d in files.items()]
                    return self.send(200, json.dumps(tree).encode())
                m = re.fullmatch(f"/{repo}/resolve/{hub.SHA}/(.+)", path)
                if m and m.group(1) in files:
                    data = files[m.group(1)]
                    if self.command == "GET":
                        hub.downloaded.append(m.group(1))
                    return self.send(200, data, "application/octet-stream", X_Repo_Commit=hub.SHA,
                                     ETag=f'"{hashlib.sha1(data).hexdigest()}"')
                self.send(404, b'{"error": "Repository not found"}', X_Error_Code="RepoNotFound")

            do_HEAD = do_GET

        self.handler, self.endpoint = Handler, None

    @contextlib.contextmanager
    def running(self):
        with serving(self.handler) as self.endpoint:
            yield self


def test_hub_id_downloads_what_training_needs(tmp_path):
    """Online, a Hub id is downloaded into the cache: config, tokenizer and the weights it has
    (.bin when there is no safetensors), not the other frameworks' files; an unknown id is one line."""
    model = reference_gpt2(0, vocab_size=300)
    src = tmp_path / "repo"
    save_layout(src, model.state_dict(), openai_config(model.config), "openai-bin")
    write_small_tokenizer(src, [open(os.path.join(ROOT, "README.md")).read()], vocab_size=300)
    (src / "tf_model.h5").write_bytes(b"TensorFlow weights training must not download")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_HUB_CACHE", None)
    script = ("from flax_gpt2v.training import options; import json, sys; "
              "_, cfg, _, t = options.load_run_config({'model_name_or_path': sys.argv[1]}); "
              "print(json.dumps([cfg['n_layer'], cfg['n_inner'], t['tokenizer_name']]))")
    with DownloadHub("openai-community/gpt2", src).running() as hub:
        env["HF_ENDPOINT"] = hub.endpoint
        r = subprocess.run([sys.executable, "-c", script, "openai-community/gpt2"], capture_output=True, text=True,
                           cwd=ROOT, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        n_layer, n_inner, tokenizer = json.loads(r.stdout.splitlines()[-1])
        assert (n_layer, n_inner) == (2, 40)
        snapshot = tmp_path / "hf" / "hub" / "models--openai-community--gpt2" / "snapshots" / hub.SHA
        assert tokenizer == str(snapshot)
        assert sorted(os.listdir(snapshot)) == sorted(f for f in os.listdir(src) if f != "tf_model.h5")
        assert "tf_model.h5" not in hub.downloaded

        cfg = tmp_path / "cfg.json"
        cfg.write_text(json.dumps({"model_name_or_path": "org/none", "output_dir": str(tmp_path / "run")}))
        r = subprocess.run([sys.executable, os.path.join(ROOT, "train_jax.py"), "--config", str(cfg)],
                           capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 2
    assert r.stderr == ("error: config key 'model_name_or_path': 'org/none' is neither a local directory nor a "
                        "model repository on the Hub (or it is private and no token is set)\n")


def test_uncached_hub_id_offline_is_one_line(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model_name_or_path": "org/not-cached", "output_dir": str(tmp_path / "run")}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_jax.py"), "--config", str(cfg)],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 2
    assert r.stderr == ("error: config key 'model_name_or_path': 'org/not-cached' is not a local directory nor "
                        "in the Hugging Face cache, and the Hub is offline (HF_HUB_OFFLINE or no network)\n")
    assert not os.path.exists(tmp_path / "run")


def test_mask_token_rows_as_transformers_resizes(tmp_path):
    """<|MASK|> added to a 256-token checkpoint: the old rows stay, the new row is drawn around
    their mean (transformers' mean_resizing); where their covariance is singular it is the mean,
    exactly the row transformers' resize_token_embeddings gives."""
    ckpt = tmp_path / "gpt2"
    hf_gpt2(ckpt, vocab=256)
    cfg = options.load_run_config(cfg_from(ckpt, tmp_path / "run", vocab_size=257))[1]
    lines = []
    params = pretrained.initial_params({"model_name_or_path": str(ckpt)}, cfg, fg.init(cfg).params, 0,
                                       lines.append)
    wte, old = params["transformer"]["wte"]["embedding"], checkpoint.load_hf_dir(ckpt)[1]["transformer"]["wte"]["embedding"]
    np.testing.assert_array_equal(wte[:256], old[:256])
    assert wte.shape[0] == 384 and not wte[257:].any()  # padded to a multiple of 128 with zeros
    mean, std = old[:256].astype(np.float64).mean(0), old[:256].std(0)
    assert np.all(np.abs(wte[256] - mean) <= 6 * np.sqrt(1e-9) * std + 1e-7)
    assert not np.array_equal(wte[256], mean.astype(np.float32))  # drawn, not the mean itself
    assert any("resized from 256 to 257 rows" in line and "mean_resizing" in line for line in lines)

    small = hf_gpt2(tmp_path / "small", vocab=16)  # 16 rows in 32 dims: a singular covariance
    old = small.transformer.wte.weight.detach().numpy().copy()
    small.resize_token_embeddings(18)
    np.testing.assert_allclose(pretrained.resize_rows(old, 18, seed=0),
                               small.transformer.wte.weight.detach().numpy(), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(pretrained.resize_rows(old, 10, seed=0), old[:10])


KILLED_RUN = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
import helpers as t
from flax_gpt2v.training import trainer as tr
from flax_gpt2v.data import pipeline as data
indices = data.BatchSchedule.indices
def dying_indices(self, step):
    if step == {kill_at}:
        time.sleep(1.0)  # lets the asynchronous checkpoint land, as it would in a long run
        os.kill(os.getpid(), signal.SIGKILL)
    return indices(self, step)
data.BatchSchedule.indices = dying_indices
tr.train({cfg!r}, prepared=t.corpus(), log=print)
"""


def test_resume_continues_the_run_not_the_checkpoint(tmp_path):
    """Killed after its step-4 checkpoint, a run from a checkpoint resumes from its own
    checkpoints: replacing the source's weights meanwhile changes nothing."""
    ckpt, ref, out = tmp_path / "gpt2", tmp_path / "ref", tmp_path / "killed"
    hf_gpt2(ckpt)
    extra = dict(max_steps=6, save_steps=2, eval_steps=2, logging_steps=1)
    tr.train(cfg_from(ckpt, ref, **extra), prepared=corpus(), log=lambda m: None)
    script = KILLED_RUN.format(tests=TESTS, kill_at=5, cfg=cfg_from(ckpt, out, **extra))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert max(int(s) for s in os.listdir(out / "checkpoints") if s.isdigit()) == 4
    hf_gpt2(ckpt, seed=1)  # the source now holds other weights
    assert not np.array_equal(checkpoint.load_hf_dir(ckpt)[1]["transformer"]["ln_f"]["scale"],
                              fg.load(ref).params["transformer"]["ln_f"]["scale"])
    lines = []
    tr.train(cfg_from(ckpt, out, **extra), prepared=corpus(), log=lines.append)
    assert any("resumed from" in line for line in lines) and not any("initialised from" in line for line in lines)
    assert read_metrics(out) == read_metrics(ref)
    for x, y in zip(jax.tree.leaves(fg.load(ref).params), jax.tree.leaves(fg.load(out).params)):
        np.testing.assert_array_equal(x, y)
