"""The network API: REST, websocket feeds, auth and the web page. It translates and delegates."""

from cext.accelerated import install as _install_compiled

_install_compiled()  # this package's listed modules run compiled when built from their current source
