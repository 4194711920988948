"""Atomic writes: a failure while writing leaves the previous file intact and no debris."""

from __future__ import annotations

import os

import pytest
import torch

from dsbp.experiments import atomic


class Crash(Exception):
    pass


def _debris(folder):
    return [p for p in os.listdir(folder) if p.endswith(".tmp")]


def test_crash_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "result.json"
    atomic.write_json(path, {"test_acc": 0.5})
    old = path.read_bytes()

    def half_then_crash(f):
        f.write(b'{"test_acc": 0.9')  # a truncated JSON document reaches the disk ...
        raise Crash("power cut")     # ... and the process dies before finishing

    with pytest.raises(Crash):
        atomic.atomic_write(path, half_then_crash)
    assert path.read_bytes() == old
    assert _debris(tmp_path) == []


def test_crash_in_torch_save_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic.torch_save(path, {"w": torch.arange(4)})
    # A lambda cannot be pickled: torch.save fails midway through writing.
    with pytest.raises((AttributeError, TypeError, RuntimeError)):
        atomic.torch_save(path, {"w": torch.ones(1000), "bad": lambda: 0})
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4))
    assert _debris(tmp_path) == []


def test_replace_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    atomic.write_jsonl(path, [{"step": 1}])

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic.write_jsonl(path, [{"step": 1}, {"step": 2}])
    monkeypatch.undo()
    assert atomic.read_jsonl(path) == [{"step": 1}]
    assert _debris(tmp_path) == []


def test_written_content_round_trips(tmp_path):
    recs = [{"kind": "train", "step": i, "loss": i / 3} for i in range(5)]
    atomic.write_jsonl(tmp_path / "m.jsonl", recs)
    assert atomic.read_jsonl(tmp_path / "m.jsonl") == recs
