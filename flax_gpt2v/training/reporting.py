"""Where the trainer's metrics go besides metrics.jsonl: HF Trainer's `report_to`.

`report_to` is a name or a list of names, as in HF: "tensorboard" (tensorboardX,
scalars in `<output_dir>/tb`), "wandb" (Weights & Biases; WANDB_MODE, WANDB_PROJECT,
WANDB_DIR, ... as wandb reads them), "all" (both) or "none". Tags are HF's
(`train/loss`, `eval/perplexity`, ...), so charts line up with the original's W&B
runs. A backend whose package is missing or that cannot start is named in one log
line and training goes on.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any, Callable

from flax_gpt2v import durable
from flax_gpt2v.config import ConfigError
from flax_gpt2v.errors import first_line

BACKENDS = ("tensorboard", "wandb")
WANDB_ID_FILE = "wandb_run_id"  # in output_dir: a resumed run continues the same W&B run


def resolve_report_to(value: Any) -> list[str]:
    """HF's `report_to` value -> the backend names it selects."""
    names = [value] if isinstance(value, str) else value
    if value is None or names == ["none"]:
        return []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"config key 'report_to': expected a name or a list of names, got {value!r}")
    if names == ["all"]:
        return list(BACKENDS)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ConfigError(f"config key 'report_to': {unknown[0]!r} is not supported; use "
                          f"{', '.join(BACKENDS)}, 'all' or 'none' (alone)")
    return list(dict.fromkeys(names))


def hf_tags(record: dict) -> dict:
    """metrics.jsonl record -> HF's tags (`eval_loss` -> `eval/loss`, `loss` -> `train/loss`), numbers only;
    a key that is already a tag (the harness's `eval/<task>/<metric>`) stays as it is."""
    return {(k if "/" in k else f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, output_dir: str, run_config: dict, restored_step: int = 0):
        from tensorboardX import SummaryWriter
        # purge_step: TensorBoard hides what the lost part of an interrupted run wrote past the restored step
        # (step 0 too: a run killed before its first checkpoint restarts from there).
        self.writer = SummaryWriter(os.path.join(output_dir, "tb"), purge_step=restored_step + 1)
        self.writer.add_text("run_config", json.dumps(run_config, indent=2))  # as HF's callback adds its args

    def log(self, record: dict) -> None:
        for tag, v in hf_tags(record).items():
            self.writer.add_scalar(tag, v, record["step"])
        self.writer.flush()  # a killed run keeps its scalars

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, output_dir: str, run_config: dict):
        import wandb
        id_file = os.path.join(output_dir, WANDB_ID_FILE)
        run_id = uuid.uuid4().hex[:12]
        if os.path.isfile(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "flax-gpt2v",
                              name=run_config["train"]["run_name"], id=run_id, resume="allow",
                              config=run_config, dir=os.environ.get("WANDB_DIR") or output_dir)
        durable.write_text(id_file, run_id)

    def log(self, record: dict) -> None:
        self.run.log(hf_tags(record), step=record["step"])

    def close(self) -> None:
        import wandb
        self.run.finish()
        # wandb reads its WANDB_* settings once per session: ending the session lets the next run in this
        # process (a sweep, a test) see the environment as it is then.
        wandb.teardown()


def open_backends(names: list[str], output_dir: str, run_config: dict, log: Callable[[str], None],
                  restored_step: int = 0) -> list:
    """The backends `names` selects that could start; each one that could not is named in one line."""
    backends = []
    for name, cls, package in (("tensorboard", TensorBoard, "tensorboardX"), ("wandb", WandB, "wandb")):
        if name not in names:
            continue
        try:
            backends.append(cls(output_dir, run_config, **({"restored_step": restored_step} if cls is TensorBoard else {})))
        except ImportError:
            log(f"report_to {name}: {package} is not installed (pip install {package}); not reporting there")
        except Exception as e:  # e.g. wandb online without an API key or network
            log(f"report_to {name}: could not start ({first_line(e)}); not reporting there")
    return backends
