"""Checkpoint directories: the native Flax format and Hugging Face directories (docs/export.md).

Native: `config.json` (the validated config + "flax_gpt2v_format") and
`flax_params.safetensors` (float32, keys = '/'-joined Flax paths), plus the
tokenizer files when known. HF: what `transformers` (and the original's classes)
load as-is. Every write goes to a temporary directory beside the destination
first, fsynced, which then takes its place whole, so a failed or killed write (or a power loss) never
leaves a half-written checkpoint nor destroys an existing one; replacing a
checkpoint replaces only the files this module writes (README "Conversion").
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import uuid
from typing import Any, Callable, Mapping

import numpy as np
import safetensors.numpy

from flax_gpt2v import durable
from flax_gpt2v.config import HF_MUST_BE, read_json
from flax_gpt2v.models import load_config, variant_of
from flax_gpt2v.hf.files import CONFIG_FILE, CheckpointError, read_safetensors
from flax_gpt2v.hf.keymap import (check_flax_params, check_weights, flatten_params, flax_to_torch_state,
                                  per_layer_state, torch_to_flax_params, unflatten_params)
from flax_gpt2v.hf.layouts import READ_ORDER, has_weights, read_hf_dir

# 2: the embedding holds config.padded_vocab rows (zero beyond vocab_size).
# 3: the layers stacked (transformer/h/... [n_layer, ...]), attention heads on their own axes
#    (hf/keymap.py's Flax shapes). Format 2 (transformer/h/{i}/..., Conv1D's shapes) still loads.
NATIVE_FORMAT = 3
PER_LAYER_FORMAT = 2
NATIVE_WEIGHTS = "flax_params.safetensors"
HF_WEIGHTS = "model.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILES = ("tokenizer.json", TOKENIZER_CONFIG_FILE, "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
EXPORT_DTYPES = ("float32", "bfloat16")
# Weights of other frameworks' checkpoints (ours and every HF layout we read aside), for check_destination.
OTHER_WEIGHT_FILES = ("flax_model.msgpack", "tf_model.h5")
# What the trainer writes into every output_dir (train.py), and what Orbax writes into a checkpoint.
RUN_MARKERS = ("run_config.json", "checkpoints")
ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")


def is_native(path: str | os.PathLike) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in (CONFIG_FILE, NATIVE_WEIGHTS))


def is_hf(path: str | os.PathLike) -> bool:
    """config.json and weights in any layout `load_hf_dir` reads (or a broken one it can name)."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and has_weights(path)


def has_tokenizer(directory: str | os.PathLike) -> bool:
    return bool(_tokenizer_files(directory))


def _tokenizer_files(directory: str | os.PathLike) -> list[str]:
    return [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, f))]


def save_native(path: str | os.PathLike, cfg: Mapping[str, Any], params: Mapping[str, Any],
                tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False) -> list[str]:
    """Write a native checkpoint; returns the file names written."""
    cfg = load_config(cfg)
    flat = flatten_params(params)
    check_flax_params(flat, cfg)
    arrays = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in flat.items()}

    def write(tmp: str) -> None:
        _write_json(os.path.join(tmp, CONFIG_FILE), {**cfg, "flax_gpt2v_format": NATIVE_FORMAT})
        safetensors.numpy.save_file(arrays, os.path.join(tmp, NATIVE_WEIGHTS))
        _copy_tokenizer(tokenizer_dir, tmp, cfg["n_positions"])

    return _write_dir_atomically(path, overwrite, write, _owned_files("native"))


def load_dir(path: str | os.PathLike) -> tuple[dict, dict]:
    """(validated config, nested float32 numpy params) of a native checkpoint or an HF directory in any
    published layout; a directory whose config.json is native's is read as native, so a missing weights
    file is named as such."""
    config_file = os.path.join(path, CONFIG_FILE)
    if is_native(path) or (os.path.isfile(config_file) and "flax_gpt2v_format" in read_json(config_file)):
        return load_native(path)
    if os.path.isfile(config_file):
        return load_hf_dir(path)
    raise FileNotFoundError(f"{path}: neither a flax-gpt2v checkpoint (flax_params.safetensors + config.json) "
                            "nor an HF directory (config.json + weights)")


