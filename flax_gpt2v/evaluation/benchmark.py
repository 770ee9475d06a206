"""Training and inference throughput of our JAX train step beside the PyTorch twin, in one process.

`python benchmark.py --config configs/dd-both.json --size small --seq 256 --batch 8` (see
`python benchmark.py --help`). The sides train on the same batch and targets:

- JAX: `training.steps.jit_train_step` (the trainer's step) on a one-device mesh, AdamW from `schedule`.
- PyTorch: the twin from `flax_gpt2v.hf.twins`, trained the way the original trained with HF Trainer:
  `torch.optim.AdamW` (fused on CUDA), bf16 autocast over fp32 weights, SDPA attention,
  gradient checkpointing with `--remat`, dropout on, grad-norm clipping at 1.0.
- hf (unless `--no-hf`): transformers' own GPT2LMHeadModel with the same sizes and dropout, at its best:
  SDPA and no gradient checkpointing. It is the bar for a variant's overhead over plain GPT-2.

All sides are built and warmed up first; then timed rounds alternate (JAX round, torch round,
hf round, ...) so that a slow phase of the machine hurts all alike, and the median round counts.
Forward throughput is the evaluation pass (eval mode, no gradients, logits and loss).

Tokens are the model's input positions per step, batch x length. For duo-predict the input is
the interleaved x_0, M, x_1, ..., M, x_{L-1} with L = seq / 2 text tokens, so a step holds
batch x (seq - 1) input positions (1023 per sequence at seq 1024, as the original trained).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt2v import durable
from flax_gpt2v.evaluation import aot, profiling
from flax_gpt2v.training import sharding
from flax_gpt2v.training.options import TrainOptions
from flax_gpt2v.training.steps import (eval_loop, flops_per_token, init_state, jit_train_step, make_eval_step,
                                       peak_flops)
from flax_gpt2v.errors import ArgumentParser, non_negative, positive, run_cli
from flax_gpt2v.config import PRESETS, TRAINING_KEYS, ConfigError, read_json
from flax_gpt2v.models import load_config
from flax_gpt2v.models.gpt2 import REMAT_POLICIES
from flax_gpt2v.hf.keymap import num_params as count_params
from flax_gpt2v.models import ATTENTION_IMPLEMENTATIONS, VARIANTS, attention_implementation, build_model, variant_of
from flax_gpt2v.training.schedule import adamw, lr_schedule

# --all: one experiment file of the original per variant.
ALL_CONFIGS = ("gpt2-medium-baseline", "dd-both", "parallel-mean", "duo-predict", "rotating-head-gp",
               "rotating-head-lr")
# Model sizes; they override the sizes the experiment file names. "tiny" is for smoke tests.
SIZES = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2),
    "small": dict(n_layer=6, n_embd=384, n_head=6),
    "gpt2-medium": dict(PRESETS["gpt2-medium"]),
}
# A config name is looked up in ./configs, then in the checkout's configs/ (absent from an installed package).
CONFIG_DIRS = (Path("configs"), Path(__file__).resolve().parents[2] / "configs")
LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 0.01, 1.0
PROFILE_TOP = 10  # ops listed per side with --profile


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the workload

@dataclasses.dataclass
class Workload:
    """One config's model and the batch both sides train on."""
    name: str
    path: str
    cfg: dict
    input_ids: np.ndarray  # [B, T] model inputs (interleaved for duo-predict)
    targets: np.ndarray    # [B, T] target ids, -100 where none
    text_tokens: int       # text tokens per step (B x seq/2 for duo-predict, else B x seq)

    @property
    def interleaved(self) -> bool:
        return variant_of(self.cfg).interleaved

    @property
    def tokens_per_step(self) -> int:
        return int(self.input_ids.size)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


def resolve_config(name: str) -> Path:
    """A config path, or the name of a file in configs/ (`dd-both` or `dd-both.json`)."""
    for candidate in (Path(name), *(d / f for d in CONFIG_DIRS for f in (name, f"{name}.json"))):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted({p.stem for d in CONFIG_DIRS for p in d.glob("*.json")})) or "none"
    raise ConfigError(f"config {name!r} not found (a path, or one of: {known})")


