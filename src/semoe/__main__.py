"""``python -m semoe``: the same as the ``semoe`` console script (torchrun runs it this way)."""

from semoe.cli.main import main

raise SystemExit(main())
