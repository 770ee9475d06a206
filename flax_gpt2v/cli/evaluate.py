"""Evaluate, compare and sample flax-gpt2v models.

    python eval_jax.py --checkpoint runs/demo                    # the run's validation data
    python eval_jax.py --hf runs/demo/hf --validation_file val.txt --block_size 128 --output eval.json
    python eval_jax.py --compare runs/a runs/b --output compare.md --plot_dir plots
    python eval_jax.py --checkpoint runs/demo --generate "The for statement" --max_new_tokens 40
    python eval_jax.py --checkpoint runs/demo --tasks lambada_openai,hellaswag --output_path results

--tasks runs EleutherAI's lm-evaluation-harness on the JAX model (pip install '.[eval]'); its options
--num_fewshot, --limit, --include_path, --output_path, --log_samples are lm-eval's own.

Errors are one line `error: ...` and exit status 2. See flax_gpt2v/evaluation/evaluate.py; installed as `flax-gpt2v-eval`.
"""
from __future__ import annotations

import argparse
import os
import sys

from flax_gpt2v.errors import ArgumentParser, positive, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="DIR",
                     help="native checkpoint or training run directory; with --tasks also any HF directory")
    src.add_argument("--hf", metavar="DIR", help="HF directory (our export or the original's Hub format)")
    src.add_argument("--compare", metavar="RUN_DIR", nargs="+", help="compare training runs' metrics.jsonl")
    p.add_argument("--validation_file", help="text/json/csv/parquet file to evaluate on instead of the run's data")
    p.add_argument("--block_size", type=positive, help="tokens per block (default: the run's, else the model's)")
    p.add_argument("--batch_size", type=positive, default=8, help="blocks, or with --tasks requests, per batch")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--duo_loss", choices=("dual", "original"),
                   help="duo-predict: 'original' also reports the original's combined loss")
    p.add_argument("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "flax_gpt2v"))
    p.add_argument("--output", help="write results: JSON for an evaluation, markdown for --compare")
    p.add_argument("--plot_dir", default=".", help="--compare: where the PNG plots go")
    p.add_argument("--generate", metavar="PROMPT", help="generate text from PROMPT instead of evaluating")
    p.add_argument("--max_new_tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_k", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    harness = p.add_argument_group("lm-evaluation-harness (pip install '.[eval]')")
    harness.add_argument("--tasks", help="comma-separated lm-eval task names or task YAML files, e.g. "
                                         "hellaswag,lambada_openai,arc_easy,piqa,winogrande,wikitext")
    harness.add_argument("--num_fewshot", type=int, help="examples in each prompt (default: each task's)")
    harness.add_argument("--limit", type=float, help="examples per task: a count, or a fraction (< 1) of each")
    harness.add_argument("--include_path", metavar="DIR", help="a directory of local task YAMLs")
    harness.add_argument("--output_path", metavar="DIR", help="write lm-eval's results JSON under DIR")
    harness.add_argument("--log_samples", action="store_true",
                         help="with --output_path, also each task's samples (prompts, answers, scores)")
    return p


def run_harness(args) -> dict:
    """--tasks: lm-eval's tasks on the JAX model of any checkpoint; its results table printed."""
    import jax

    from flax_gpt2v.evaluation import evaluate as ev
    from flax_gpt2v.hf import checkpoint
    from flax_gpt2v.training import harness, sharding

    if args.batch_size <= 0:
        raise ev.EvalError(f"--batch_size must be positive, got {args.batch_size}")
    if args.output or args.generate is not None:
        raise ev.EvalError(f"{'--output' if args.output else '--generate'} does not go with --tasks "
                           "(lm-eval's results go to --output_path DIR)")
    tasks = harness.resolve_tasks([t for t in args.tasks.split(",") if t], args.include_path, "--tasks")
    path = args.checkpoint or args.hf
    hf = args.hf or (path if os.path.isdir(path) and not checkpoint.is_native(path) and checkpoint.is_hf(path)
                     else None)
    lm, model_dir = ev.load_model(None if hf else path, hf, dtype=_dtype(args.dtype))
    tokenizer = ev.tokenizer_from_dir(model_dir)
    if tokenizer is None:
        raise ev.EvalError(f"{model_dir}: no tokenizer files (tokenizer.json), which the harness needs")
    mesh = sharding.make_mesh()
    model = harness.make_harness_lm(lm.module, jax.device_put(lm.params, sharding.replicated(mesh)), tokenizer.hf,
                                    lm.config, mesh, args.batch_size, progress=not args.no_progress)
    results = harness.run_tasks(model, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                log_samples=args.log_samples, output_path=args.output_path,
                                model_name=os.path.abspath(model_dir))
    print(harness.format_table(results))
    return results


def _dtype(name: str):
    import jax.numpy as jnp

    return jnp.bfloat16 if name == "bfloat16" else None


def run(args) -> dict:
    from flax_gpt2v import durable
    from flax_gpt2v.evaluation import evaluate as ev

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    if args.compare:
        rows = [ev.summarize_run(d, log) for d in args.compare]
        table = ev.markdown_table(rows)
        print(table, end="")
        if args.output:
            durable.write_text(args.output, table)
        plots = ev.plot_runs(rows, args.plot_dir)
        print("plots: " + ", ".join(plots))
        return {"rows": rows, "table": table, "plots": plots}

    if not (args.checkpoint or args.hf):
        raise ev.EvalError("give --checkpoint DIR, --hf DIR or --compare RUN_DIR ...")
    if args.tasks is not None:
        return run_harness(args)
    lm, model_dir = ev.load_model(args.checkpoint, args.hf, dtype=_dtype(args.dtype))
    tokenizer = ev.tokenizer_from_dir(model_dir)

    if args.generate is not None:
        if tokenizer is None:
            cfg = ev.data_config(model_dir, args.validation_file, args.block_size, lm.config)
            _, tokenizer = ev.validation_blocks(cfg, None, args.cache_dir, log)
        text = ev.generate_text(lm, tokenizer, args.generate, args.max_new_tokens, args.temperature,
                                args.top_k, args.seed)
        print(text)
        result = {"prompt": args.generate, "text": text}
    else:
        cfg = ev.data_config(model_dir, args.validation_file, args.block_size, lm.config)
        blocks, tokenizer = ev.validation_blocks(cfg, tokenizer, args.cache_dir, log)
        metrics = ev.evaluate_lm(lm, blocks, args.batch_size, duo_loss=args.duo_loss,
                                 progress=not args.no_progress)
        result = {**metrics, "model": model_dir, "model_type": lm.config["model_type"],
                  "num_params": lm.num_params, "blocks": int(len(blocks)), "block_size": int(blocks.shape[1]),
                  "dtype": args.dtype, "tokenizer": tokenizer.source}
        print(ev.format_results(result))
    if args.output:
        durable.write_json(args.output, result, indent=2)
    return result


def _main(argv: list[str] | None) -> int:
    run(build_parser().parse_args(argv))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)
