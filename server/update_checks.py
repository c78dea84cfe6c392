"""What the FL server refuses from a client before it averages: pure checks of one training
reply, and one small stateful guard against a step that jumped.

Why apart from the strategies: a client, buggy or hostile, must not poison the average, and the
rules for that are easier to read, test and change in one place than spread through the round
logic that calls them (``FedShiftStrategy._reject_bad_updates``).
"""

from __future__ import annotations

import math
import statistics
from collections import deque

import numpy as np
from flwr.app import ArrayRecord, Message

from core.fl_config import WEIGHT_KEY, has_non_finite


def update_problem(msg: Message, sent: dict[str, tuple[tuple[int, ...], str]]) -> str | None:
    """What is wrong with a training reply's update (``None``: nothing), against the keys and shapes
    that were sent: one array record, a positive finite sample count, the same keys and shapes,
    numeric dtypes, no NaN/Inf."""
    records = list(msg.content.array_records.items())
    if len(records) != 1:
        return f"{len(records)} array records (expected 1)"
    metrics = next(iter(msg.content.metric_records.values()), None)
    weight = metrics.get(WEIGHT_KEY) if metrics is not None else None
    if not isinstance(weight, (int, float)) or not math.isfinite(float(weight)) or float(weight) <= 0:
        return f"sample count {weight!r} is not a positive finite number"
    _, record = records[0]
    if sent and set(record.keys()) != set(sent):
        missing, extra = sorted(set(sent) - set(record.keys()))[:3], sorted(set(record.keys()) - set(sent))[:3]
        return f"keys differ from the model sent (missing {missing}, unexpected {extra})"
    for key, array in record.items():
        if sent and tuple(array.shape) != sent[key][0]:
            return f"{key}: shape {tuple(array.shape)}, sent {sent[key][0]}"
        values = array.numpy()
        # dtypes may differ (FedAvg's average turns an int64 counter into float64): numbers suffice
        if values.dtype.kind not in "biuf":
            return f"{key}: dtype {values.dtype} is not numeric"
        if has_non_finite(values):
            return f"{key}: NaN or Inf values"
    return None


class StepJumpGuard:
    """Refuses a client update whose step is far larger than the federation's steps.

    Why: a finite update can still be ruinous. In the FRAug study (README, issue 11) one client's
    update came back finite but huge after its generator overflowed, passed :func:`update_problem`,
    was averaged in, and every client fell to chance. The rules, all here:

    - a reply's step is the L2 distance from the model sent, over the arrays that were
      floating-point in the first round this guard saw (the model's own dtypes: FRAug's
      ``generator.*`` arrays count, an integer counter such as BatchNorm's ``num_batches_tracked``
      does not, even after FedAvg's average has made it a float); a reply's array counts whatever
      its dtype, so an integer reply cannot hide a float layer's step;
    - the reference is the median, over the last ``window`` rounds, of each round's median
      accepted step;
    - a step is refused when it exceeds ``ratio`` × the larger of the reference and this round's
      lower median step: a step shared by at least half of the round's clients is the federation
      moving (FRAug's warm-up ending, say), not an outlier, so such a change cannot lock the run out;
    - with no reference (the first round of a run, resumed runs included: the history is not
      checkpointed) only the round's own lower median applies, and a typical step of 0 (nobody
      moved) judges nothing. At least half of a round's steps always pass.

    A ratio of 10 leaves steady growth alone (a few percent a round: FRAug's generator distance
    doubles every 11 rounds in the study) and catches a lone jump of an order of magnitude.
    """

    def __init__(self, ratio: float, window: int = 5) -> None:
        if ratio <= 1 or window < 1:
            raise ValueError(f"need ratio > 1 and window >= 1, got {ratio}, {window}")
        self.ratio = ratio
        self._history: deque[float] = deque(maxlen=window)
        self._float_keys: frozenset[str] | None = None
        self._sent: dict[str, np.ndarray] = {}

    def begin_round(self, sent: ArrayRecord) -> None:
        """Remember the floating-point arrays this round sends."""
        if self._float_keys is None:
            self._float_keys = frozenset(k for k, v in sent.items() if v.numpy().dtype.kind == "f")
        self._sent = {k: sent[k].numpy().astype(np.float64) for k in self._float_keys if k in sent}

    def step(self, record: ArrayRecord) -> float:
        """L2 distance of a reply's arrays from the ones sent (keys and shapes already checked)."""
        return math.sqrt(sum(float(np.sum((record[k].numpy().astype(np.float64) - sent) ** 2))
                             for k, sent in self._sent.items()))

    def reference(self) -> float | None:
        """The median of the last rounds' median accepted steps (``None``: no round yet)."""
        return statistics.median(self._history) if self._history else None

    def judge(self, steps: list[float]) -> list[str | None]:
        """For each of a round's steps, why it is refused (or ``None``); records the accepted ones."""
        if not steps:
            return []
        ref, this_round = self.reference(), statistics.median_low(steps)
        base = max(ref or 0.0, this_round)
        recent = f"{ref:.3g} over the last {len(self._history)} round(s)" if ref is not None else "none yet"
        why = [None if s <= self.ratio * base or base == 0 else
               f"step {s:.3g} is {s / base:.3g}× the typical step {base:.3g} (the larger of the recent "
               f"median, {recent}, and this round's lower median, {this_round:.3g}); max-update-jump "
               f"{self.ratio:g}" for s in steps]
        accepted = [s for s, w in zip(steps, why) if w is None]
        if accepted:
            self._history.append(statistics.median(accepted))
        return why
