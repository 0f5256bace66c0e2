"""A generated image demo: synthetic "scans" whose answer depends on what is drawn.

Each image is a 56x56 grey "scan" (noise on a dark disc) with one bright round "lesion" in one of four
quadrants; the question asks where the lesion is, with the four locations as shuffled options, and the
answer is the option's text in ``<answer></answer>`` (as in the text demo, :mod:`lingshu_rl.data.demo`). The
text alone carries no information about the answer, so a model can only beat chance by looking at the image.
At the tiny vision model's resolution a 56x56 image is 2x2 image tokens, one per quadrant.

Images are PNG files written once under ``<cache>/image-demo-v<version>-<seed>/`` (the tiny model's cache),
samples reference them by path, exactly as user data would.
"""

from __future__ import annotations

import random
from pathlib import Path

from lingshu_rl.data.sample import Sample

IMAGE_DEMO_VERSION = 1
IMAGE_DEMO_SOURCE = "lingshu_image_demo"
SIZE = 56
LOCATIONS = ("upper left", "upper right", "lower left", "lower right")
SYSTEM_PROMPT = "Answer with the text of the correct option inside <answer></answer>."
QUESTION = "Where is the lesion in this scan?"
LETTERS = "ABCD"


def draw_scan(location: int, rng: random.Random):
    """A ``SIZE`` x ``SIZE`` RGB image with a bright blob in quadrant ``location`` (an index into LOCATIONS)."""
    from PIL import Image, ImageChops, ImageDraw

    image = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(image)
    draw.ellipse((2, 2, SIZE - 3, SIZE - 3), fill=60)  # the body outline
    half = SIZE // 2
    cx = half // 2 + (half if location in (1, 3) else 0) + rng.randint(-4, 4)
    cy = half // 2 + (half if location in (2, 3) else 0) + rng.randint(-4, 4)
    radius = rng.randint(5, 8)
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=rng.randint(200, 255))
    noise = Image.frombytes("L", (SIZE, SIZE), bytes(rng.randrange(24) for _ in range(SIZE * SIZE)))
    return ImageChops.add(image, noise).convert("RGB")


def image_demo_dir(cache_dir: Path | str | None = None, seed: int = 0) -> Path:
    from lingshu_rl.models.tiny import default_cache_dir

    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"image-demo-v{IMAGE_DEMO_VERSION}-{seed}"


def make_image_demo(n_train: int = 400, n_heldout: int = 100, seed: int = 0, cache_dir: Path | str | None = None
                    ) -> tuple[list[Sample], list[Sample]]:
    """``(train, heldout)`` samples; their images are written on first use. Locations are balanced in each
    split and the gold letter is uniform over A-D."""
    folder = image_demo_dir(cache_dir, seed)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"lingshu-image-demo-{IMAGE_DEMO_VERSION}-{seed}")
    splits: dict[str, list[Sample]] = {"train": [], "heldout": []}
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        locations = [i % len(LOCATIONS) for i in range(n)]
        rng.shuffle(locations)
        for i, location in enumerate(locations):
            path = folder / f"{split}-{i:05d}.png"
            image = draw_scan(location, rng)  # drawn even when cached, so the random stream never depends on the cache
            if not path.is_file():
                tmp = path.with_suffix(".tmp.png")
                image.save(tmp)
                tmp.replace(path)
            texts = list(LOCATIONS)
            rng.shuffle(texts)
            options = dict(zip(LETTERS, texts))
            answer = LETTERS[texts.index(LOCATIONS[location])]
            question = "\n".join([QUESTION, *(f"{k}. {v}" for k, v in options.items())])
            splits[split].append(Sample(
                id=f"image-demo-{split}-{i}", answer=answer, options=options, task="mcq", images=[str(path)],
                source=IMAGE_DEMO_SOURCE, meta={"location": LOCATIONS[location], "split": split},
                messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]))
    return splits["train"], splits["heldout"]
