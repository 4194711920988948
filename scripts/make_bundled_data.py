"""Build the small Fashion-MNIST subset bundled inside the package (the demo's default data).

Run from the repository root:

    python scripts/make_bundled_data.py --src ../shared/data/fashion_mnist.npz

It takes the first ``--train-per-class`` training images and the first ``--test-per-class``
test images of each class, in the upstream order (deterministic, no RNG), and writes
``src/dsbp/data/bundled/fashion_mnist_small.npz`` (pixel-array layout, uint8 (N, 28, 28, 1))
with the Fashion-MNIST MIT notice beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def balanced_indices(y: np.ndarray, per_class: int) -> np.ndarray:
    """First ``per_class`` indices of every class, in the original order."""
    picks = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        if len(idx) < per_class:
            raise ValueError(f"class {c} has only {len(idx)} images, need {per_class}")
        picks.append(idx[:per_class])
    return np.sort(np.concatenate(picks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--src", default="../shared/data/fashion_mnist.npz")
    ap.add_argument("--out", default="src/dsbp/data/bundled")
    ap.add_argument("--train-per-class", type=int, default=600)
    ap.add_argument("--test-per-class", type=int, default=100)
    args = ap.parse_args()

    d = np.load(args.src)
    tr = balanced_indices(d["y_train"], args.train_per_class)
    te = balanced_indices(d["y_test"], args.test_per_class)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fashion_mnist_small.npz"
    np.savez_compressed(
        path,
        x_train=d["x_train"][tr].astype(np.uint8), y_train=d["y_train"][tr].astype(np.int64),
        x_test=d["x_test"][te].astype(np.uint8), y_test=d["y_test"][te].astype(np.int64),
    )
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    meta = {
        "name": "fashion_mnist_small",
        "source": "Fashion-MNIST (zalandoresearch/fashion-mnist), bit-exact copy in shared/data",
        "license": "MIT, Copyright (c) 2017 Zalando SE (see LICENSE-fashion-mnist.txt)",
        "selection": f"first {args.train_per_class} train and {args.test_per_class} test "
                     "images of each class, upstream order",
        "classes": CLASSES,
        "counts": {"train": int(len(tr)), "test": int(len(te))},
        "train_indices_sha256": hashlib.sha256(tr.tobytes()).hexdigest(),
        "sha256": sha,
        "made_by": "scripts/make_bundled_data.py",
    }
    (out / "fashion_mnist_small.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB), train={len(tr)} test={len(te)}")


if __name__ == "__main__":
    main()