def load_native(path: str | os.PathLike) -> tuple[dict, dict]:
    """(validated config, nested float32 numpy params) of a native checkpoint."""
    _require_files(path, (CONFIG_FILE, NATIVE_WEIGHTS), "flax_gpt2v checkpoint")
    raw = read_json(path)
    version = raw.get("flax_gpt2v_format")
    if version not in (NATIVE_FORMAT, PER_LAYER_FORMAT):
        raise CheckpointError(f"{os.path.join(path, CONFIG_FILE)}: flax_gpt2v_format is {version!r}, expected "
                              f"{NATIVE_FORMAT} (or {PER_LAYER_FORMAT}, which is converted on load)")
    cfg = load_config(raw)
    file = os.path.join(path, NATIVE_WEIGHTS)
    flat = read_safetensors(file, safetensors.numpy.load_file)
    for key, a in flat.items():
        if a.dtype != np.float32:
            raise CheckpointError(f"corrupt checkpoint: {file}: {key} is {a.dtype}, expected float32")
    if version == PER_LAYER_FORMAT:
        return cfg, torch_to_flax_params(per_layer_state(flat, cfg), cfg)
    check_flax_params(flat, cfg)
    return cfg, unflatten_params(flat)


def load_hf_dir(path: str | os.PathLike) -> tuple[dict, dict]:
    """(validated config, nested float32 numpy params) of an HF directory: ours, the original's,
    or GPT-2 in any published layout (see hf/layouts.py). The one entry point for reading them."""
    cfg, state = read_hf_dir(path)
    return cfg, torch_to_flax_params(state, cfg)


def save_hf_dir(path: str | os.PathLike, cfg: Mapping[str, Any], params: Mapping[str, Any],
                dtype: str = "float32", force: bool = False,
                tokenizer_dir: str | os.PathLike | None = None) -> dict:
    """Write an HF directory per docs/export.md; returns {"dtype": written dtype, "files": names}."""
    import torch
    import safetensors.torch

    if dtype not in EXPORT_DTYPES:
        raise CheckpointError(f"export dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    cfg = load_config(cfg)
    torch_dtype = getattr(torch, dtype)
    # np.array copies: torch.from_numpy needs a writable array and jax buffers are read-only.
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)).to(torch_dtype).contiguous()
               for k, v in flax_to_torch_state(params, cfg).items()}
    mt, variant = cfg["model_type"], variant_of(cfg)
    hf_config = {"architectures": [variant.architecture], **cfg, **HF_MUST_BE,
                 "torch_dtype": dtype, "dtype": dtype}
    modeling = None
    if variant.twin_module is not None:  # plain GPT-2 is transformers' own GPT2LMHeadModel
        from flax_gpt2v.hf.twins import TWINS, auto_map, bundle_source
        hf_config["auto_map"] = auto_map(mt)
        modeling = (TWINS[mt][2], bundle_source(mt))
    generation_config = {"_from_model_config": True, "bos_token_id": cfg["bos_token_id"],
                         "eos_token_id": cfg["eos_token_id"]}

    def write(tmp: str) -> None:
        _write_json(os.path.join(tmp, CONFIG_FILE), hf_config)
        # "format": "pt" is what transformers requires to load a safetensors file.
        safetensors.torch.save_file(tensors, os.path.join(tmp, HF_WEIGHTS), metadata={"format": "pt"})
        if modeling:
            with open(os.path.join(tmp, modeling[0]), "w") as f:
                f.write(modeling[1])
        _write_json(os.path.join(tmp, GENERATION_CONFIG_FILE), generation_config)
        _copy_tokenizer(tokenizer_dir, tmp, cfg["n_positions"])

    return {"dtype": dtype, "files": _write_dir_atomically(path, force, write, _owned_files("hf"))}


