"""Decoders: the JPEG frame-header reader against PIL, the CPU decoder against data.read_image,
nvjpeg against libjpeg-turbo."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CUDA
from nad_ext import data
from nad_ext.data import decode
from test_pipeline import _save, write_tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("tree"))


def test_jpeg_frame_reads_the_header_as_pil_does(tmp_path):
    array = np.asarray(Image.new("RGB", (37, 21), (10, 200, 30)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: an APP1 segment before the frame header
    cases = {"baseline": dict(quality=90), "progressive": dict(progressive=True), "exif": dict(exif=exif),
             "optimized": dict(optimize=True, quality=50)}
    for name, kw in cases.items():
        for mode, components in (("RGB", 3), ("L", 1), ("CMYK", 4)):
            buffer = io.BytesIO()
            _save(array, buffer, mode=mode, **kw)
            frame = decode.jpeg_frame(buffer.getvalue())
            with Image.open(io.BytesIO(buffer.getvalue())) as im:
                assert (frame[2], frame[3]) == (im.height, im.width) and frame[4] == components, (name, mode)
                assert frame[0] == (0xC2 if kw.get("progressive") else 0xC0) and frame[1] == 8
    buffer = io.BytesIO()
    _save(array, buffer, "PNG")
    assert decode.jpeg_frame(buffer.getvalue()) is None
    assert decode.jpeg_frame(b"\xff\xd8\xff\xe0\x00") is None  # truncated before the frame header
    assert decode.jpeg_frame(b"not an image") is None


def test_decode_cpu_gives_read_images_pixels(tree, tmp_path):
    files = sorted((tree / "train").rglob("*.*"))
    assert {f.suffix for f in files} == {".jpg", ".png"}  # baseline, progressive, grayscale, CMYK JPEG and PNG
    for f in files:
        pixels = decode.decode_cpu(torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8), str(f))
        assert torch.equal(pixels, data.read_image(f))
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 nothing")
    with pytest.raises(decode.BadImageError, match="cannot read image file .*x.jpg"):
        decode.decode_cpu(torch.frombuffer(bytearray((tmp_path / "x.jpg").read_bytes()), dtype=torch.uint8),
                          str(tmp_path / "x.jpg"))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_nvjpeg_batched_decode_matches_libjpeg_cuda(tree):
    files = [p for p in sorted((tree / "train").rglob("*.jpg"))
             if decode.jpeg_frame(p.read_bytes())[4] in (1, 3)]
    encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in files]
    gpu = decode.decode_batch_cuda(encoded, [str(p) for p in files], torch.device("cuda"))
    for cpu_image, gpu_image in zip((decode.decode_cpu(e, "") for e in encoded), gpu):
        assert gpu_image.device.type == "cuda" and gpu_image.shape == cpu_image.shape
        # Different IDCT and chroma upsampling: close on average, not equal.
        assert (gpu_image.cpu().float() - cpu_image.float()).abs().mean() < 2.0
    # A batch with a broken file: the others decode, the broken one comes back as its error.
    mixed = decode.decode_batch_cuda(encoded[:2] + [torch.tensor([0xFF, 0xD8, 0xFF, 0], dtype=torch.uint8)],
                                     ["a", "b", "broken"], torch.device("cuda"))
    assert [type(m) for m in mixed][:2] == [torch.Tensor] * 2 and isinstance(mixed[2], decode.BadImageError)
