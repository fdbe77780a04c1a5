"""Exit policies: PCEE, PCEE-WS and the baselines, all with one interface (see base.py)."""