def export_hf(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "float32",
              force: bool = False) -> dict:
    """Native checkpoint `src` -> HF directory `dst`, tokenizer included; see save_hf_dir."""
    check_destination(src, dst, "hf")
    cfg, params = load_native(src)
    check_weights(flatten_params(params), f"{os.path.join(src, NATIVE_WEIGHTS)}: cannot export")
    return save_hf_dir(dst, cfg, params, dtype=dtype, force=force,
                       tokenizer_dir=src if has_tokenizer(src) else None)


def import_hf(src: str | os.PathLike, dst: str | os.PathLike, force: bool = False) -> list[str]:
    """HF directory `src` -> native checkpoint `dst`, tokenizer included; returns the file names."""
    check_destination(src, dst, "native")
    cfg, params = load_hf_dir(src)
    return save_native(dst, cfg, params, tokenizer_dir=src if has_tokenizer(src) else None,
                       overwrite=force)


def _owned_files(kind: str) -> set[str]:
    """Every file name a `kind` ("native" or "hf") checkpoint written here can hold."""
    if kind == "native":
        return {CONFIG_FILE, NATIVE_WEIGHTS, *TOKENIZER_FILES}
    from flax_gpt2v.hf.twins import TWINS
    return {CONFIG_FILE, HF_WEIGHTS, GENERATION_CONFIG_FILE, *TOKENIZER_FILES,
            *(filename for _, _, filename in TWINS.values())}


def _is_orbax(path: str, names: set[str]) -> bool:
    """An Orbax step (its markers) or a CheckpointManager directory (numbered steps)."""
    return bool(names & set(ORBAX_MARKERS)) or any(
        n.isdigit() and os.path.exists(os.path.join(path, n, ORBAX_MARKERS[0])) for n in names)


def _inside(path: str, parent: str) -> bool:
    return os.path.commonpath([path, parent]) == parent and path != parent


def check_destination(src: str | os.PathLike, dst: str | os.PathLike, kind: str) -> None:
    """Refuse a conversion whose writing could lose something: into its own source, into a training
    run or an Orbax checkpoint, or over a directory that is not a `kind` checkpoint already (one that
    is, a previous conversion's output, is replaced only with force; see _write_dir_atomically)."""
    s, d = os.path.realpath(src), os.path.realpath(dst)
    if s == d:
        raise CheckpointError(f"source and destination are the same directory: {src}")
    if _inside(s, d):
        raise CheckpointError(f"the source {src} is inside the destination {dst}; write to another directory")
    if _inside(d, s):
        raise CheckpointError(f"the destination {dst} is inside the source {src}; write to another directory")
    parent = d
    while parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
        # Only probes: an ancestor may be searchable but not readable.
        if os.path.isfile(os.path.join(parent, RUN_MARKERS[0])):
            raise CheckpointError(f"the destination {dst} is inside the training run {parent}; "
                                  "write to a directory outside it")
        if any(os.path.exists(os.path.join(parent, m)) for m in ORBAX_MARKERS):
            raise CheckpointError(f"the destination {dst} is inside the Orbax checkpoint {parent}; "
                                  "write to a directory outside it")
    if not os.path.isdir(d):
        return
    names = set(os.listdir(d))
    if names & set(RUN_MARKERS):
        raise CheckpointError(f"{dst} is a training run (it has {', '.join(sorted(names & set(RUN_MARKERS)))}); "
                              "write to a directory outside it")
    if _is_orbax(d, names):
        raise CheckpointError(f"{dst} is an Orbax checkpoint; write to another directory")
    weight_files = {NATIVE_WEIGHTS, *READ_ORDER, *OTHER_WEIGHT_FILES}  # a directory with one is a checkpoint
    weights = {NATIVE_WEIGHTS if kind == "native" else HF_WEIGHTS}
    if CONFIG_FILE in names and names & weight_files == weights:
        return  # a `kind` checkpoint: replaced with force only
    others = sorted(names & weight_files - weights)
    if others:
        raise CheckpointError(f"{dst} is another kind of checkpoint (it has {', '.join(others)}); "
                              f"refusing to write a {'native' if kind == 'native' else 'Hugging Face'} "
                              "checkpoint into it")
    clash = sorted(names & _owned_files(kind))
    if clash:
        raise CheckpointError(f"{os.path.join(dst, clash[0])} exists and is not part of a checkpoint; "
                              "refusing to replace it")


