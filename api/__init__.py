"""The network API: REST, websocket feeds, auth and the web page. It translates and delegates."""

from cext.accelerated import check as _check_build

_check_build()  # a compiled module of this package must be of its current source
