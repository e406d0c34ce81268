"""Data shipped with carbonx (emission-factor tables)."""
