"""Finished runs as data (runs), the claims checked on them, the figures, `plot` and `report`."""