def make_workload(name: str, size: str, seq: int, batch: int, seed: int = 0, layers: int | None = None,
                  attn_pdrop: float | None = None) -> Workload:
    path = resolve_config(name)
    raw = read_json(path)
    model_raw = {k: v for k, v in raw.items() if k not in TRAINING_KEYS}
    model_raw.update(SIZES[size])
    if layers is not None:
        model_raw["n_layer"] = layers
    if attn_pdrop is not None:
        model_raw["attn_pdrop"] = attn_pdrop
    cfg = load_config(model_raw)
    label = path.stem
    rng = np.random.default_rng(seed)
    variant = variant_of(cfg)
    # Random text without the mask id (the last one for duo-predict).
    if variant.interleaved:
        real = seq // 2
        if real < 2:
            raise ConfigError(f"--seq {seq}: {cfg['model_type']} needs at least 4 (2 text tokens, interleaved)")
        if real > cfg["n_positions"]:
            raise ConfigError(f"--seq {seq} holds {real} text tokens, more than the {cfg['n_positions']} positions "
                              f"of {label} (n_positions)")
        # As the original trained (512 text tokens, n_positions 512): the interleaved input is longer
        # than n_positions, which is what makes the torch twin use the duo layout.
        cfg = load_config({**model_raw, "n_positions": real})
        tokens = rng.integers(0, cfg["vocab_size"] - 1, (batch, real))
        text_tokens = batch * real
    else:
        if seq > cfg["n_positions"]:
            raise ConfigError(f"--seq {seq} is longer than the {cfg['n_positions']} positions of {label} "
                              "(n_positions)")
        tokens = rng.integers(0, cfg["vocab_size"] - 1, (batch, seq))
        text_tokens = batch * seq
    input_ids, targets = variant.batch(tokens, cfg)
    return Workload(label, str(path), cfg, input_ids.astype(np.int32), targets.astype(np.int32), text_tokens)


# ---------------------------------------------------------------- the two sides

class JaxSide:
    """The trainer's jitted step on a one-device mesh."""
    name = "jax"

    def __init__(self, work: Workload, bf16: bool, build_options: dict, seed: int):
        self.work = work
        self.device = jax.devices()[0]
        # JAX cannot reset its peak-memory counter: a later config only knows its own peak if it sets a new one.
        self.peak_before = (self.device.memory_stats() or {}).get("peak_bytes_in_use")
        mesh = sharding.make_mesh({"data": 1}, devices=[self.device])
        schedule = lr_schedule("constant", LEARNING_RATE, 0, 1)
        tx = adamw(schedule, WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM)
        dtype = jnp.bfloat16 if bf16 else jnp.float32
        self.build_options = build_options  # build_model's keyword options besides dtype
        self.attention = attention_implementation(build_options["attention"], dtype)
        # Attention dropout has no fused kernel in jax.nn: training takes the explicit path then (the
        # flash kernel draws its dropout inside).
        self.train_attention = ("explicit" if work.cfg["attn_pdrop"] > 0 and self.attention != "flash"
                                else self.attention)
        self.module = build_model(work.cfg, dtype=dtype, **build_options)
        self.state, shardings = init_state(build_model(work.cfg), tx, mesh, seed)
        self.batch = jax.device_put({"input_ids": work.input_ids, "targets": work.targets},
                                    sharding.batch_sharding(mesh))
        step = jit_train_step(self.module, tx, schedule, mesh, shardings, accum=1, seed=seed,
                                    interleaved=work.interleaved)
        start = time.perf_counter()
        self.step = step.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.eval_step, self.forward_compile_s = None, None
        self.first_step_s = self.train(1)

    def train(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.state, self.metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, self.metrics))
        return time.perf_counter() - start

    def loss(self) -> float:
        return float(self.metrics["loss"])

    def forward(self, steps: int) -> float:
        if self.eval_step is None:
            start = time.perf_counter()
            step = jax.jit(make_eval_step(self.module, interleaved=self.work.interleaved))
            self.eval_step = step.lower(self.state["params"], self.batch).compile()
            self.forward_compile_s = time.perf_counter() - start
        start = time.perf_counter()
        eval_loop(self.eval_step, self.state["params"], itertools.repeat(self.batch, steps))
        return time.perf_counter() - start

    def profile(self, steps: int, directory: Path) -> list[dict]:
        with jax.profiler.trace(str(directory), create_perfetto_trace=True):
            self.train(steps)
        return profiling.jax_top_ops(directory, steps, PROFILE_TOP, self.step.as_text())

    def peak_memory(self) -> tuple[int | None, str]:
        peak = (self.device.memory_stats() or {}).get("peak_bytes_in_use")
        if peak is not None and (self.peak_before is None or peak > self.peak_before):
            return int(peak), "device memory_stats peak_bytes_in_use"
        m = self.step.memory_analysis()
        if m is None:
            return None, "n/a"
        return int(aot.peak_bytes(m)), "compiled memory_analysis (temp + arguments + outputs - aliased)"

    def info(self) -> dict:
        return {"device": self.device.device_kind, "platform": self.device.platform,
                "build_model": self.build_options, "attention": self.attention,
                "train_attention": self.train_attention, "compile_s": self.compile_s,
                "first_step_s": self.first_step_s, "forward_compile_s": self.forward_compile_s}

    def peak_flops(self) -> float | None:
        return peak_flops(self.device)


