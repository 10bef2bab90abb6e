"""Image decoding for the input pipelines: JPEG by libjpeg-turbo on the CPU or by nvjpeg in
batches on a GPU (torchvision's operators), anything else by PIL; a JPEG frame-header reader
that tells which JPEGs nvjpeg can take.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch


class BadImageError(ValueError):
    """An image that cannot be read; the message names the file."""


def image_ops():
    """torchvision's codec operators (``torch.ops.image``: libjpeg-turbo, nvjpeg), called directly:
    torchvision 0.29's Python wrappers warn on every call that they are deprecated in favour of
    TorchCodec, which is not a dependency of this project. The operators are what they run."""
    import torchvision.io  # noqa: F401  (loads the operators)

    return torch.ops.image


RGB = 3  # torchvision.io.ImageReadMode.RGB

# What nvjpeg decodes: baseline, extended sequential and progressive Huffman frames of 8-bit
# grayscale or YCbCr. Other JPEGs (CMYK, arithmetic coding, 12-bit) are decoded on the CPU.
_NVJPEG_FRAMES = (0xC0, 0xC1, 0xC2)


def jpeg_frame(encoded) -> tuple[int, int, int, int, int] | None:
    """(frame marker, precision, height, width, components) from a JPEG's frame header, or None
    when ``encoded`` (bytes-like) is not a JPEG or has no readable frame header.

    A marker walk of a few microseconds instead of ``PIL.Image.open`` (about 40 us per image,
    with the GIL held: measured in benchmarks/RESULTS.md), because on a GPU the per-image Python
    work of the producer thread bounds the images per second. Pinned against PIL on baseline,
    progressive, grayscale, CMYK and EXIF-carrying files (python_tests/test_pipeline.py).
    """
    buf = memoryview(encoded).cast("B")
    n = len(buf)
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= n:
        if buf[pos] != 0xFF:
            return None
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 10 > n:
                return None
            height = (buf[pos + 5] << 8) | buf[pos + 6]
            width = (buf[pos + 7] << 8) | buf[pos + 8]
            return marker, buf[pos + 4], height, width, buf[pos + 9]
        pos += 2 + ((buf[pos + 2] << 8) | buf[pos + 3])
    return None


def decode_cpu(encoded: torch.Tensor, where: str) -> torch.Tensor:
    """Bytes (uint8 (n,)) -> uint8 RGB (3, H, W) with channels-last strides, the pixels of
    :func:`nad_ext.data.imagesets.read_image`: JPEGs by torchvision's libjpeg-turbo (the same pixels as
    PIL's, tested), anything else, or a JPEG it refuses, by PIL. :class:`BadImageError` naming
    ``where`` if neither can."""
    if len(encoded) >= 3 and bytes(encoded[:3].tolist()) == b"\xff\xd8\xff":
        try:
            return image_ops().decode_jpeg(encoded, RGB, False)
        except RuntimeError:
            pass  # truncated, or a variant libjpeg-turbo's torchvision build refuses: PIL decides
    from PIL import Image

    try:
        with Image.open(io.BytesIO(encoded.numpy().tobytes())) as image:
            array = np.asarray(image.convert("RGB"))
    except Exception as err:  # PIL raises several types for broken or foreign files
        raise BadImageError(f"cannot read image file {where}: {err}") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def nvjpeg_can(encoded: torch.Tensor) -> bool:
    """Whether this JPEG (uint8 (n,) bytes) goes to nvjpeg: an 8-bit baseline or progressive
    Huffman frame of grayscale or YCbCr."""
    frame = jpeg_frame(encoded.numpy())
    return frame is not None and frame[0] in _NVJPEG_FRAMES and frame[1] == 8 and frame[4] in (1, 3)


def decode_batch_cuda(encoded: Sequence[torch.Tensor], where: Sequence[str], device: torch.device) -> list:
    """JPEG bytes (CPU uint8 (n,) tensors) -> uint8 RGB (3, H, W) on ``device``, decoded by nvjpeg
    as one batch. nvjpeg fails a batch as a whole: then each image is tried alone, and one it
    refuses is decoded on the CPU (:func:`decode_cpu`); an image nobody reads is returned as its
    :class:`BadImageError` in place."""
    if not encoded:
        return []
    decode = image_ops().decode_jpegs_cuda
    try:
        return list(decode(list(encoded), RGB, device))
    except RuntimeError:
        out = []
        for data, name in zip(encoded, where):
            try:
                out.append(decode([data], RGB, device)[0])
            except RuntimeError:
                try:
                    out.append(decode_cpu(data, name))
                except BadImageError as err:
                    out.append(err)
        return out
