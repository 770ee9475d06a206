"""TensorFlow Datasets as a text source: `dataset: {source: tfds, name: ..., data_dir: ...}`.

Any other key of `dataset` (data_dir, config, version, file_format, ...) goes to `tfds.builder`.
The dataset is prepared if it is not yet (`download_and_prepare`, as `tfds.load` does).
Datasets stored as array_record are read without TensorFlow (`as_data_source`);
tfrecord ones (TFDS's default) need TensorFlow (`pip install tensorflow-cpu`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from flax_gpt2v.data.common import ROWS_PER_BATCH, DataError, check_texts
from flax_gpt2v.errors import first_line

if TYPE_CHECKING:  # the spec is built by pipeline, which calls this module
    from flax_gpt2v.data.pipeline import DataSpec


def load_tfds(spec: DataSpec) -> dict:
    """{train split: batches(), validation split: batches()}, each a callable yielding lists of texts."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError("dataset source 'tfds' needs TensorFlow Datasets, which is not installed: "
                        "pip install tensorflow-datasets") from None
    opts = dict(spec.options)
    name = opts.pop("name")
    try:
        builder = tfds.builder(name, **opts)
        builder.download_and_prepare()
    except Exception as e:  # tfds raises many kinds; all mean the same to the user
        raise DataError(f"cannot load tfds dataset {name!r}: {first_line(e, with_type=True)}") from e
    splits = builder.info.splits
    if spec.train_split not in splits:
        raise DataError(f"tfds dataset {name!r} has no split {spec.train_split!r} (it has {', '.join(splits)})")
    train, validation = spec.train_split, spec.validation_split
    if validation not in splits or spec.validation_split_percentage is not None:
        # As for `datasets` (data.py): the first validation_split_percentage % of train when it is given
        # (the original's rule), else when there is no validation split (run_clm's fallback, 5%).
        p = spec.validation_split_percentage or 5
        train, validation = f"{spec.train_split}[{p}%:]", f"{spec.train_split}[:{p}%]"
    column = spec.text_column or "text"
    if column not in builder.info.features:
        raise DataError(f"tfds dataset {name!r} has no feature {column!r} "
                        f"(it has {', '.join(builder.info.features)})")
    array_record = builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD

    def where(split):
        return f"tfds dataset {name!r} split {split}"

    def reader(split):
        def batches():
            if array_record:
                source = builder.as_data_source(split=split)
                for start in range(0, len(source), ROWS_PER_BATCH):
                    rows = source.__getitems__(range(start, min(start + ROWS_PER_BATCH, len(source))))
                    yield check_texts([_text(row[column]) for row in rows], where(split), start, column)
                return
            try:
                rows = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
            except ImportError as e:
                raise DataError(f"tfds dataset {name!r} is stored as {builder.info.file_format.value}, which "
                                f"needs TensorFlow to read ({first_line(e, with_type=True)}): pip install "
                                "tensorflow-cpu, or prepare it with file_format array_record") from None
            batch, start = [], 0
            for row in rows:
                batch.append(_text(row[column]))
                if len(batch) == ROWS_PER_BATCH:
                    yield check_texts(batch, where(split), start, column)
                    batch, start = [], start + len(batch)
            if batch:
                yield check_texts(batch, where(split), start, column)
        batches.num_rows = splits[split].num_examples
        return batches

    return {spec.train_split: reader(train), spec.validation_split: reader(validation)}


def _text(value):
    """A Text feature's bytes decoded; anything else (bytes that are not UTF-8 too) as it is, for
    check_texts to name."""
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else value
    except UnicodeDecodeError:
        return value
