"""Example images that used to be read wrongly, hang the loader or crash it; and VAE encoding in bounded batches."""
import os
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from closeness import relative_error
from unlearn_core.backend import ENCODE_BATCH
from unlearn_core.images import ImageInputError, load_images


def test_16_bit_greyscale_png_is_scaled_to_8_bit(tmp_path):
    levels = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    images, notes = load_images(tmp_path, 16)
    expected = torch.from_numpy(np.round(levels / 257.0) / 255.0).float()
    for channel in images[0]:
        assert torch.allclose(channel, expected, atol=0.5 / 255)  # 8-bit quantisation, not float rounding
    assert any("converted from 16-bit greyscale" in n for n in notes)


@pytest.mark.parametrize("mode, pixel", [("RGBA", (0, 0, 0, 0)), ("LA", (0, 0))])
def test_transparent_areas_become_white_and_the_note_says_so(tmp_path, mode, pixel):
    image = Image.new(mode, (16, 16), pixel)
    image.paste(Image.new(mode, (8, 16), (200, 20, 20, 255) if mode == "RGBA" else (90, 255)), (0, 0))
    image.save(tmp_path / "cut-out.png")
    images, notes = load_images(tmp_path, 16)
    assert torch.equal(images[0, :, :, 8:], torch.ones(3, 16, 8))  # fully transparent: white
    opaque = torch.tensor([200, 20, 20] if mode == "RGBA" else [90, 90, 90]) / 255
    assert torch.allclose(images[0, :, 0, 0], opaque)
    assert any("transparent areas composited on white" in n for n in notes), notes


def test_fifo_named_like_an_image_is_skipped(tmp_path):
    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "b.png")
    fifo = tmp_path / "a.png"
    os.mkfifo(fifo)
    stop = threading.Event()

    def unblock_a_stuck_reader():  # so that a loader that opens the FIFO fails this test instead of hanging
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not stop.is_set():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                return
            except OSError:  # no reader yet
                time.sleep(0.05)

    watchdog = threading.Thread(target=unblock_a_stuck_reader, daemon=True)
    watchdog.start()
    try:
        images, _ = load_images(tmp_path, 16)
    finally:
        stop.set()
        watchdog.join()
    assert images.shape == (1, 3, 16, 16)


def _png_header_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height pixels (Pillow checks the size when it opens the file)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b"")


def test_huge_image_is_one_clear_error(tmp_path):
    (tmp_path / "huge.png").write_bytes(_png_header_claiming(20000, 20000))
    with pytest.raises(ImageInputError, match="huge.png is too large to decode safely .*resize it"):
        load_images(tmp_path, 16)


def test_many_images_are_encoded_in_bounded_batches(backend):
    batch_sizes = []
    hook = backend.pipe.vae.encoder.register_forward_hook(lambda _m, inputs, _o: batch_sizes.append(len(inputs[0])))
    images = torch.rand(3 * ENCODE_BATCH + 1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            latents = backend.encode_images(images)
            one_by_one = torch.cat([backend.encode_images(image[None]) for image in images])
    finally:
        hook.remove()
    assert max(batch_sizes) == ENCODE_BATCH and sum(batch_sizes) == 2 * len(images)
    assert latents.shape[0] == len(images) and relative_error(latents, one_by_one) < 1e-5
