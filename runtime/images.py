"""Training data from a folder of images, one subfolder per class, as the compiled model expects it.

    data/
      cat/ 001.jpg 002.png ...
      dog/ ...

Classes are the subfolders. When every subfolder name is an integer ("0", "1", ...) that integer
is the label; otherwise labels follow the sorted names (cat = 0, dog = 1). Every image is
converted to the compiled channel count (1: greyscale "L", 3: "RGB", 4: "RGBA"), resized to the
compiled H x W (bilinear), and then goes through the manifest's preprocessing
(`(x * scale - mean) / std`, layout NCHW or NHWC), exactly like uint8 arrays from an .npz.

Images larger than MAX_IMAGE_PIXELS are refused from their header, before any pixel is decoded:
a 30000 x 30000 PNG that compresses to kilobytes would otherwise take 900 MB to decode (Pillow
itself only warns below twice its own limit, and above it raises an error that is not an OSError).

Pillow is imported only here, so .npz-only devices do not need it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import RunError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# Pillow's own DecompressionBomb threshold (about 89 megapixels, e.g. 9460 x 9460): larger is refused.
MAX_IMAGE_PIXELS = 89_478_485


def input_geometry(manifest: dict) -> tuple[int, int, int, str]:
    """(channels, height, width, layout) of one compiled input sample."""
    spec = manifest.get("preprocess") or {}
    layout = str(spec.get("layout", "NCHW")).upper()
    shape = list(manifest["inputs"][0]["shape"])
    if len(shape) != 4:
        raise RunError(f"image folders need a 4-D image input, the model takes {shape}")
    if layout == "NCHW":
        _, channels, height, width = shape
    elif layout == "NHWC":
        _, height, width, channels = shape
    else:
        raise RunError(f"the manifest's preprocess layout {layout!r} is neither NCHW nor NHWC")
    return int(channels), int(height), int(width), layout


def class_folders(root: Path) -> list[tuple[int, Path]]:
    """(label, folder) per class subfolder, in label order."""
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    if not folders:
        raise RunError(f"{root}: expected one subfolder of images per class, found none")
    names = [folder.name for folder in folders]
    if all(name.isdigit() for name in names):
        return sorted(((int(folder.name), folder) for folder in folders), key=lambda item: item[0])
    return list(enumerate(folders))


def load_image(path: Path, channels: int, height: int, width: int) -> np.ndarray:
    """One image as uint8 (H, W, C) at the compiled size and channel count."""
    from PIL import Image, UnidentifiedImageError

    if channels not in MODES:
        raise RunError(f"cannot make {channels}-channel images; image folders support 1, 3 or 4 channels")
    try:
        with Image.open(path) as image:
            width_in, height_in = image.size
            if width_in * height_in > MAX_IMAGE_PIXELS:
                raise RunError(
                    f"{path}: {width_in} x {height_in} pixels is more than the {MAX_IMAGE_PIXELS:,} this runner "
                    "decodes (a decompression bomb?); resize it first"
                )
            image = image.convert(MODES[channels])
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except Image.DecompressionBombError as exc:  # Pillow's own check, in Image.open, for the largest images
        raise RunError(f"{path}: refused as a decompression bomb ({exc})") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise RunError(f"{path}: not a readable image ({exc})") from None
    return array.reshape(height, width, channels)


def load_image_folder(root: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 images in the compiled layout, int64 labels, and the class names by label."""
    root = Path(root)
    if not root.is_dir():
        raise RunError(f"{root}: no such image folder")
    if manifest.get("loss") != "cross_entropy":
        raise RunError(f"{root}: image folders hold classification data; give a {manifest.get('loss')} model an .npz")
    channels, height, width, layout = input_geometry(manifest)
    classes = int(manifest["outputs"][0]["shape"][1])
    images: list[np.ndarray] = []
    labels: list[int] = []
    names: dict[int, str] = {}
    for label, folder in class_folders(root):
        if label >= classes:
            raise RunError(f"{folder}: class {label} is out of range for a model with {classes} classes")
        names[label] = folder.name
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for file in files:
            images.append(load_image(file, channels, height, width))
            labels.append(label)
    if not images:
        raise RunError(f"{root}: the class folders hold no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    x = np.stack(images)  # N, H, W, C
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    class_names = [names.get(label, "") for label in range(max(names) + 1)]
    return np.ascontiguousarray(x), np.asarray(labels, dtype=np.int64), class_names
