"""Edge selection pinned on hand-made logits (METHODS.md, CEMA "Edge sample selection").

Logits are log-probabilities of chosen distributions, so softmax(logits) is that distribution
exactly and every expected value below is computed by hand from the formulas.
"""

import math

import numpy as np
import pytest

from edge.selection import EntropySelector, SelectionConfig, softmax_entropy

C = 4
LN_C = math.log(C)
E0 = 0.4 * LN_C  # 0.5545
E_MIN = 0.02 * LN_C  # 0.0277

P97 = [0.97, 0.01, 0.01, 0.01]  # H 0.168: reliable and informative
P90 = [0.90, 0.04, 0.03, 0.03]  # H 0.434: reliable at E0, excluded once E_max shrinks below it
PU = [0.25, 0.25, 0.25, 0.25]  # H ln 4: unreliable
P997 = [0.997, 0.001, 0.001, 0.001]  # H 0.0237 < E_min: low-informative


def H(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p)


def logits(*rows: list[float]) -> np.ndarray:
    return np.log(np.array(rows, dtype=np.float64))


def selector(**kw) -> EntropySelector:
    kw.setdefault("num_classes", C)
    return EntropySelector(SelectionConfig(**kw))


def test_entropy_matches_hand_values_and_is_shift_invariant() -> None:
    p, h = softmax_entropy(logits(P97, PU, P997))
    np.testing.assert_allclose(h, [H(P97), LN_C, H(P997)], rtol=1e-12)
    np.testing.assert_allclose(p[0], P97, rtol=1e-12)
    _, h_shift = softmax_entropy(logits(P97, PU, P997) + 1000.0)  # stable for huge logits
    np.testing.assert_allclose(h_shift, h, rtol=1e-9)
    assert H(P97) == pytest.approx(0.1677, abs=1e-4) and H(P997) < E_MIN < H(P97) < H(P90) < E0


def test_constants() -> None:
    cfg = SelectionConfig(num_classes=10)
    assert cfg.e0 == pytest.approx(0.4 * math.log(10)) and cfg.e0 == pytest.approx(0.921, abs=1e-3)
    assert cfg.e_min == pytest.approx(0.02 * math.log(10))
    assert (cfg.lam, cfg.warmup, cfg.kappa, cfg.redundancy, cfg.dynamic, cfg.use_emin) == \
        (1.0, 128, 0.02, None, True, True)


def test_warmup_then_dynamic_threshold_shrinks_as_mean_entropy_drops() -> None:
    s = selector(warmup=4)
    b1 = [P97, PU, P90, P997]
    sel = s.select(logits(*b1))  # warm-up: E_max = E0
    assert sel.e_max == pytest.approx(E0) and sel.e_min == pytest.approx(E_MIN)
    assert sel.mask.tolist() == [True, False, True, False]
    assert (sel.unreliable, sel.low_informative, sel.redundant, sel.kept) == (1, 1, 0, 2)
    e_w = sum(map(H, b1)) / 4
    assert s.warmup_mean == pytest.approx(e_w)

    total = sum(map(H, b1))
    sel = s.select(logits(P97, P90))  # E_max = lam*E0*mean_t/mean_w, mean_t includes this batch
    total += H(P97) + H(P90)
    expected2 = E0 * (total / 6) / e_w
    assert sel.e_max == pytest.approx(expected2, rel=1e-9) and expected2 < E0
    assert sel.mask.tolist() == [True, True]  # H(P90)=0.434 < 0.480

    sel = s.select(logits(P97, P97, P97, P90))  # more confident -> tighter still
    total += 3 * H(P97) + H(P90)
    expected3 = E0 * (total / 10) / e_w
    assert sel.e_max == pytest.approx(expected3, rel=1e-9) and expected3 < expected2
    assert sel.mask.tolist() == [True, True, True, False] and sel.unreliable == 1
    assert s.mean_entropy == pytest.approx(total / 10)
    assert s.warmup_mean == pytest.approx(e_w)  # frozen


