"""The engines of the scaled-out stack (README "Scale-out"): start, stop and address a local
PostgreSQL server (:mod:`.postgres`), an S3-compatible server (:mod:`.s3`) and a Dask cluster
(:mod:`.dask`), or point at existing ones. Used by ``make up`` (``scripts/services.d/``) and by the
tests, which start real processes on 127.0.0.1. Process management only: no math, no Prefect.
"""
