"""What every text source shares: the data error, the rows read per batch and the check that a row is
text; whether a process lives (the token cache's temporary files and the training lock name their
writer's host and PID)."""
import os

# Rows handed to the tokenizer and the grouping at once, whatever the source.
ROWS_PER_BATCH = 1000


class DataError(RuntimeError):
    """The data cannot be loaded; the message says which and why, on one line."""


def check_texts(texts: list, where: str, first_row: int, column: str) -> list[str]:
    """`texts` (rows first_row+1... of `where`) when each is a string, else one DataError naming the
    first row that is not (a JSON null or number, an empty CSV cell): nothing is skipped silently."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            what = f"{type(text).__name__} {str(text)[:40]!r}"
            if text is None:  # CSV files are read by pandas, whose missing values include "NA" and "NaN"
                what = "an empty, NA or NaN cell" if ".csv" in where.lower() else "null"
            raise DataError(f"{where}: row {first_row + i + 1}, column {column!r}: {what}, not text; "
                            "fix or remove the row")
    return texts


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
