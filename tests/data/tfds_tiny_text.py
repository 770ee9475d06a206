"""A tiny TensorFlow Datasets builder of text examples, for the tfds source's tests.

Built with file_format="array_record", which needs no TensorFlow."""
import numpy as np
import tensorflow_datasets as tfds

NAME = "flax_gpt2v_tiny_text"
TEXTS = {
    "train": [f"Line {i}: the quick brown fox {'jumps over' if i % 3 else 'naps by'} the lazy dog {i * 7}.\n"
              for i in range(120)],
    "validation": [f"Held-out line {i}: a slow red fox naps under the busy dog {i * 11}.\n" for i in range(30)],
}


class FlaxGpt2vTinyText(tfds.core.GeneratorBasedBuilder):
    """Config `two_splits`: train and validation; `train_only`: train alone."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="two_splits"), tfds.core.BuilderConfig(name="train_only")]

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "id": tfds.features.Scalar(dtype=np.int32)}))

    def _split_generators(self, dl_manager):
        splits = ["train", "validation"] if self.builder_config.name == "two_splits" else ["train"]
        return {split: self._generate_examples(TEXTS[split]) for split in splits}

    def _generate_examples(self, texts):
        for i, text in enumerate(texts):
            yield i, {"text": text, "id": i}


def build(data_dir: str) -> None:
    for config in ("two_splits", "train_only"):
        FlaxGpt2vTinyText(config=config, data_dir=data_dir, file_format="array_record").download_and_prepare()
