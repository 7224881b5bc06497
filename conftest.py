"""Root pytest configuration: which package files are not doctest modules."""

collect_ignore_glob = ["cadence/store/migrations/*"]
