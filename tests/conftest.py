"""Shared pytest fixtures (plain helpers: helpers.py)."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest
from helpers import write_tiny_coco


@pytest.fixture
def tiny_coco(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny COCO-format dataset written to ``tmp_path/coco``: (json_path, image_dir)."""
    return write_tiny_coco(tmp_path / "coco")


@pytest.fixture
def nfdet_log():
    """Messages of the "nfdet" loggers, joined by newlines (a handler on the logger itself: a
    trainer run earlier in the session may have stopped them from propagating to pytest's
    caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    log = logging.getLogger("nfdet")
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield lambda: "\n".join(r.getMessage() for r in records)
    log.removeHandler(handler)
    log.setLevel(level)


_dataset_names = itertools.count()


@pytest.fixture
def register_coco():
    """``register_coco(prefix, json_path, image_dir) -> name``: registers a COCO file through
    nfdet's checked loader under a name unique to the session; removed after the test."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from nfdet.detection.data import register_checked_coco

    names: list[str] = []

    def register(prefix: str, json_path: Path, image_dir: Path) -> str:
        name = f"{prefix}_{next(_dataset_names)}"
        register_checked_coco(name, str(json_path), str(image_dir))
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture(autouse=True)
def _restore_nfdet_logger():
    """Undo what a tool's in-process set-up (``launch.setup``, detectron2's ``setup_logger``)
    does to the "nfdet" logger: its console handler writes to the test's captured stdout, which
    is closed after the test, and later tests' log records would hit it ("Logging error")."""
    log = logging.getLogger("nfdet")
    state = (list(log.handlers), log.level, log.propagate)
    yield
    for handler in list(log.handlers):
        if handler not in state[0]:
            log.removeHandler(handler)
            handler.close()
    log.setLevel(state[1])
    log.propagate = state[2]
