"""``tools/pretrain_net.py``'s command: data errors end in one line.

A dataset that is not there (a missing ``DATA.ROOT``, split folder, file list or shard, a shard
of the wrong size) is found before any process starts and ends the command with a one-line usage
error (exit status 2), as a config error does. A data error found while loading (a bad label, a
truncated shard, too many unreadable images), in the training process, a loader worker or one of
several processes, ends it with one line naming the file, shard or key (exit status 1) instead
of a traceback, as ``tools/train_net.py`` does.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from ..config import ConfigError
from ..data.validate import DatasetError, ImageReadError
from .config import load_pretrain_cfg
from .data import check_data_paths
from .launch import launch_from_args, pretrain_argument_parser

__all__ = ["DATA_ERRORS", "one_line", "pretrain_command"]

DATA_ERRORS = (DatasetError, ImageReadError, FileNotFoundError)
_NAMES = tuple(e.__name__ for e in DATA_ERRORS)
# "nfdet.data.validate.DatasetError: message" (a traceback's last line).
_LAST_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+): (.*)$")

logger = logging.getLogger("nfdet.pretrain")


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line: an error re-raised from a loader worker or another
    process carries the original traceback, whose last line is the original message.

    Args:
        error (BaseException): the error.
    """
    lines = [x for x in str(error).strip().splitlines() if x.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    match = _LAST_LINE.match(lines[-1].strip())
    return match.group(2) if match else lines[-1].strip()


def _data_error_of(error: BaseException) -> str | None:
    """The one-line message of a data error raised in another process, else None."""
    lines = [x for x in str(error).strip().splitlines() if x.strip()]
    match = _LAST_LINE.match(lines[-1].strip()) if lines else None
    if match and match.group(1) in _NAMES:
        return match.group(2)
    return None


def pretrain_command(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` (default: ``sys.argv``), check the data paths and run the pretraining
    (``launch_from_args``), turning data errors into one line (see the module docstring)."""
    parser = pretrain_argument_parser()
    args = parser.parse_args(argv)
    try:
        check_data_paths(load_pretrain_cfg(args.config_file, args.opts))
    except (FileNotFoundError, ConfigError, DatasetError) as e:
        parser.error(one_line(e))
    try:
        launch_from_args(args)
    except DATA_ERRORS as e:
        message = one_line(e)
    except Exception as e:  # several processes: torch's ProcessRaisedException
        message = _data_error_of(e)
        if message is None:
            raise
    else:
        return
    logger.error("%s", message)  # into log.txt too
    parser.exit(1, f"{parser.prog}: error: {message}\n")