class TorchSide:
    """The PyTorch twin, trained like HF Trainer trained the original; or (`reference`) transformers' own
    GPT2LMHeadModel of the same sizes at its best: SDPA and no gradient checkpointing (on a GPU without
    the memory for that, with it, and the result says so)."""

    def __init__(self, work: Workload, bf16: bool, remat: bool, seed: int, reference: bool = False):
        import torch

        self.torch, self.bf16, self.reference = torch, bf16, reference
        self.name = "hf" if reference else "torch"
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.seed, self.remat = seed, remat and not reference
        self.input_ids = torch.from_numpy(work.input_ids).long().to(self.device)
        self.targets = torch.from_numpy(work.targets).long().to(self.device)
        self.build(work)
        try:
            self.first_step_s = self.train(1)
        except torch.OutOfMemoryError:
            if not reference or self.remat:
                raise
            log(f"[{work.name}] hf: out of GPU memory without gradient checkpointing; with it")
            self.release()
            self.remat = True
            self.build(work)
            self.first_step_s = self.train(1)

    def build(self, work: Workload):
        torch = self.torch
        from flax_gpt2v.hf.twins import TWINS, CoreGPT2LMHeadModel
        from transformers import GPT2Config, GPT2LMHeadModel

        if self.reference:
            # The same sizes and dropout as plain GPT-2; positions for the whole input (duo's is interleaved).
            keys = GPT2Config().to_dict().keys() - {"model_type", "n_positions"}
            config = GPT2Config(**{k: v for k, v in work.cfg.items() if k in keys},
                                n_positions=max(work.cfg["n_positions"], work.length))
            config._attn_implementation = "sdpa"
            model_class = GPT2LMHeadModel
        else:
            if work.cfg["model_type"] not in TWINS:  # plain GPT-2: transformers' own config
                config_class, model_class = GPT2Config, CoreGPT2LMHeadModel
            else:
                config_class, model_class = TWINS[work.cfg["model_type"]][:2]
            config = config_class(**{k: v for k, v in work.cfg.items() if k != "model_type"})
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        torch.manual_seed(self.seed)
        self.model = model_class(config).to(self.device).train()  # dropout on, as in training
        self.attention = self.model.config._attn_implementation
        if self.remat:
            enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5.x
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # HF Trainer's groups: no weight decay on biases and LayerNorm weights (the 1-D parameters).
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, fused=self.cuda or None)
        self.loss_value = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.bf16)

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def logits_and_loss(self):
        with self.autocast():
            logits = self.model(self.input_ids, use_cache=False).logits
        # fp32 loss over the token mean, like HF's causal-LM loss.
        loss = self.torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), self.targets.flatten(),
                                                      ignore_index=-100)
        return logits, loss

    def train(self, steps: int) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            _, loss = self.logits_and_loss()
            loss.backward()
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
            self.optimizer.step()
            self.loss_value = loss.detach()
        self.sync()
        return time.perf_counter() - start

    def loss(self) -> float:
        return float(self.loss_value)

    def forward(self, steps: int) -> float:
        self.model.eval()
        self.sync()
        start = time.perf_counter()
        with self.torch.no_grad():
            for _ in range(steps):
                self.logits_and_loss()
        self.sync()
        seconds = time.perf_counter() - start
        self.model.train()
        return seconds

    def profile(self, steps: int, directory: Path) -> list[dict]:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=activities) as prof:
            self.train(steps)
        directory.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(directory / "trace.json"))
        return profiling.torch_top_ops(prof, steps, self.cuda, PROFILE_TOP)

    def peak_memory(self) -> tuple[int | None, str]:
        if self.cuda:
            return int(self.torch.cuda.max_memory_allocated(self.device)), "torch.cuda.max_memory_allocated"
        return None, "n/a (CPU)"

    def device_name(self) -> str:
        return self.torch.cuda.get_device_name(self.device) if self.cuda else "cpu"

    def info(self) -> dict:
        return {"device": self.device_name(), "model": type(self.model).__module__ + "." + type(self.model).__name__,
                "attn_implementation": self.attention, "gradient_checkpointing": self.remat,
                "autocast_bf16": self.bf16, "first_step_s": self.first_step_s,
                "allow_tf32": bool(self.torch.backends.cuda.matmul.allow_tf32)}

    def peak_flops(self) -> float | None:
        return peak_flops(SimpleNamespace(device_kind=self.device_name())) if self.cuda else None

    def release(self):
        """Hand the cached blocks back, so that the next config's JAX side has the memory."""
        del self.model, self.optimizer
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


