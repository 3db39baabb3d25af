"""Draws docs/figures/preprocessing.png: images as a person might give them, and what the model gets from them.

    python scripts/preprocessing_figure.py --data-dir ../shared/data [--checkpoint runs/.../best.pt]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kmnist import plots
from kmnist.data import load_dataset
from kmnist.imageprep import prepare_bytes

# The stroke the browser test draws on the 280-px board: a つ.
TSU = [(45, 125), (80, 104), (125, 94), (170, 96), (208, 112), (228, 140), (222, 172), (198, 198), (160, 214),
       (122, 218)]


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def examples(test_images: np.ndarray) -> list[tuple[str, bytes]]:
    """(caption, encoded file) for each kind of input."""
    rng = np.random.default_rng(0)
    # A photo of paper: dark ink, grey uneven background with noise, the character small and off-centre, JPEG.
    paper = np.linspace(185, 215, 600)[None, :] + rng.normal(0, 5, (400, 600))
    ink = np.asarray(Image.fromarray(test_images[0]).resize((150, 150), Image.Resampling.BICUBIC), dtype=np.float64)
    paper[60:210, 380:530] -= ink * 0.65
    photo = Image.fromarray(np.clip(paper, 0, 255).astype(np.uint8)).convert("RGB")
    # A drawing like the page's canvas: black stroke on white.
    board = Image.new("RGB", (280, 280), "white")
    ImageDraw.Draw(board).line(TSU, fill="black", width=18, joint="curve")
    # Typed modern hiragana on a transparent background, as an RGBA PNG.
    import matplotlib_fontja

    font = ImageFont.truetype(str(Path(matplotlib_fontja.__file__).parent / "fonts" / "ipaexg.ttf"), 150)
    typed = Image.new("RGBA", (320, 240), (0, 0, 0, 0))
    ImageDraw.Draw(typed).text((20, 30), "は", font=font, fill=(20, 20, 20, 255))
    return [
        ("test image, 28x28 PNG", encode(Image.fromarray(test_images[1]))),
        ("photo-like, 600x400 RGB JPEG", encode(photo, "JPEG", quality=85)),
        ("drawn, 280x280 RGB PNG", encode(board)),
        ("typed は, 320x240 RGBA PNG", encode(typed)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--checkpoint", help="also show this checkpoint's top class for each model input")
    parser.add_argument("--out", default="docs/figures/preprocessing.png")
    args = parser.parse_args()
    test_images = load_dataset("kmnist", args.data_dir, download=False, progress=False).test.images.numpy()
    befores, afters, before_titles, after_titles = [], [], [], []
    classifier = None
    if args.checkpoint:
        from kmnist.predict import Classifier

        classifier = Classifier.from_file(args.checkpoint)
    for caption, data in examples(test_images):
        shown = Image.open(io.BytesIO(data))
        befores.append(np.asarray(shown.convert("RGBA") if shown.mode == "RGBA" else shown.convert("RGB")))
        after = prepare_bytes(data)
        afters.append(after)
        before_titles.append(caption)
        if classifier is not None:
            best = classifier.top_k(classifier.probabilities(after[None])[0], 1)[0]
            after_titles.append(f"model input; top class {best['character']} ({best['probability'] * 100:.0f}%)")
        else:
            after_titles.append("model input")
    print(plots.preprocessing_examples(befores, afters, before_titles, after_titles, Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
