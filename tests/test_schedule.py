from kscu.schedule import key_step_table, uniform_table


def steps(table):
    return [s for _, s in table]


def test_paper_default_table_s14_l750():
    table = key_step_table(["church"], start=14, end=50, length=750, loops=8)
    assert len(table) == 750
    run = list(range(14, 50))
    assert steps(table[:288]) == run * 8  # eight complete runs of 14..49
    assert steps(table[288:323]) == list(range(15, 50))  # then S moves to 15
    assert steps(table[288:568]) == list(range(15, 50)) * 8
    # 750 - 568 = 182 = 5 runs of 16..49 (34 each) and 12 entries of a sixth
    assert steps(table[568:738]) == list(range(16, 50)) * 5
    assert steps(table[738:]) == list(range(16, 28))
    assert {c for c, _ in table} == {"church"}


def test_several_concepts_walk_in_turn_and_share_the_run_count():
    table = key_step_table(["a", "b"], start=46, end=50, length=20, loops=2)
    one_run = [("a", s) for s in range(46, 50)] + [("b", s) for s in range(46, 50)]
    assert table[:8] == one_run
    assert table[8:16] == one_run  # loops=2: the start stays for two complete runs
    # 46 > cap 44: the start never moves
    assert table[16:20] == [("a", s) for s in range(46, 50)]


def test_start_moves_every_loops_runs_and_caps_at_44():
    table = key_step_table(["x"], start=40, end=50, length=400, loops=1)
    starts, prev = [], None
    for _, s in table:
        if prev is None or s <= prev:
            starts.append(s)
        prev = s
    assert starts[:6] == [40, 41, 42, 43, 44, 44]
    assert max(starts) == 44  # ceil(0.9 * 50) - 1
    assert set(starts[4:]) == {44}


def test_cap_follows_end_step():
    table = key_step_table(["x"], start=0, end=15, length=500, loops=1)
    assert min(s for _, s in table[-20:]) == 13  # ceil(0.9 * 15) - 1
    assert max(s for _, s in table) == 14


def test_length_shorter_than_one_run():
    assert key_step_table(["x"], start=14, end=50, length=5) == [("x", s) for s in range(14, 19)]


def test_uniform_table_is_seeded_and_covers_the_range():
    a = uniform_table(["a", "b"], 0, 50, 2000, seed=3)
    assert a == uniform_table(["a", "b"], 0, 50, 2000, seed=3)
    assert a != uniform_table(["a", "b"], 0, 50, 2000, seed=4)
    assert {s for _, s in a} == set(range(50))
    assert [c for c, _ in a[:4]] == ["a", "b", "a", "b"]
