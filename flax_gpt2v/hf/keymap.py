"""The one table that maps Flax parameter paths to torch state-dict keys (docs/gpt2.md, docs/variants).

Everything that converts weights (native <-> HF checkpoints, the CLIs) goes
through `key_table`, so a key can only be added or renamed in one place.
Conversion is strict: every key on both sides is used exactly once and every
shape is checked; all problems are reported together in one `ConversionError`.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np

from flax_gpt2v.config import head_dim, inner_dim, padded_vocab
from flax_gpt2v.models import variant_of

# Flax leaf name -> torch leaf name; every other path component is kept as is.
_LEAF_RENAME = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# Tied to wte (docs/gpt2.md): never a Flax param, never written, accepted on import if equal.
LM_HEAD_KEY = "lm_head.weight"
_WTE_KEY = "transformer.wte.weight"
# Long lists of unexpected keys or problems are cut so the error stays one readable line.
_MAX_LISTED = 12
# The stacked layers' subtree: its leaves' slice i is the torch state dict's transformer.h.{i}.
LAYERS_PATH = "transformer/h"
# A per-layer key (torch or Flax naming): prefix, layer index, rest.
_LAYER = re.compile(r"^(.*?\bh[./])(\d+)([./].*)$")


class ConversionError(ValueError):
    """Parameters do not match the key table; lists every missing, unexpected and misshapen key."""

    def __init__(self, what: str, missing=(), unexpected=(), mismatched=(), problems=()):
        self.missing, self.unexpected = list(missing), list(unexpected)
        self.mismatched, self.problems = list(mismatched), list(problems)
        parts = list(self.problems)
        if self.missing:
            # Every missing name is shown: the key table bounds them, and a hidden one cannot be looked for.
            parts.append(f"missing {len(self.missing)} key(s): {_listing(self.missing, limit=None)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)} key(s): {_listing(self.unexpected)}")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} shape mismatch(es): " + _listing(
                [f"{k} expected {tuple(e)} got {tuple(g)}" for k, e, g in self.mismatched]))
        super().__init__(f"{what}: " + "; ".join(parts))


def _listing(items: list[str], limit: int | None = _MAX_LISTED) -> str:
    """The keys with layer indices folded, so 24 layers' worth reads as one pattern
    (transformer.h.{0-23}.attn.bias), and the names that share their layers as one brace list
    (transformer.h.2.{ln_1.weight,ln_1.bias}): short, and every name is still shown. Past `limit`
    patterns, a count of the rest."""
    groups: dict[tuple[str, str], list[int] | None] = {}
    for item in items:
        m = _LAYER.match(item)
        if m:
            groups.setdefault((m[1], m[3]), []).append(int(m[2]))
        else:
            groups[(item, "")] = None
    by_layers: dict[tuple[str, str | None], list[str]] = {}
    for (head, tail), ix in groups.items():
        by_layers.setdefault((head, _indices(ix) if ix is not None else None), []).append(tail)
    shown = []
    for (head, ix), tails in by_layers.items():
        if ix is None:
            shown.append(head)
        elif len(tails) > 1 and not any(" " in t for t in tails):  # keys, not problems naming keys
            shown.append(f"{head}{ix}{tails[0][0]}{{{','.join(t[1:] for t in tails)}}}")
        else:
            shown += [head + ix + tail for tail in tails]
    if limit is None or len(shown) <= limit:
        return ", ".join(shown)
    return ", ".join(shown[:limit]) + f", ... and {len(shown) - limit} more"


def _indices(ix: list[int]) -> str:
    if len(ix) == 1:
        return str(ix[0])
    ix = sorted(ix)
    if ix == list(range(ix[0], ix[-1] + 1)):
        return f"{{{ix[0]}-{ix[-1]}}}"
    return "{" + ",".join(map(str, ix)) + "}"


class KeyEntry(NamedTuple):
    flax_path: str
    # Slice `layer` of the stacked leaf flax_path (layers on the leading axis), or None: the whole leaf.
    layer: int | None
    torch_key: str
    shape: tuple[int, ...]  # the Flax shape (of the slice)
    # "none"; "transpose" (torch nn.Linear stores [out, in]); "pad_rows": Flax holds zero rows
    # beyond the torch rows (the embedding padded to config.padded_vocab); or "reshape": the same
    # values in the same order, with the heads on their own axes in Flax (torch's Conv1D packs them).
    transform: str
    torch_shape: tuple[int, ...]


def _torch_name(flax_path: str) -> str:
    """The torch state-dict name of a '/'-joined Flax path outside the stacked layers."""
    *parents, leaf = flax_path.split("/")
    return ".".join(parents + [_LEAF_RENAME.get(leaf, leaf)])


def _entry(flax_path: str, shape: tuple[int, ...], transform: str = "none", torch_shape=None,
           layer: int | None = None) -> KeyEntry:
    torch_key = _torch_name(flax_path)
    if layer is not None:  # slice i of transformer/h/<rest> is transformer.h.{i}.<rest>
        prefix = LAYERS_PATH.replace("/", ".")
        torch_key = f"{prefix}.{layer}.{torch_key[len(prefix) + 1:]}"
    if torch_shape is None:
        torch_shape = shape[::-1] if transform == "transpose" else shape
    return KeyEntry(flax_path, layer, torch_key, tuple(shape), transform, tuple(torch_shape))


def _to_torch(e: KeyEntry, a):
    if e.transform == "transpose":
        return np.ascontiguousarray(a.T)
    if e.transform == "reshape":
        return np.ascontiguousarray(a).reshape(e.torch_shape)
    return a[:e.torch_shape[0]] if e.transform == "pad_rows" else a


def _to_flax(e: KeyEntry, a):
    if e.transform == "transpose":
        return np.ascontiguousarray(a.T)
    if e.transform == "reshape":
        return a.reshape(e.shape)
    if e.transform == "pad_rows":
        return np.concatenate([a, np.zeros((e.shape[0] - a.shape[0], *a.shape[1:]), a.dtype)])
    return a


def layer_rows(cfg: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...], str, tuple[int, ...] | None]]:
    """(path inside a layer, Flax shape of one layer's slice, transform, torch shape or None for
    the transform's) of every per-layer parameter: GPT-2's, then the variant's own."""
    d, h, dh, inner = cfg["n_embd"], cfg["n_head"], head_dim(cfg), inner_dim(cfg)
    rows = [("ln_1/scale", (d,), "none", None), ("ln_1/bias", (d,), "none", None),
            # Conv1D's [d, 3d] columns are (q|k|v) x head x Dh, in that order.
            ("attn/c_attn/kernel", (d, 3, h, dh), "reshape", (d, 3 * d)),
            ("attn/c_attn/bias", (3, h, dh), "reshape", (3 * d,)),
            ("attn/c_proj/kernel", (h, dh, d), "reshape", (d, d)), ("attn/c_proj/bias", (d,), "none", None),
            ("ln_2/scale", (d,), "none", None), ("ln_2/bias", (d,), "none", None),
            ("mlp/c_fc/kernel", (d, inner), "none", None), ("mlp/c_fc/bias", (inner,), "none", None),
            ("mlp/c_proj/kernel", (inner, d), "none", None), ("mlp/c_proj/bias", (d,), "none", None)]
    for path, shape, *transform in variant_of(cfg).layer_params(cfg):
        rows.append((path, shape, transform[0] if transform else "none", None))
    return rows


def key_table(cfg: Mapping[str, Any]) -> list[KeyEntry]:
    """Every parameter of the model `cfg` (a validated config) describes: one entry per torch key,
    so a stacked layer leaf has n_layer entries, slice i naming `transformer.h.{i}.*`."""
    d = cfg["n_embd"]
    table = [_entry("transformer/wte/embedding", (padded_vocab(cfg), d), "pad_rows", (cfg["vocab_size"], d)),
             _entry("transformer/wpe/embedding", (cfg["n_positions"], d))]
    rows = layer_rows(cfg)
    for i in range(cfg["n_layer"]):
        table += [_entry(f"{LAYERS_PATH}/{path}", shape, transform, torch_shape, layer=i)
                  for path, shape, transform, torch_shape in rows]
    table += [_entry("transformer/ln_f/scale", (d,)), _entry("transformer/ln_f/bias", (d,))]
    table += [_entry(*row) for row in variant_of(cfg).model_params(cfg)]
    return table


def flax_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """'/'-joined Flax path -> full leaf shape (a stacked leaf: [n_layer, *slice])."""
    shapes = {}
    for e in key_table(cfg):
        shapes[e.flax_path] = e.shape if e.layer is None else (cfg["n_layer"], *e.shape)
    return shapes


def per_layer_state(flat: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The torch state dict of a flat tree in native format 2, which stored every layer apart
    (`transformer/h/{i}/...`, Conv1D's shapes: each path was its torch key with '/' for '.');
    the parameters outside the layers were as they are now. Unknown keys pass through for the
    strict conversion to name."""
    whole = {e.flax_path: e for e in key_table(cfg) if e.layer is None}
    return {(whole[path].torch_key if path in whole else _torch_name(path)):
            (_to_torch(whole[path], a) if path in whole else a) for path, a in flat.items()}


def num_params(cfg: Mapping[str, Any]) -> int:
    """The model's parameter count as exported (the embedding's padding rows not counted)."""
    return sum(int(np.prod(e.torch_shape)) for e in key_table(cfg))


def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """{'a': {'b': x}} -> {'a/b': x}; leaves are returned as given."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            for sub, leaf in flatten_params(value).items():
                flat[f"{key}/{sub}"] = leaf
        else:
            flat[str(key)] = value
    return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = leaf
    return params


def _check(what: str, arrays: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
           problems: Iterable[str] = ()) -> None:
    missing = [k for k in expected if k not in arrays]
    unexpected = sorted(k for k in arrays if k not in expected)
    mismatched = [(k, expected[k], tuple(np.shape(arrays[k]))) for k in expected
                  if k in arrays and tuple(np.shape(arrays[k])) != expected[k]]
    problems = list(problems)
    if missing or unexpected or mismatched or problems:
        raise ConversionError(what, missing, unexpected, mismatched, problems)


def check_weights(arrays: Mapping[str, Any], what: str) -> None:
    """Raise ConversionError naming every tensor that is not floating point or holds NaN/inf:
    such weights would convert without complaint and produce garbage or NaN everywhere."""
    problems = []
    for key, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind != "f" and a.dtype.name != "bfloat16":  # numpy's bfloat16 (ml_dtypes) is kind "V"
            problems.append(f"{key} is {a.dtype}, not floating point")
        elif not np.isfinite(a).all():
            problems.append(f"{key} has {int(np.size(a) - np.isfinite(a).sum())} non-finite value(s) (NaN/inf)")
    if problems:
        raise ConversionError(what, problems=[_listing(problems)])


def check_flax_params(flat: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    """Raise ConversionError unless the flat Flax params match the key table exactly."""
    _check(f"Flax params do not match a {cfg['model_type']} model", flat, flax_shapes(cfg))


def flax_to_torch_state(params: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax param tree -> torch state dict of numpy arrays (dtype kept; no lm_head.weight)."""
    flat = flatten_params(params)
    check_flax_params(flat, cfg)
    table = key_table(cfg)
    flat = {path: np.asarray(flat[path]) for path in flax_shapes(cfg)}
    padded = [e.flax_path for e in table if e.transform == "pad_rows" and np.any(flat[e.flax_path][e.torch_shape[0]:])]
    if padded:
        # Those rows never reach an output, so non-zero values mean the params were not made here.
        raise ConversionError("Flax params cannot be exported", problems=[
            f"{p} has non-zero padding rows beyond {cfg['vocab_size']}" for p in padded])
    return {e.torch_key: _to_torch(e, flat[e.flax_path] if e.layer is None else flat[e.flax_path][e.layer])
            for e in table}


def torch_to_flax_params(state: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Torch state dict (numpy arrays) -> nested Flax param tree (dtype kept)."""
    state = {k: np.asarray(v) for k, v in state.items()}
    problems = []
    if LM_HEAD_KEY in state:
        head = state.pop(LM_HEAD_KEY)
        if _WTE_KEY in state and not np.array_equal(head, state[_WTE_KEY]):
            problems.append(f"{LM_HEAD_KEY} differs from {_WTE_KEY}; only a tied LM head is supported")
    table = key_table(cfg)
    _check(f"torch state dict does not match a {cfg['model_type']} model",
           state, {e.torch_key: e.torch_shape for e in table}, problems)
    slices: dict[str, list] = {}
    for e in table:  # a stacked leaf's entries come in layer order
        slices.setdefault(e.flax_path, []).append(_to_flax(e, state[e.torch_key]))
    layered = {e.flax_path for e in table if e.layer is not None}
    return unflatten_params({path: np.stack(parts) if path in layered else parts[0]
                             for path, parts in slices.items()})