# ---------------------------------------------------------------- one config

def build_sides(work: Workload, args) -> list:
    """The sides the flags ask for, each built, compiled or warmed up by its first step."""
    tag, bf16 = f"[{work.name}]", args.dtype == "bf16"
    sides = []
    if not args.torch_only:
        log(f"{tag} jax: building and compiling the train step")
        options = dict(remat=args.jax_remat_policy if args.remat else "none", scan=args.jax_scan,
                       attention=args.jax_attention)
        sides.append(JaxSide(work, bf16, options, args.seed))
        log(f"{tag} jax: compiled in {sides[-1].compile_s:.1f} s; attention: {sides[-1].train_attention} in "
            f"training, {sides[-1].attention} in the forward pass")
    if not args.jax_only:
        log(f"{tag} torch: building the twin, first step")
        sides.append(TorchSide(work, bf16, args.remat, args.seed))
        log(f"{tag} torch: first step {sides[-1].first_step_s:.1f} s")
    if args.hf and not args.jax_only:
        log(f"{tag} hf: building transformers' GPT2LMHeadModel of the same sizes, first step")
        sides.append(TorchSide(work, bf16, args.remat, args.seed, reference=True))
        log(f"{tag} hf: first step {sides[-1].first_step_s:.1f} s")
    return sides


