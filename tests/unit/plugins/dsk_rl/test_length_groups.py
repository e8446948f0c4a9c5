"""``length_groups``: the split of a micro-batch's rows into length groups is the cheapest one (checked by brute
force), covers every row once, and degenerates to one group or one group per length at the extremes."""

import itertools
import random

import pytest
from dsk_rl.rollout import length_groups


def cost(groups, lengths, overhead):
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


def brute_force(lengths, overhead):
    """The cheapest split of the rows sorted by length into consecutive groups, over all 2^(n-1) cut sets."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = None
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        groups, current = [], [order[0]]
        for cut, i in zip(cuts, order[1:], strict=True):
            if cut:
                groups.append(current)
                current = []
            current.append(i)
        groups.append(current)
        c = cost(groups, lengths, overhead)
        best = c if best is None else min(best, c)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_the_split_is_the_cheapest_and_covers_every_row_once(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 11))]
    overhead = rng.choice([0, 1, 5, 20, 100, 1000])
    groups = length_groups(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert cost(groups, lengths, overhead) == brute_force(lengths, overhead)
    # consecutive in length: every row of a group is at least as long as every row of the group before
    for a, b in itertools.pairwise(groups):
        assert max(lengths[i] for i in a) <= min(lengths[i] for i in b)


def test_a_large_overhead_keeps_one_pass_and_a_small_one_splits_by_length():
    lengths = [30, 104, 31, 100, 29, 104]
    assert length_groups(lengths, 10_000) == [[4, 0, 2, 3, 1, 5]]
    assert length_groups(lengths, 0) == [[4], [0], [2], [3], [1, 5]]  # rows of one length always share a pass
    # two languages: short symbolic traces and long English ones go to separate passes
    assert length_groups(lengths, 64) == [[4, 0, 2], [3, 1, 5]]
    assert length_groups([], 5) == [] and length_groups([7], 5) == [[0]]
