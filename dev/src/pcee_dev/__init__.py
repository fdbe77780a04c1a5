"""pcee's development tools (``dev/``): launchers of the local stack's engines, the service manager
behind ``make up``, the serving fleet's coordinator and one process helper. Installed into the
project's environment as a dev dependency; never part of the ``pcee`` wheel."""
