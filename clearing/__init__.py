"""Clearing: turning trades into settlement (delivery versus payment, fees, the cash ledger)."""
