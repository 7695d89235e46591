# The --data-root default of every command that reads data files (data.records.default_data_root).
DATA_ROOT_HELP = (
    "media paths resolve here (default: the data root recorded in the "
    "FILE.summary.json that convert or mix wrote beside the file, else its folder)"
)

# Every command: third-party start-up chatter left out, each message by name (quiet.py).
from . import quiet  # noqa: E402

quiet.install()
