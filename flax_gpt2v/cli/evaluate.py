"""Evaluate, compare and sample flax-gpt2v models.

    python eval_jax.py --checkpoint runs/demo                    # the run's validation data
    python eval_jax.py --hf runs/demo/hf --validation_file val.txt --block_size 128 --output eval.json
    python eval_jax.py --compare runs/a runs/b --output compare.md --plot_dir plots
    python eval_jax.py --checkpoint runs/demo --generate "The for statement" --max_new_tokens 40

Errors are one line `error: ...` and exit status 2. See flax_gpt2v/evaluation/evaluate.py; installed as `flax-gpt2v-eval`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from flax_gpt2v.errors import ArgumentParser, positive, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="DIR", help="native checkpoint or training run directory")
    src.add_argument("--hf", metavar="DIR", help="HF directory (our export or the original's Hub format)")
    src.add_argument("--compare", metavar="RUN_DIR", nargs="+", help="compare training runs' metrics.jsonl")
    p.add_argument("--validation_file", help="text/json/csv/parquet file to evaluate on instead of the run's data")
    p.add_argument("--block_size", type=positive, help="tokens per block (default: the run's, else the model's)")
    p.add_argument("--batch_size", type=positive, default=8)
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
    return p


def run(args) -> dict:
    from flax_gpt2v.evaluation import evaluate as ev

    if args.compare:
        rows = [ev.summarize_run(d) for d in args.compare]
        table = ev.markdown_table(rows)
        print(table, end="")
        if args.output:
            with open(args.output, "w") as f:
                f.write(table)
        plots = ev.plot_runs(rows, args.plot_dir)
        print("plots: " + ", ".join(plots))
        return {"rows": rows, "table": table, "plots": plots}

    if not (args.checkpoint or args.hf):
        raise ev.EvalError("give --checkpoint DIR, --hf DIR or --compare RUN_DIR ...")
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
    lm, model_dir = ev.load_model(args.checkpoint, args.hf, dtype=dtype)
    tokenizer = ev.tokenizer_from_dir(model_dir)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731

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
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _main(argv: list[str] | None) -> int:
    run(build_parser().parse_args(argv))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)
