"""Scale-out: real PostgreSQL, S3-compatible and Dask processes (issue 13)."""
