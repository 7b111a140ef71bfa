"""Letter boxes: the bands that pad a picture to a square are found, and crops are laid out in the picture."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ScoringConfig
from pipeline.scoring.letterbox import content_box
from pipeline.scoring.regions import sample_crops

from .support import photo


def _padded(side: int = 256, fill: tuple[int, int, int] = (0, 0, 0), jpeg: bool = True) -> tuple[torch.Tensor, tuple[float, ...]]:
    """A photo resized to `side` on its longer side and padded to a square, as img2dataset's border mode does."""
    picture = Image.fromarray(photo("coffee"))  # 600 x 400: bands above and below
    scale = side / max(picture.size)
    width, height = round(picture.width * scale), round(picture.height * scale)
    canvas = Image.new("RGB", (side, side), fill)
    top = (side - height) // 2
    canvas.paste(picture.resize((width, height)), (0, top))
    if jpeg:
        buffer = io.BytesIO()
        canvas.save(buffer, format="JPEG", quality=90)
        canvas = Image.open(buffer).convert("RGB")
    return torch.from_numpy(np.asarray(canvas)).permute(2, 0, 1).contiguous(), (0.0, top / side, 1.0, (top + height) / side)


@pytest.mark.parametrize("fill", [(0, 0, 0), (255, 255, 255), (124, 116, 104)])
def test_the_picture_inside_a_letter_box_is_found_whatever_the_padding_colour(fill):
    pixels, truth = _padded(fill=fill)
    found = content_box(pixels)
    assert found[0] == 0.0 and found[2] == 1.0
    # JPEG rings a few rows into the bands: the box may keep a few rows of padding, never cuts the picture
    assert truth[1] - 8 / 256 <= found[1] <= truth[1] + 1 / 256 and truth[3] - 1 / 256 <= found[3] <= truth[3] + 8 / 256


def test_no_letter_box_is_found_where_there_is_none():
    assert content_box(torch.from_numpy(photo("cat")).permute(2, 0, 1).contiguous()) == (0.0, 0.0, 1.0, 1.0)
    pixels, _ = _padded(jpeg=False)
    one_band = pixels.clone()
    one_band[:, 200:, :] = torch.from_numpy(photo("rocket")[:56, :256]).permute(2, 0, 1)  # the bottom band is picture now
    assert content_box(one_band) == (0.0, 0.0, 1.0, 1.0)
    flat = torch.zeros((3, 64, 64), dtype=torch.uint8)
    assert content_box(flat) == (0.0, 0.0, 1.0, 1.0)  # all padding: no picture to lay crops in


def test_crops_are_laid_out_inside_the_picture_and_keep_their_share_of_it():
    content = (0.0, 0.25, 1.0, 0.75)
    boxes = sample_crops("k", 256, 256, 50, (0.3, 0.7), seed=0, content=content)
    assert (boxes[:, 1] >= 0.25 - 1e-9).all() and (boxes[:, 3] <= 0.75 + 1e-9).all()
    sides = (boxes[:, 3] - boxes[:, 1]) * 256  # pixels: a share of the picture's shorter side (128), not the square's
    assert sides.min() >= 0.3 * 128 - 1 and sides.max() <= 0.7 * 128 + 1
    assert np.array_equal(
        sample_crops("k", 256, 256, 50, (0.3, 0.7), seed=0), sample_crops("k", 256, 256, 50, (0.3, 0.7), 0, content=(0.0, 0.0, 1.0, 1.0))
    )


def test_the_letterbox_setting_is_checked_and_recorded_where_it_decides_crops():
    assert "letterbox" not in ScoringConfig().to_dict()  # off by default: plans made before the option resume as they are
    assert ScoringConfig(letterbox="detect").to_dict()["letterbox"] == "detect"
    assert "letterbox" not in ScoringConfig(method="clip", letterbox="detect").to_dict()  # no crops: nothing it decides
    with pytest.raises(ValueError, match="letterbox 'auto' is unknown; choose off or detect"):
        ScoringConfig(letterbox="auto")