def test_warmup_mean_uses_exactly_the_first_nw_samples_and_lambda_scales() -> None:
    s = selector(warmup=3, lam=1.2)
    b1 = [P97, PU, P90, P97]
    sel = s.select(logits(*b1))  # 0 seen before: the whole batch is in warm-up
    assert sel.e_max == pytest.approx(E0)
    e_w = (H(P97) + LN_C + H(P90)) / 3  # the 4th sample is past N_w
    assert s.warmup_mean == pytest.approx(e_w)
    sel = s.select(logits(P97))
    expected = 1.2 * E0 * ((sum(map(H, b1)) + H(P97)) / 5) / e_w
    assert sel.e_max == pytest.approx(expected, rel=1e-9)


def test_static_threshold_ablation_and_eata_ignore_dynamics() -> None:
    for s in (selector(warmup=1, dynamic=False), selector(warmup=1, method="eata", lam=0.5)):
        s.select(logits(PU, PU))
        for _ in range(3):
            sel = s.select(logits(P97, P97))
            assert sel.e_max == pytest.approx(E0)


def test_emin_floor_and_its_ablation() -> None:
    sel = selector().select(logits(P997, P97))
    assert sel.mask.tolist() == [False, True] and sel.low_informative == 1
    sel = selector(use_emin=False).select(logits(P997, P97))
    assert sel.mask.tolist() == [True, True] and sel.e_min is None
    sel = selector(kappa=0.2).select(logits(P97))  # E_min = 0.277 > H(P97)
    assert sel.e_min == pytest.approx(0.2 * LN_C) and sel.low_informative == 1


def test_threshold_below_floor_counts_each_sample_once_as_unreliable() -> None:
    s = selector(warmup=1, lam=0.01)
    s.select(logits(P97))
    sel = s.select(logits(P97, P997))  # E_max ~ 0.005 < E_min
    assert sel.e_max < sel.e_min
    assert (sel.kept, sel.unreliable, sel.low_informative) == (0, 2, 0)


def test_redundancy_first_batch_initialises_then_filters_and_updates_m() -> None:
    pa, pb = [0.90, 0.04, 0.03, 0.03], [0.03, 0.90, 0.04, 0.03]
    pd = [0.03, 0.03, 0.90, 0.04]
    s = selector(redundancy=0.5)
    sel = s.select(logits(pa, pa, pb))  # first batch: keeps all, even identical samples
    assert sel.mask.all() and sel.redundant == 0
    m = (np.array(pa) * 2 + np.array(pb)) / 3
    np.testing.assert_allclose(s.moving_probs, m, rtol=1e-12)

    def cos(u, v):
        u, v = np.asarray(u), np.asarray(v)
        return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))

    assert cos(m, pa) >= 0.5 > cos(m, pd)  # hand check of the geometry used below
    sel = s.select(logits(pa, pd))
    assert sel.mask.tolist() == [False, True] and sel.redundant == 1
    np.testing.assert_allclose(s.moving_probs, 0.9 * m + 0.1 * np.array(pd), rtol=1e-12)

    sel = selector(redundancy=None).select(logits(pa, pa))
    assert sel.mask.all() and sel.redundant == 0


def test_redundancy_waits_for_a_batch_with_survivors() -> None:
    s = selector(redundancy=0.5)
    s.select(logits(PU, P997))  # nothing survives (a)+(b): m stays unset
    assert s.moving_probs is None
    sel = s.select(logits(P90, P90))
    assert sel.mask.all()
    np.testing.assert_allclose(s.moving_probs, P90, rtol=1e-12)


def test_eata_is_static_e0_plus_redundancy_without_floor() -> None:
    s = selector(method="eata", redundancy=0.5)
    sel = s.select(logits(P997, PU, P90))
    assert sel.mask.tolist() == [True, False, True] and sel.e_min is None and sel.e_max == pytest.approx(E0)
    sel = s.select(logits(P997))  # same direction as m: redundant
    assert sel.redundant == 1 and sel.kept == 0


