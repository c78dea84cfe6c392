"""A PNG contact sheet of a federated dataset: one row per client, one column per sample.

Looking at the data is the quickest check that domains differ and labels still read; the report
and `fedshift data` write one of these next to every run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .types import ClientData, FederatedDataset

logger = logging.getLogger(__name__)

MIN_CELL = 64  # small images are enlarged by an integer factor to at least this many pixels
LABEL_WIDTH = 120  # left column with "client k / domain"
HEADER = 20  # top row with the dataset name
PAD = 2
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


def preview_size(n_clients: int, per_client: int, image_size: int) -> tuple[int, int]:
    """(width, height) in pixels of the sheet save_preview writes."""
    cell = image_size * max(1, math.ceil(MIN_CELL / image_size))
    return (LABEL_WIDTH + per_client * (cell + PAD) + PAD,
            HEADER + n_clients * (cell + PAD) + PAD)


def _pick(client: ClientData, per_client: int) -> list[int]:
    """Training samples in class order, one per class per pass (first of each class first),
    so the row shows every class when per_client allows; with more classes than places, classes
    evenly spaced over the whole set (a 100-class row is not just the digits)."""
    labels = client.train.labels
    classes = np.unique(labels)
    if per_client < len(classes):
        classes = classes[np.linspace(0, len(classes) - 1, per_client).round().astype(int)]
    by_class = [np.flatnonzero(labels == c) for c in classes]
    picked: list[int] = []
    for rank in range(max((len(b) for b in by_class), default=0)):
        picked += [int(b[rank]) for b in by_class if rank < len(b)]
        if len(picked) >= per_client:
            break
    return picked[:per_client]


def save_preview(dataset: FederatedDataset, path: str | Path, per_client: int = 10) -> Path:
    """Write the sheet as PNG to `path` (parent folders are created) and return the path."""
    if per_client < 1:
        raise ValueError(f"per_client must be positive, got {per_client}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = dataset.image_size
    scale = max(1, math.ceil(MIN_CELL / size))
    cell = size * scale
    sheet = Image.new("RGB", preview_size(len(dataset.clients), per_client, size), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((PAD, 3), f"{dataset.name}: {len(dataset.clients)} clients, "
              f"{dataset.num_classes} classes, {size}x{size}", fill=_TEXT, font=font)
    for row, client in enumerate(dataset.clients):
        top = HEADER + row * (cell + PAD)
        draw.text((PAD, top + 4), f"client {client.client_id}\n{client.domain}",
                  fill=_TEXT, font=font)
        for col, idx in enumerate(_pick(client, per_client)):
            tile = Image.fromarray(client.train.images[idx]).resize((cell, cell),
                                                                   Image.Resampling.NEAREST)
            left = LABEL_WIDTH + col * (cell + PAD)
            sheet.paste(tile, (left, top))
            name = dataset.classes[client.train.labels[idx]]
            draw.text((left + 2, top + 1), name, fill=(255, 255, 0), font=font,
                      stroke_width=1, stroke_fill=(0, 0, 0))
    sheet.save(path, format="PNG")
    logger.info("wrote preview %s", path)
    return path


def save_corruption_preview(images: np.ndarray, path: str | Path, *, seed: int = 0,
                            severities: tuple[int, ...] = (1, 2, 3, 4, 5)) -> Path:
    """Write a PNG grid: rows = the 15 corruptions, columns = ``images`` × ``severities``.

    Shows at a glance how strong each corruption is at the image size the edges will see.
    """
    from core.corruptions import CORRUPTIONS, corrupt

    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = images.shape[1]
    cell = size * max(1, math.ceil(MIN_CELL / size))
    cols = len(images) * (len(severities) + 1)
    sheet = Image.new("RGB", (LABEL_WIDTH + cols * (cell + PAD) + PAD,
                              HEADER + len(CORRUPTIONS) * (cell + PAD) + PAD), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((PAD, 3), f"corruptions, columns: clean then severity {', '.join(map(str, severities))}",
              fill=_TEXT, font=font)
    for row, name in enumerate(CORRUPTIONS):
        top = HEADER + row * (cell + PAD)
        draw.text((PAD, top + 4), name, fill=_TEXT, font=font)
        tiles = [images] + [corrupt(images, name, s, seed=seed) for s in severities]
        for i in range(len(images)):
            for j, batch in enumerate(tiles):
                left = LABEL_WIDTH + (i * len(tiles) + j) * (cell + PAD)
                sheet.paste(Image.fromarray(batch[i]).resize((cell, cell), Image.Resampling.NEAREST), (left, top))
    sheet.save(path, format="PNG")
    logger.info("wrote corruption preview %s", path)
    return path
