"""The domain and the process: registry, accounts, storage, configuration and the command line."""

from cext.accelerated import check as _check_build

_check_build()  # a compiled module of this package must be of its current source
