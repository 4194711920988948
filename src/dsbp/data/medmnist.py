"""MedMNIST 2-D sets: ``<flag>.npz`` as the ``medmnist`` package saves it, or the shared layout.

Official layout: ``train_images`` uint8 (N, H, W) or (N, H, W, 3), ``train_labels`` (N, 1), and
the same for ``val_`` and ``test_``. Shared layout (``medmnist_<flag>.npz``): ``x_<split>``,
``y_<split>``. Size variants of MedMNIST+ are flags with a suffix, e.g. ``breastmnist_64``.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np

from dsbp.data.dataset import ImageDataset, make_dataset
from dsbp.data.npz_layouts import Splits, num_classes, read_pixel_npz, sidecar_classes
from dsbp.data.sources import Candidate

# Number of classes of each single-label 2-D MedMNIST flag (MedMNIST v2, Yang et al. 2023).
# chestmnist is multi-label (14 binary labels) and cannot be an ImageDataset.
FLAGS_2D = {
    "pathmnist": 9, "dermamnist": 7, "octmnist": 4, "pneumoniamnist": 2, "retinamnist": 5,
    "breastmnist": 2, "bloodmnist": 8, "tissuemnist": 8, "organamnist": 11,
    "organcmnist": 11, "organsmnist": 11,
}
_FLAG = re.compile(r"^([a-z]+mnist(?:3d)?)(?:_(64|128|224))?$")


def parse_flag(flag: str) -> tuple[str, int | None]:
    """Split ``"breastmnist_64"`` into ``("breastmnist", 64)``; validate 2-D, single-label."""
    m = _FLAG.match(flag)
    if not m:
        raise ValueError(
            f"bad MedMNIST flag {flag!r}: expected e.g. 'breastmnist' or 'pathmnist_64' "
            f"(2-D flags: {', '.join(sorted(FLAGS_2D))})"
        )
    base, size = m.group(1), (int(m.group(2)) if m.group(2) else None)
    if base.endswith("3d"):
        raise ValueError(f"{flag!r} is a 3-D MedMNIST set; only 2-D image sets are supported")
    if base == "chestmnist":
        raise ValueError("chestmnist is multi-label (14 binary labels); ImageDataset holds "
                         "single-label classification only")
    return base, size


def how_to_get(flag: str) -> str:
    """Instructions for obtaining ``<flag>.npz``."""
    return (
        f"Get it with `load_dataset('medmnist:{flag}', download=True)` (needs "
        "`pip install 'dsbp[download]'`, i.e. the medmnist package), or download "
        f"{flag}.npz from https://zenodo.org/records/10519652 (MedMNIST v2/v3) into <root>."
    )


def _read_official(path: Path) -> Splits:
    with np.load(path, allow_pickle=False) as z:
        need = [f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")]
        missing = [k for k in need if k not in z.files]
        if missing:
            raise ValueError(f"{path} lacks arrays {missing} (has {sorted(z.files)})")
        splits = {}
        for s in ("train", "val", "test"):
            x, y = z[f"{s}_images"], np.asarray(z[f"{s}_labels"])
            if x.ndim == 4 and x.shape[-1] not in (1, 3):
                raise ValueError(f"{path}: {s}_images has shape {x.shape}; 3-D volumes are "
                                 "not supported")
            if y.ndim == 2 and y.shape[1] > 1:
                raise ValueError(f"{path}: {s}_labels has shape {y.shape}: multi-label sets "
                                 "are not supported")
            splits[s] = (x, y.reshape(-1).astype(np.int64))
    return splits


def _class_names(base: str, path: Path, splits: Splits) -> list[str]:
    names = sidecar_classes(path)
    if names is None:
        try:  # the package's own table, when installed
            import medmnist

            label = medmnist.INFO[base]["label"]
            names = [label[str(i)] for i in range(len(label))]
        except (ImportError, KeyError):
            names = None
    n = FLAGS_2D.get(base, num_classes(splits))
    if names is None or len(names) != n:
        # [ours] generic names when neither a sidecar nor the medmnist package gives them.
        names = [f"class_{i}" for i in range(n)]
    return names


def _read(name: str, base: str, path: Path) -> ImageDataset:
    with np.load(path, allow_pickle=False) as z:
        official = "train_images" in z.files  # else the shared x_<split>/y_<split> layout
    splits = _read_official(path) if official else read_pixel_npz(path)
    layout = "medmnist npz" if official else "pixel-array npz"
    return make_dataset(name, splits, _class_names(base, path, splits), f"{layout} {path}")


def candidates(root: Path, flag: str) -> list[Candidate]:
    """Copies of MedMNIST ``flag`` that may be under ``root``, preferred first."""
    base, _ = parse_flag(flag)
    name = f"medmnist:{flag}"
    paths = [root / f"{flag}.npz", root / "medmnist" / f"{flag}.npz",
             root / f"medmnist_{flag}.npz"]
    return [Candidate(p, "npz", partial(_read, name, base, p)) for p in paths]


def download(target: Path, flag: str) -> None:
    """Download ``<flag>.npz`` with the medmnist package into ``target``."""
    import medmnist

    base, size = parse_flag(flag)
    cls = getattr(medmnist, medmnist.INFO[base]["python_class"])
    target.mkdir(parents=True, exist_ok=True)
    kwargs = {} if size is None else {"size": size}
    cls(split="train", download=True, root=str(target), **kwargs)
