"""The README's picture of the demo model: for a few prompts, every 4th frame of its video side by side.

    python tools/demo_frames.py docs/demo-frames.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from x2v.demo import DEMO_MODEL  # noqa: E402
from x2v.pipelines.wan import Pipeline  # noqa: E402

PROMPTS = ["a red ball moves to the right on a blue background", "a yellow triangle moves up on a black background",
           "a white square moves to the left on a green background"]
SCALE, CAPTION = 2, 18


def main(out: Path) -> None:
    pipe = Pipeline.from_pretrained(DEMO_MODEL, device="cpu")
    rows = []
    for prompt in PROMPTS:
        frames = pipe.generate(prompt, seed=0, progress=False).frames
        strip = Image.fromarray(np.concatenate(list(frames[::4]), axis=1))
        strip = strip.resize((strip.width * SCALE, strip.height * SCALE), Image.NEAREST)
        row = Image.new("RGB", (strip.width, strip.height + CAPTION), "white")
        ImageDraw.Draw(row).text((4, 3), f'"{prompt}" (frames 0, 4, 8, 12, 16)', fill="black")
        row.paste(strip, (0, CAPTION))
        rows.append(row)
    picture = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for i, row in enumerate(rows):
        picture.paste(row, (0, i * row.height))
    picture.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/demo-frames.png"))
