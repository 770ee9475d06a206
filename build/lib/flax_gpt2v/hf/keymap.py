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

from flax_gpt2v.config import inner_dim, padded_vocab
from flax_gpt2v.models import variant_of

# Flax leaf name -> torch leaf name; every other path component is kept as is.
_LEAF_RENAME = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# Tied to wte (docs/gpt2.md): never a Flax param, never written, accepted on import if equal.
LM_HEAD_KEY = "lm_head.weight"
_WTE_KEY = "transformer.wte.weight"
# Long lists of unexpected keys or problems are cut so the error stays one readable line.
_MAX_LISTED = 12
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
    torch_key: str
    shape: tuple[int, ...]  # the Flax shape
    # "none"; "transpose" (torch nn.Linear stores [out, in]); or "pad_rows": Flax holds
    # zero rows beyond the torch rows (the embedding padded to config.padded_vocab).
    transform: str
    torch_shape: tuple[int, ...]


def _entry(flax_path: str, shape: tuple[int, ...], transform: str = "none", torch_shape=None) -> KeyEntry:
    *parents, leaf = flax_path.split("/")
    torch_key = ".".join(parents + [_LEAF_RENAME.get(leaf, leaf)])
    if torch_shape is None:
        torch_shape = shape[::-1] if transform == "transpose" else shape
    return KeyEntry(flax_path, torch_key, tuple(shape), transform, tuple(torch_shape))


def _to_torch(e: KeyEntry, a):
    if e.transform == "transpose":
        return np.ascontiguousarray(a.T)
    return a[:e.torch_shape[0]] if e.transform == "pad_rows" else a


def _to_flax(e: KeyEntry, a):
    if e.transform == "transpose":
        return np.ascontiguousarray(a.T)
    if e.transform == "pad_rows":
        return np.concatenate([a, np.zeros((e.shape[0] - a.shape[0], *a.shape[1:]), a.dtype)])
    return a


def key_table(cfg: Mapping[str, Any]) -> list[KeyEntry]:
    """Every parameter of the model `cfg` (a validated config) describes."""
    d, inner = cfg["n_embd"], inner_dim(cfg)
    variant = variant_of(cfg)
    rows = [("transformer/wpe/embedding", (cfg["n_positions"], d))]
    for i in range(cfg["n_layer"]):
        p = f"transformer/h/{i}/"
        rows += [(p + "ln_1/scale", (d,)), (p + "ln_1/bias", (d,)),
                 (p + "attn/c_attn/kernel", (d, 3 * d)), (p + "attn/c_attn/bias", (3 * d,)),
                 (p + "attn/c_proj/kernel", (d, d)), (p + "attn/c_proj/bias", (d,)),
                 (p + "ln_2/scale", (d,)), (p + "ln_2/bias", (d,)),
                 (p + "mlp/c_fc/kernel", (d, inner)), (p + "mlp/c_fc/bias", (inner,)),
                 (p + "mlp/c_proj/kernel", (inner, d)), (p + "mlp/c_proj/bias", (d,))]
        rows += [(p + path, *rest) for path, *rest in variant.layer_params(cfg)]
    rows += [("transformer/ln_f/scale", (d,)), ("transformer/ln_f/bias", (d,))]
    table = [_entry("transformer/wte/embedding", (padded_vocab(cfg), d), "pad_rows", (cfg["vocab_size"], d))]
    table += [_entry(*row) for row in rows]
    table += [_entry(*row) for row in variant.model_params(cfg)]
    return table


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
    _check(f"Flax params do not match a {cfg['model_type']} model",
           flat, {e.flax_path: e.shape for e in key_table(cfg)})


def flax_to_torch_state(params: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax param tree -> torch state dict of numpy arrays (dtype kept; no lm_head.weight)."""
    flat = flatten_params(params)
    check_flax_params(flat, cfg)
    table = key_table(cfg)
    flat = {e.flax_path: np.asarray(flat[e.flax_path]) for e in table}
    padded = [e.flax_path for e in table if e.transform == "pad_rows" and np.any(flat[e.flax_path][e.torch_shape[0]:])]
    if padded:
        # Those rows never reach an output, so non-zero values mean the params were not made here.
        raise ConversionError("Flax params cannot be exported", problems=[
            f"{p} has non-zero padding rows beyond {cfg['vocab_size']}" for p in padded])
    return {e.torch_key: _to_torch(e, flat[e.flax_path]) for e in table}


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
    return unflatten_params({e.flax_path: _to_flax(e, state[e.torch_key]) for e in table})
