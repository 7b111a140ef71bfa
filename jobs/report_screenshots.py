"""Screenshots of an `lgca report` for the docs: the summary, the gallery filtered, one image (headless Chromium).

Run from the repository root after `make example` and `lgca report out/example --out out/review/report.html`:

    .venv/bin/python jobs/report_screenshots.py out/review/report.html docs/images

It writes report-summary.png, report-gallery.png and report-view.png, quantised to 256 colours.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.outputs import HeadlessChromium  # the test suite's Chromium driver, from the repository root

WIDTH = 1240
# name -> (URL fragment: the gallery state, JavaScript run before the shot, viewport height)
SHOTS = {
    "report-summary.png": ("", "window.scrollTo(0, 0)", 560),
    # the scenes where crops cut the object: three of them lgca gets right and clip does not (jobs/show_example.py)
    "report-gallery.png": (
        "#status=0&q=scale-0.60&sort=key",
        "document.getElementById('gallery').scrollIntoView(); window.scrollBy(0, -8)",
        900,
    ),
    # the pullover clip calls a dress: its salient lineages carry lgca's score
    "report-view.png": ("#status=0&q=pullover/scale-0.60", "document.querySelector('#gallery-grid .card').click()", 760),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="the report's HTML file")
    parser.add_argument("out", type=Path, help="folder for the PNG files")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (fragment, script, height) in SHOTS.items():
        browser = HeadlessChromium(width=WIDTH, height=height)
        try:
            browser.open(args.report.resolve().as_uri() + fragment)
            browser.evaluate("window.lgcaReport.idle()")
            browser.evaluate(script)
            browser.evaluate("window.lgcaReport.idle()")
            browser.evaluate(
                "Promise.all(Array.from(document.images).filter(i => i.getBoundingClientRect().top < innerHeight).map(i => i.decode().catch(() => null)))"
            )
            shot = browser.screenshot().quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            shot.save(args.out / name, optimize=True)
            print(f"{args.out / name}: {WIDTH} x {height}")
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
