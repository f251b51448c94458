"""Dreambooth data: concepts, instance and class images, preprocessing, and resumable batches.

Everything here is numpy/PIL; JAX is touched only when class images are
generated through the pipeline (:func:`ensure_class_images`).

Order and randomness. Batch ``position`` (an integer: how many global batches
came before) holds the examples of the instance *sequence* at indices
``j = position * batch_size + r``. Sequence index ``j`` lies in epoch
``j // epoch_size`` (``epoch_size`` = instance images x ``repeats``), whose order
is the permutation drawn from ``np.random.default_rng([seed, 0, epoch])``. Each
instance example is paired with a class example of its own concept, taken from
that concept's class sequence (shuffled per class epoch from
``default_rng([seed, 1, concept, class_epoch])``), so class images are cycled
evenly at their own rate. The flip and crop of row ``j`` come from
``default_rng([seed, 2, j])`` (instance) and ``default_rng([seed, 3, j])``
(class). So ``batch(k)`` is a pure function of ``(seed, k)``: a run resumed from
a saved position sees exactly the batches of an uninterrupted run, whatever
the image count, batch size or device count (epochs simply wrap).

Caching. :meth:`DreamboothDataset.iter_all_images` yields every image once,
center-cropped and unflipped, for encoding latents once. Cached latents lose
the random-crop variety (the cache holds the center crop) and lose random
flips unless the flipped image (``image[:, ::-1]``) is encoded and cached too;
``batch()`` returns ``*_index`` and ``*_flip`` so a trainer can look the right
latent up instead of using the pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sd_jax.dreambooth import config as config_schema
from sd_jax.images import open_image, save_png, to_rgb
from sd_jax.limits import MAX_SEED
from sd_jax.outputs import image_metadata
from sd_jax.request import DEFAULT_GUIDANCE, DEFAULT_STEPS

log = logging.getLogger("sd_jax")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}
CROPS = ("center", "random")
GENERATED_NAME = re.compile(r"^class-(\d+)-(\d+)\.png$")  # class-{index:05d}-{seed}.png
TFDS_NAME = re.compile(r"^tfds-(\d+)\.png$")  # tfds-{index:05d}.png


# ----------------------------------------------------------------------------- concepts

def list_images(folder: str | Path) -> list[Path]:
    """Image files (by extension, case-insensitive, hidden files skipped) directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


@dataclasses.dataclass(frozen=True)
class Concept(config_schema.Concept):
    """A recipe's concept (``config.Concept``: same fields) checked against the file system:
    the instance folder exists and holds images, and a class prompt comes with a class folder."""

    def __post_init__(self) -> None:
        for name in ("instance_dir", "class_dir"):
            value = getattr(self, name)
            if isinstance(value, Path):
                object.__setattr__(self, name, str(value))  # plain strings: the config is saved as JSON
        super().__post_init__()  # the schema's checks: types, non-empty prompts, counts
        folder = Path(self.instance_dir)
        if not folder.is_dir():
            raise ValueError(f"instance_dir {self.instance_dir!r} is not an existing folder")
        if not list_images(folder):
            raise ValueError(f"instance_dir {self.instance_dir!r} holds no images (looked for files ending in "
                             f"{', '.join(IMAGE_EXTENSIONS)})")
        if self.class_prompt is not None and self.class_dir is None:
            raise ValueError(f"class_prompt {self.class_prompt!r} needs a class_dir (where class images are kept)")
        if self.class_dir is not None and self.class_prompt is None:
            raise ValueError(f"class_dir {self.class_dir!r} needs a class_prompt (the prompt of its images)")
        if self.class_dir is not None and Path(self.class_dir).exists() and not Path(self.class_dir).is_dir():
            raise ValueError(f"class_dir {self.class_dir!r} exists and is not a folder")
        if self.num_class_images < 1:
            raise ValueError(f"num_class_images must be an integer >= 1, got {self.num_class_images!r}")

    @property
    def with_prior(self) -> bool:
        """Whether this concept uses prior preservation (has a class prompt)."""
        return self.class_prompt is not None