def test_all_none_random_semantics() -> None:
    x = logits(PU, P97, P997)
    sel = selector(method="all").select(x)
    assert sel.mask.all() and sel.e_max is None and sel.kept == 3
    sel = selector(method="none").select(x)
    assert not sel.mask.any() and sel.skipped == 3
    big = np.random.default_rng(1).normal(size=(20000, C))
    sel = selector(method="random", random_rate=0.3, seed=5).select(big)
    assert abs(sel.mask.mean() - 0.3) < 0.02 and sel.skipped == 20000 - sel.kept
    same = selector(method="random", random_rate=0.3, seed=5).select(big)
    other = selector(method="random", random_rate=0.3, seed=6).select(big)
    assert np.array_equal(sel.mask, same.mask) and not np.array_equal(sel.mask, other.mask)
    assert selector(method="random", random_rate=0.0).select(x).kept == 0
    assert selector(method="random", random_rate=1.0).select(x).kept == 3


def test_every_sample_counted_under_exactly_one_rule() -> None:
    rng = np.random.default_rng(0)
    s = selector(warmup=16, redundancy=0.8)
    for _ in range(10):
        sel = s.select(rng.normal(0, 3, size=(32, C)))
        assert sel.kept + sel.unreliable + sel.low_informative + sel.redundant + sel.skipped == sel.size == 32


def test_selectors_do_not_share_state() -> None:
    a, b = selector(warmup=1, redundancy=0.5), selector(warmup=1, redundancy=0.5)
    a.select(logits(P97, PU))
    assert b.seen == 0 and b.moving_probs is None and b.warmup_mean is None