def _require_files(path: str | os.PathLike, names: tuple[str, ...], kind: str) -> None:
    if not os.path.isdir(path):
        raise CheckpointError(f"not a {kind}: {path} is not a directory")
    missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise CheckpointError(f"not a {kind}: {path} has no {', '.join(missing)}")


def _write_json(file: str, data: Mapping[str, Any]) -> None:
    # Into the temporary directory, which _write_dir_atomically fsyncs whole before it takes its place.
    with open(file, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _copy_tokenizer(src: str | os.PathLike | None, dst: str, n_positions: int) -> None:
    if src is None:
        return
    names = _tokenizer_files(src)
    if not names:
        raise CheckpointError(f"no tokenizer files in {src} (looked for {', '.join(TOKENIZER_FILES)})")
    for name in names:
        if name == TOKENIZER_CONFIG_FILE:
            # A checkpoint's tokenizer is its model's: it allows the model's positions (512 for
            # duo-predict), whatever the directory it comes from said.
            _write_json(os.path.join(dst, name), {**read_json(os.path.join(src, name)),
                                                  "model_max_length": n_positions})
        else:
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def _write_dir_atomically(path: str | os.PathLike, replace: bool, write: Callable[[str], None],
                          owned: set[str]) -> list[str]:
    """Run write(tmp_dir) beside `path`, then put it in place whole; returns the names written.

    A new directory is renamed into place. An existing one is replaced by swapping: the new directory
    first gets hard links to everything of the old one that is not `owned` (the names such a checkpoint
    can hold: the user's own files stay, stale tokenizer or modeling files go), then the two are
    exchanged in one rename and the old one removed. A reader, or a process killed at any point, sees
    the old checkpoint or the new one, never a new config beside old weights.
    """
    path = os.path.abspath(path)
    exists = os.path.lexists(path)
    if exists:
        if not os.path.isdir(path):
            raise CheckpointError(f"{path} exists and is not a directory")
        if os.listdir(path) and not replace:
            raise CheckpointError(f"{path} already exists and is not empty; refusing to overwrite it "
                                  "without force")
        path = os.path.realpath(path)  # a link to the checkpoint: the directory it names is replaced
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    # Beside the destination, on its filesystem, so that the renames are atomic.
    tmp = os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        write(tmp)
        files = sorted(os.listdir(tmp))
        durable.fsync_tree(tmp)  # on disk before it takes the old one's place
        if exists:
            for entry in sorted(set(os.listdir(path)) - owned):
                _link_tree(os.path.join(path, entry), os.path.join(tmp, entry))
            _exchange(tmp, path)  # tmp now holds the old checkpoint
        else:
            os.rename(tmp, path)
        durable.fsync_dir(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def _link_tree(src: str, dst: str) -> None:
    """Hard links: the user's files are not copied, however large, and stay theirs."""
    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, symlinks=True, copy_function=_link)
    elif os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    else:
        _link(src, dst)


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


# renameat2(2): the current directory as the base of relative paths, and the flag that swaps two paths.
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: str, b: str) -> None:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE). Where the system or the
    filesystem cannot, three renames: a kill between the first two leaves the old checkpoint beside,
    as `a`.old, and no checkpoint at `b`."""
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "renameat2") and libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                                                     _RENAME_EXCHANGE) == 0:
        return
    aside = f"{a}.old"
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)