@dataclasses.dataclass(frozen=True)
class Example:
    """One training image (RGB, EXIF-rotated) and its prompt."""

    image: Image.Image
    prompt: str
    path: Path


# ----------------------------------------------------------------------------- loading

def _caption(image_path: Path, default: str) -> str:
    """The prompt of an image: the text of ``<stem>.txt`` beside it, else ``default``."""
    txt = image_path.with_suffix(".txt")
    if not txt.is_file():
        return default
    try:
        text = txt.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read caption file {str(txt)!r}: {err}") from None
    if not text:
        raise ValueError(f"caption file {str(txt)!r} is empty; write the prompt for {image_path.name} "
                         f"in it or delete it to use the concept's prompt")
    return text


def resize_shortest_side(img: Image.Image, size: int, resample: str = "bilinear") -> Image.Image:
    """Resize so the shorter side is ``size`` (the longer one truncated, as torchvision's ``Resize(size)``)."""
    if resample not in RESAMPLE:
        raise ValueError(f"resample={resample!r} must be one of {sorted(RESAMPLE)}")
    w, h = img.size
    if min(w, h) == size:
        return img
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return img.resize(new, RESAMPLE[resample])


def load_images(paths: Sequence[Path], default_prompt: str, *, skip_bad: bool = False, limit: int | None = None,
                resolution: int | None = None, resample: str = "bilinear") -> list[Example]:
    """Load images as RGB :class:`Example` s (captions from ``.txt`` files), in the given order.

    An unreadable image raises a ``ValueError`` naming it, or with ``skip_bad``
    warns and is skipped. ``limit`` stops after that many good images;
    ``resolution`` resizes each (shorter side) as soon as it is read, to keep
    memory small.
    """
    examples = []
    for path in paths:
        if limit is not None and len(examples) >= limit:
            break
        try:
            img = to_rgb(open_image(path))
        except ValueError as err:
            if not skip_bad:
                raise ValueError(f"{err} (pass skip_bad / --skip-bad-images to skip unreadable images)") from None
            warnings.warn(f"skipping unreadable image {str(path)!r}", stacklevel=2)
            continue
        if resolution is not None:
            img = resize_shortest_side(img, resolution, resample)
        examples.append(Example(image=img, prompt=_caption(Path(path), default_prompt), path=Path(path)))
    return examples


