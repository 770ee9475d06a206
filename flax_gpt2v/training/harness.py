"""EleutherAI's lm-evaluation-harness on the JAX model: `HarnessLM` (an lm-eval `LM`) and `run_tasks`.

`python eval_jax.py --checkpoint X --tasks hellaswag,...` and the trainer's `eval_harness_tasks` both
run `run_tasks`; it lives here because training never imports evaluation. lm-eval is the optional
extra `eval` and is imported only when a harness is asked for.

HarnessLM answers lm-eval's three request kinds as its own `hf` model does (lm_eval/models/huggingface.py),
so that the numbers compare with published ones: the same tokenization (lm-eval's TemplateLM splits each
context/continuation pair), the same truncation to the model's positions, the same rolling windows,
the same stop strings; only the computation is ours. Loglikelihood requests are sorted by length,
padded on the right to a few bucket lengths (powers of two) and a fixed number of rows, so a task
compiles a handful of shapes; each batch is split over the mesh's batch axes. generate_until runs
models/generate.py's KV-cache decoding on prompts of one length at a time (padded to a bucket: the model
takes one set of positions per batch, so prompts of different lengths never share a batch), then cuts
the text at the first end-of-text token and at the first stop string. Duo-predict is called in its plain
layout, as its export is.

With several JAX processes every process runs every request (lm-eval sees one rank): the batches are
global arrays over all devices, and each process reads the results back.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt2v.training import sharding

INSTALL = "pip install '.[eval]' (lm-eval)"
# Bucket lengths are powers of two from this one up, capped at the model's positions.
MIN_BUCKET = 16


class HarnessError(ValueError):
    """lm-eval missing, an unknown task or a bad harness argument; one `error:` line in the CLIs."""


def require_lm_eval():
    """lm_eval, or HarnessError saying how to install it."""
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401
    except ImportError as e:
        raise HarnessError(f"lm-evaluation-harness is not installed ({e.name} missing): {INSTALL}") from None
    return lm_eval


def bucket(length: int, cap: int) -> int:
    """The padded length of a sequence of `length` tokens: the next power of two (at least MIN_BUCKET),
    never beyond `cap` (the model's positions)."""
    return min(cap, max(MIN_BUCKET, 1 << max(0, length - 1).bit_length()))


def cut_generation(tokens: Sequence[int], stop_ids: set[int]) -> list[int]:
    """Generated tokens up to (not including) the first end-of-text token: lm-eval's `hf` model stops there."""
    tokens = list(tokens)
    ends = [i for i, t in enumerate(tokens) if t in stop_ids]
    return tokens[:ends[0]] if ends else tokens


class JaxHarnessModel:
    """What lm-eval asks of a model, answered by the JAX model: mixed into lm-eval's TemplateLM by
    `make_harness_lm` (that base class exists only once lm-eval is imported)."""
    backend = "causal"

    def __init__(self, module, params, tokenizer, config: dict, mesh, batch_size: int, progress: bool):
        super().__init__()
        self.module = module
        if tokenizer.eos_token_id is None:
            raise HarnessError("the tokenizer has no end-of-text (eos) token, which lm-eval needs")
        self.tokenizer = tokenizer
        self.config = config
        self.mesh = mesh
        # Rows per batch: a multiple of the devices the batch is split over.
        shards = sharding.batch_size_multiple(mesh)
        self.rows = -(-batch_size // shards) * shards
        self.batch_size = batch_size
        self.params = params
        self.progress = progress
        self.stop_ids = {tokenizer.eos_token_id} | ({config["eos_token_id"]}
                                                    if config.get("eos_token_id") is not None else set())
        replicated = sharding.replicated(mesh)
        self._score = jax.jit(self._score_fn, out_shardings=replicated)
        self._decoders: dict[tuple, Callable] = {}
        self._seed = 0

    # ---------------------------------------------------------- what lm-eval asks of a TemplateLM

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self.config["n_positions"]

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_type": self.config["model_type"], "model_dtype": str(jnp.dtype(self.module.dtype))}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **extra)

    # ---------------------------------------------------------- scoring

    def _score_fn(self, params, ids, targets):
        """(log-probability of each target [B, T], whether it is the argmax [B, T])."""
        logits = self.module.apply({"params": params}, ids)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return (jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0],
                jnp.argmax(logits, axis=-1) == targets)

    def _place(self, rows: np.ndarray):
        """Every process's identical rows -> one array split over the mesh's batch axes."""
        return jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh), rows, rows.shape)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether every continuation token is the
        argmax) per ((context, continuation), context ids, continuation ids)."""
        from tqdm.auto import tqdm

        n_pos = self.max_length
        seqs = []
        for _, context_enc, continuation_enc in requests:
            whole = (list(context_enc) + list(continuation_enc))[-(n_pos + 1):]
            seqs.append((whole[:-1], whole[1:], len(continuation_enc)))
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(seqs)
        starts = range(0, len(order), self.rows)
        for start in tqdm(starts, desc="loglikelihood", disable=disable_tqdm or not self.progress,
                          unit="batch"):
            batch = order[start:start + self.rows]
            width = bucket(len(seqs[batch[0]][0]), n_pos)
            ids = np.zeros((self.rows, width), np.int32)
            targets = np.zeros((self.rows, width), np.int32)
            for row, i in enumerate(batch):
                inp, tgt, _ = seqs[i]
                ids[row, :len(inp)], targets[row, :len(tgt)] = inp, tgt
            logp, greedy = jax.device_get(self._score(self.params, self._place(ids), self._place(targets)))
            for row, i in enumerate(batch):
                length, n_cont = len(seqs[i][0]), seqs[i][2]
                span = slice(length - n_cont, length)
                results[i] = (float(np.sum(logp[row, span], dtype=np.float64)), bool(np.all(greedy[row, span])))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over lm-eval's disjoint windows of the model's positions."""
        from lm_eval import utils

        windows, owner = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[index] += logp
        return totals

    # ---------------------------------------------------------- generation

    def _decoder(self, max_new: int, temperature: float, top_k: int | None):
        from flax_gpt2v.models.generate import continuation

        key, module = (max_new, temperature, top_k), self.module
        if key not in self._decoders:
            self._decoders[key] = jax.jit(
                lambda p, ids, length, rng: continuation(module, p, ids, length, rng, max_new, temperature, top_k),
                out_shardings=sharding.replicated(self.mesh))
        return self._decoders[key]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, sampled) text after each context, cut at end-of-text and at
        the first of the request's stop strings."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
        from tqdm.auto import tqdm

        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[tuple, list[int]] = {}
        prepared = []
        for index, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            max_ctx = self.max_length - max_new
            if max_ctx <= 0:
                raise HarnessError(f"max_gen_toks {max_new} leaves no room for a context in the model's "
                                   f"{self.max_length} positions")
            ids = self.tok_encode(context)[-max_ctx:]
            temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
            top_k = kwargs.get("top_k") if temperature else None
            prepared.append((ids, until))
            groups.setdefault((len(ids), max_new, temperature, top_k, max_ctx), []).append(index)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress)
        # Longest prompts first, like lm-eval's own models: a prompt too long for memory fails at once.
        for (length, max_new, temperature, top_k, max_ctx), members in sorted(groups.items(), key=lambda g: -g[0][0]):
            width = bucket(length, max_ctx)
            decode = self._decoder(max_new, temperature, top_k)
            for start in range(0, len(members), self.rows):
                batch = members[start:start + self.rows]
                ids = np.zeros((self.rows, width), np.int32)
                for row, i in enumerate(batch):
                    ids[row, :length] = prepared[i][0]
                self._seed += 1
                new = jax.device_get(decode(self.params, self._place(ids), jnp.int32(length),
                                            jax.random.PRNGKey(self._seed)))
                for row, i in enumerate(batch):
                    text = self.tokenizer.decode(cut_generation(new[row], self.stop_ids), skip_special_tokens=True)
                    out[i] = postprocess_generated_text(text, prepared[i][1], None)
                bar.update(len(batch))
        bar.close()
        return out