def benchmark(work: Workload, args) -> dict:
    tag = f"[{work.name}]"
    num_params = count_params(work.cfg)  # as exported: no vocabulary padding rows
    fpt = flops_per_token(work.cfg, num_params, work.length)
    sides = build_sides(work, args)

    def alternate(phase: str, run) -> dict:
        """Warm-up steps for every side, then timed rounds taking turns; tokens/s per round."""
        for side in sides:
            run(side, args.warmup)
        rounds = {side.name: [] for side in sides}
        for i in range(args.rounds):
            for side in sides:
                seconds = run(side, args.steps)
                rounds[side.name].append(args.steps * work.tokens_per_step / seconds)
            log(f"{tag} {phase} round {i + 1}/{args.rounds}: "
                + ", ".join(f"{name} {tps[-1]:,.0f} tokens/s" for name, tps in rounds.items()))
        return rounds

    losses = {side.name: side.loss() for side in sides}  # after the first step: both near ln(V)
    train_rounds = alternate("train", lambda side, n: side.train(n))
    memory = {side.name: side.peak_memory() for side in sides}  # training peak, before the forward phase
    forward_rounds = alternate("forward", lambda side, n: side.forward(n))
    # After the timed rounds: the profiler's overhead stays out of the figures.
    profiles = {}
    if args.profile:
        for side in sides:
            directory = args.profile / work.name / side.name
            log(f"{tag} {side.name}: profiling {args.steps} train steps into {directory}")
            profiles[side.name] = {"trace_dir": str(directory), "top_ops": side.profile(args.steps, directory)}

    result = {
        "variant": work.name, "config": work.path, "model_type": work.cfg["model_type"], "model": work.cfg,
        "num_params": num_params, "input_length": work.length, "tokens_per_step": work.tokens_per_step,
        "text_tokens_per_step": work.text_tokens,
        "tokens": "interleaved input positions" if work.interleaved else "input tokens",
        "flops_per_token": fpt,
    }
    for side in sides:
        tps = statistics.median(train_rounds[side.name])
        peak = side.peak_flops()
        result[side.name] = {
            **side.info(),
            "train_tokens_per_s": tps,
            "train_rounds_tokens_per_s": train_rounds[side.name],
            "peak_flops": peak,
            "mfu": tps * fpt / peak if peak else None,
            "peak_memory_bytes": memory[side.name][0],
            "peak_memory_source": memory[side.name][1],
            "forward_tokens_per_s": statistics.median(forward_rounds[side.name]),
            "forward_rounds_tokens_per_s": forward_rounds[side.name],
            "loss_first": losses[side.name],
            "loss_last": side.loss(),
            **({"profile": profiles[side.name]} if side.name in profiles else {}),
        }
    # JAX against the twin ("ratio") and against transformers' GPT-2 at its best ("ratio_hf").
    for other, field in (("torch", "ratio"), ("hf", "ratio_hf")):
        if "jax" in result and other in result:
            result[field] = {key: result["jax"][f"{key}_tokens_per_s"] / result[other][f"{key}_tokens_per_s"]
                             for key in ("train", "forward")}
    for side in sides:
        if isinstance(side, TorchSide):
            side.release()
    sides.clear()
    gc.collect()
    return result


# ---------------------------------------------------------------- report

COLUMNS = ("variant", "tokens/s JAX", "tokens/s torch", "JAX/torch", "tokens/s HF", "JAX/HF", "MFU JAX",
           "MFU torch", "peak mem JAX", "peak mem torch", "compile JAX", "1st step torch", "fwd tokens/s JAX",
           "fwd tokens/s torch", "fwd JAX/torch", "fwd JAX/HF")


def markdown_table(results: list[dict]) -> str:
    def get(r, side, key):
        return r.get(side, {}).get(key)

    def number(x, fmt):
        return "n/a" if x is None else fmt.format(x)

    rows = []
    for r in results:
        mem = [get(r, s, "peak_memory_bytes") for s in ("jax", "torch")]
        ratio, ratio_hf = r.get("ratio", {}), r.get("ratio_hf", {})
        rows.append([
            r["variant"] + (" *" if VARIANTS[r["model_type"]].interleaved else ""),
            number(get(r, "jax", "train_tokens_per_s"), "{:,.0f}"),
            number(get(r, "torch", "train_tokens_per_s"), "{:,.0f}"),
            number(ratio.get("train"), "{:.2f}"),
            number(get(r, "hf", "train_tokens_per_s"), "{:,.0f}"),
            number(ratio_hf.get("train"), "{:.2f}"),
            number(get(r, "jax", "mfu"), "{:.1%}"),
            number(get(r, "torch", "mfu"), "{:.1%}"),
            *(number(None if m is None else m / 2**30, "{:.2f} GiB") for m in mem),
            number(get(r, "jax", "compile_s"), "{:.1f} s"),
            number(get(r, "torch", "first_step_s"), "{:.1f} s"),
            number(get(r, "jax", "forward_tokens_per_s"), "{:,.0f}"),
            number(get(r, "torch", "forward_tokens_per_s"), "{:,.0f}"),
            number(ratio.get("forward"), "{:.2f}"),
            number(ratio_hf.get("forward"), "{:.2f}"),
        ])
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    explicit = sorted({r["model"]["attn_pdrop"] for r in results if get(r, "jax", "train_attention") == "explicit"})
    if explicit:
        lines.append(f"\nJAX trains with explicit attention at attn_pdrop {', '.join(map(str, explicit))} "
                     "(attention dropout has no fused kernel in JAX); --attn-pdrop 0 measures the fused one.")
    if any(VARIANTS[r["model_type"]].interleaved for r in results):
        lines.append("\n\\* interleaved (duo-predict): tokens are interleaved input positions, batch x (seq - 1); "
                     "text tokens are about half of them.")
    return "\n".join(lines)


