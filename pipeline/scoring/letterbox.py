"""Letter-boxed images: bands of one flat colour that pad the picture to a square (img2dataset's default
`resize_mode=border` pads 256 x 256 so). Random crops that land on the padding see nothing; with detection the
crops are laid out inside the picture instead.
"""

from __future__ import annotations

import torch

TOLERANCE = 10  # grey levels a padding pixel may differ from the padding colour (JPEG noise near the edge)
MIN_BAND = 0.03  # a band narrower than this share of the side is not padding


def content_box(pixels: torch.Tensor, tolerance: int = TOLERANCE, min_band: float = MIN_BAND) -> tuple[float, float, float, float]:
    """The picture inside a letter box, as normalised (x0, y0, x1, y1); (0, 0, 1, 1) when there is none.

    A letter box is two opposite bands (top and bottom, or left and right), each at least `min_band` of the
    side, of the colour the image's corners share. One band alone, or a flat background that the picture also
    has in its middle, is left alone: only rows and columns that are flat all the way across count.

    Args:
        pixels: uint8 (3, H, W).
    """
    height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
    if height < 8 or width < 8:
        return 0.0, 0.0, 1.0, 1.0
    image = pixels.to(torch.int16)
    corners = torch.stack([image[:, 0, 0], image[:, 0, -1], image[:, -1, 0], image[:, -1, -1]])  # (4, 3)
    if int((corners.max(dim=0).values - corners.min(dim=0).values).max()) > tolerance:
        return 0.0, 0.0, 1.0, 1.0  # the corners disagree: no frame of one colour
    colour = corners.float().mean(dim=0).round().to(torch.int16)[:, None, None]
    flat = ((image - colour).abs() <= tolerance).all(dim=0)  # (H, W): pixels of the padding colour
    rows, columns = flat.all(dim=1), flat.all(dim=0)
    top, bottom = _run(rows), _run(rows.flip(0))
    left, right = _run(columns), _run(columns.flip(0))
    x0, y0, x1, y1 = 0.0, 0.0, 1.0, 1.0
    if min(top, bottom) >= min_band * height and top + bottom < height:
        y0, y1 = top / height, (height - bottom) / height
    if min(left, right) >= min_band * width and left + right < width:
        x0, x1 = left / width, (width - right) / width
    return x0, y0, x1, y1


def _run(flags: torch.Tensor) -> int:
    """How many leading entries of a boolean vector are True."""
    falses = (~flags).nonzero()
    return int(falses[0]) if len(falses) else int(flags.numel())
