"""Clearing: turning trades into settlement (delivery versus payment, fees, the cash ledger)."""

from cext.accelerated import install as _install_compiled

_install_compiled()  # this package's listed modules run compiled when built from their current source
