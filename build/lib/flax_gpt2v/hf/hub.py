"""HF Trainer's `push_to_hub`: the HF export (docs/export.md) uploaded to a Hub model repo.

`push_to_hub: true` creates the repo `hub_model_id` (default: the output_dir's name,
under the token's user; `hub_private_repo` as in HF) when training starts, uploads
an HF export of the parameters after each checkpoint save in a background thread
(one upload at a time; a save while one is still running is not pushed, as in HF),
and uploads `<output_dir>/hf` when training ends, waiting for it. `hub_strategy`:
"every_save" (default), "end", or "all_checkpoints" (each save also goes to
`checkpoint-<step>/`). The token is `hub_token`, else huggingface_hub's own
(HF_TOKEN or `hf auth login`); it is never written to run_config.json.

Offline (HF_HUB_OFFLINE), without a token or when the Hub refuses or cannot be
reached: one warning line, no further attempts, training goes on; everything stays
in output_dir, and `hf upload REPO OUTPUT_DIR/hf` uploads it later.
"""
from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from flax_gpt2v.config import ConfigError
from flax_gpt2v.errors import first_line

STRATEGIES = ("every_save", "end", "all_checkpoints")
STAGING = ".hub-push"  # in output_dir: the export of a save while it uploads


def _reason(e: BaseException) -> str:
    return first_line(e)[:300]  # a server's first line can be a whole HTML page


class HubPush:
    def __init__(self, opts, token: str | None, log: Callable[[str], None], active: bool):
        """Validates the hub options on every process; only an `active` one (process 0) uploads."""
        if opts.hub_strategy not in STRATEGIES:
            raise ConfigError(f"config key 'hub_strategy': must be one of {', '.join(STRATEGIES)}, got "
                              f"{opts.hub_strategy!r} ('checkpoint' would push the Orbax training state; "
                              "resume from output_dir instead)")
        for key, value, kind in (("hub_model_id", opts.hub_model_id, str), ("hub_token", token, str),
                                 ("hub_private_repo", opts.hub_private_repo, bool)):
            if value is not None and not isinstance(value, kind):
                raise ConfigError(f"config key '{key}': expected {kind.__name__}, got {value!r}")
        if opts.push_to_hub and not opts.export_hf:
            raise ConfigError("config key 'export_hf': push_to_hub uploads the HF export; it cannot be false")
        self.log = log
        self.every_save = opts.push_to_hub and opts.hub_strategy != "end"
        self.all_checkpoints = opts.hub_strategy == "all_checkpoints"
        self.output_dir = opts.output_dir
        self.repo_id = opts.hub_model_id or os.path.basename(os.path.abspath(opts.output_dir))
        self.api = self.pending = self.executor = None
        if not (opts.push_to_hub and active):
            return
        try:
            from huggingface_hub import HfApi, constants, get_token
        except ImportError:
            return self._give_up("huggingface_hub is not installed (pip install huggingface_hub)")
        if constants.HF_HUB_OFFLINE:
            return self._give_up("HF_HUB_OFFLINE is set")
        try:
            token = token or get_token()
        except Exception as e:  # get_token raises when an OIDC exchange (HF_OIDC_RESOURCE) fails
            return self._give_up(f"no Hugging Face token ({_reason(e)})")
        if not token:
            return self._give_up("no Hugging Face token (set hub_token or HF_TOKEN, or run `hf auth login`)")
        self.api = HfApi(token=token)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-push")
        self.pending = self.executor.submit(self._create_repo, opts.hub_private_repo)

    def _give_up(self, reason: str) -> None:
        self.log(f"warning: push_to_hub: {reason}; not uploading to {self.repo_id}, training goes on; the run stays "
                 f"in {self.output_dir} (`hf upload {self.repo_id} {self.output_dir}/hf` uploads its export later)")
        self.api = None
        if self.executor is not None:
            self.executor.shutdown(wait=False)

    def _guarded(self, fn: Callable[[], Any]) -> None:
        if self.api is None:
            return
        try:
            fn()
        except Exception as e:  # the Hub's and the network's errors come in many types
            self._give_up(f"{self.api.endpoint}: {_reason(e)}")

    def _create_repo(self, private: bool | None) -> None:
        def create():
            self.repo_id = self.api.create_repo(self.repo_id, private=private, exist_ok=True).repo_id
        self._guarded(create)

    def _upload(self, folder: str, message: str, path_in_repo: str | None = None) -> None:
        self._guarded(lambda: self.api.upload_folder(repo_id=self.repo_id, folder_path=folder,
                                                     path_in_repo=path_in_repo, commit_message=message))

    def push_checkpoint(self, step: int, model_cfg: dict, params, tokenizer_dir: str | None) -> None:
        """Export `params` (host arrays) and upload them in the background; skipped while an upload runs."""
        if self.api is None or (self.pending is not None and not self.pending.done()):
            return
        self.pending = self.executor.submit(self._export_and_upload, step, model_cfg, params, tokenizer_dir)

    def _export_and_upload(self, step: int, model_cfg: dict, params, tokenizer_dir: str | None) -> None:
        from flax_gpt2v.hf import checkpoint

        staging = os.path.join(self.output_dir, STAGING)
        try:
            checkpoint.save_hf_dir(staging, model_cfg, params, force=True, tokenizer_dir=tokenizer_dir)
        except ImportError as e:  # torch is optional for training; without it there is no export
            return self._give_up(f"no HF export ({e})")
        try:
            self._upload(staging, f"Training in progress, step {step}")
            if self.all_checkpoints:
                self._upload(staging, f"Checkpoint at step {step}", f"checkpoint-{step}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def push_final(self, hf_dir: str) -> None:
        """Upload the final export `hf_dir`; returns when the upload is complete (or has failed)."""
        if self.pending is not None:
            self.pending.result()
        if self.api is not None and not os.path.isfile(os.path.join(hf_dir, "config.json")):
            self._give_up(f"no HF export in {hf_dir}")
        self._upload(hf_dir, "End of training")
        if self.executor is not None:
            self.executor.shutdown()
