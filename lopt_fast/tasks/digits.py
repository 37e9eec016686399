"""Tasks on the embedded 8x8 UCI digits: the default data set, needing no download.

`lopt_fast/tasks/data/digits.npz` holds the 1797 images (uint8, 0..16, [1797, 8, 8])
and labels (uint8, 0..9) that scikit-learn bundles; see `DIGITS_LICENSE.txt` beside
it (CC BY 4.0, Alpaydin & Kaynak 1998). scikit-learn is not needed at run time; the
archive was written once with

    python -c "import numpy as np, sklearn.datasets as d; x = d.load_digits(); \\
      np.savez_compressed('lopt_fast/tasks/data/digits.npz', \\
      images=x.images.astype(np.uint8), labels=x.target.astype(np.uint8))"

The split is a fixed permutation (seed `SPLIT_SEED`) cut into `SPLIT_SIZES`, so it is
the same on every machine and independent of the task's seed; the task's seed only
drives the batch order of each split.

This module also holds the few layer helpers the image tasks share: haiku's default
initialisers, a 'SAME' NHWC convolution (im2col on CPU, see `conv2d`) and softmax
cross-entropy.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lopt_fast.tasks.base import Datasets, Task
from lopt_fast.tasks.data import BatchIterator

SPLITS = ("train", "inner_valid", "outer_valid", "test")
SPLIT_SIZES = {"train": 1200, "inner_valid": 200, "outer_valid": 200, "test": 197}
SPLIT_SEED = 0
NUM_CLASSES = 10

# ---------------------------------------------------------------------------------------
# Data


@functools.lru_cache(maxsize=1)
def load_digits() -> dict[str, dict[str, np.ndarray]]:
    """The four splits as `{"image": float32 [n, 8, 8, 1] in [0, 1], "label": int32 [n]}`.

    Cached: the arrays are shared between tasks and marked read-only.
    """
    # tasks/data/ is a plain folder of package data beside the data.py module.
    ref = importlib.resources.files("lopt_fast.tasks").joinpath("data/digits.npz")
    with ref.open("rb") as f, np.load(f) as npz:
        images, labels = npz["images"], npz["labels"]
    if images.shape[0] != sum(SPLIT_SIZES.values()):
        raise ValueError(f"digits.npz has {images.shape[0]} images, expected "
                         f"{sum(SPLIT_SIZES.values())}")
    images = (images.astype(np.float32) / 16.0)[..., None]
    labels = labels.astype(np.int32)
    order = np.random.default_rng(SPLIT_SEED).permutation(images.shape[0])
    out, start = {}, 0
    for split in SPLITS:
        idx = order[start : start + SPLIT_SIZES[split]]
        start += SPLIT_SIZES[split]
        arrays = {"image": images[idx], "label": labels[idx]}
        for a in arrays.values():
            a.flags.writeable = False
        out[split] = arrays
    return out


def digits_datasets(batch_size: int = 128, seed: int = 0) -> Datasets:
    """`Datasets` of `BatchIterator`s over the digit splits, one distinct seed per split."""
    splits = load_digits()
    return Datasets(*[BatchIterator(splits[s], batch_size, seed=4 * seed + i)
                      for i, s in enumerate(SPLITS)])


# ---------------------------------------------------------------------------------------
# Layers (plain jnp on nested dicts; initialisers match haiku's defaults)


LayerSpec = tuple[str, tuple[int, ...], float]  # (name, weight shape, init stddev)


def linear_spec(name: str, fan_in: int, fan_out: int) -> LayerSpec:
    """`hk.Linear`'s default init: truncated normal with stddev 1/sqrt(fan_in)."""
    return (name, (fan_in, fan_out), 1.0 / math.sqrt(fan_in))


