"""`Conv_Cifar10_16_32x64x64`: learned_optimization's tutorial convnet on 16x16 CIFAR-10.

Architecture (`learned_optimization/tasks/fixed/conv.py`, `_cross_entropy_pool_loss`):
three 3x3 'SAME' convolutions with 32, 64, 64 channels and ReLU, the first at stride 2
(16x16 -> 8x8), a mean over space, and a linear head to 10 classes; mean softmax
cross-entropy; haiku's default initialisers and parameter names.

Data (`learned_optimization/tasks/datasets/image.py`, `cifar10_datasets`): splits
`train[0:80%]` (train), `train[80%:90%]` (inner_valid), `train[90%:]` (outer_valid),
`test` (test); images float32 in [0, 1] (`uint8 / 255`), labels int32.
learned_optimization resizes 32x32 -> 16x16 with `tf.image.resize` (bilinear, no
antialias, half-pixel centres). At exactly half size every output pixel centre falls
midway between a 2x2 block of input pixels, so that bilinear resize *is* the 2x2 mean;
we compute it with numpy (equal up to float rounding), with no TensorFlow.

Loading goes through `tfds.data_source` (ArrayRecord files, random access, no
TensorFlow needed to read). It is lazy: nothing is read until `.datasets` is first
used, then each split is read into memory once per task instance. tensorflow-datasets
is an optional dependency (`pip install lopt-fast[tfds]`), imported only then.

`synthetic=True` replaces the data with random images and labels of the same shapes
and dtypes, for timing where CIFAR-10 cannot be fetched (a step costs the same
whatever the pixels): `lopt-fast bench --task cifar10_conv --synthetic-data`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lopt_fast.tasks.base import Datasets, Task
from lopt_fast.tasks.data import BatchIterator
from lopt_fast.tasks.digits import (
    conv2d,
    conv_spec,
    image_normalizer,
    init_layers,
    linear_spec,
    softmax_cross_entropy,
)

# Same split strings as learned_optimization's cifar10_datasets.
SPLITS = {
    "train": "train[0:80%]",
    "inner_valid": "train[80%:90%]",
    "outer_valid": "train[90%:]",
    "test": "test",
}
NUM_CLASSES = 10
_CHANNELS = (32, 64, 64)
_STRIDES = (2, 1, 1)
_CONV_NAMES = ("conv2_d", "conv2_d_1", "conv2_d_2")
SYNTHETIC_EXAMPLES = 4096  # per split of the synthetic stand-in


class DatasetNotFoundError(RuntimeError):
    """A data set a task needs is not prepared locally (the message says how to get it)."""


def _missing_message(data_dir: str | None, cause: BaseException) -> str:
    where = (f"data_dir={data_dir!r}" if data_dir is not None
             else "the default data_dir ($TFDS_DATA_DIR, else ~/tensorflow_datasets)")
    return (
        f"CIFAR-10 is not prepared for tensorflow-datasets in ArrayRecord format in {where}. "
        "Prepare it once (needs network; the tfds build step of cifar10 also needs "
        "TensorFlow, e.g. `pip install tensorflow-cpu`):\n"
        "    python -c \"import tensorflow_datasets as tfds; "
        "tfds.data_source('cifar10', download=True)\"\n"
        "or `tfds build cifar10 --file_format=array_record [--data_dir=DIR]`. "
        "To use a copy elsewhere, set TFDS_DATA_DIR=DIR or pass "
        "Conv_Cifar10_16_32x64x64(data_dir=DIR). A copy prepared as TFRecord (by tfds.load) "
        "can be converted with `tfds convert_format --dataset_dir=DIR/cifar10 "
        "--out_file_format=array_record`.\n"
        f"(tensorflow-datasets said: {type(cause).__name__}: {cause})"
    )


def _import_tfds():
    try:
        import tensorflow_datasets as tfds  # optional dependency, see module docstring
    except ImportError as e:
        raise ImportError(
            "Conv_Cifar10_16_32x64x64 needs tensorflow-datasets to read CIFAR-10: "
            "pip install 'lopt-fast[tfds]' (or pip install tensorflow-datasets)"
        ) from e
    return tfds


def _to_16x16(images: np.ndarray) -> np.ndarray:
    """uint8 [n, H, W, 3] -> float32 [n, 16, 16, 3] in [0, 1] (2x2 mean if 32x32)."""
    n, h, w, c = images.shape
    if (h, w) == (16, 16):
        return images.astype(np.float32) / np.float32(255.0)
    if (h, w) != (32, 32):
        raise ValueError(f"expected 32x32 CIFAR-10 images, got {h}x{w}")
    # Sum the 2x2 blocks exactly in integers (max 4 * 255 fits uint16), scale once.
    sums = images.reshape(n, 16, 2, 16, 2, c).sum(axis=(2, 4), dtype=np.uint16)
    return sums.astype(np.float32) / np.float32(4 * 255.0)


def load_cifar10_split(split: str, data_dir: str | None = None) -> dict[str, np.ndarray]:
    """One tfds split (e.g. `"train[0:80%]"`) as `{"image": f32 [n,16,16,3], "label": i32 [n]}`.

    Raises:
      DatasetNotFoundError: CIFAR-10 is not prepared (in ArrayRecord format) in `data_dir`.
      ImportError: tensorflow-datasets is not installed.
    """
    tfds = _import_tfds()
    try:
        # download=False: never reach for the network from inside a training run.
        # file_format is explicit because tfds only defaults to array_record when no
        # data_dir is given.
        source = tfds.data_source("cifar10", split=split, data_dir=data_dir, download=False,
                                  builder_kwargs={"file_format": "array_record"})
    except (KeyError, NotImplementedError, FileNotFoundError, OSError) as e:
        # KeyError: "splits is empty" (not generated); NotImplementedError: prepared as
        # TFRecord only; OSError/FileNotFoundError: unreadable directory.
        raise DatasetNotFoundError(_missing_message(data_dir, e)) from e
    n = len(source)
    first = source[0]
    images = np.empty((n,) + np.shape(first["image"]), np.uint8)
    labels = np.empty((n,), np.int32)
    # One record at a time: plain random access, and the one read path tfds' test
    # mocks support (their __getitems__ mock is broken in tfds 4.9.10).
    for i in range(n):
        ex = first if i == 0 else source[i]
        images[i] = ex["image"]
        labels[i] = ex["label"]
    return {"image": _to_16x16(images), "label": labels}


def synthetic_cifar10_datasets(batch_size: int = 128, seed: int = 0,
                               num_examples: int = SYNTHETIC_EXAMPLES) -> Datasets:
    """Random stand-ins for the four splits: float32 [n, 16, 16, 3] images in [0, 1] and
    int32 labels in [0, 10). For timing only: nothing in them can be learned."""
    rng = np.random.default_rng(seed)
    n = max(int(num_examples), batch_size)

    def split(i):
        arrays = {"image": rng.random((n, 16, 16, 3), dtype=np.float32),
                  "label": rng.integers(0, NUM_CLASSES, n, dtype=np.int32)}
        return BatchIterator(arrays, batch_size, seed=4 * seed + i)

    return Datasets(*[split(i) for i in range(len(SPLITS))])


def cifar10_datasets(batch_size: int = 128, seed: int = 0,
                     data_dir: str | None = None) -> Datasets:
    """Reads the four CIFAR-10 splits (16x16) into `BatchIterator`s, distinct seeds."""
    return Datasets(*[BatchIterator(load_cifar10_split(s, data_dir), batch_size, seed=4 * seed + i)
                      for i, s in enumerate(SPLITS.values())])


class Conv_Cifar10_16_32x64x64(Task):  # learned_optimization's name, hence not CamelCase
    """3-layer ReLU convnet (32x64x64) on 16x16 CIFAR-10, as in learned_optimization.

    Params: `{"conv2_d": {"w": (3,3,3,32), "b"}, "conv2_d_1": {"w": (3,3,32,64), "b"},
    "conv2_d_2": {"w": (3,3,64,64), "b"}, "linear": {"w": (64,10), "b"}}`.

    The data is read lazily, on first access of `.datasets`; `init` and `loss` need
    none of it, so the task can be built (and its params initialised) without CIFAR-10.

    Args:
      batch_size: examples per batch of every split.
      seed: seeds the batch order of the splits.
      data_dir: tensorflow-datasets data directory; None uses tfds' default
        ($TFDS_DATA_DIR, else ~/tensorflow_datasets).
      synthetic: random data of CIFAR-10's shapes instead of CIFAR-10 (for timing).
    """

    name = "cifar10_conv"
    supports_synthetic_data = True

    def __init__(self, batch_size: int = 128, seed: int = 0, data_dir: str | None = None,
                 synthetic: bool = False):
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.data_dir = None if data_dir is None else str(data_dir)
        self.synthetic = bool(synthetic)
        if self.synthetic and self.data_dir is not None:
            raise ValueError("pass data_dir or synthetic=True, not both")
        self._datasets: Datasets | None = None

    @property
    def datasets(self) -> Datasets:
        if self._datasets is None:
            self._datasets = (synthetic_cifar10_datasets(self.batch_size, self.seed)
                              if self.synthetic else
                              cifar10_datasets(self.batch_size, self.seed, self.data_dir))
        return self._datasets

    def init(self, key: jax.Array) -> dict[str, Any]:
        in_chs = (3,) + _CHANNELS[:-1]
        specs = tuple(conv_spec(name, c_in, c_out)
                      for name, c_in, c_out in zip(_CONV_NAMES, in_chs, _CHANNELS, strict=True))
        return init_layers(key, specs + (linear_spec("linear", _CHANNELS[-1], NUM_CLASSES),))

    def loss(self, params: dict[str, Any], key: jax.Array, batch: dict) -> jax.Array:
        del key
        x = batch["image"]
        for name, stride in zip(_CONV_NAMES, _STRIDES, strict=True):
            x = jax.nn.relu(conv2d(x, params[name], stride))
        x = jnp.mean(x, axis=(1, 2))
        logits = x @ params["linear"]["w"] + params["linear"]["b"]
        return softmax_cross_entropy(logits, batch["label"])

    def normalizer(self, loss: jax.Array) -> jax.Array:
        return image_normalizer(loss, NUM_CLASSES)
