"""Synthetic single-line OCR data: text lines from Python's own docstrings (a real corpus that is always
offline), rendered in DejaVu fonts (Pillow's built-in font where DejaVu is missing) with noise, blur and a
slight skew. Each image is HEIGHT pixels high; its columns are the time steps of the recognizer."""

from __future__ import annotations

import importlib
import inspect
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

HEIGHT = 32
ALPHABET = string.ascii_letters + string.digits + " .,;:'\"()[]-_=+*/%<>!?#&"
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu")
FONT_NAMES = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSansCondensed.ttf")
CORPUS_MODULES = ("json", "os", "re", "collections", "itertools", "functools", "string", "textwrap", "math",
                  "random", "datetime", "pathlib", "argparse", "logging", "unittest", "email", "csv", "heapq",
                  "bisect", "fractions", "decimal", "statistics", "shutil", "tempfile", "subprocess", "threading",
                  "queue", "socket", "inspect", "dataclasses", "enum", "contextlib", "abc", "copy",
                  "pprint", "zipfile", "tarfile", "gzip", "hashlib", "hmac", "secrets", "base64", "uuid", "difflib")


def corpus_lines(min_chars: int = 8, max_chars: int = 32) -> list[str]:
    """Distinct docstring lines of standard-library modules and their members, in a fixed order, cut to
    at most max_chars at a word boundary, keeping only characters of ALPHABET."""
    seen, lines = set(), []
    allowed = set(ALPHABET)
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__] + [getattr(obj, "__doc__", None) for _, obj in sorted(vars(module).items())
                                   if inspect.isfunction(obj) or inspect.isclass(obj)]
        for doc in docs:
            for raw in (doc if isinstance(doc, str) else "").splitlines():
                line = " ".join(raw.split())
                while len(line) > max_chars:
                    line = line[: line.rfind(" ", 0, max_chars + 1)] if " " in line[:max_chars + 1] else line[:max_chars]
                if min_chars <= len(line) and set(line) <= allowed and line not in seen:
                    seen.add(line)
                    lines.append(line)
    return lines


def fonts(size: int) -> list[ImageFont.FreeTypeFont]:
    found = [Path(d) / n for d in FONT_DIRS for n in FONT_NAMES if (Path(d) / n).exists()]
    if found:
        return [ImageFont.truetype(str(p), size) for p in found]
    return [ImageFont.load_default(size=size)]


def render(text: str, rng: np.random.Generator, font_cache: dict | None = None) -> np.ndarray:
    """One noisy line image as float32 (HEIGHT, width), ink = 1, background = 0."""
    size = int(rng.integers(18, 25))
    cache = font_cache if font_cache is not None else {}
    choices = cache.setdefault(size, fonts(size))
    font = choices[int(rng.integers(len(choices)))]
    left, top, right, bottom = font.getbbox(text)
    width = right - left + 8
    image = Image.new("L", (width, HEIGHT), 0)
    ImageDraw.Draw(image).text((4 - left, (HEIGHT - (bottom - top)) // 2 - top), text, fill=255, font=font)
    shear = rng.uniform(-0.15, 0.15)
    image = image.transform(image.size, Image.Transform.AFFINE, (1, shear, -shear * HEIGHT / 2, 0, 1, 0),
                            resample=Image.Resampling.BILINEAR)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels += rng.normal(0.0, rng.uniform(0.0, 0.12), pixels.shape).astype(np.float32)
    return np.clip(pixels, 0.0, 1.0)


def encode(text: str) -> list[int]:
    """Character ids 1..len(ALPHABET); 0 is the CTC blank."""
    return [ALPHABET.index(c) + 1 for c in text]


def decode(ids) -> str:
    return "".join(ALPHABET[i - 1] for i in ids)


@dataclass
class OCRDataset:
    images: list[np.ndarray]  # (HEIGHT, width) each
    texts: list[str]


def make_datasets(train: int = 4000, test: int = 400, seed: int = 0) -> tuple[OCRDataset, OCRDataset]:
    """Held-out split by text: no test line appears in training."""
    lines = corpus_lines()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lines))
    test_lines = [lines[i] for i in order[:test]]
    train_pool = [lines[i] for i in order[test:]]
    train_lines = [train_pool[i % len(train_pool)] for i in range(train)]
    cache: dict = {}
    make = lambda texts: OCRDataset([render(t, rng, cache) for t in texts], list(texts))  # noqa: E731
    return make(train_lines), make(test_lines)


def character_error_rate(predictions: list[str], references: list[str]) -> float:
    """Edit distance summed over lines / reference characters."""
    errors = sum(_edit_distance(p, r) for p, r in zip(predictions, references))
    return errors / max(1, sum(len(r) for r in references))


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]
