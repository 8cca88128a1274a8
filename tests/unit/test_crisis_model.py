"""The learned second opinion: its arithmetic, its place in ``detect``, the shipped weights."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

from helpdesk.crisis import detect
from helpdesk.crisis.lexicon import load_lexicon
from helpdesk.crisis.model import (
    Model,
    ModelError,
    load_category_model,
    load_model,
    parse_category_model,
    parse_model,
    sentences,
    tokens,
)

detect_module = importlib.import_module("helpdesk.crisis.detect")
DATA = Path(__file__).resolve().parents[1] / "data" / "crisis"


def _reference(model: Model, sentence: str) -> float:
    """The model's probability computed the plain way, as scikit-learn defines it."""
    counts: dict[str, int] = {}
    for t in tokens(sentence):
        if t in model.features:
            counts[t] = counts.get(t, 0) + 1
    xs = {t: (1 + math.log(n)) * model.features[t][0] for t, n in counts.items()}
    norm = math.sqrt(sum(x * x for x in xs.values())) or 1.0
    z = model.bias + sum(x / norm * model.features[t][1] for t, x in xs.items())
    return 1 / (1 + math.exp(-z))


def test_sentences_are_spans_of_the_text() -> None:
    text = "hi there. i can't do this anymore!\n\nplease help\nme   ok"
    spans = sentences(text)
    assert [text[a:z] for a, z in spans] == [
        "hi there.",
        "i can't do this anymore!",
        "please help\nme   ok",
    ]
    assert sentences("") == [] and sentences("ok") == []


def test_tokens_are_words_and_bigrams() -> None:
    assert tokens("i can't go on") == ["can't", "go", "i can't", "can't go", "go on"]


def test_probability_matches_the_plain_formula_on_the_shipped_model() -> None:
    model = load_model()
    for s in (
        "i don't see a way out of this anymore and i have my pills",
        "please move my appointment to friday, thanks again",
        "my my my my blood blood pressure",  # repeated features: sublinear tf
        "zzzz qqqq",  # nothing known: the bias alone
    ):
        assert model.probability(s) == pytest.approx(_reference(model, s), abs=1e-9)


def test_shipped_model_is_sane() -> None:
    model = load_model()
    assert model.version.startswith("crisis-model-")
    assert 0.5 <= model.threshold < 1.0
    assert len(model.features) > 1000


def _tiny() -> Model:
    return parse_model(
        {"version": "t1", "threshold": 0.7, "bias": -3.0, "features": {"zorblax": [1.0, 9.0]}}
    )


def test_a_model_hit_is_tier_2_with_a_category_and_offsets_into_the_original(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(detect_module, "load_model", _tiny)
    body = "Hello team.\n\nLately I just want to ZORBLAX.\n\nThanks, Pat"
    res = detect("question", body)
    assert res.tier == 2
    assert res.category in load_category_model().classes
    (hit,) = res.hits
    assert hit.rule_id == "model.t1"
    assert hit.field == "body"
    assert body[hit.start : hit.end] == "Lately I just want to ZORBLAX."
    assert "p=" in hit.reason and "zorblax" not in hit.reason.lower()
    assert detect("question", body, learned=False).tier is None


def test_the_model_ignores_quotes_and_our_own_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detect_module, "load_model", _tiny)
    quoted = "Thanks for the refill.\n\n> Lately I just want to zorblax.\n"
    assert detect("", quoted).tier is None
    template = "Some days everyone feels a bit zorblax."
    own = f"Thanks!\n\n{template}\n"
    assert detect("", own, own_templates=(template,)).tier is None
    assert detect("", own).tier == 2
    # hotline and emergency-room text (return precautions, signatures) never fires alone
    assert detect("", "Thanks!\n\nIf you feel zorblax, call or text 988.\n").tier is None


