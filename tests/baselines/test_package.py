"""The baselines package exports every baseline and never imports peft at import time."""

from __future__ import annotations

import subprocess
import sys


def test_import_does_not_pull_in_peft():
    code = (
        "import sys, dsbp.baselines as b; "
        "assert {'SAM', 'MAML', 'SubspaceSGD', 'apply_lora'} <= set(b.__all__); "
        "assert all(hasattr(b, n) for n in b.__all__); "
        "print('peft' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"
