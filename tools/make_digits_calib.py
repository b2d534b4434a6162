#!/usr/bin/env python3
"""Write ``examples/digits_calib.npz``: calibration inputs for the bundled digits CNN.

512 images from the *training* split of scikit-learn's digits (the model never saw the
450 test images in ``digits_test.npz``, and neither does calibration), preprocessed
exactly as ``tools/train_digits_cnn.py`` does (÷16, bilinear 8×8 → 16×16, half-pixel
centres as torch's ``interpolate(align_corners=False)``), with their labels. The script
checks its preprocessing by rebuilding the stored test split bit for bit (to 1e-6).

    pip install scikit-learn && python tools/make_digits_calib.py
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]


def upsample(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of [N, H, W] to [N, size, size], as torch with align_corners=False."""
    n, h, w = x.shape

    def axis(src: int):
        pos = np.maximum((np.arange(size) + 0.5) * src / size - 0.5, 0.0)
        lo = np.minimum(np.floor(pos).astype(int), src - 1)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, pos - lo

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    rows = x[:, y0, :] * (1 - fy)[None, :, None] + x[:, y1, :] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx)[None, None, :] + rows[:, :, x1] * fx[None, None, :]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "digits_calib.npz")
    args = parser.parse_args()
    digits = load_digits()
    x = upsample(digits.images.astype(np.float64) / 16.0, 16).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=450, random_state=0, stratify=y)
    with np.load(ROOT / "examples" / "digits_test.npz") as test:
        if not (np.allclose(test["input"], x_te, atol=1e-6) and np.array_equal(test["label"], y_te)):
            raise SystemExit("preprocessing does not reproduce examples/digits_test.npz")
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(x_tr), size=min(args.samples, len(x_tr)), replace=False))
    np.savez_compressed(args.out, input=x_tr[pick], label=y_tr[pick])
    print(f"wrote {args.out}: {len(pick)} training images with labels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
