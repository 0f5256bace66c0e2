"""A generated image demo: synthetic stained slides whose answer depends on what is drawn.

Each image is a 56x56 "micrograph": tissue in the colours of one of four histological stains (H&E pink,
Gram-stain violet, Giemsa blue, Masson's trichrome green), with randomly placed darker cells and pixel noise.
The question asks which stain was used and the answer is the stain's name in ``<answer></answer>``. The prompt
is the same for every image, so a model can only beat chance by looking at the image. Samples are
multiple-choice records (``options``: the four stains, shuffled; ``answer``: the gold letter), so ``mcq_exact``
maps the named stain back to its letter, but the options are not listed in the prompt: a closed-set question,
like SLAKE's closed questions.

Why stains and not, say, where a lesion is: a stain colours every image token, which the tiny model's random
vision tower passes on at once; a lesion's position has to be read from which of the image tokens is bright,
and the tiny model needed over 200 warm-up steps to get off chance on that (measured: greedy accuracy 0.20
after 120 steps, 0.30 after 200). Listing the options in the prompt kept the stain task at chance for 120
steps as well (0.27; the long option list dilutes the attention on the 4 image tokens); without them greedy
accuracy is 0.27 after 80 warm-up steps, 0.38 after 100, 0.47 after 120.

Images are PNG files written once under ``<cache>/image-demo-v<version>-<seed>/`` (the tiny model's cache);
samples reference them by path, exactly as user data would.
"""

from __future__ import annotations

import random
from pathlib import Path

from lingshu_rl.data.sample import Sample

IMAGE_DEMO_VERSION = 3
IMAGE_DEMO_SOURCE = "lingshu_image_demo"
SIZE = 56
# stain -> (tissue colour, cell colour) in RGB
STAINS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "hematoxylin and eosin": ((235, 160, 200), (90, 40, 120)),
    "Gram stain": ((200, 170, 230), (80, 20, 140)),
    "Giemsa stain": ((170, 190, 235), (40, 50, 150)),
    "Masson trichrome": ((170, 220, 180), (110, 40, 40)),
}
SYSTEM_PROMPT = "Answer with the name of the stain inside <answer></answer>."
QUESTION = "Which stain was used for this slide?"
LETTERS = "ABCD"


def draw_slide(stain: str, rng: random.Random):
    """A ``SIZE`` x ``SIZE`` RGB image: tissue in ``stain``'s colours with darker cells and noise."""
    from PIL import Image, ImageChops, ImageDraw

    tissue, cell = STAINS[stain]
    jitter = [rng.randint(-15, 15) for _ in range(3)]
    image = Image.new("RGB", (SIZE, SIZE), tuple(max(0, min(255, c + j)) for c, j in zip(tissue, jitter)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 8)):
        x, y, r = rng.randrange(SIZE), rng.randrange(SIZE), rng.randint(2, 5)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=cell)
    noise = Image.frombytes("L", (SIZE, SIZE), bytes(rng.randrange(24) for _ in range(SIZE * SIZE))).convert("RGB")
    return ImageChops.subtract(image, noise)


def image_demo_dir(cache_dir: Path | str | None = None, seed: int = 0) -> Path:
    from lingshu_rl.cache import default_cache_dir

    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"image-demo-v{IMAGE_DEMO_VERSION}-{seed}"


def make_image_demo(n_train: int = 400, n_heldout: int = 100, seed: int = 0, cache_dir: Path | str | None = None
                    ) -> tuple[list[Sample], list[Sample]]:
    """``(train, heldout)`` samples; their images are written on first use. Stains are balanced in each split and
    the gold letter is uniform over A-D."""
    folder = image_demo_dir(cache_dir, seed)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"lingshu-image-demo-{IMAGE_DEMO_VERSION}-{seed}")
    splits: dict[str, list[Sample]] = {"train": [], "heldout": []}
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        stains = [list(STAINS)[i % len(STAINS)] for i in range(n)]
        rng.shuffle(stains)
        for i, stain in enumerate(stains):
            path = folder / f"{split}-{i:05d}.png"
            image = draw_slide(stain, rng)  # drawn even when cached, so the random stream never depends on the cache
            if not path.is_file():
                tmp = path.with_suffix(".tmp.png")
                image.save(tmp)
                tmp.replace(path)
            texts = list(STAINS)
            rng.shuffle(texts)
            options = dict(zip(LETTERS, texts))
            answer = LETTERS[texts.index(stain)]
            splits[split].append(Sample(
                id=f"image-demo-{split}-{i}", answer=answer, options=options, task="mcq", images=[str(path)],
                source=IMAGE_DEMO_SOURCE, meta={"stain": stain, "split": split},
                messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": QUESTION}]))
    return splits["train"], splits["heldout"]
