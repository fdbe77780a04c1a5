"""Prefect tasks: thin wrappers that call the library (``src/pcee``). Tasks that do I/O retry."""

IO_RETRIES = 2
IO_RETRY_DELAY_S = 2