def make_harness_lm(module, params, tokenizer, config: dict, mesh, batch_size: int,
                    progress: bool = True):
    """An lm-eval model over `module` (the plain-layout model), `params` (placed on `mesh` or replicable
    onto it) and an HF fast `tokenizer` (transformers' PreTrainedTokenizerFast)."""
    require_lm_eval()
    from lm_eval.api.model import TemplateLM

    class HarnessLM(JaxHarnessModel, TemplateLM):
        pass

    return HarnessLM(module, params, tokenizer, config, mesh, batch_size, progress)


# ------------------------------------------------------------------ tasks

def resolve_tasks(tasks: Sequence[str], include_path: str | None, what: str):
    """(lm-eval TaskManager, task list for simple_evaluate): names, and task YAML files as lm-eval's own
    command takes them. lm-eval's index of its ~15k bundled tasks takes many seconds to build, so names
    that `include_path` alone defines are looked up there first. Raises HarnessError naming `what`
    (the option or config key) for a task the harness does not know."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t.strip() for t in tasks):
        raise HarnessError(f"{what}: expected a list of task names or task YAML files, got {tasks!r}")
    files = [t for t in tasks if t.endswith((".yaml", ".yml"))]
    names = [t for t in tasks if t not in files]
    for f in files:
        if not os.path.isfile(f):
            raise HarnessError(f"{what}: task file {f}: no such file")
    if include_path is not None and not os.path.isdir(include_path):
        raise HarnessError(f"{what}: include path {include_path}: no such directory")
    manager = None
    if include_path is not None:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if any(not manager.match_tasks([n]) for n in names):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=include_path)
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        import lm_eval
        raise HarnessError(f"{what}: unknown task {unknown[0]!r}: lm-eval {lm_eval.__version__} has no such task"
                           + (f" and {include_path} defines none" if include_path else "")
                           + " (`lm-eval ls tasks` lists them; --include_path adds local task YAMLs)")
    matched = [m for n in names for m in manager.match_tasks([n])]
    return manager, matched + [load_yaml(os.path.abspath(f), resolve_func=True) for f in files]


def run_tasks(lm, tasks: tuple, *, num_fewshot: int | None = None, limit: float | None = None,
              log_samples: bool = False, output_path: str | None = None, model_name: str | None = None,
              bootstrap_iters: int = 100000) -> dict:
    """lm-eval's simple_evaluate of HarnessLM `lm` on `tasks` (resolve_tasks' answer); with `output_path`
    its EvaluationTracker writes the results JSON (and with `log_samples` each task's samples) as
    lm-eval's own command does, under output_path/<model_name>/."""
    from lm_eval import evaluator
    from lm_eval.loggers import EvaluationTracker

    if log_samples and not output_path:
        raise HarnessError("--log_samples needs --output_path")
    manager, task_list = tasks
    tracker = EvaluationTracker(output_path=output_path) if output_path else None
    results = evaluator.simple_evaluate(
        model=lm, model_args={"pretrained": model_name} if model_name else None, tasks=task_list,
        num_fewshot=num_fewshot, batch_size=lm.batch_size, limit=limit, log_samples=log_samples,
        evaluation_tracker=tracker, task_manager=manager, bootstrap_iters=bootstrap_iters,
        torch_random_seed=None)  # no torch here: its seed would import it
    if tracker is not None:
        samples = results.pop("samples") if log_samples else None
        tracker.save_results_aggregated(results=results, samples=samples)
        for name in (results["configs"] if log_samples else ()):
            tracker.save_results_samples(task_name=name, samples=samples[name])
    return results


def metric_record(results: dict) -> dict[str, float]:
    """lm-eval results -> {"eval/<task>/<metric>": value}: numbers only, no standard errors; a filter
    other than lm-eval's "none" stays in the name (`eval/<task>/<metric>/<filter>`)."""
    record = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            record[f"eval/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = float(value)
    return record


def format_table(results: dict) -> str:
    """lm-eval's own results table (and its groups table when there are groups)."""
    from lm_eval.utils import make_table

    return make_table(results) + (("\n" + make_table(results, "groups")) if results.get("groups") else "")
