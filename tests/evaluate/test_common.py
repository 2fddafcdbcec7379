"""Reading the images and CSVs every evaluator shares: odd inputs are read right or refused."""

import numpy as np
import pytest
from PIL import Image

from kscu.errors import KscuError
from kscu.evaluate.common import list_images, load_rgb, read_csv_records


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """Before: Pillow's conversion clipped 16-bit values, so nearly every pixel read as 255."""
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0..65535
    Image.fromarray(ramp).save(tmp_path / "0.png")
    with Image.open(tmp_path / "0.png") as im:
        assert im.mode.startswith("I")  # what this Pillow makes of a 16-bit PNG
    rgb = np.asarray(load_rgb(tmp_path / "0.png"))
    assert rgb.shape == (16, 16, 3) and (rgb[..., 0] == ramp >> 8).all()


def test_an_image_too_large_to_decode_safely_is_a_one_line_error(tmp_path, monkeypatch):
    """Before: PIL's DecompressionBombError as a traceback (it is neither OSError nor
    ValueError)."""
    Image.new("RGB", (64, 64)).save(tmp_path / "0.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is over twice that
    with pytest.raises(KscuError, match=r"cannot read image .*0.png: Image size"):
        load_rgb(tmp_path / "0.png")


def test_odd_case_numbers_sort_after_real_ones(tmp_path):
    """Before: "--5" and "²" passed the digit check and ``int`` raised a ValueError."""
    for name in ("10", "2", "--5", "²", "a"):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{name}.png")
    names = [p.stem for p in list_images(tmp_path)]
    assert names[:2] == ["2", "10"] and sorted(names[2:]) == sorted(["--5", "²", "a"])


@pytest.mark.parametrize("pair", [("0.png", "0.jpg"), ("2.png", "02.png")])
def test_two_images_of_one_case_are_refused(tmp_path, pair):
    """Before: both were scored (evaluate clip: 5 images for 3 rows, "prompt_rows_without_image"
    -2; nudity counted 0.png and 0.jpg as two images)."""
    for name in ("1.png", *pair):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    case = int(pair[0].split(".")[0])
    with pytest.raises(KscuError, match=rf"two images of case {case}; keep one of them"):
        list_images(tmp_path)
    assert len(list_images(tmp_path, cases=False)) == 3  # FID's plain image sets: all count


def test_a_row_without_a_needed_cell_names_its_line(tmp_path):
    """Before: a TypeError (sorting None) or an AttributeError (None.strip()) in classify."""
    (tmp_path / "p.csv").write_text("case_number,prompt,class\n0,a,church\n3,d\n")
    with pytest.raises(KscuError, match=r"p.csv: row 3 has no 'class' cell"):
        read_csv_records(tmp_path / "p.csv", ["class"])


def test_a_folder_given_as_the_prompt_file_is_named_a_folder(tmp_path):
    """Before: "does not exist", for a path that does."""
    with pytest.raises(KscuError, match=r"prompt file .* is a folder; give a CSV path"):
        read_csv_records(tmp_path, ["class"])
