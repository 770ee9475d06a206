"""Start training from a pretrained checkpoint: `model_name_or_path`, as in HF's run_clm.

The source is a local directory (a native checkpoint or any HF layout `checkpoint`
reads) or a Hub id, fetched with `huggingface_hub.snapshot_download` (offline, only a
cached id resolves). Two steps, called by the trainer:
- `merge_config`: the training config completed from the checkpoint's config. Sizes
  come from the checkpoint; a size the training config also gives must agree with it.
  The model_type and variant keys may differ from the checkpoint's as long as every
  checkpoint parameter has its place in the new model (GPT-2 -> rotating-head, dd,
  parallel, duo: the variant only adds parameters).
- `initial_params`: the checkpoint's weights in the new model's tree; parameters the
  checkpoint lacks keep their fresh initialisation; the embedding is resized to the
  tokenizer (`<|MASK|>`) with transformers' mean resizing.
A resumed run never calls `initial_params`: it continues from its own checkpoints.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np

from flax_gpt2v.hf import checkpoint, layouts as hf_layouts
from flax_gpt2v.config import MASK_TOKEN, PRESETS, ConfigError, inner_dim, padded_vocab
from flax_gpt2v.models import load_config, variant_of
from flax_gpt2v.errors import first_line
from flax_gpt2v.hf.keymap import flatten_params, flax_shapes, unflatten_params

# Keys that fix the function of the pretrained weights: the training config may repeat them, not change them.
SIZE_KEYS = ("n_layer", "n_embd", "n_head", "n_positions", "n_inner", "activation_function", "layer_norm_epsilon")
# Taken from the checkpoint unless the training config sets them (run_clm trains with the checkpoint's dropout).
TRAINING_DEFAULT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "initializer_range")
# Variant keys that depend on the tokenizer, not the checkpoint.
_TOKENIZER_KEYS = ("mask_token_id",)
WTE = "transformer/wte/embedding"
# Files a training start needs from a Hub repo (not the TF, Flax-msgpack, ONNX or rust weights).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja"]
HUB_BIN_PATTERNS = ["pytorch_model*.bin"]
# transformers >= 4.46 `resize_token_embeddings(mean_resizing=True)`: new rows ~ N(mean, EPS * cov) of the old rows.
MEAN_RESIZING_EPS = 1e-9


def resolve(name_or_path: str, cache_dir: str | None = None) -> str:
    """The local directory of `name_or_path`: itself, or the Hub snapshot of that id."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ConfigError(f"config key 'model_name_or_path': expected a directory or a Hub id, got {name_or_path!r}")
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise ConfigError(f"config key 'model_name_or_path': {name_or_path} is not a directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    from flax_gpt2v.data.tokenizer import hub_reachable

    def fetch(patterns, local_only):
        return snapshot_download(name_or_path, cache_dir=cache_dir, allow_patterns=patterns,
                                 local_files_only=local_only)

    try:
        try:
            path = fetch(HUB_PATTERNS + HUB_BIN_PATTERNS, True)
        except LocalEntryNotFoundError:
            path = None
        # A cached snapshot can be partial (only the tokenizer, say): without weights it does not count.
        if path is not None and not hf_layouts.has_weights(path):
            path = None
        if path is None and hub_reachable():
            path = fetch(HUB_PATTERNS, False)
            if not any(f.endswith(".safetensors") for f in os.listdir(path)):  # .bin only when nothing else
                path = fetch(HUB_PATTERNS + HUB_BIN_PATTERNS, False)
    except RepositoryNotFoundError:
        raise ConfigError(f"config key 'model_name_or_path': {name_or_path!r} is neither a local directory nor a "
                          "model repository on the Hub (or it is private and no token is set)") from None
    except HFValidationError:
        raise ConfigError(f"config key 'model_name_or_path': {name_or_path!r} is neither a local directory "
                          "nor a valid Hub id") from None
    except (OSError, ValueError) as e:  # huggingface_hub's not-found, gated and HTTP errors
        raise ConfigError(f"config key 'model_name_or_path': cannot fetch {name_or_path!r} from the Hub: "
                          f"{first_line(e)}") from None
    if path is None:
        raise ConfigError(f"config key 'model_name_or_path': {name_or_path!r} is not a local directory nor in the "
                          "Hugging Face cache, and the Hub is offline (HF_HUB_OFFLINE or no network)")
    return path


def merge_config(model_raw: Mapping[str, Any], train: Mapping[str, Any]) -> tuple[dict, dict]:
    """(model keys, training keys) of a run starting from train["model_name_or_path"].

    The model keys hold the checkpoint's sizes; the training keys name the checkpoint's
    tokenizer when the config names none and the checkpoint has one."""
    name = train["model_name_or_path"]
    path = resolve(name, train.get("cache_dir"))
    src = checkpoint.load_dir(path)[0]
    raw = dict(model_raw)
    given = dict(raw)
    preset = train.get("config_name")
    if isinstance(preset, str) and preset in PRESETS:
        # A preset's sizes are sizes the config gives.
        given = {**PRESETS[preset], **given}
    for key in SIZE_KEYS:
        if key not in given:
            continue
        mine, theirs = given[key], src[key]
        if key == "n_inner":
            mine, theirs = inner_dim({**src, "n_inner": mine}), inner_dim(src)
        if mine != theirs:
            where, shown = (key, repr(mine)) if key in raw else ("config_name", f"{preset}'s {key} {mine!r}")
            raise ConfigError(f"config key '{where}': {shown} contradicts the checkpoint {name} "
                              f"({key} {theirs!r}); sizes come from model_name_or_path")
        raw.pop(key, None)
    model_type = raw.setdefault("model_type", src["model_type"])
    inherited = list(SIZE_KEYS) + list(TRAINING_DEFAULT_KEYS)
    if model_type == src["model_type"]:
        inherited += [k for k in variant_of(raw).defaults if k not in _TOKENIZER_KEYS and k != "n_positions"]
    raw = {**{k: src[k] for k in inherited if k in src}, **raw}
    train = dict(train)
    if not train.get("tokenizer_name") and checkpoint.has_tokenizer(path):
        train["tokenizer_name"] = path
    check_structure(src, load_config({**raw, "vocab_size": src["vocab_size"]}), name)
    return raw, train


def check_structure(src: Mapping[str, Any], cfg: Mapping[str, Any], name: str) -> list[str]:
    """Parameters of model `cfg` that checkpoint `src` lacks (the added ones); refuses, in
    one line, a model in which some checkpoint parameter has no place."""
    theirs = {path: shape for path, shape in flax_shapes(src).items() if path != WTE}
    mine = {path: shape for path, shape in flax_shapes(cfg).items() if path != WTE}
    lost = sorted(k for k in theirs if k not in mine)
    if lost:
        raise ConfigError(f"config key 'model_type': a {describe(cfg)} model has no place for the "
                          f"{describe(src)} checkpoint {name}'s {', '.join(lost)}; starting from a checkpoint "
                          "may add parameters to it, never drop any")
    if src["model_type"] not in (cfg["model_type"], "gpt2"):
        # A variant without parameters of its own (gp rotation, duo, parallel mean) would pass the
        # parameter check above and silently lose what makes it that variant.
        raise ConfigError(f"config key 'model_type': a {src['model_type']} checkpoint ({name}) starts only a "
                          f"{src['model_type']} run; another model_type starts from a gpt2 checkpoint")
    reshaped = sorted(k for k in theirs if mine[k] != theirs[k])
    if reshaped:  # sizes agree, so only a variant key can do this
        raise ConfigError(f"config key 'model_type': {reshaped[0]} is {theirs[reshaped[0]]} in the checkpoint "
                          f"{name} and {mine[reshaped[0]]} in a {describe(cfg)} model")
    return sorted(k for k in mine if k not in theirs)


def describe(cfg: Mapping[str, Any]) -> str:
    opts = ", ".join(f"{k}={cfg[k]}" for k in variant_of(cfg).describing_keys if k != "duo_loss")
    return f"{cfg['model_type']}" + (f" ({opts})" if opts else "")


def resize_rows(old: np.ndarray, rows: int, seed: int) -> np.ndarray:
    """The embedding `old` [V0, d] with `rows` rows, as transformers >= 4.46 resizes it
    (`mean_resizing`): rows beyond V0 drawn from N(mean, 1e-9 * cov) of the old rows, or the
    mean itself when that covariance is not positive definite; fewer rows cut the table."""
    if rows <= len(old):
        return old[:rows]
    x = old.astype(np.float64)
    mean = x.mean(0)
    cov = MEAN_RESIZING_EPS * (x - mean).T @ (x - mean) / len(x)
    added = np.broadcast_to(mean, (rows - len(old), x.shape[1]))
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        pass
    else:
        added = added + np.random.default_rng(seed).standard_normal(added.shape) @ chol.T
    return np.concatenate([old, added.astype(old.dtype)])


def initial_params(train: Mapping[str, Any], cfg: Mapping[str, Any], fresh: Mapping[str, Any], seed: int,
                   log: Callable[[str], None]) -> dict:
    """The checkpoint's parameters placed in the tree of model `cfg`: those it lacks keep their
    fresh initialisation (`fresh`, the variant's own init), the embedding gets `cfg`'s rows."""
    name = train["model_name_or_path"]
    path = resolve(name, train.get("cache_dir"))
    src, params = checkpoint.load_dir(path)
    added = check_structure(src, cfg, name)
    flat, out = flatten_params(params), flatten_params(fresh)
    for key, value in flat.items():
        if not np.isfinite(value).all():  # else every step would be skipped as if the learning rate were too high
            raise checkpoint.CheckpointError(f"model_name_or_path {name}: parameter {key} holds NaN or infinite "
                                             f"values ({path}); the checkpoint is damaged, use another")
        if key != WTE:
            out[key] = np.asarray(value, np.float32)
    old_rows, rows = src["vocab_size"], cfg["vocab_size"]
    wte = resize_rows(np.asarray(flat[WTE][:old_rows], np.float32), rows, seed)
    out[WTE] = np.concatenate([wte, np.zeros((padded_vocab(cfg) - rows, wte.shape[1]), np.float32)])
    log(f"initialised from {name} ({describe(src)}, {path}); "
        + (f"added parameters, initialised as in a new {describe(cfg)} model: {', '.join(added)}"
           if added else "no added parameters"))
    if rows > old_rows:
        log(f"embeddings resized from {old_rows} to {rows} rows (the tokenizer's, with {MASK_TOKEN}); the new rows "
            "are drawn from N(mean, 1e-9 * covariance) of the old rows, as transformers' resize_token_embeddings "
            "(mean_resizing, the default since 4.46) does")
    elif rows < old_rows:
        log(f"embeddings cut from {old_rows} to the tokenizer's {rows} rows")
    return unflatten_params(out)



def place(params: Mapping[str, Any], shardings) -> Any:
    """Host arrays -> global arrays in `shardings` (each process supplies its own shards)."""
    import jax

    return jax.tree.map(lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx: a[idx]),
                        params, shardings)
