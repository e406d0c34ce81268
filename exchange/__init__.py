"""The domain and the process: registry, accounts, storage, configuration and the command line."""