def load_instance_images(concept: Concept, *, skip_bad: bool = False, resolution: int | None = None,
                         resample: str = "bilinear") -> list[Example]:
    """The concept's photos, sorted by file name; a ``.txt`` beside an image overrides the instance prompt."""
    paths = list_images(concept.instance_dir)
    if not paths:
        raise ValueError(f"instance_dir {concept.instance_dir!r} holds no images (looked for files ending in "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
    examples = load_images(paths, concept.instance_prompt, skip_bad=skip_bad, resolution=resolution,
                           resample=resample)
    if not examples:
        raise ValueError(f"instance_dir {concept.instance_dir!r}: none of its {len(paths)} image files is readable")
    return examples


def load_class_images(concept: Concept, *, skip_bad: bool = False, resolution: int | None = None,
                      resample: str = "bilinear") -> list[Example]:
    """The first ``num_class_images`` readable images of the class folder, by name (empty without a class prompt)."""
    if not concept.with_prior:
        return []
    examples = load_images(list_images(concept.class_dir), concept.class_prompt, skip_bad=skip_bad,
                           limit=concept.num_class_images, resolution=resolution, resample=resample)
    if len(examples) < concept.num_class_images:
        raise ValueError(f"class_dir {concept.class_dir!r} holds {len(examples)} readable image(s) of the "
                         f"{concept.num_class_images} asked for; run ensure_class_images first (or lower "
                         f"num_class_images)")
    return examples


# ----------------------------------------------------------------------------- class images

def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def _existing_class_images(folder: Path, limit: int) -> list[Path]:
    """Up to ``limit`` readable images in ``folder`` (sorted); unreadable ones are warned about, not counted."""
    for stale in folder.glob("*.png.tmp"):  # a write interrupted before its rename
        if GENERATED_NAME.match(stale.name[:-4]) or TFDS_NAME.match(stale.name[:-4]):
            stale.unlink(missing_ok=True)
    found = []
    for path in list_images(folder):
        if len(found) == limit:
            break
        if _readable(path):
            found.append(path)
        else:
            warnings.warn(f"class image {str(path)!r} is unreadable and is not counted", stacklevel=3)
    return found


def ensure_class_images(pipe: Any, concept: Concept, *, resolution: int, batch_size: int, seed: int,
                        num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                        scheduler: str | None = None, clip_skip: int = 0, progress: bool = True) -> list[Path]:
    """Make ``concept.class_dir`` hold ``num_class_images`` images; return their paths (sorted).

    Readable images already there (the user's or an earlier run's) are reused;
    only the missing ones are generated by ``pipe.generate`` from the class
    prompt, ``batch_size`` at a time, each written as soon as its batch is done
    as ``class-{index:05d}-{seed}.png`` (PNG text: prompt, seed, steps, ...)
    through a temporary file and a rename. Class image ``index`` gets seed
    ``seed + index``, and the indices continue after those present, so an
    interrupted generation resumes where it stopped and ends with the images
    of an uninterrupted run. ``clip_skip``: the text encoder layers skipped, as
    the run trains. ``pipe`` may be None when nothing is missing.
    Multi-host: call it on one process (then a barrier) when the folder is
    shared, or on every host into host-local folders.
    """
    if not concept.with_prior:
        return []
    for name, value in (("resolution", resolution), ("batch_size", batch_size), ("num_inference_steps",
                                                                                  num_inference_steps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an integer >= 0")
    folder = Path(concept.class_dir)
    folder.mkdir(parents=True, exist_ok=True)
    want = concept.num_class_images
    existing = _existing_class_images(folder, want)
    missing = want - len(existing)
    if missing <= 0:
        return existing
    if pipe is None:
        raise ValueError(f"class_dir {str(folder)!r} needs {missing} more class image(s) but no pipeline was given")
    indices = [int(m.group(1)) for p in folder.iterdir() if (m := GENERATED_NAME.match(p.name))]
    start = max(len(existing), max(indices, default=-1) + 1)
    if seed + start + missing - 1 > MAX_SEED:
        raise ValueError(f"seed {seed} + class image index {start + missing - 1} exceeds the 32-bit seed range")
    log.info("generating %d class image(s) for %r in %s (%d there)", missing, concept.class_prompt, folder,
             len(existing))
    from tqdm.auto import tqdm

    made = []
    with tqdm(total=missing, desc="class images", unit="img", disable=not progress) as bar:
        for lo in range(start, start + missing, batch_size):
            index = list(range(lo, min(lo + batch_size, start + missing)))
            result = pipe.generate([concept.class_prompt] * len(index), height=resolution, width=resolution,
                                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                   scheduler=scheduler, seed=[seed + i for i in index], batch_size=len(index),
                                   clip_skip=clip_skip)
            for k, (i, img) in enumerate(zip(index, result.images)):
                meta = image_metadata(result, k, extra={"class_index": i})  # sd_jax.outputs: one schema
                made.append(save_png(img, folder / f"class-{i:05d}-{seed + i}.png", meta))
            bar.update(len(index))
    return sorted(existing + made)[:want]


def class_images_from_tfds(name: str, split: str, count: int, class_dir: str | Path, label: int | str | None = None,
                           *, image_key: str = "image", label_key: str = "label") -> list[Path]:
    """Fill ``class_dir`` with ``count`` images from a TensorFlow Datasets image dataset instead of generating them.

    ``label`` (an int or a class name) keeps only that class. Images already in
    the folder count; the ``i``-th image of the (filtered) split is written as
    ``tfds-{i:05d}.png``, so an interrupted fill resumes. Needs the optional
    ``tensorflow-datasets`` package (``pip install sd_jax[tfds]``).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count={count!r} must be an integer >= 1")
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError("class images from TensorFlow Datasets need the optional package tensorflow-datasets: "
                          "pip install sd_jax[tfds]") from None
    folder = Path(class_dir)
    folder.mkdir(parents=True, exist_ok=True)
    existing = _existing_class_images(folder, count)
    missing = count - len(existing)
    if missing <= 0:
        return existing
    done = {int(m.group(1)) for p in folder.iterdir() if (m := TFDS_NAME.match(p.name))}
    ds, info = tfds.load(name, split=split, with_info=True, shuffle_files=False)
    if image_key not in info.features:
        raise ValueError(f"TFDS dataset {name!r} has no {image_key!r} feature (features: {list(info.features)})")
    label_id = None
    if label is not None:
        if label_key not in info.features:
            raise ValueError(f"TFDS dataset {name!r} has no {label_key!r} feature to filter by label {label!r}")
        label_id = info.features[label_key].str2int(label) if isinstance(label, str) else int(label)
    made, i = [], -1
    for ex in tfds.as_numpy(ds):
        if label_id is not None and int(ex[label_key]) != label_id:
            continue
        i += 1
        if i in done:
            continue
        arr = np.asarray(ex[image_key])
        img = to_rgb(Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr))
        made.append(save_png(img, folder / f"tfds-{i:05d}.png",
                             {"source": f"tfds:{name}:{split}", "index": i, "label": label}))
        if len(made) == missing:
            break
    if len(made) < missing:
        raise ValueError(f"TFDS {name!r} split {split!r} (label {label!r}) ran out after {len(made)} of the "
                         f"{missing} image(s) still needed in {str(folder)!r}")
    return sorted(existing + made)[:count]


# ----------------------------------------------------------------------------- preprocessing

def _crop(arr: np.ndarray, resolution: int, crop: str, rng: np.random.Generator | None) -> np.ndarray:
    """(H, W, 3) -> (R, R, 3): a center crop (torchvision's rounding) or a uniformly random one."""
    h, w = arr.shape[:2]
    if crop == "center":
        top, left = round((h - resolution) / 2.0), round((w - resolution) / 2.0)
    else:
        top, left = int(rng.integers(0, h - resolution + 1)), int(rng.integers(0, w - resolution + 1))
    return arr[top:top + resolution, left:left + resolution]


def preprocess(img: Image.Image, resolution: int, crop: str = "center", rng: np.random.Generator | None = None,
               *, resample: str = "bilinear") -> np.ndarray:
    """PIL image -> (R, R, 3) float32 in [-1, 1]: shorter side resized to R, then a center or random crop.

    As diffusers' ``train_dreambooth.py`` (``Resize(R, BILINEAR)``,
    ``CenterCrop``/``RandomCrop``, ``Normalize([0.5], [0.5])``); ``rng`` draws
    the random crop. Flips are the dataset's.
    """
    if crop not in CROPS:
        raise ValueError(f"crop={crop!r} must be one of {CROPS}")
    if crop == "random" and rng is None:
        raise ValueError("crop='random' needs an rng (np.random.Generator)")
    arr = np.asarray(resize_shortest_side(to_rgb(img), resolution, resample))
    return _crop(arr, resolution, crop, rng).astype(np.float32) / 127.5 - 1.0


# ----------------------------------------------------------------------------- dataset

@dataclasses.dataclass(frozen=True)
class Item:
    """One image of :meth:`DreamboothDataset.iter_all_images`."""

    kind: str  # "instance" or "class"
    index: int  # into instance_examples / class_examples; what batch() returns as *_index
    image: np.ndarray  # (R, R, 3) float32 in [-1, 1], center-cropped, not flipped
    prompt: str


class DreamboothDataset:
    """Instance (and class) examples of one or more concepts, served as resumable global batches.

    ``batch_size`` is the global number of instance examples per batch (the
    same number of class examples ride along with prior preservation).
    ``repeats`` shows each instance image that many times per epoch. Either
    every concept has a class prompt (prior preservation) or none does.
    """

    def __init__(self, concepts: Sequence[Concept], *, resolution: int, batch_size: int, seed: int = 0,
                 center_crop: bool = False, random_flip: bool = True, repeats: int = 1, skip_bad: bool = False,
                 resample: str = "bilinear"):
        concepts = [concepts] if isinstance(concepts, Concept) else list(concepts)
        if not concepts or not all(isinstance(c, Concept) for c in concepts):
            raise ValueError(f"concepts must be a non-empty list of Concept, got {concepts!r}")
        priors = {c.with_prior for c in concepts}
        if len(priors) > 1:
            raise ValueError("either every concept has a class prompt (prior preservation) or none does; got "
                             + ", ".join(f"{c.instance_dir!r}: {c.class_prompt!r}" for c in concepts))
        for name, value in (("resolution", resolution), ("batch_size", batch_size), ("repeats", repeats)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if resolution % 8:
            raise ValueError(f"resolution={resolution} must be a multiple of 8 (the VAE's downsampling factor)")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r} must be an integer >= 0")
        if resample not in RESAMPLE:
            raise ValueError(f"resample={resample!r} must be one of {sorted(RESAMPLE)}")
        self.concepts, self.resolution, self.batch_size = concepts, int(resolution), int(batch_size)
        self.seed = int(seed)
        self.crop = "center" if center_crop else "random"
        self.random_flip, self.repeats = bool(random_flip), int(repeats)
        self.with_prior = priors == {True}
        self.instance_examples: list[Example] = []
        self.class_examples: list[Example] = []
        inst_concept, self._class_start, self._class_count = [], [], []
        for c, concept in enumerate(concepts):
            ex = load_instance_images(concept, skip_bad=skip_bad, resolution=resolution, resample=resample)
            self.instance_examples += ex
            inst_concept += [c] * len(ex)
            cls = load_class_images(concept, skip_bad=skip_bad, resolution=resolution, resample=resample)
            self._class_start.append(len(self.class_examples))
            self._class_count.append(len(cls))
            self.class_examples += cls
        self._inst_concept = np.asarray(inst_concept, np.int64)
        self._per_epoch = np.bincount(self._inst_concept, minlength=len(concepts)) * self.repeats  # per concept
        self._inst_arrays = [np.asarray(e.image) for e in self.instance_examples]  # (H, W, 3) uint8, short side R
        self._class_arrays = [np.asarray(e.image) for e in self.class_examples]
        self._epoch = functools.lru_cache(maxsize=8)(self._compute_epoch)
        self._class_perm = functools.lru_cache(maxsize=32)(self._compute_class_perm)

    @property
    def epoch_size(self) -> int:
        """Instance examples per epoch (images x repeats)."""
        return len(self.instance_examples) * self.repeats

    def epochs_done(self, position: int) -> float:
        """Epochs covered by the batches before ``position``."""
        return position * self.batch_size / self.epoch_size

    def _compute_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(instance example per slot, rank of the slot among its concept's slots) for one epoch."""
        base = np.tile(np.arange(len(self.instance_examples)), self.repeats)
        order = base[np.random.default_rng([self.seed, 0, epoch]).permutation(len(base))]
        concept = self._inst_concept[order]
        rank = np.zeros(len(order), np.int64)
        for c in np.unique(concept):
            rank[concept == c] = np.arange(np.count_nonzero(concept == c))
        return order, rank

    def _compute_class_perm(self, concept: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 1, concept, epoch]).permutation(self._class_count[concept])

    def _pick(self, j: int) -> tuple[int, int | None]:
        """Sequence index j -> (instance example, paired class example or None)."""
        epoch, offset = divmod(j, self.epoch_size)
        order, rank = self._epoch(epoch)
        i = int(order[offset])
        if not self.with_prior:
            return i, None
        c = int(self._inst_concept[i])
        class_epoch, class_offset = divmod(epoch * int(self._per_epoch[c]) + int(rank[offset]), self._class_count[c])
        return i, self._class_start[c] + int(self._class_perm(c, class_epoch)[class_offset])

    def _view(self, arr: np.ndarray, stream: int, j: int) -> tuple[np.ndarray, bool]:
        """Crop and maybe flip one stored image with the rng of (seed, stream, j); float32 in [-1, 1]."""
        rng = np.random.default_rng([self.seed, stream, j])
        flip = bool(rng.random() < 0.5) and self.random_flip  # drawn always, so crops don't depend on the flag
        out = _crop(arr, self.resolution, self.crop, rng)
        out = out[:, ::-1] if flip else out
        return out.astype(np.float32) / 127.5 - 1.0, flip

    def batch(self, position: int, *, process_index: int = 0, process_count: int = 1) -> dict[str, Any]:
        """This process's share of global batch ``position``, by kind.

        The global batch's ``batch_size`` instance rows are split into
        ``process_count`` contiguous slices; process ``p`` gets instance rows
        ``[p*b, (p+1)*b)`` with ``b = batch_size // process_count`` and the class
        rows paired with them, so concatenating the shares in process order gives
        the single-process batch *of each kind*. (The trainer does not feed the
        step this way: it takes whichever rows of the padded instance + class
        batch its devices hold, see :meth:`rows`.) Returns ``instance_images``
        (b, R, R, 3) float32 in [-1, 1], ``instance_prompts`` (list of b str),
        ``instance_index`` (b,) int64, ``instance_flip`` (b,) bool, and with
        prior preservation the same four ``class_*`` entries.
        """
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
        if self.batch_size % process_count:
            raise ValueError(f"the global batch_size={self.batch_size} must be a multiple of "
                             f"process_count={process_count} (each process takes an equal share)")
        local = self.batch_size // process_count
        share = range(process_index * local, (process_index + 1) * local)
        return self.rows(position, share, share if self.with_prior else ())

    def rows(self, position: int, instance_rows: Sequence[int], class_rows: Sequence[int] = ()) -> dict[str, Any]:
        """Chosen rows of global batch ``position``, in the order asked (repeats allowed).

        ``instance_rows`` index the batch's ``batch_size`` instance rows,
        ``class_rows`` the class rows paired with them (row ``r`` of each kind
        comes from instance sequence index ``position * batch_size + r``). A
        process of a multi-host run asks for the rows its devices hold and gets
        exactly what a single process has in those rows. Returns the entries of
        :meth:`batch` for each kind asked for (``class_*`` only with prior
        preservation; an empty selection gives empty arrays).
        """
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or position < 0:
            raise ValueError(f"position={position!r} must be an integer >= 0")
        wanted = {"instance": [int(r) for r in instance_rows], "class": [int(r) for r in class_rows]}
        if wanted["class"] and not self.with_prior:
            raise ValueError("class rows asked for, but no concept has a class prompt (no prior preservation)")
        bad = [r for rs in wanted.values() for r in rs if not 0 <= r < self.batch_size]
        if bad:
            raise ValueError(f"batch rows {bad[:8]} are outside [0, batch_size={self.batch_size})")
        base = int(position) * self.batch_size
        out: dict[str, Any] = {}
        kinds = [("instance", 0, self.instance_examples, self._inst_arrays, 2)]
        if self.with_prior:
            kinds.append(("class", 1, self.class_examples, self._class_arrays, 3))
        for kind, which, examples, arrays, stream in kinds:
            js = [base + r for r in wanted[kind]]
            idx = [self._pick(j)[which] for j in js]
            views = [self._view(arrays[i], stream, j) for i, j in zip(idx, js)]
            res = self.resolution
            out[f"{kind}_images"] = (np.stack([v[0] for v in views]) if views
                                     else np.zeros((0, res, res, 3), np.float32))  # (b, R, R, 3)
            out[f"{kind}_prompts"] = [examples[i].prompt for i in idx]
            out[f"{kind}_index"] = np.asarray(idx, np.int64)
            out[f"{kind}_flip"] = np.asarray([v[1] for v in views], bool)
        return out

    def iter_all_images(self) -> Iterator[Item]:
        """Every instance then every class image once, center-cropped and unflipped, in index order."""
        for kind, examples, arrays in (("instance", self.instance_examples, self._inst_arrays),
                                       ("class", self.class_examples, self._class_arrays)):
            for i, (ex, arr) in enumerate(zip(examples, arrays)):
                image = _crop(arr, self.resolution, "center", None).astype(np.float32) / 127.5 - 1.0
                yield Item(kind=kind, index=i, image=image, prompt=ex.prompt)
