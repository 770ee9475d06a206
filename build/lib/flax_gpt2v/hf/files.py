"""What every checkpoint reader and writer shares: the config file's name, the checkpoint error,
and reading a safetensors file so that damage is named rather than raised from deep inside."""
from __future__ import annotations

from typing import Callable

import safetensors

CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupt or would be overwritten."""


def read_safetensors(file: str, load: Callable[[str], dict]) -> dict:
    try:
        return load(file)
    except safetensors.SafetensorError as e:
        raise CheckpointError(f"corrupt checkpoint: {file}: {e}") from None