def shorten(source: str | None, width: int = 90) -> str:
    """A JAX name stack's informative end: the Flax module path and the primitive."""
    if not source:
        return ""
    return f"`{source}`" if len(source) <= width else f"`...{source[-(width - 3):]}`"


def profile_tables(result: dict) -> str:
    """Each profiled side's top ops, milliseconds per train step and share of the profiled op time."""
    parts = []
    for side in ("jax", "torch", "hf"):
        profile = result.get(side, {}).get("profile")
        if profile:
            lines = [f"{result['variant']}, {side}: top ops by self time ({profile['trace_dir']})", "",
                     "| op | ms/step | share | from |", "|---|---|---|---|"]
            lines += [f"| `{op['name'][:80]}` | {op['ms_per_step']:.2f} | {op['share']:.1%} | "
                      f"{shorten(op['source'])} |" for op in profile["top_ops"]]
            parts.append("\n".join(lines))
    return "\n\n".join(parts)


def environment() -> dict:
    import flax
    import jaxlib
    env = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
           "flax": flax.__version__, "host": platform.node(), "jax_device": jax.devices()[0].device_kind,
           "jax_platform": jax.default_backend(),
           "jax_default_matmul_precision": jax.config.jax_default_matmul_precision}
    try:  # torch is optional with --jax-only
        import torch
        import transformers
        env.update(torch=torch.__version__, transformers=transformers.__version__,
                   torch_device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    except ImportError:
        env.update(torch=None, transformers=None, torch_device=None)
    return env


def default_output(device: str, date: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "device"
    path = Path("benchmarks") / f"{slug}-{date}.json"
    n = 2
    while path.exists():  # a second run the same day does not replace the first
        path = Path("benchmarks") / f"{slug}-{date}-{n}.json"
        n += 1
    return path


# ---------------------------------------------------------------- command line

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", nargs="+", metavar="CONFIG",
                       help="experiment file(s): a path or a name in configs/ (e.g. dd-both)")
    which.add_argument("--all", action="store_true", help=f"one config per variant: {', '.join(ALL_CONFIGS)}")
    p.add_argument("--size", choices=SIZES, default="small",
                   help="model size; overrides the file's sizes (small: 6 layers, d 384, 6 heads)")
    p.add_argument("--layers", type=positive, help="n_layer instead of the size's (e.g. compile time against depth)")
    p.add_argument("--attn-pdrop", type=float, metavar="P",
                   help="attention dropout for both sides instead of the config's (the original's: 0.1)")
    p.add_argument("--seq", type=positive, default=1024,
                   help="tokens per sequence; duo-predict: seq/2 text tokens, interleaved to seq-1 inputs")
    p.add_argument("--batch", type=positive, default=8, help="sequences per step")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="bf16: JAX bf16 compute, torch bf16 autocast (fp32 weights on both)")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing (the original trained with it)")
    p.add_argument("--jax-remat-policy", choices=[r for r in REMAT_POLICIES if r != "none"],
                   default=TrainOptions.remat_policy, help="JAX remat policy with --remat (as the trainer's)")
    p.add_argument("--jax-scan", action=argparse.BooleanOptionalAction, default=TrainOptions.scan_layers,
                   help="JAX layers as one lax.scan (as the trainer's scan_layers)")
    p.add_argument("--jax-attention", choices=ATTENTION_IMPLEMENTATIONS,
                   default=TrainOptions.attention_implementation, help="JAX attention implementation")
    p.add_argument("--steps", type=positive, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=positive, default=3, help="timed rounds per side (alternating)")
    p.add_argument("--warmup", type=non_negative, default=2, help="untimed steps per side after the first")
    side = p.add_mutually_exclusive_group()
    side.add_argument("--jax-only", action="store_true", help="only our JAX train step")
    side.add_argument("--torch-only", action="store_true", help="only the PyTorch twin (and --hf)")
    p.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True,
                   help="also train transformers' own GPT2LMHeadModel of the same sizes at its best (SDPA, no "
                        "gradient checkpointing unless the GPU lacks the memory), the 'hf' side")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help=f"after the timed rounds, profile --steps train steps per side into DIR/<variant>/<side> "
                        f"and list the top {PROFILE_TOP} ops by self time")
    p.add_argument("--seed", type=int, default=0, help="init and data seed")
    p.add_argument("--aot", choices=aot.TARGETS, metavar="TARGET",
                   help=f"instead of running: compile the trainer's step for one {'/'.join(aot.TARGETS)} without "
                        "it and report memory, attention kernel, collectives, FLOPs (evaluation/aot.py)")
    p.add_argument("--output", type=Path,
                   help="results JSON, written atomically (None: benchmarks/<device>-<date>.json, "
                        "with --aot benchmarks/aot-<target>-<date>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # Every config is checked before anything runs.
    works = [make_workload(name, args.size, args.seq, args.batch, args.seed, args.layers, args.attn_pdrop)
             for name in (ALL_CONFIGS if args.all else args.config)]
    if args.aot:
        return compile_ahead(works, args, argv)
    env = environment()
    now = datetime.datetime.now().astimezone()
    output = args.output or default_output(env["jax_device"] if not args.torch_only else env["torch_device"],
                                           now.strftime("%Y-%m-%d"))
    report = {
        "date": now.isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmark.py", *argv]),
        "environment": env,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": [],
    }
    for work in works:
        result = benchmark(work, args)
        report["results"].append(result)
        output.parent.mkdir(parents=True, exist_ok=True)
        durable.write_json(output, report, indent=2)  # after every config: a late failure keeps the earlier ones
        print(f"\n{markdown_table([result])}\n", flush=True)
        if args.profile:
            print(f"{profile_tables(result)}\n", flush=True)
    if len(works) > 1:
        print(markdown_table(report["results"]))
    log(f"results written to {output}")
    return 0


def compile_ahead(works: list[Workload], args, argv: list[str]) -> int:
    """--aot TARGET: each config's train step compiled for one TARGET device (the trainer's options from the
    flags), reported and written to JSON; nothing runs."""
    on = aot.target_devices(args.aot, 1)
    now = datetime.datetime.now().astimezone()
    output = args.output or default_output(f"aot-{args.aot}", now.strftime("%Y-%m-%d"))
    report = {"date": now.isoformat(timespec="seconds"), "command": shlex.join(["python", "benchmark.py", *argv]),
              "target": args.aot, "environment": aot.environment(), "results": []}
    for work in works:
        opts = dataclasses.replace(
            TrainOptions(), per_device_train_batch_size=args.batch, block_size=work.text_tokens // args.batch,
            bf16=args.dtype == "bf16", gradient_checkpointing=args.remat, remat_policy=args.jax_remat_policy,
            scan_layers=args.jax_scan, attention_implementation=args.jax_attention, mesh={"data": 1}, seed=args.seed)
        log(f"[{work.name}] compiling the train step for {on.name}")
        result = {"config": work.name, **aot.compile_step(work.cfg, opts, on)}
        report["results"].append(result)
        durable.write_json(output, report, indent=2)  # after every config: a late failure keeps the earlier ones
        print("\n".join(aot.summary_lines(work.name, result)), flush=True)
    print(f"\n{aot.markdown_table(report['results'])}")
    log(f"results written to {output}")
    return 0
