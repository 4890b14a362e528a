"""`python -m bnstudy spectrum RUN_DIR...`: see bnstudy/landscape_commands.py."""
from bnstudy.landscape_commands import spectrum_main as main  # noqa: F401
