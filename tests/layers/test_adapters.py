import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsbp.layers import adapters


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_as_matrix_views_conv_weight():
    conv = nn.Conv2d(3, 5, 3)
    W = adapters.as_matrix(conv.weight)
    assert W.shape == (5, 27)
    assert W.data_ptr() == conv.weight.data_ptr()  # a view, no copy


def test_linear_rows_both_sides_without_subsampling():
    lin = nn.Linear(4, 3)
    x = torch.randn(2, 5, 4)
    y = lin(x)
    a_in = adapters.rows(lin, x, y, "input", 1000, _gen())
    a_out = adapters.rows(lin, x, y, "output", 1000, _gen())
    torch.testing.assert_close(a_in, x.reshape(-1, 4))
    torch.testing.assert_close(a_out, y.detach().reshape(-1, 3))


def test_conv_rows_equal_im2col_and_channels_by_positions():
    conv = nn.Conv2d(2, 4, 3, padding=1, stride=2)
    x = torch.randn(3, 2, 7, 7)
    y = conv(x)
    a_out = adapters.rows(conv, x, y, "output", 10_000, _gen())
    ref_out = y.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(a_out, ref_out)
    a_in = adapters.rows(conv, x, y, "input", 10_000, _gen())
    ref_in = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18)
    torch.testing.assert_close(a_in, ref_in)
    # the im2col rows reproduce the conv output: rows @ W^T (+ b) = outputs
    W = adapters.as_matrix(conv.weight)
    torch.testing.assert_close(a_in @ W.T + conv.bias, ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["output", "input"])
def test_subsampled_rows_are_distinct_rows_of_the_full_matrix(side):
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(6, 2, 8, 8)
    y = conv(x)
    full = (y.detach().permute(0, 2, 3, 1).reshape(-1, 3) if side == "output"
            else F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18))
    sub = adapters.rows(conv, x, y, side, 50, _gen(3))
    assert sub.shape == (50, full.shape[1])
    # each sampled row is an exact row of the full matrix, and no row is taken twice
    d = torch.cdist(sub, full, compute_mode="donot_use_mm_for_euclid_dist")
    assert (d.min(dim=1).values < 1e-5).all()
    assert len(set(d.argmin(dim=1).tolist())) == 50
    # deterministic for a given generator seed
    torch.testing.assert_close(sub, adapters.rows(conv, x, y, side, 50, _gen(3)))


def test_input_side_rejects_grouped_conv_and_string_padding():
    with pytest.raises(ValueError, match="groups"):
        adapters.check_module(nn.Conv2d(4, 4, 3, groups=2), "input", "c")
    with pytest.raises(ValueError, match="padding"):
        adapters.check_module(nn.Conv2d(4, 4, 3, padding="same"), "input", "c")
    adapters.check_module(nn.Conv2d(4, 4, 3, groups=2), "output", "c")  # fine on the output side


@pytest.mark.parametrize("n,m", [(10, 20), (30, 10), (100_000, 64), (5000, 1000)])
def test_pick_is_a_sorted_subset_of_the_right_size(n, m):
    from dsbp.layers.adapters import _pick

    idx = _pick(n, m, torch.Generator().manual_seed(0))
    assert idx.dtype == torch.int64
    assert idx.numel() == min(n, m)
    assert torch.equal(idx, idx.unique())  # distinct and sorted
    assert int(idx.min()) >= 0 and int(idx.max()) < n


def test_pick_o_m_branch_draws_every_index_with_probability_m_over_n():
    """The O(m) branch (n > 4m, stratified) includes every index with probability m/n:
    chi-square of the inclusion counts over 2000 draws of 8 out of 41 against the closed form
    (df = 40; p ~ 1e-4 at 77), and the two ends of the range are not starved."""
    from dsbp.layers.adapters import _pick

    n, m, draws = 41, 8, 2000
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(n)
    for _ in range(draws):
        counts[_pick(n, m, g)] += 1
    expected = draws * m / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 77, chi2
    assert counts[0] > 0.5 * expected and counts[-1] > 0.5 * expected


def test_pick_sample_gives_an_unbiased_covariance():
    """Mean of (1/m) A_S^T A_S over draws equals (1/n) A^T A (closed form), within Monte Carlo
    error: the property the refresh relies on."""
    from dsbp.layers.adapters import _pick

    g = torch.Generator().manual_seed(2)
    A = torch.randn(200, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.3],
                                                                                 dtype=torch.float64)
    A[:50] *= 4  # rows differ in scale along the range: a biased sampler would show
    want = A.T @ A / A.shape[0]
    est = torch.zeros(3, 3, dtype=torch.float64)
    draws = 4000
    for _ in range(draws):
        S = A[_pick(200, 20, g)]
        est += S.T @ S / 20
    est /= draws
    assert torch.allclose(est, want, rtol=0.03, atol=0.03 * float(want.abs().max()))


@pytest.mark.parametrize("n,m", [(150, 30), (157, 30), (680, 40), (703, 40), (2000, 64)])
def test_pick_is_a_uniform_subset_distinct_with_inclusion_m_over_n(n, m):
    """n/m integer and not, on both paths (n <= 16m: a permutation; n > 16m: without one,
    the cases 680/40, 703/40 and 2000/64). A sampler
    with replacement, or one of equal strata with rounded edges, repeats rows; one that favours
    some rows misses m/n."""
    from dsbp.layers.adapters import _pick

    trials = 3000
    hits = torch.zeros(n)
    for t in range(trials):
        idx = _pick(n, m, torch.Generator().manual_seed(t))
        assert idx.numel() == m and idx.unique().numel() == m  # distinct, every draw
        hits[idx] += 1
    freq = hits / trials
    sigma = (m / n * (1 - m / n) / trials) ** 0.5
    assert float((freq - m / n).abs().max()) < 5 * sigma
    # no position bias: the first and the last tenth are drawn as often as the middle
    assert abs(float(freq[: n // 10].mean() - freq[-(n // 10):].mean())) < 3 * sigma


def test_pick_stays_distinct_at_large_non_integer_ratios():
    from dsbp.layers.adapters import _pick

    for t in range(20):  # Fashion-MNIST-sized layers: 150,000 rows, 8192 kept
        idx = _pick(150_000, 8192, torch.Generator().manual_seed(t))
        assert idx.unique().numel() == 8192