def conv_spec(name: str, in_ch: int, out_ch: int, kernel: int = 3) -> LayerSpec:
    """`hk.Conv2D`'s default init, VarianceScaling(1, fan_in, truncated_normal), HWIO.

    The 0.8796 is the std of a unit normal truncated at +-2: dividing by it makes the
    std *after* truncation sqrt(1 / fan_in).
    """
    fan_in = kernel * kernel * in_ch
    return (name, (kernel, kernel, in_ch, out_ch), math.sqrt(1.0 / fan_in) / 0.87962566103423978)


@functools.partial(jax.jit, static_argnames="specs")
def init_layers(key: jax.Array, specs: tuple[LayerSpec, ...]) -> dict[str, dict[str, jax.Array]]:
    """`{name: {"w": stddev * truncated_normal(-2, 2), "b": zeros(shape[-1])}}` per spec.

    All weights come from one truncated-normal draw, split and reshaped, inside one
    cached jit: XLA:CPU takes ~0.5-1 s to compile each random kernel, so one draw per
    layer (eagerly or in a fresh trace) made `init` cost seconds; this costs one
    compile per architecture and process. (Values differ from haiku's, which splits
    keys per module; the distributions are the same.)
    """
    sizes = [math.prod(shape) for _, shape, _ in specs]
    flat = jax.random.truncated_normal(key, -2.0, 2.0, (sum(sizes),), jnp.float32)
    params, start = {}, 0
    for (name, shape, stddev), size in zip(specs, sizes, strict=True):
        params[name] = {"w": stddev * flat[start : start + size].reshape(shape),
                        "b": jnp.zeros(shape[-1:], jnp.float32)}
        start += size
    return params


