"""What a frame of the bouncing-shapes videos shows, measured on the pixels: the lit parts (pixels far from
the background colour, 8-connected), whether they make one shape, its colour and its centre."""

import numpy as np

from latte_cli.video import BACKGROUND, COLOURS


def parts(lit: np.ndarray) -> list[np.ndarray]:
    """The 8-connected parts of a boolean (H, W) image, each an (n, 2) array of (y, x), largest first."""
    H, W = lit.shape
    seen, found = np.zeros_like(lit), []
    for i, j in zip(*np.nonzero(lit), strict=True):
        if seen[i, j]:
            continue
        seen[i, j], stack, pixels = True, [(i, j)], []
        while stack:
            a, b = stack.pop()
            pixels.append((a, b))
            for y in range(max(a - 1, 0), min(a + 2, H)):
                for x in range(max(b - 1, 0), min(b + 2, W)):
                    if lit[y, x] and not seen[y, x]:
                        seen[y, x] = True
                        stack.append((y, x))
        found.append(np.array(pixels))
    return sorted(found, key=len, reverse=True)


def frame_shapes(video: np.ndarray, classes: int) -> list[dict]:
    """Per frame of a (T, H, W, 3) uint8 video: one (a single part of >= 8 pixels, stray pixels elsewhere
    <= 2 in all), colour (the class whose colour is nearest the main part's mean colour) and centre (y, x)."""
    out = []
    for frame in video.astype(float):
        found = parts(np.abs(frame - np.array(BACKGROUND)).sum(-1) > 120)
        if not found:
            out.append(dict(one=False, colour=None, centre=None))
            continue
        main = found[0]
        mean = frame[main[:, 0], main[:, 1]].mean(0)
        out.append(dict(one=len(main) >= 8 and sum(map(len, found[1:])) <= 2, centre=main.mean(0),
                        colour=int(np.argmin([np.abs(mean - np.array(c)).sum() for c in COLOURS[:classes]]))))
    return out