def test_the_model_does_not_reread_what_the_lexicon_dismissed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def chesty() -> Model:
        feats = {"chest": [1.0, 9.0], "choking": [1.0, 9.0]}
        return parse_model({"version": "t2", "threshold": 0.7, "bias": -3.0, "features": feats})

    monkeypatch.setattr(detect_module, "load_model", chesty)
    denied = "No chest pain, just a cough since Monday."
    idiom = "I am choking on the price of these new glasses."
    assert detect("", denied).tier is None
    assert detect("", idiom).tier is None
    # the same words the lexicon has not judged are the model's to score
    assert detect("", "My chest feels strange.").rule_ids == ("model.t2",)
    # and without the blanking the model would have raised both
    monkeypatch.setattr(detect_module, "_DISMISSED", frozenset())
    assert detect("", denied).rule_ids == ("model.t2",)
    assert detect("", idiom).rule_ids == ("model.t2",)


def test_model_texts_are_what_the_model_is_shown() -> None:
    # the training script reads every mail through model_texts: the same preparation
    # detect gives the model (lexicon corrections, quotes and dismissed words blanked)
    subject, body = "Fwd: refill", "No chest pain, just a cough.\n\nOn Mon, A <a@b.c> wrote:\n> hi"
    texts = detect_module.model_texts(subject, body)
    assert len(texts) == 2
    assert len(texts[1]) == len(body)  # offsets hold
    assert "chest" not in texts[1] and "cough" in texts[1]
    assert "> hi" not in texts[1]
    assert texts[0].startswith("fwd: refill")
    # a misspelling the lexicon corrects reaches the model corrected, as in detect
    assert detect_module.model_texts("", "i feel sucidal")[1] == "i feel suicidal"


def test_a_rule_hit_takes_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detect_module, "load_model", _tiny)
    res = detect("", "I want to kill myself, zorblax")
    assert res.tier == 1
    assert "model.t1" not in res.rule_ids


def test_a_broken_model_file_is_an_error_not_silence() -> None:
    with pytest.raises(ModelError):
        parse_model({"version": "x"})
    with pytest.raises(ModelError):
        parse_model([1, 2])


def _rows(name: str) -> list[dict[str, object]]:
    path = DATA / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_every_labelled_crisis_mail_is_found_with_the_model() -> None:
    """The sets the model was trained on: lexicon + model miss none of their crises."""
    missed = [
        str(r["id"])
        for name in ("devset.jsonl", "fresh.jsonl", "blind.jsonl", "heldout_a.jsonl")
        for r in _rows(name)
        if r["tier"] is not None and detect(str(r["subject"]), str(r["body"])).tier is None
    ]
    assert not missed


@pytest.mark.parametrize(
    ("sentence", "category"),
    [
        ("i took all my pills an hour ago", "overdose"),
        ("my chest feels like an elephant is sitting on it", "chest_pain"),
        ("he said he will kill me tonight", "abuse"),
        ("my face is drooping and my words are slurred", "stroke"),
        ("i cant breathe and my lips are blue", "breathing"),
    ],
)
def test_the_category_model_names_the_kind_of_crisis(sentence: str, category: str) -> None:
    assert load_category_model().category(sentence) == category


def test_a_model_hit_gets_the_category_of_its_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detect_module, "load_model", _tiny)
    res = detect("", "Thanks.\n\nThe whole box of my sleeping tablets, zorblax.\n")
    assert (res.tier, res.category) == (2, "overdose")


def test_the_packaged_category_model_covers_every_lexicon_category() -> None:
    model = load_category_model()
    rule_categories = {rule.category for rule in load_lexicon().rules}
    assert set(model.classes) <= rule_categories
    assert {"suicidal_ideation", "overdose", "chest_pain", "stroke", "abuse"} <= set(model.classes)


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"version": "c", "classes": ["a", "b"], "bias": [0.0], "features": {}},
        {
            "version": "c",
            "classes": ["a", "b"],
            "bias": [0.0, 0.0],
            "features": {"x": [1.0, [1.0]]},
        },
        {"version": "c", "classes": ["a"], "bias": [0.0], "features": {"x": ["idf", [1.0]]}},
        {"version": "c", "bias": [0.0], "features": {}},
    ],
)
def test_a_malformed_category_model_is_refused(data: object) -> None:
    with pytest.raises(ModelError):
        parse_category_model(data)
