"""Shifted images: identities, closed forms, and severity monotone in distance from clean."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsbp.data import load_dataset
from dsbp.data import shifts as sh


@pytest.fixture(scope="module")
def clean() -> torch.Tensor:
    ds = load_dataset("bundled")
    return ds.x_test[::10]  # 100 real Fashion-MNIST images, 10 per class


def dist(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().mean().item()


@pytest.mark.parametrize("kind", sh.KINDS)
def test_severity_is_monotone_and_shape_kept(clean, kind: str) -> None:
    d = []
    for s in range(0, 6):
        out = sh.apply_shift(clean, kind, s, seed=1)
        assert out.shape == clean.shape and out.dtype == torch.uint8
        d.append(dist(out, clean))
    assert d[0] == 0.0
    assert all(a < b for a, b in zip(d, d[1:], strict=False)), d


def test_rotate_identity_and_quarter_turns() -> None:
    x = torch.randint(0, 256, (4, 3, 9, 9), dtype=torch.uint8)
    assert torch.equal(sh.rotate(x, 0.0), x)
    assert torch.equal(sh.rotate(x, 360.0), x)
    # counter-clockwise as displayed, like numpy's rot90 on (rows, cols)
    assert torch.equal(sh.rotate(x, 90.0), torch.rot90(x, 1, (-2, -1)))
    assert torch.equal(sh.rotate(x, -90.0), torch.rot90(x, -1, (-2, -1)))
    r = torch.randint(0, 256, (2, 1, 6, 10), dtype=torch.uint8)
    assert torch.equal(sh.rotate(r, 180.0), torch.rot90(r, 2, (-2, -1)))


def test_rotation_keeps_a_centred_disc_and_is_invertible(clean) -> None:
    # A turn and its inverse return the image up to bilinear blur (much closer than the turn).
    x = clean
    there = sh.rotate(x, 30.0)
    back = sh.rotate(there, -30.0)
    h = x.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(h) - (h - 1) / 2,
                            indexing="ij")
    disc = (yy**2 + xx**2) < (h / 2 - 2) ** 2  # pixels that never leave the frame
    assert dist(back[..., disc], x[..., disc]) < 0.35 * dist(there[..., disc], x[..., disc])


def test_noise_statistics_and_seed() -> None:
    x = torch.full((2, 3, 64, 64), 128, dtype=torch.uint8)
    out = sh.gaussian_noise(x, 0.1, seed=5)
    e = (out.double() - 128) / 255
    assert e.mean().item() == pytest.approx(0.0, abs=3e-3)
    assert e.std().item() == pytest.approx(0.1, rel=0.03)  # rounding adds ~1/255/sqrt(12)
    assert torch.equal(out, sh.gaussian_noise(x, 0.1, seed=5))
    assert not torch.equal(out, sh.gaussian_noise(x, 0.1, seed=6))


def test_blur_closed_forms() -> None:
    flat = torch.full((1, 2, 12, 12), 77, dtype=torch.uint8)
    assert torch.equal(sh.gaussian_blur(flat, 1.0), flat)  # normalised kernel keeps constants
    k = sh.gaussian_kernel1d(1.0).double()
    assert k.sum().item() == pytest.approx(1.0) and torch.equal(k, k.flip(0))
    # Separable blur == one 2-D convolution with the outer-product kernel (interior pixels).
    x = torch.randint(0, 256, (2, 1, 20, 20), dtype=torch.uint8)
    r = (len(k) - 1) // 2
    ref = F.conv2d(x.double(), torch.outer(k, k).view(1, 1, 2 * r + 1, 2 * r + 1))
    got = sh.gaussian_blur(x, 1.0)[..., r:-r, r:-r].double()
    assert (got - ref).abs().max().item() <= 0.5 + 1e-6  # only the final rounding differs


def test_contrast_closed_form() -> None:
    x = torch.randint(0, 256, (3, 3, 5, 5), dtype=torch.uint8)
    assert torch.equal(sh.contrast(x, 1.0), x)
    m = x.double().mean(dim=(1, 2, 3), keepdim=True)
    ref = (m + 0.4 * (x.double() - m)).round()
    assert torch.equal(sh.contrast(x, 0.4).double(), ref)


def test_bad_input() -> None:
    x = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="unknown shift kind"):
        sh.apply_shift(x, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        sh.apply_shift(x, "noise", 6)
    with pytest.raises(ValueError, match="uint8"):
        sh.apply_shift(x.float(), "noise", 1)


def test_shifted_stream(clean) -> None:
    y = torch.arange(len(clean))
    schedule = [("rotate", 1), ("noise", 4)]
    batches = list(sh.shifted_stream(clean, y, schedule, batch_size=32, seed=2))
    assert len(batches) == 2 * 4
    assert [b[2:] for b in batches] == [("rotate", 1)] * 4 + [("noise", 4)] * 4
    seg = torch.cat([b[1] for b in batches[:4]])
    assert sorted(seg.tolist()) == y.tolist()  # each segment is one pass over the data
    xb, yb = batches[0][0], batches[0][1]
    assert torch.equal(xb, sh.rotate(clean[yb], 15.0))
    again = list(sh.shifted_stream(clean, y, schedule, batch_size=32, seed=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