@pytest.mark.parametrize("kw,match", [
    ({"method": "tent"}, "unknown selection method"),
    ({"method": "random"}, "random_rate"),
    ({"method": "random", "random_rate": 1.5}, "random_rate"),
    ({"num_classes": 1}, "at least 2"),
    ({"lam": 0.0}, "positive"),
    ({"redundancy": float("nan")}, "finite"),
])
def test_bad_config_is_refused(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        SelectionConfig(**{"num_classes": C, **kw})


def test_wrong_logits_are_refused() -> None:
    with pytest.raises(ValueError, match="classes"):
        selector().select(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="logits must be"):
        selector().select(np.zeros(4))


# ---------------------------------------------------------------- episodes, released config, budget, oracle


def test_reset_restarts_warmup_means_and_redundancy_hand_computed() -> None:
    """Episode 1 is confident, episode 2 uncertain: after ``reset`` the warm-up mean, the running
    mean and the threshold come from episode 2 alone (hand values), not from a mix of both."""
    s = selector(warmup=2, redundancy=0.5)
    s.select(logits(P97, P97))  # warm-up of episode 1 (m initialised from P97)
    s.select(logits(P90, P90))
    assert s.warmup_mean == pytest.approx(H(P97))
    s.reset()
    assert s.seen == 0 and s.warmup_mean is None and s.moving_probs is None
    first = s.select(logits(P90, PU))  # episode 2's warm-up: E_max = E0, m re-initialised from P90
    assert first.e_max == pytest.approx(E0) and first.mask.tolist() == [True, False]
    np.testing.assert_allclose(s.moving_probs, P90)
    second = s.select(logits(P90, P97))
    warm, mean = (H(P90) + LN_C) / 2, (2 * H(P90) + LN_C + H(P97)) / 4
    assert s.warmup_mean == pytest.approx(warm) and second.mean_entropy == pytest.approx(mean)
    assert second.e_max == pytest.approx(E0 * mean / warm)
    # without the reset the warm-up mean would still be episode 1's
    t = selector(warmup=2)
    for rows in ([P97, P97], [P90, P90], [P90, PU]):
        t.select(logits(*rows))
    assert t.warmup_mean == pytest.approx(H(P97))


def test_cema_released_is_static_e0_no_floor_redundancy_scaled_to_classes() -> None:
    cfg = SelectionConfig(num_classes=C, method="cema_released")
    assert cfg.redundancy_threshold == pytest.approx(0.5 * math.sqrt(10 / C)) and not cfg.uses_floor
    assert SelectionConfig(num_classes=1000, method="cema_released").redundancy_threshold == pytest.approx(0.05, abs=2e-3)
    s = EntropySelector(cfg)
    sel = s.select(logits(P97, P997, P90, PU))  # first batch: E0 only, the floor does not apply
    assert sel.e_max == pytest.approx(E0) and sel.e_min is None
    assert sel.mask.tolist() == [True, True, True, False] and sel.unreliable == 1
    # m = mean of the three kept rows; cos to class-0 rows is ~0.99 > d = 0.79: all redundant
    sel = s.select(logits(P97, P90, [0.01, 0.97, 0.01, 0.01]))
    m = np.mean([P97, P997, P90], axis=0)
    q = np.array([0.01, 0.97, 0.01, 0.01])
    assert q @ m / (np.linalg.norm(q) * np.linalg.norm(m)) < cfg.redundancy_threshold  # a new class passes
    assert sel.e_max == pytest.approx(E0) and sel.mask.tolist() == [False, False, True] and sel.redundant == 2


@pytest.mark.parametrize("method", ["eata", "cema_released", "cema"])
@pytest.mark.parametrize("budget", [0.05, 0.1, 0.25, 0.5])
def test_budget_hits_its_rate_within_two_points(method, budget) -> None:
    rng = np.random.default_rng(3)
    s = EntropySelector(SelectionConfig(num_classes=10, method=method, budget=budget))
    kept = seen = 0
    for t in range(120):  # entropies drift down over the stream, as an adapting edge's do
        z = rng.normal(0, 1 + 4 * t / 120, (64, 10))
        sel = s.select(z)
        kept, seen = kept + sel.kept, seen + sel.size
        assert sel.redundant == 0
    assert abs(kept / seen - budget) <= 0.02


def test_budget_ranks_like_its_rule() -> None:
    """Same budget, same stream: eata keeps the lowest entropies, cema the lowest above its floor."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (512, 10))
    _, h = softmax_entropy(z)
    eata = EntropySelector(SelectionConfig(num_classes=10, method="eata", budget=0.2)).select(z)
    cema = EntropySelector(SelectionConfig(num_classes=10, method="cema", budget=0.2, kappa=0.05)).select(z)
    assert h[eata.mask].max() <= h[~eata.mask].min()
    floor = 0.05 * math.log(10)
    assert (h[cema.mask] > floor).all() and cema.low_informative == int((h <= floor).sum())
    assert abs(eata.kept - cema.kept) <= 2


def test_oracle_keeps_where_edge_and_reference_disagree() -> None:
    s = selector(method="oracle")
    sel = s.select(logits(P97, P90, PU[::-1], [0.01, 0.97, 0.01, 0.01]), reference=np.array([0, 1, 0, 1]))
    assert sel.mask.tolist() == [False, True, False, False] and sel.skipped == 3
    with pytest.raises(ValueError, match="reference"):
        s.select(logits(P97))


@pytest.mark.parametrize("kw, match", [
    ({"method": "random", "random_rate": 0.5, "budget": 0.2}, "budget applies"),
    ({"method": "cema", "budget": 0.0}, "budget must be"),
    ({"method": "eata", "budget": 1.5}, "budget must be"),
])
def test_bad_budget_is_refused(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        SelectionConfig(num_classes=C, **kw)


def test_eata_and_released_scale_d_when_unset_and_record_it() -> None:
    cfg = SelectionConfig(method="eata").for_classes(100)
    assert cfg.redundancy == pytest.approx(0.5 * math.sqrt(10 / 100))  # the d in force is what is recorded
    assert SelectionConfig(method="cema").for_classes(100).redundancy is None  # ours keeps it off
    assert SelectionConfig(method="eata", budget=0.1).for_classes(100).redundancy_threshold is None
