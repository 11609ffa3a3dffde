"""The offline compositional image testbed for CLIP-style prompt learning, and CoOp's split protocol.

No CLIP weights exist offline, so exp_plpp pretrains a small dual encoder itself. For zero-shot to *novel* classes
to be possible, classes are (attribute, object) pairs such as "red seven": the attribute is a colour, the object a
digit, a garment or a shape. Pretraining sees only the *seen* combinations, a checkerboard over the attribute x
object grid, so every colour word and every object word still appears in pretraining while the held-out
combinations stay unseen. Every set lists its seen classes first, so CoOp's base-to-novel rule ("base = the first
ceil(n/2) labels") makes base = seen and novel = held-out.

Sources (all offline):
    mnist           ``<data root>/images/mnist/t10k-*``: the 10k MNIST test images (the train images are absent)
    usps            ``<data root>/images/usps/zip.test.gz``: 2,007 USPS test digits, 16x16
    sklearn_digits  ``sklearn.datasets.load_digits``: 1,797 optdigits images, 8x8
    fashion         Debian ``dataset-fashion-mnist`` (or ``<data root>/images/fashion-mnist``): 60k train + 10k test
    shapes          the ``easy-vqa`` package: 64x64 RGB shapes in 8 colours, labels derived from its questions

Every image becomes 32x32x3 uint8 by an exact rule (``to_size``): 28 -> 32 by zero padding, 16 and 8 -> 32 by
bilinear upsampling, 64 -> 32 by 2x2 average pooling.

    tb = build_testbed(None, ["red", "green", "blue", "yellow"], seed=0)
    tb["pretrain"]["digits"]        # seen colour-digit combinations of MNIST test images [0, 5000)
    tb["downstream"]["digits"]      # all 40 classes on MNIST test images [5000, 10000)
    base, novel = base_novel(len(tb["downstream"]["digits"].classnames))   # base = seen, novel = held-out
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.data import DatasetNotAvailableError, DataValidationError
from common.data import data_root as _default_root

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
# easy-VQA's palette (measured from its images), so a colour word means the same RGB in every set; the order fixes
# the attribute index the checkerboard uses. "black" renders nothing on colourise's black background: it is only
# for the shapes set, which draws on light backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
DEFAULT_COLOURS = ["red", "green", "blue", "yellow"]
SHAPE_COLOURS = ["red", "green", "blue", "yellow", "teal", "brown", "gray", "black"]
SHAPES = ["circle", "rectangle", "triangle"]
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FASHION_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
DEFAULT_TEMPLATE = "a photo of a {}."  # CoOp's hand prompt
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # where apt's dataset-fashion-mnist installs it
RAW_SETS = ("mnist", "usps", "sklearn_digits", "fashion", "shapes")
PRETRAIN_SETS = ("digits", "fashion", "shapes")
DOWNSTREAM_SETS = ("digits", "fashion", "shapes", "usps", "sklearn_digits", "digits_noise", "digits_blur")


@dataclass
class ImageSet:
    """Images with class labels; ``seen[c]`` says whether class c's combination was used in pretraining."""

    name: str
    images: np.ndarray  # uint8 (N, 32, 32, 3)
    labels: np.ndarray  # int64 (N,), indices into classnames
    classnames: list[str]
    seen: np.ndarray  # bool (n_classes,)
    template: str = DEFAULT_TEMPLATE
    source_idx: np.ndarray | None = None  # int64 (N,): row in load_raw's arrays, for provenance and disjointness
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # fail at construction, not deep inside a training loop
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"{self.name}: images must be uint8 (N, H, W, 3), got {self.images.dtype} "
                             f"{self.images.shape}")
        if len(self.labels) != len(self.images) or len(self.seen) != len(self.classnames):
            raise ValueError(f"{self.name}: {len(self.images)} images, {len(self.labels)} labels, "
                             f"{len(self.classnames)} classnames, {len(self.seen)} seen flags")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classnames)):
            raise ValueError(f"{self.name}: labels outside 0..{len(self.classnames) - 1}")
        if self.source_idx is not None and len(self.source_idx) != len(self.images):
            raise ValueError(f"{self.name}: source_idx has {len(self.source_idx)} rows for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> ImageSet:
        """The rows ``idx`` (an index or boolean array); classes unchanged."""
        idx = np.asarray(idx)
        src = None if self.source_idx is None else self.source_idx[idx]
        return ImageSet(self.name, self.images[idx], self.labels[idx], list(self.classnames), self.seen.copy(),
                        self.template, src, dict(self.meta))

    def relabel(self, classes: Sequence[int]) -> ImageSet:
        """Keep only ``classes``, relabelled 0..len-1 in the given order (CoOp's ``subsample_classes``)."""
        classes = [int(c) for c in classes]
        if len(set(classes)) != len(classes) or any(c < 0 or c >= len(self.classnames) for c in classes):
            raise ValueError(f"{self.name}: classes must be distinct labels in 0..{len(self.classnames) - 1}")
        new_of_old = np.full(len(self.classnames), -1, dtype=np.int64)
        new_of_old[classes] = np.arange(len(classes))
        keep = np.flatnonzero(new_of_old[self.labels] >= 0)
        out = self.subset(keep)
        out.labels = new_of_old[out.labels]
        out.classnames = [self.classnames[c] for c in classes]
        out.seen = self.seen[classes].copy()
        if "grid_of_class" in out.meta:  # keep the class -> (attribute, object) map in step
            out.meta["grid_of_class"] = np.asarray(out.meta["grid_of_class"])[classes]
        return out

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.classnames))


