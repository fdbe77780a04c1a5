"""The service manager behind ``make up`` / ``make down`` / ``make status`` (``scripts/services.py``):
:mod:`.manager` (services, health, the commands), :mod:`.supervisor` (supervisord, which runs and
restarts them), :mod:`.hooks` (the engines' and serving's services). Nothing is imported here: the
modules supervisord runs on every start (:mod:`.run`, :mod:`.events`) stay light."""
