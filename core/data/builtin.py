"""The built-in benchmarks behind one spec: which one, how many classes, how many images.

Why one place: the FL clients, the built-in teacher and edge model, the adapt launcher's streams
and the pipeline's previews must all build *the same* dataset from the same few settings; each
used to call ``make_digits_shift`` with its own arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from protos.config import option

from .domains import DOMAINS
from .types import FederatedDataset

BUILTIN_DATASETS: tuple[str, ...] = ("digits-shift", "glyph-shift")
GLYPH_DEFAULT_SIZES = {"train_per_client": 2000, "val_per_client": 250, "test_per_client": 1000}


@dataclass(frozen=True)
class BuiltinData:
    """A built-in feature-shift benchmark (sizes are per client; 0 = the dataset's default)."""

    dataset: str = option("digits-shift", "built-in benchmark: digits-shift (1,797 handwritten digits) or "
                          "glyph-shift (font-rendered glyphs, 10 / 47 / 100 classes, any size)",
                          choices=BUILTIN_DATASETS)
    classes: int = option(10, "classes (digits-shift: 10; glyph-shift: 10, 47 or 100)")
    train_per_client: int = option(0, "training images per client (0: digits-shift its whole split, "
                                   "glyph-shift 2,000)")
    val_per_client: int = option(0, "glyph-shift: validation images per client (0: 250)")
    test_per_client: int = option(0, "glyph-shift: test images per client (0: 1,000)")

    def __post_init__(self) -> None:
        if self.dataset not in BUILTIN_DATASETS:
            raise ValueError(f"dataset {self.dataset!r} is not built in; choose from {', '.join(BUILTIN_DATASETS)}")
        if min(self.train_per_client, self.val_per_client, self.test_per_client) < 0:
            raise ValueError("image counts per client must be >= 0")
        if self.dataset == "digits-shift":
            if self.classes != 10:
                raise ValueError(f"digits-shift has 10 classes, got classes = {self.classes}")
            if self.val_per_client or self.test_per_client:
                raise ValueError("digits-shift splits its 1,797 digits by fixed fractions: "
                                 "val_per_client / test_per_client apply to glyph-shift only")
        else:  # 0 resolves to the default size, so equal datasets have equal specs (and cache keys)
            from .glyph_shift import glyph_classes

            glyph_classes(self.classes)  # one of the built-in class sets, or a ValueError naming them
            for key, size in GLYPH_DEFAULT_SIZES.items():
                if getattr(self, key) == 0:
                    object.__setattr__(self, key, size)

    def class_names(self) -> tuple[str, ...]:
        """The label names, in label order (written into the exported model's metadata)."""
        if self.dataset == "digits-shift":
            return tuple(str(i) for i in range(10))
        from .glyph_shift import glyph_classes

        return tuple(glyph_classes(self.classes))

    def make(self, seed: int, image_size: int, domains: Sequence[str] = DOMAINS,
             clients_per_domain: int = 1) -> FederatedDataset:
        """Build (glyph-shift: or load from its cache) the dataset; same arguments, same bytes."""
        if self.dataset == "digits-shift":
            from .digits_shift import make_digits_shift

            return make_digits_shift(seed, image_size=image_size, domains=domains,
                                     clients_per_domain=clients_per_domain,
                                     train_per_client=self.train_per_client or None)
        from .glyph_shift import make_glyph_shift

        return make_glyph_shift(seed, classes=self.classes, image_size=image_size, domains=domains,
                                clients_per_domain=clients_per_domain, train_per_client=self.train_per_client,
                                val_per_client=self.val_per_client, test_per_client=self.test_per_client)