def conv2d(x: jax.Array, p: dict[str, jax.Array], stride: int = 1,
           impl: str = "auto") -> jax.Array:
    """NHWC x HWIO convolution with 'SAME' padding (TF/haiku convention), plus bias.

    Args:
      x: [batch, height, width, in_channels].
      p: {"w": [kh, kw, in_channels, out_channels], "b": [out_channels]}.
      stride: the same in both spatial dimensions.
      impl: "lax" (`lax.conv_general_dilated`), "im2col" (the kh*kw shifted, strided
        views concatenated on channels, then one matmul), or "auto": im2col on CPU,
        lax elsewhere. Why: XLA:CPU runs convolutions inside `lax.scan`/while loops
        (every training curve and truncated unroll) 15-40x slower than the same
        convolution outside one, while im2col's slices and matmul are fast in both.
        The two agree to float rounding (~1e-6).
    """
    if impl == "auto":
        impl = "im2col" if jax.default_backend() == "cpu" else "lax"
    if impl == "lax":
        y = jax.lax.conv_general_dilated(x, p["w"], (stride, stride), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + p["b"]
    if impl != "im2col":
        raise ValueError(f"impl must be 'auto', 'lax' or 'im2col', got {impl!r}")
    kh, kw, in_ch, out_ch = p["w"].shape
    _, h, w, _ = x.shape
    out_h, out_w = -(-h // stride), -(-w // stride)
    # 'SAME': total padding so the output is ceil(in / stride); the odd pixel goes after.
    pad_h = max((out_h - 1) * stride + kh - h, 0)
    pad_w = max((out_w - 1) * stride + kw - w, 0)
    xp = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                     (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    # Patch channels ordered (di, dj, c): the row-major flattening of HWIO's (h, w, i).
    patches = jnp.concatenate(
        [xp[:, i : i + (out_h - 1) * stride + 1 : stride, j : j + (out_w - 1) * stride + 1 : stride]
         for i in range(kh) for j in range(kw)], axis=-1)
    return patches @ p["w"].reshape(kh * kw * in_ch, out_ch) + p["b"]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over the batch of -log softmax(logits)[label]."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


def image_normalizer(loss: jax.Array, num_classes: int = NUM_CLASSES) -> jax.Array:
    """learned_optimization's image-task normaliser: clip to [0, 1.5 log(num_classes)]."""
    return jnp.clip(loss, 0.0, 1.5 * math.log(num_classes))


# ---------------------------------------------------------------------------------------
# Tasks


class DigitsMLP(Task):
    """ReLU MLP on the flattened 8x8 digits, softmax cross-entropy.

    Params: `{"linear_0": {"w", "b"}, ..., "linear_{L}": {"w", "b"}}`, the last layer
    mapping to the 10 classes.

    Args:
      hidden: widths of the hidden layers.
      batch_size: examples per batch of every split.
      seed: seeds the batch order of the splits (not the split itself).
    """

    name = "digits_mlp"

    def __init__(self, hidden: Sequence[int] = (32, 32), batch_size: int = 128, seed: int = 0):
        self.hidden = tuple(int(h) for h in hidden)
        self.batch_size = int(batch_size)
        self.datasets = digits_datasets(self.batch_size, seed)

    def init(self, key: jax.Array) -> dict:
        sizes = (64,) + self.hidden + (NUM_CLASSES,)
        return init_layers(key, tuple(linear_spec(f"linear_{i}", sizes[i], sizes[i + 1])
                                      for i in range(len(sizes) - 1)))

    def loss(self, params: dict, key: jax.Array, batch: dict) -> jax.Array:
        del key
        x = jnp.reshape(batch["image"], (batch["image"].shape[0], -1))
        n = len(params)
        for i in range(n):
            p = params[f"linear_{i}"]
            x = x @ p["w"] + p["b"]
            if i < n - 1:
                x = jax.nn.relu(x)
        return softmax_cross_entropy(x, batch["label"])

    def normalizer(self, loss: jax.Array) -> jax.Array:
        return image_normalizer(loss)


class DigitsConv(Task):
    """Small ReLU convnet on the 8x8 digits.

    3x3 'SAME' convolutions with ReLU, each at stride 2 (8x8 -> 4x4 -> 2x2), a mean
    over space and a linear head. learned_optimization's conv tasks (as
    `Conv_Cifar10_16_32x64x64`) use stride 2 only in the first layer; striding every
    layer makes a step ~3x cheaper here (FLOPs dominate on CPU) at the same accuracy
    (~95% test after 500 Adam steps either way), and this task is meant to be trained
    thousands of times on a CPU.

    Params: `{"conv2_d": ..., "conv2_d_1": ..., "linear": {"w", "b"}}` (haiku names).

    Args:
      channels: output channels of the conv layers.
      batch_size: examples per batch of every split.
      seed: seeds the batch order of the splits.
    """

    name = "digits_conv"

    def __init__(self, channels: Sequence[int] = (16, 32), batch_size: int = 128, seed: int = 0):
        self.channels = tuple(int(c) for c in channels)
        self.batch_size = int(batch_size)
        self.datasets = digits_datasets(self.batch_size, seed)

    def init(self, key: jax.Array) -> dict:
        in_chs = (1,) + self.channels[:-1]
        specs = tuple(conv_spec(_conv_name(i), c_in, c_out)
                      for i, (c_in, c_out) in enumerate(zip(in_chs, self.channels, strict=True)))
        return init_layers(key, specs + (linear_spec("linear", self.channels[-1], NUM_CLASSES),))

    def loss(self, params: dict, key: jax.Array, batch: dict) -> jax.Array:
        del key
        x = batch["image"]
        for i in range(len(self.channels)):
            x = jax.nn.relu(conv2d(x, params[_conv_name(i)], stride=2))
        x = jnp.mean(x, axis=(1, 2))
        logits = x @ params["linear"]["w"] + params["linear"]["b"]
        return softmax_cross_entropy(logits, batch["label"])

    def normalizer(self, loss: jax.Array) -> jax.Array:
        return image_normalizer(loss)


def _conv_name(i: int) -> str:
    """haiku's module names: conv2_d, conv2_d_1, conv2_d_2, ..."""
    return "conv2_d" if i == 0 else f"conv2_d_{i}"
