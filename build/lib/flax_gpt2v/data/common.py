"""What every text source shares: the data error and the rows read per batch."""

# Rows handed to the tokenizer and the grouping at once, whatever the source.
ROWS_PER_BATCH = 1000


class DataError(RuntimeError):
    """The data cannot be loaded; the message says which and why, on one line."""
