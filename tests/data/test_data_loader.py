"""DeviceLoader: determinism, mid-epoch resume, augmentation geometry, normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsbp.data import augment as aug
from dsbp.data import load_dataset
from dsbp.data.loader import DeviceLoader


def images(n: int = 37, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)


def epoch(loader: DeviceLoader, e: int, start: int = 0) -> list[tuple[torch.Tensor, ...]]:
    return list(loader.iter_epoch(e, start_batch=start))


def make(x, y=None, **kw) -> DeviceLoader:
    y = torch.arange(len(x)) if y is None else y
    kw = {"shuffle": True, "augment": True, "seed": 7, **kw}
    return DeviceLoader(x, y, kw.pop("batch_size", 8), **kw)


def test_same_seed_and_epoch_same_batches_and_global_rng_untouched() -> None:
    x = images()
    state = torch.get_rng_state()
    a, b = epoch(make(x), 3), epoch(make(x), 3)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(a) == len(b) == 5
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = epoch(make(x), 4)
    assert not torch.equal(torch.cat([t[1] for t in a]), torch.cat([t[1] for t in other]))
    other_seed = epoch(make(x, seed=8), 3)
    assert not torch.equal(torch.cat([t[1] for t in a]), torch.cat([t[1] for t in other_seed]))


@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_equals_tail_of_full_epoch(drop_last: bool) -> None:
    x = images()
    full = epoch(make(x, drop_last=drop_last), 2)
    for start in (0, 1, 3, len(full)):
        tail = epoch(make(x, drop_last=drop_last), 2, start)  # a fresh loader, as after a crash
        assert len(tail) == len(full) - start
        for (xa, ya), (xb, yb) in zip(full[start:], tail, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError, match="start_batch"):
        epoch(make(x, drop_last=drop_last), 0, len(full) + 1)


def test_epoch_is_a_permutation_and_len() -> None:
    x = images(n=37)
    for drop_last, nb, seen in ((False, 5, 37), (True, 4, 32)):
        ld = make(x, drop_last=drop_last)
        ys = torch.cat([y for _, y in ld.iter_epoch(0)])
        assert len(ld) == nb and ys.numel() == seen
        assert len(set(ys.tolist())) == seen  # no repeats
    ys = torch.cat([y for _, y in make(x, shuffle=False).iter_epoch(5)])
    assert torch.equal(ys, torch.arange(37))


def test_labels_follow_their_images() -> None:
    # Constant images whose value encodes the index: crops/flips keep them constant.
    n = 40
    x = (torch.arange(n, dtype=torch.uint8) * 5).view(n, 1, 1, 1).expand(n, 2, 6, 6).contiguous()
    for x_b, y_b in make(x, batch_size=7).iter_epoch(1):
        val = torch.round(x_b * 255).to(torch.int64)  # mean None / std None: x / 255
        assert torch.equal(val, (y_b * 5).view(-1, 1, 1, 1).expand_as(val))


def test_reflect_pad_matches_torch() -> None:
    x = images(n=4, h=7, w=9)
    for p in (1, 4):
        assert torch.equal(aug.pad_images(x, p).float(),
                           F.pad(x.float(), (p, p, p, p), mode="reflect"))
        z = aug.pad_images(x, p, "zeros")
        assert torch.equal(z.float(), F.pad(x.float(), (p, p, p, p)))


@pytest.mark.parametrize("pad_mode", ["reflect", "zeros"])
def test_augmented_image_is_a_window_of_the_padded_image_maybe_mirrored(pad_mode: str) -> None:
    x = images(n=30, h=8, w=8)
    ld = make(x, batch_size=30, pad_mode=pad_mode)
    (xb, yb), = epoch(ld, 0)
    padded = F.pad(x.float(), (4, 4, 4, 4), mode="reflect" if pad_mode == "reflect" else
                   "constant")
    out = torch.round(xb * 255)
    offsets_seen, flips_seen = set(), set()
    for img, i in zip(out, yb.tolist(), strict=True):
        hits = []
        for r in range(9):
            for c in range(9):
                win = padded[i, :, r:r + 8, c:c + 8]
                hits += [(r, c, f) for f, ref in ((False, win), (True, win.flip(-1)))
                         if torch.equal(img, ref)]
        assert hits, "output is no shifted window of the padded image"
        offsets_seen.update((r, c) for r, c, _ in hits)
        flips_seen.update(f for _, _, f in hits)
    assert len(offsets_seen) > 5 and flips_seen == {False, True}  # randomness is really used


def test_draws_explain_every_image_exactly() -> None:
    x = images(n=20)
    ld = make(x, batch_size=6)
    order, flips, offs = ld.epoch_draws(4)
    got = torch.cat([xb for xb, _ in ld.iter_epoch(4)])
    padded = F.pad(x.float(), (4, 4, 4, 4), mode="reflect")
    for k in range(20):
        r, c = offs[k].tolist()
        win = padded[order[k], :, r:r + 8, c:c + 8]
        ref = win.flip(-1) if flips[k] else win
        assert torch.equal(torch.round(got[k] * 255), ref)


def test_flip_is_exact_mirror_and_crop_window() -> None:
    x = images(n=3)
    assert torch.equal(aug.flip(x, torch.tensor([True, False, True]))[0], x[0].flip(-1))
    assert torch.equal(aug.flip(x, torch.tensor([True, False, True]))[1], x[1])
    p = aug.pad_images(x, 2)
    out = aug.crop(p, torch.tensor([[0, 4], [2, 2], [4, 0]]), (8, 8))
    assert torch.equal(out[0], p[0, :, 0:8, 4:12])
    assert torch.equal(out[1], x[1])  # offset (pad, pad) is the original image
    assert torch.equal(out[2], p[2, :, 4:12, 0:8])
    m = torch.tensor([True, False, True])
    both = aug.crop(p, torch.tensor([[0, 4], [2, 2], [4, 0]]), (8, 8), flip=m)
    assert torch.equal(both, aug.flip(out, m))
    assert torch.equal(both[0], p[0, :, 0:8, 4:12].flip(-1))
    with pytest.raises(ValueError, match="offsets must lie"):
        aug.crop(p, torch.tensor([[0, 5], [2, 2], [4, 0]]), (8, 8))


def test_flip_only_without_crop() -> None:
    x = images(n=40)
    ld = make(x, batch_size=40, pad=0)
    (xb, yb), = epoch(ld, 0)
    got = torch.round(xb * 255)
    _, flips, _ = ld.epoch_draws(0)
    for k in range(40):
        src = x[yb[k]].float()
        assert torch.equal(got[k], src.flip(-1) if flips[k] else src)
    assert 0 < int(flips.sum()) < 40


def test_no_augment_normalises_exactly() -> None:
    x = images(n=10, c=3)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    ld = DeviceLoader(x, torch.arange(10), 4, shuffle=False, augment=False, mean=mean, std=std)
    got = torch.cat([xb for xb, _ in ld.iter_epoch(0)])
    ref = (x.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)


def test_dataset_stats_standardise_real_data() -> None:
    ds = load_dataset("bundled")
    ld = DeviceLoader(ds.x_train, ds.y_train, 1000, shuffle=False, augment=False,
                      mean=ds.mean, std=ds.std)
    allx = torch.cat([xb for xb, _ in ld.iter_epoch(0)]).double()
    assert allx.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert allx.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)


def test_dtype_and_channels_last_and_iter() -> None:
    x = images(n=9)
    ld = make(x, batch_size=4, dtype=torch.bfloat16, channels_last=True)
    xb, yb = next(iter(ld))
    assert xb.dtype == torch.bfloat16 and yb.dtype == torch.int64
    assert xb.is_contiguous(memory_format=torch.channels_last)
    # iter() walks epochs 0, 1, ...: the second iter() is epoch 1.
    ld2 = make(x, batch_size=4)
    first, second = list(ld2), list(ld2)
    assert torch.equal(first[0][1], epoch(ld2, 0)[0][1])
    assert torch.equal(second[0][1], epoch(ld2, 1)[0][1])


def test_bad_arguments() -> None:
    x = images(n=4)
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(x.float(), torch.arange(4), 2)
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(x, torch.arange(4), 0)
    with pytest.raises(ValueError, match="one per channel"):
        DeviceLoader(x, torch.arange(4), 2, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="positive"):
        DeviceLoader(x, torch.arange(4), 2, mean=(0, 0, 0), std=(1, 0, 1))
    with pytest.raises(ValueError, match="floating"):
        DeviceLoader(x, torch.arange(4), 2, dtype=torch.int32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_cpu_batches() -> None:
    x = images(n=50)
    cpu = epoch(make(x, batch_size=16), 1)
    gpu = epoch(make(x, batch_size=16, device="cuda"), 1)
    for (xa, ya), (xb, yb) in zip(cpu, gpu, strict=True):
        assert xb.device.type == "cuda"
        assert torch.equal(ya, yb.cpu())
        torch.testing.assert_close(xa, xb.cpu(), rtol=0, atol=1e-6)
