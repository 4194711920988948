"""LoRA through peft: only adapters train, identity at init, closed-form parameter count."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dsbp.baselines.lora import apply_lora, lora_param_count, lora_target_names
from dsbp.models.vit import ViT

pytest.importorskip("peft")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 3))


def test_lora_mlp_identity_at_init_count_and_only_adapters_train():
    base = _mlp()
    model = copy.deepcopy(base)
    rank = 2
    peft_model, n_train = apply_lora(model, rank)
    # Closed form by hand: r * (d_in + d_out) for each of the three Linears.
    assert n_train == rank * ((12 + 9) + (9 + 7) + (7 + 3))
    assert n_train == lora_param_count(base, rank, ["0", "2", "4"])
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    x, y = torch.randn(10, 12), torch.randint(0, 3, (10,))
    torch.testing.assert_close(peft_model(x), base(x), rtol=0, atol=0)  # B = 0 at init

    frozen = {
        n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad
    }
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(peft_model(x), y).backward()
        opt.step()
    for n, p in peft_model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    assert not torch.allclose(peft_model(x), base(x))  # the adapters did learn something


def test_lora_conv_count_matches_closed_form():
    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4)
    )
    model = copy.deepcopy(base)
    peft_model, n_train = apply_lora(model, 3, modules_to_save=["3"])
    # conv: r (C_in*kh*kw + C_out); the head "3" trains in full.
    assert n_train == 3 * (3 * 3 * 3 + 8) + (8 * 16 * 4 + 4)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(peft_model(x), base(x), rtol=0, atol=0)


def test_lora_on_vit_blocks():
    torch.manual_seed(0)
    base = ViT(image_size=8, patch=4, in_channels=1, num_classes=3, dim=16, depth=2, heads=2)
    targets = [
        n for n in lora_target_names(base) if n.split(".")[-1] in ("qkv", "proj", "fc1", "fc2")
    ]
    assert len(targets) == 8
    peft_model, n_train = apply_lora(copy.deepcopy(base), 4, targets, alpha=8)
    per_block = 4 * ((16 + 48) + (16 + 16) + (16 + 64) + (64 + 16))
    assert n_train == 2 * per_block == lora_param_count(base, 4, targets)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(peft_model(x), base(x), rtol=0, atol=0)


def test_lora_target_names_exclude_whole_submodules():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    )
    assert lora_target_names(net) == ["0", "2.0", "2.2"]
    assert lora_target_names(net, exclude=["2"]) == ["0"]
    base = copy.deepcopy(net)
    peft_model, n_train = apply_lora(net, 2, modules_to_save=["2"])
    assert n_train == 2 * (1 * 9 + 4) + (4 * 5 + 5) + (5 * 2 + 2)  # conv adapter + whole head
    x = torch.randn(3, 1, 3, 3)
    torch.testing.assert_close(peft_model(x), base(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not modules"):
        lora_target_names(base, exclude=["head"])


def test_lora_rejects_bad_input():
    with pytest.raises(ValueError, match="rank"):
        apply_lora(_mlp(), 0)
    with pytest.raises(ValueError, match="Linear/Conv2d"):
        apply_lora(_mlp(), 2, target_modules=["1"])
