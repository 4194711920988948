import math

import pytest
import torch

from dsbp.core.subspace import drift, effective_rank, energy_kept, principal_angles, rank_for_energy


def test_principal_angles_known_rotation():
    # span{e1, cos(t) e2 + sin(t) e3} vs span{e1, e2}: angles {0, t}
    for t in (1e-7, 1e-3, 0.3, 1.2):
        U = torch.eye(4, dtype=torch.float64)[:, :2]
        V = torch.zeros(4, 2, dtype=torch.float64)
        V[0, 0] = 1
        V[1, 1], V[2, 1] = math.cos(t), math.sin(t)
        ang = principal_angles(U, V)
        torch.testing.assert_close(ang, torch.tensor([0.0, t], dtype=torch.float64),
                                   atol=1e-13, rtol=1e-9)


def test_principal_angles_invariant_to_basis_choice():
    U = torch.randn(10, 3, dtype=torch.float64)
    R = torch.randn(3, 3, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
    assert principal_angles(U, U @ R).max() < 1e-7


def test_drift_extremes_and_formula():
    E = torch.eye(6, dtype=torch.float64)[:, :2]
    assert drift(E, E).item() == pytest.approx(0.0, abs=1e-12)
    assert drift(E, torch.eye(6, dtype=torch.float64)[:, 2:4]).item() == pytest.approx(1.0)
    # one of two directions rotated away entirely: delta = sqrt(1 - 1/2)
    F = torch.eye(6, dtype=torch.float64)[:, [0, 3]]
    assert drift(E, F).item() == pytest.approx(math.sqrt(0.5))


def test_energy_kept_closed_form():
    E = torch.eye(4, dtype=torch.float64)[:, :1]
    G = torch.tensor([[3.0, 0.0], [4.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    assert energy_kept(G, E, "output").item() == pytest.approx(3.0 / 5.0)
    assert energy_kept(torch.zeros(4, 2), E, "output").item() == 1.0


def test_effective_rank_and_rank_for_energy():
    assert effective_rank(torch.ones(5)).item() == pytest.approx(5.0)
    assert effective_rank(torch.tensor([1.0, 0, 0])).item() == pytest.approx(1.0)
    lam = torch.tensor([5.0, 3.0, 1.0, 1.0])
    assert rank_for_energy(lam, 0.5) == 1
    assert rank_for_energy(lam, 0.8) == 2
    assert rank_for_energy(lam, 0.85) == 3
    assert rank_for_energy(lam, 1.0) == 4
    with pytest.raises(ValueError):
        rank_for_energy(lam, 0.0)
