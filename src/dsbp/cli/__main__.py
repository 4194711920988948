"""``python -m dsbp.cli ...`` (e.g. under ``torchrun``): the ``dsbp`` command."""

import sys

from dsbp.cli import main

sys.exit(main())
