"""What every text source shares: the data error and the rows read per batch; whether a process lives
(the token cache's temporary files and the training lock are named by host and PID)."""
import os

# Rows handed to the tokenizer and the grouping at once, whatever the source.
ROWS_PER_BATCH = 1000


class DataError(RuntimeError):
    """The data cannot be loaded; the message says which and why, on one line."""


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