# ---------------------------------------------------------------------------------------------- raw readers


def _resolve_root(data_root: Path | None) -> Path:
    return Path(data_root) if data_root is not None else _default_root(required=True)


def _need(path: Path, how: str) -> Path:
    if not path.is_file():
        raise DatasetNotAvailableError(f"missing file {path}: {how}")
    return path


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped) as a uint8 array; a truncated file is a DataValidationError."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataValidationError(f"{path}: not a complete gzip file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataValidationError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) != offset + math.prod(shape):
        raise DataValidationError(f"{path}: {len(raw) - offset} data bytes for shape {shape} (truncated?)")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(shape).copy()


def _mnist(root: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "images" / "mnist"
    how = "the MNIST test set ships in ../shared/data/images/mnist (see its MANIFEST.md)"
    if part != "test":
        raise DatasetNotAvailableError(f"MNIST part '{part}': only the test images exist offline "
                                       f"({folder / 'train-images-idx3-ubyte.gz'} is not shipped); use part='test'")
    images = read_idx(_need(folder / "t10k-images-idx3-ubyte.gz", how))
    labels = read_idx(_need(folder / "t10k-labels-idx1-ubyte.gz", how))
    return images, labels


def _usps(root: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    path = _need(root / "images" / "usps" / "zip.test.gz",
                 "the USPS test set (ESL zip.test.gz) ships in ../shared/data/images/usps")
    if part != "test":
        raise DatasetNotAvailableError(f"USPS part '{part}': only {path.name} (the test set) exists offline")
    table = np.loadtxt(path, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 257:
        raise DataValidationError(f"{path}: expected rows of 1 label + 256 pixels, got shape {table.shape}")
    # values are in [-1, 1] with -1 the background: map to 0..255 so ink is bright, as in MNIST
    grey = np.rint((table[:, 1:] + 1.0) * 127.5).clip(0, 255).astype(np.uint8).reshape(-1, 16, 16)
    return grey, table[:, 0].astype(np.int64)


def _sklearn_digits(part: str) -> tuple[np.ndarray, np.ndarray]:
    if part not in ("test", "all"):
        raise ValueError(f"sklearn_digits has a single part (the optdigits test set): 'test', not '{part}'")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetNotAvailableError("sklearn_digits needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    grey = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 grey levels -> 0..255
    return grey, d.target.astype(np.int64)


def _fashion(root: Path | None, part: str) -> tuple[np.ndarray, np.ndarray]:
    if part not in ("train", "test"):
        raise ValueError(f"fashion part must be 'train' or 'test', not '{part}'")
    local = root / "images" / "fashion-mnist" if root is not None else None
    folder = local if local is not None and local.is_dir() else DEBIAN_FASHION
    stem = "train" if part == "train" else "t10k"
    how = ("install Fashion-MNIST with `apt-get install -y dataset-fashion-mnist` "
           "(or copy its files to <data root>/images/fashion-mnist)")
    images = read_idx(_need(folder / f"{stem}-images-idx3-ubyte.gz", how))
    labels = read_idx(_need(folder / f"{stem}-labels-idx1-ubyte.gz", how))
    return images, labels


def shape_labels(questions: list, shapes: Sequence[str] = SHAPES,
                 colours: Sequence[str] = SHAPE_COLOURS) -> dict[int, tuple[str, str]]:
    """(colour, shape) per easy-VQA image id, derived from its questions; images whose questions fix neither
    uniquely, or contradict each other, are left out.

    Each image holds one shape, so: an answer that is a shape or a colour fixes it; "what is the blue shape?" ->
    rectangle also fixes the colour, "what color is the triangle?" -> blue also the shape; a yes/no question naming
    one shape or colour fixes it when the answer asserts presence (yes without negation, or no with "not"/"no").
    """
    vocab_s, vocab_c = set(shapes), set(colours)
    found: dict[int, tuple[set, set]] = {}
    for q, a, i in questions:
        words = set(re.findall(r"[a-z]+", q.lower()))
        s_named, c_named = words & vocab_s, words & vocab_c
        s, c = found.setdefault(int(i), (set(), set()))
        if a in vocab_s:
            s.add(a)
            c.update(c_named if len(c_named) == 1 else ())
        elif a in vocab_c:
            c.add(a)
            s.update(s_named if len(s_named) == 1 else ())
        elif a in ("yes", "no") and (a == "yes") != bool(words & {"no", "not"}):
            named = s_named | c_named
            if len(named) == 1:
                (s if named <= vocab_s else c).update(named)
    return {i: (next(iter(c)), next(iter(s))) for i, (s, c) in sorted(found.items()) if len(s) == 1 and len(c) == 1}


def _shapes(part: str) -> tuple[np.ndarray, np.ndarray]:
    if part not in ("train", "test"):
        raise ValueError(f"shapes part must be 'train' or 'test', not '{part}'")
    try:
        import easy_vqa
    except ImportError:
        raise DatasetNotAvailableError("the shapes set needs the easy-vqa package: pip install easy-vqa") from None
    from PIL import Image

    folder = Path(easy_vqa.__file__).parent / "data" / part
    qpath = _need(folder / "questions.json", "reinstall easy-vqa: pip install --force-reinstall easy-vqa")
    labels = shape_labels(json.loads(qpath.read_text()))
    ids = sorted(labels)
    images = []
    for i in ids:
        png = _need(folder / "images" / f"{i}.png", "reinstall easy-vqa: pip install --force-reinstall easy-vqa")
        with Image.open(png) as im:
            images.append(np.asarray(im.convert("RGB")))
    # grid label, attribute-major over SHAPE_COLOURS x SHAPES (see checkerboard)
    grid = [SHAPE_COLOURS.index(labels[i][0]) * len(SHAPES) + SHAPES.index(labels[i][1]) for i in ids]
    return np.stack(images), np.asarray(grid, dtype=np.int64)


def load_raw(name: str, data_root: Path | None = None, part: str = "test") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images, int64 labels, class names) of a source at its native size.

    Grey sources ("mnist", "usps", "sklearn_digits", "fashion") give uint8 (N, h, w) and object names; "shapes"
    gives RGB uint8 (N, 64, 64, 3) and the natively compositional names "<colour> <shape>", labels attribute-major
    over SHAPE_COLOURS x SHAPES. ``part`` is "test" or "train": only fashion and shapes have a train part offline
    (sklearn_digits is one set, a copy of the optdigits test set). Missing files or packages raise
    DatasetNotAvailableError naming them and how to get them.
    """
    if name in ("mnist", "usps"):
        root = _resolve_root(data_root)
        images, labels = (_mnist if name == "mnist" else _usps)(root, part)
        return images, labels.astype(np.int64), list(DIGIT_NAMES)
    if name == "sklearn_digits":
        images, labels = _sklearn_digits(part)
        return images, labels, list(DIGIT_NAMES)
    if name == "fashion":
        images, labels = _fashion(Path(data_root) if data_root is not None else _default_root(required=False), part)
        return images, labels.astype(np.int64), list(FASHION_NAMES)
    if name == "shapes":
        images, labels = _shapes(part)
        return images, labels, [f"{c} {s}" for c in SHAPE_COLOURS for s in SHAPES]
    raise ValueError(f"unknown raw set '{name}'; known: {', '.join(RAW_SETS)}")


# ---------------------------------------------------------------------------------------------- pixel transforms


def colourise(grey: np.ndarray, colour_idx: np.ndarray, colours: Sequence[str] | None = None) -> np.ndarray:
    """Tint grey (N, h, w) uint8 foregrounds on black: rgb = grey / 255 * COLOURS[colour], rounded to nearest.

    ``colour_idx[n]`` indexes ``colours`` (default: COLOURS' order). Integer arithmetic, so exact: (g*c + 127) // 255
    is round(g*c / 255) because g*c / 255 never ends in .5 for integers.
    """
    names = list(COLOURS) if colours is None else list(colours)
    palette = np.asarray([COLOURS[c] for c in names], dtype=np.uint16)[np.asarray(colour_idx)]  # (N, 3)
    out = np.empty((*grey.shape, 3), dtype=np.uint8)
    for start in range(0, len(grey), 8192):  # chunks bound the uint16 temporary (Fashion train is 60k images)
        g = grey[start:start + 8192, ..., None].astype(np.uint16)
        out[start:start + 8192] = (g * palette[start:start + 8192, None, None, :] + 127) // 255
    return out


def _pool(images: np.ndarray, f: int) -> np.ndarray:
    n, h, w, c = images.shape
    s = images.reshape(n, h // f, f, w // f, f, c).sum(axis=(2, 4), dtype=np.uint32)
    return ((s + f * f // 2) // (f * f)).astype(np.uint8)  # block mean rounded half up, exact integers


def _upsample(images: np.ndarray, size: int, mode: str) -> np.ndarray:
    if mode == "nearest":
        f = size // images.shape[1]
        return images.repeat(f, axis=1).repeat(f, axis=2)
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy().copy()


def _pil_resize(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


def to_size(images: np.ndarray, size: int = IMAGE_SIZE, method: str = "auto") -> np.ndarray:
    """uint8 (N, h, w) or (N, h, w, 3) -> (N, size, size, 3); grey is repeated to 3 channels.

    ``method="auto"`` picks an exact rule for square images: h == size as is; h a multiple of size -> block average
    pooling (64 -> 32: 2x2 mean, rounded half up); size a multiple of h -> bilinear upsampling (torch, align_corners
    False; 16, 8 -> 32), which keeps strokes smooth as in MNIST; other h < size -> centred zero padding (28 -> 32: 2 px
    each side, MNIST's own framing kept); anything else -> PIL bicubic. Also "pad", "pool", "nearest", "bilinear",
    "bicubic" by name.
    """
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"to_size wants uint8 (N, h, w[, 3]), got {images.dtype} {images.shape}")
    h, w = images.shape[1:3]
    if method == "auto":
        if h != w:
            method = "bicubic"
        elif h == size:
            method = "none"
        elif h > size and h % size == 0:
            method = "pool"
        elif h < size and size % h == 0:
            method = "bilinear"
        else:
            method = "pad" if h < size else "bicubic"
    if method == "none":
        out = images
    elif method == "pool":
        out = _pool(images, h // size)
    elif method in ("nearest", "bilinear"):
        out = _upsample(images, size, method)
    elif method == "pad":
        top, left = (size - h) // 2, (size - w) // 2
        out = np.zeros((len(images), size, size, images.shape[-1]), dtype=np.uint8)
        out[:, top:top + h, left:left + w] = images
    elif method == "bicubic":
        rgb = images if images.shape[-1] == 3 else images.repeat(3, axis=-1)
        return _pil_resize(rgb, size)
    else:
        raise ValueError(f"unknown to_size method '{method}'")
    # repeat after resizing: 3x less work than resizing three identical channels
    return np.ascontiguousarray(out if out.shape[-1] == 3 else out.repeat(3, axis=-1))


def corrupt(images: np.ndarray, kind: str, severity: float, seed: int = 0) -> np.ndarray:
    """A corrupted copy of uint8 (N, H, W, 3) images, deterministic given ``seed``.

    "noise": additive Gaussian noise, sigma = severity on the [0, 1] intensity scale; "blur": Gaussian blur,
    sigma = severity pixels (scipy.ndimage, reflect borders); "contrast": x' = m + (x - m) * (1 - severity), m the
    per-image, per-channel mean (ImageNet-C's contrast rule), so severity 0 is the identity.
    """
    x = images.astype(np.float32)
    if kind == "noise":
        x = x + np.random.default_rng(seed).normal(0.0, severity * 255.0, size=x.shape).astype(np.float32)
    elif kind == "blur":
        from scipy.ndimage import gaussian_filter

        x = gaussian_filter(x, sigma=(0, severity, severity, 0))
    elif kind == "contrast":
        m = x.mean(axis=(1, 2), keepdims=True)
        x = m + (x - m) * (1.0 - severity)
    else:
        raise ValueError(f"unknown corruption '{kind}'; use noise, blur or contrast")
    return np.rint(x).clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- compositional sets


def checkerboard(n_attr: int, n_obj: int) -> np.ndarray:
    """bool (n_attr * n_obj,) in grid order (index a * n_obj + o): seen iff (a + o) is even.

    For n_attr, n_obj >= 2 every attribute and every object occurs both seen and held out, so pretraining teaches
    every word while each held-out pair stays novel; the seen count is ceil(n_attr * n_obj / 2).
    """
    a, o = np.divmod(np.arange(n_attr * n_obj), n_obj)
    return (a + o) % 2 == 0


def grid_set(name: str, images: np.ndarray, attr_idx: np.ndarray, obj_idx: np.ndarray, attrs: Sequence[str],
             objs: Sequence[str], template: str = DEFAULT_TEMPLATE, source_idx: np.ndarray | None = None) -> ImageSet:
    """An ImageSet over the full attribute x object grid, classes ordered seen first, then held out (each in grid
    order), so CoOp's base classes (the first ceil(n/2) labels) are exactly the seen combinations."""
    n_obj = len(objs)
    seen_grid = checkerboard(len(attrs), n_obj)
    order = np.concatenate([np.flatnonzero(seen_grid), np.flatnonzero(~seen_grid)])  # class -> grid index
    class_of_grid = np.empty_like(order)
    class_of_grid[order] = np.arange(len(order))
    labels = class_of_grid[np.asarray(attr_idx) * n_obj + np.asarray(obj_idx)].astype(np.int64)
    classnames = [f"{attrs[g // n_obj]} {objs[g % n_obj]}" for g in order]
    meta = {"attributes": list(attrs), "objects": list(objs), "grid_of_class": order}
    return ImageSet(name, images, labels, classnames, seen_grid[order], template, source_idx, meta)


def _seed(seed: int, name: str) -> np.random.Generator:
    # a stable per-set stream (crc32, not hash(): Python salts str hashes per process)
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))


def compositional_set(name: str, raw_images: np.ndarray, raw_labels: np.ndarray, object_names: Sequence[str],
                      colours: Sequence[str], rng_seed: int, *, only_seen: bool = False,
                      template: str = DEFAULT_TEMPLATE, source_idx: np.ndarray | None = None) -> ImageSet:
    """Colour each grey image with a colour drawn uniformly by a seeded RNG; class = f"{colour} {object}".

    Class order: the seen combinations (checkerboard over colours x objects) first, then the held-out ones, so CoOp's
    rule "base = first ceil(n/2) labels" gives base = seen and novel = held out; ``seen`` says which.
    ``only_seen=True`` (pretraining) draws each image's colour uniformly among the colours seen with its object, so no
    image is wasted, and returns only the seen classes (same labels, as they come first).
    """
    n_attr, n_obj = len(colours), len(object_names)
    obj = np.asarray(raw_labels, dtype=np.int64)
    source_idx = np.arange(len(obj), dtype=np.int64) if source_idx is None else np.asarray(source_idx, np.int64)
    rng = np.random.default_rng(rng_seed)
    if only_seen:
        seen = checkerboard(n_attr, n_obj).reshape(n_attr, n_obj)
        allowed = [np.flatnonzero(seen[:, o]) for o in range(n_obj)]
        counts = np.asarray([len(a) for a in allowed])
        table = np.asarray([np.pad(a, (0, n_attr - len(a))) for a in allowed])
        pick = np.floor(rng.random(len(obj)) * counts[obj]).astype(np.int64)
        attr = table[obj, pick]
    else:
        attr = rng.integers(0, n_attr, size=len(obj))
    images = to_size(colourise(raw_images, attr, colours))
    out = grid_set(name, images, attr, obj, colours, object_names, template, source_idx)
    return out.relabel(np.flatnonzero(out.seen)) if only_seen else out


def _cap(s: ImageSet, n: int | None, seed: int) -> ImageSet:
    if n is None or len(s) <= n:
        return s
    return s.subset(np.sort(_seed(seed, s.name + "/cap").permutation(len(s))[:n]))


def _shape_set(name: str, images: np.ndarray, grid: np.ndarray, colours: Sequence[str], only_seen: bool) -> ImageSet:
    attr_all, obj = np.divmod(grid, len(SHAPES))
    names = [SHAPE_COLOURS[a] for a in attr_all]
    keep = np.flatnonzero([c in colours for c in names])  # colours outside the chosen list are dropped
    attr = np.asarray([list(colours).index(names[k]) for k in keep], dtype=np.int64)
    out = grid_set(name, to_size(images[keep]), attr, obj[keep], colours, SHAPES, source_idx=keep)
    if only_seen:
        out = out.relabel(np.flatnonzero(out.seen))
    return out


def build_testbed(data_root: Path | None = None, colours: Sequence[str] = DEFAULT_COLOURS, seed: int = 0, *,
                  pretrain: Sequence[str] = PRETRAIN_SETS, downstream: Sequence[str] = DOWNSTREAM_SETS,
                  max_pretrain: int | None = None, max_downstream: int | None = None, mnist_split: int = 5000,
                  shape_colours: Sequence[str] = SHAPE_COLOURS, noise_sigma: float = 0.25, blur_sigma: float = 1.0,
                  skip_missing: bool = False) -> dict[str, dict[str, ImageSet]]:
    """{"pretrain": {...}, "downstream": {...}}, with no source image in both.

    pretrain (seen combinations only): "digits" = MNIST test images [0, mnist_split), "fashion" = Fashion-MNIST train
    (60k), "shapes" = easy-VQA train. downstream (all classes, seen first): "digits" = MNIST [mnist_split, 10000),
    "fashion" = Fashion-MNIST test, "shapes" = easy-VQA test, and domain-generalisation targets with the classes of
    "digits": "usps", "sklearn_digits" (colourised the same way), "digits_noise", "digits_blur" (corrupted copies of
    the downstream digits). MNIST's first 5k test images come from NIST's training writers and are cleaner than the
    last 5k, a mild shift between pretraining and downstream digits. ``max_*`` cap images per set (seeded subset);
    ``skip_missing`` leaves out, with a warning, sets whose source is missing instead of raising.
    """
    colours = list(colours)
    cache: dict[tuple[str, str], tuple] = {}

    def raw(src: str, part: str) -> tuple:
        if (src, part) not in cache:
            cache[(src, part)] = load_raw(src, data_root, part)
        return cache[(src, part)]

    def colour_set(set_name: str, src: str, part: str, rows: slice | None, only_seen: bool) -> ImageSet:
        images, labels, names = raw(src, part)
        idx = np.arange(len(labels))[rows] if rows is not None else np.arange(len(labels))
        s = compositional_set(set_name, images[idx], labels[idx], names, colours,
                              int(_seed(seed, f"{set_name}/{src}/{part}/{only_seen}").integers(2**31)),
                              only_seen=only_seen, source_idx=idx)
        s.meta.update(source=src, part=part)  # provenance: source_idx indexes load_raw(src, part=part)
        return s

    def shape_set(set_name: str, part: str, only_seen: bool) -> ImageSet:
        s = _shape_set(set_name, *raw("shapes", part)[:2], shape_colours, only_seen)
        s.meta.update(source="shapes", part=part)
        return s

    def make_pretrain(name: str) -> ImageSet:
        if name == "digits":
            return colour_set(name, "mnist", "test", slice(0, mnist_split), True)
        if name == "fashion":
            return colour_set(name, "fashion", "train", None, True)
        if name == "shapes":
            return shape_set(name, "train", True)
        raise ValueError(f"unknown pretraining set '{name}'; known: {', '.join(PRETRAIN_SETS)}")

    built: dict[str, ImageSet] = {}

    def make_downstream(name: str) -> ImageSet:
        if name in built:
            return built[name]
        if name == "digits":
            s = colour_set(name, "mnist", "test", slice(mnist_split, None), False)
        elif name == "fashion":
            s = colour_set(name, "fashion", "test", None, False)
        elif name == "shapes":
            s = shape_set(name, "test", False)
        elif name in ("usps", "sklearn_digits"):
            s = colour_set(name, name, "test", None, False)
        elif name in ("digits_noise", "digits_blur"):
            d = make_downstream("digits")
            kind, sev = ("noise", noise_sigma) if name == "digits_noise" else ("blur", blur_sigma)
            s = d.subset(np.arange(len(d)))
            s.name, s.images = name, corrupt(d.images, kind, sev, seed)
            s.meta = {**d.meta, "corruption": kind, "severity": sev}
        else:
            raise ValueError(f"unknown downstream set '{name}'; known: {', '.join(DOWNSTREAM_SETS)}")
        built[name] = s
        return s

    out: dict[str, dict[str, ImageSet]] = {"pretrain": {}, "downstream": {}}
    for group, names, make, cap in (("pretrain", pretrain, make_pretrain, max_pretrain),
                                    ("downstream", downstream, make_downstream, max_downstream)):
        for name in names:
            try:
                out[group][name] = _cap(make(name), cap, seed)
            except DatasetNotAvailableError as exc:
                if not skip_missing:
                    raise
                log.warning("testbed: %s set '%s' left out: %s", group, name, exc)
    return out


@dataclass
class PretrainPairs:
    """Image-caption pairs for contrastive pretraining: image n's captions are ``captions[labels[n]]``, one per
    template, so a text tower encodes each (class, template) caption once."""

    images: np.ndarray  # uint8 (N, 32, 32, 3)
    labels: np.ndarray  # int64 (N,), indices into classnames
    classnames: list[str]  # unique over all sets, in first-seen order
    captions: list[list[str]]  # per class, one caption per template
    source: np.ndarray  # int64 (N,), index into set_names
    set_names: list[str]


def pretrain_pairs(sets: dict[str, ImageSet], templates: Sequence[str]) -> PretrainPairs:
    """Concatenate the pretraining sets into one image-caption table (classes with the same name are merged)."""
    classnames: list[str] = []
    index: dict[str, int] = {}
    images, labels, source = [], [], []
    for k, s in enumerate(sets.values()):
        ids = np.asarray([index.setdefault(c, len(index)) for c in s.classnames], dtype=np.int64)
        classnames += [c for c in s.classnames if c not in classnames]
        images.append(s.images)
        labels.append(ids[s.labels])
        source.append(np.full(len(s), k, dtype=np.int64))
    captions = [[t.format(c) for t in templates] for c in classnames]
    return PretrainPairs(np.concatenate(images), np.concatenate(labels), classnames, captions,
                         np.concatenate(source), list(sets))


# ---------------------------------------------------------------------------------------------- CoOp split protocol


def fixed_split(labels: np.ndarray, p_val: float, p_test: float, seed: int) -> dict[str, np.ndarray]:
    """Per-class stratified train/val/test index arrays (CoOp's ``split_trainval`` idea), sorted, deterministic.

    Per class (in label order) a seeded shuffle; the first round(n * p_val) go to val, the next round(n * p_test) to
    test, the rest to train.
    """
    if not (0 <= p_val and 0 <= p_test and p_val + p_test < 1):
        raise ValueError(f"need p_val, p_test >= 0 and p_val + p_test < 1, got {p_val}, {p_test}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val, n_test = round(len(idx) * p_val), round(len(idx) * p_test)
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val:n_val + n_test])
        parts["train"].append(idx[n_val + n_test:])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) if v else np.zeros(0, np.int64) for k, v in parts.items()}


def few_shot_indices(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Dassl's ``generate_fewshot_dataset``: per class, k items without replacement when it has at least k, else
    with replacement (``repeat=True``). Output: classes in label order, each class's picks sorted. k < 1 returns every
    index (Dassl returns the full set)."""
    labels = np.asarray(labels)
    if k < 1:
        return np.arange(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picks.append(np.sort(rng.choice(idx, size=k, replace=len(idx) < k)))
    return np.concatenate(picks).astype(np.int64) if picks else np.zeros(0, np.int64)


def base_novel(n_classes: int) -> tuple[list[int], list[int]]:
    """CoOp's ``subsample_classes``: m = ceil(n / 2); base = the first m labels, novel = the rest."""
    m = math.ceil(n_classes / 2)
    return list(range(m)), list(range(m, n_classes))
