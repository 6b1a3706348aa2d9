import numpy as np
import pytest
from PIL import Image

from clipcap_cache.data.images import ImageLoadError, load_image


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / f"image_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.new(mode, (10, 6)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (10, 6)


def test_16_bit_images_are_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(load_image(path))[0, :, 0]
    assert pixels.tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert Image.open(path).size == (40, 20)
    assert load_image(path).size == (20, 40)


def test_multi_frame_files_use_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    red, green, blue = np.asarray(load_image(path))[4, 4]
    assert red > 200 and blue < 50


@pytest.mark.bad_input("parsing")
def test_bad_files_raise_image_load_error_with_a_reason(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])
    text = tmp_path / "text.jpg"
    text.write_text("not an image at all")
    cases = {
        tmp_path / "missing.jpg": "missing",
        empty: "empty",
        truncated: "truncated",
        text: "not an image",
    }
    for path, reason in cases.items():
        with pytest.raises(ImageLoadError, match=reason):
            load_image(path)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(good, max_pixels=64 * 63)
