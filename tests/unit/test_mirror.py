import numpy as np

from infogrowth.mirror import VectorMirror


def test_blocks_hold_rows_across_borders_without_copying_old_blocks() -> None:
    rng = np.random.default_rng(0)
    m = VectorMirror(4, block_bytes=4 * 4 * 5)  # 5 rows a block
    assert m.rows == 5
    v = rng.normal(size=(23, 4)).astype(np.float32)
    m.write(0, v[:3])
    first = m.blocks[0]
    m.write(3, v[3:17])  # crosses two borders
    m.write(17, v[17:])
    assert m.blocks[0] is first  # growth appended blocks, never reallocated
    assert m.capacity == 25
    assert np.array_equal(m.take(np.arange(23)), v)
    ids = rng.permutation(23)
    assert np.array_equal(m.take(ids), v[ids])
    assert np.array_equal(m.head(23), v)
    assert np.array_equal(m.head(4), v[:4]) and m.head(4).base is first
    assert m.rows_view(6, 9) is not None and np.array_equal(m.rows_view(6, 9), v[6:9])
    assert m.rows_view(4, 6) is None  # spans a border


def test_scatter_in_any_order() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(size=(12, 3)).astype(np.float32)
    m = VectorMirror(3, block_bytes=3 * 4 * 4)
    order = rng.permutation(12)
    m.scatter(order, v[order])
    assert np.array_equal(m.take(np.arange(12)), v)


def test_min_rows_keeps_an_exact_search_range_in_one_block() -> None:
    m = VectorMirror(8, min_rows=1000, block_bytes=64)
    assert m.rows == 1000
