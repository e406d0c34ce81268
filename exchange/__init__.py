"""The domain and the process: registry, accounts, storage, configuration and the command line."""

from cext.accelerated import install as _install_compiled

_install_compiled()  # this package's listed modules run compiled when built from their current source
