"""Where the engines of the scaled-out stack are (README "Scale-out"): the URLs and credentials of
PostgreSQL (:mod:`.postgres`), S3 (:mod:`.s3`) and the Dask scheduler (:mod:`.dask`) that pcee's
clients need. Addresses only: the launchers that start these servers for ``make up`` and the tests
are development tools (``dev/``, package ``pcee_dev``), not part of the library.
"""
