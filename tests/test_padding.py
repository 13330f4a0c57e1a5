from loramux.padding import length_groups


def test_groups_bound_padding_and_keep_every_index_once():
    lengths = [10, 21, 34, 37, 43, 51, 53, 54, 54, 56, 61, 77, 81, 81, 165, 212]  # the serving benchmark's prompts
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert groups == [list(range(11)), [11, 12, 13], [14, 15]]
    assert sum(len(g) * max(lengths[i] for i in g) for g in groups) == 1338  # one padded prefill: 16 x 212 = 3392
    assert length_groups([40, 40, 40]) == [[0, 1, 2]]  # no padding: one forward
    assert length_groups([500, 3]) == [[1], [0]]  # shortest first; a long prompt does not pad a short one
    assert length_groups([]) == []


def test_groups_respect_max_size():
    groups = length_groups([30] * 10, max_size=4)
    assert [len(g) for g in groups] == [4, 4, 2] and sorted(i for g in groups for i in g) == list(range(10))
