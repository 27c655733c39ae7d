"""Cells: both spaces route, exactly n regions, boundary replication, the bench copies."""

from __future__ import annotations

import numpy as np
import pytest

from infogrowth.cells import Cells, hyperplanes, kmeans, random_centroids, routing_vectors
from infogrowth_dev.bench import synth


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _data(n: int = 600, dim: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s: _unit(rng.normal(size=(n, dim))) for s in ("image", "text")}


def test_routing_vector_is_the_scaled_concatenation() -> None:
    v = _data(3, 4)
    x = routing_vectors(v, ("image", "text"))
    assert x.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(x[:, :4], v["image"] / np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(x[:, 4:], v["text"] / np.sqrt(2), rtol=1e-6)


@pytest.mark.parametrize("make", ["kmeans", "random"])
def test_routing_is_deterministic(make: str) -> None:
    v = _data()
    spaces = ("image", "text")

    def build() -> Cells:
        if make == "kmeans":
            return kmeans(spaces, v, 5)
        return random_centroids(spaces, {"image": 16, "text": 16}, 5)

    a, b = build(), build()
    np.testing.assert_array_equal(a.vectors, b.vectors)
    np.testing.assert_array_equal(a.route_many(v), b.route_many(v))
    # one at a time == all at once, and through the published record
    again = Cells.from_record(a.as_record(), 5)
    one = [again.route({s: v[s][i] for s in spaces}) for i in range(50)]
    assert one == a.route_many(v)[:50].tolist()


def test_both_spaces_route() -> None:
    v = _data()
    cells = kmeans(("image", "text"), v, 4)
    assert cells.as_record()["spaces"] == ["image", "text"]
    base = cells.route_many(v)
    # Changing only the text moves items to other cells: the text space takes part.
    other = _data(seed=1)["text"]
    moved = cells.route_many({"image": v["image"], "text": other})
    assert (moved != base).mean() > 0.2
    moved_img = cells.route_many({"image": _data(seed=2)["image"], "text": v["text"]})
    assert (moved_img != base).mean() > 0.2


@pytest.mark.parametrize("n_cells", [3, 5, 6, 7])
def test_exactly_n_cells_without_modulo(n_cells: int) -> None:
    v = _data(4000, 8)
    for cells in (
        kmeans(("image", "text"), v, n_cells),
        random_centroids(("image", "text"), {"image": 8, "text": 8}, n_cells),
    ):
        assert cells.vectors.shape[0] == n_cells
        got = cells.route_many(v)
        assert set(got.tolist()) == set(range(n_cells))
        # each cell is the region nearest to its own centroid: no region folded onto another
        x = routing_vectors(v, ("image", "text"))
        np.testing.assert_array_equal(got, np.argmax(x @ cells.vectors.T, axis=1))
        # a centroid routes to its own cell
        c = cells.vectors.astype(np.float64)
        per_space = {"image": c[:, :8] * np.sqrt(2), "text": c[:, 8:] * np.sqrt(2)}
        assert cells.route_many(per_space).tolist() == list(range(n_cells))


def test_fewer_seed_items_than_cells_falls_back_to_random_centroids() -> None:
    v = _data(3, 8)
    cells = kmeans(("image", "text"), v, 5)
    assert cells.kind == "random" and cells.n_cells == 5


def test_old_single_space_records_still_load() -> None:
    v = _data(200, 8)
    old_kmeans = {"kind": "kmeans", "space": "image", "vectors": _unit(v["image"][:3]).tolist()}
    cells = Cells.from_record(old_kmeans, 3)
    assert cells.spaces == ("image",)
    got = cells.route_many(v)  # the text vector is ignored, as the record routed
    np.testing.assert_array_equal(got, np.argmax(v["image"] @ cells.vectors.T, axis=1))
    legacy = hyperplanes("image", 8, 4)
    back = Cells.from_record(
        {"kind": "hyperplanes", "space": "image", "vectors": legacy.vectors.tolist()}, 4
    )
    assert back.route(v["image"][0]) == legacy.route(v["image"][0])


def test_replication_puts_a_border_item_in_both_cells() -> None:
    c = _unit(np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))
    cells = Cells("kmeans", ("image",), c, 3)
    border = _unit(np.array([[1.0, 0.98, 0.0, 0.1]]))  # nearer cell 0, cell 1 just behind
    inner = _unit(np.array([[1.0, 0.1, 0.0, 0.1]]))
    assert cells.route(border[0]) == 0
    assert cells.replicas({"image": border}, 0.05) == [[1]]
    assert cells.replicas({"image": inner}, 0.05) == [[]]
    assert cells.replicas({"image": border}, 0.0) == [[]]
    # a near-copy of the border item that lands across the border still meets it
    copy = _unit(np.array([[0.98, 1.0, 0.0, 0.1]]))
    assert cells.route(copy[0]) == 1 and 1 in cells.replicas({"image": border}, 0.05)[0]


def test_bench_copies_sit_at_the_stated_distance() -> None:
    for d in (0.02, 0.05, 0.1):
        vec = synth.make(100, 400, dim=32, dup_rate=0.2, dup_distance=d, seed=3)
        rows = np.flatnonzero(vec.dup)
        assert len(rows) > 20
        for s in vec.stream:
            allv = np.concatenate([vec.prefill[s], vec.stream[s]]).astype(np.float64)
            got = 1.0 - np.einsum("ij,ij->i", vec.stream[s][rows], allv[vec.dup_source[rows]])
            np.testing.assert_allclose(got, d, atol=1e-6)
