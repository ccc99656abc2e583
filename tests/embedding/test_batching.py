"""Token-budget batching and window planning: pure functions, no model."""

from __future__ import annotations

import itertools
import random

import esm
import pytest

from esm2_batch.embedding.batching import (
    MAX_RESIDUES,
    padded_tokens,
    plan_batches,
    plan_windows,
    window_coverage,
    window_overlap,
)


def test_budget_counts_bos_and_eos() -> None:
    assert plan_batches([10, 10], toks_per_batch=24).batches == ((0, 1),)
    assert plan_batches([10, 10], toks_per_batch=23).batches == ((0,), (1,))


def test_fair_esm_undercounts_what_we_count() -> None:
    # get_batch_indices(extra_toks_per_seq=1) packs 2 x 10 residues into 22 tokens, but
    # the tensor ESM2 builds is 2 x 12 = 24 tokens; our plan keeps to the budget.
    dataset = esm.data.FastaBatchedDataset(["a", "b"], ["A" * 10, "A" * 10])
    assert dataset.get_batch_indices(22, extra_toks_per_seq=1) == [[0, 1]]
    assert plan_batches([10, 10], toks_per_batch=22).batches == ((0,), (1,))


def test_padded_tokens_count_against_budget() -> None:
    # width is set by the longest member: 102 * 2 fits 300, 102 * 3 does not
    plan = plan_batches([10, 100, 10], toks_per_batch=300)
    assert plan.batches == ((1, 0), (2,))
    assert padded_tokens([100, 10]) == 204


@pytest.mark.parametrize("seed", range(5))
def test_every_index_once_and_every_batch_within_budget(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 1500) for _ in range(300)]
    plan = plan_batches(lengths, toks_per_batch=4096, batch_size=rng.choice([None, 7]))
    seen = [i for batch in plan.batches for i in batch] + list(plan.oversize)
    assert sorted(seen) == list(range(len(lengths)))
    for batch in plan.batches:
        assert padded_tokens([lengths[i] for i in batch]) <= 4096


def test_batch_size_caps_sequences() -> None:
    plan = plan_batches([5] * 10, toks_per_batch=10_000, batch_size=4)
    assert [len(b) for b in plan.batches] == [4, 4, 2]


def test_longest_first_ties_by_index() -> None:
    plan = plan_batches([3, 9, 3, 9], toks_per_batch=11)
    assert plan.batches == ((1,), (3,), (0, 2))


def test_oversize_reported_not_batched() -> None:
    plan = plan_batches([50, 2000, 10, 3000], toks_per_batch=1024)
    assert plan.oversize == (1, 3)
    assert sorted(i for b in plan.batches for i in b) == [0, 2]


def test_invalid_budget_rejected() -> None:
    with pytest.raises(ValueError):
        plan_batches([1], toks_per_batch=0)
    with pytest.raises(ValueError):
        plan_batches([1], toks_per_batch=10, batch_size=0)


def test_empty_input() -> None:
    assert plan_batches([], toks_per_batch=10) == plan_batches([], toks_per_batch=99)
    assert plan_batches([], toks_per_batch=10).batches == ()


@pytest.mark.parametrize("length", [1, 500, MAX_RESIDUES])
def test_sequence_that_fits_is_one_window(length: int) -> None:
    assert plan_windows(length) == ((0, length),)


@pytest.mark.parametrize("length", [MAX_RESIDUES + 1, 2500, 5000, 35_000])
def test_windows_cover_everything_full_length_with_overlap(length: int) -> None:
    windows = plan_windows(length)
    assert windows[0][0] == 0 and windows[-1][1] == length
    assert all(end - start == MAX_RESIDUES for start, end in windows)
    for (_, end), (start, _) in itertools.pairwise(windows):
        assert end - start >= window_overlap(MAX_RESIDUES)
    assert min(window_coverage(length, windows)) >= 1


def test_titin_window_count() -> None:
    # stride 1022 - 255 = 767: titin's 35,000 residues take 46 windows
    assert len(plan_windows(35_000)) == 46


def test_small_window() -> None:
    assert plan_windows(10, window=4) == ((0, 4), (3, 7), (6, 10))
    assert window_coverage(10, plan_windows(10, window=4)) == [1, 1, 1, 2, 1, 1, 2, 1, 1, 1]


def test_uncovered_residues_rejected() -> None:
    with pytest.raises(ValueError):
        window_coverage(5, [(0, 2)])
