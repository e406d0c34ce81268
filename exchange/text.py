"""Which text carbonx takes in: one rule for the API's request fields and for the exchange's own
checks made before anything changes (an offset validates its beneficiary before it buys).

Refused: control characters (Unicode category Cc: NUL, which PostgreSQL cannot store, tabs, line
breaks, C1 controls) and the bidirectional embeddings, overrides and isolates, which make text
display in another order than it is stored (a certificate's beneficiary could read as someone
else's).
"""

from __future__ import annotations

import re

UNSAFE_RANGES = r"\u0000-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069"  # a regex character class's ranges
UNSAFE_TEXT = re.compile(f"[{UNSAFE_RANGES}]")
