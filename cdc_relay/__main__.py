"""``python -m cdc_relay``: the same as the ``cdc-relay`` console script."""

from cdc_relay.cli import main

raise SystemExit(main())
