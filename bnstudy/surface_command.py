"""`python -m bnstudy surface RUN_DIR...`: see bnstudy/landscape_commands.py."""
from bnstudy.landscape_commands import surface_main as main  # noqa: F401
