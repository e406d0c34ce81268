"""Clearing: turning trades into settlement (delivery versus payment, fees, the cash ledger)."""

from cext.accelerated import check as _check_build

_check_build()  # a compiled module of this package must be of its current source
