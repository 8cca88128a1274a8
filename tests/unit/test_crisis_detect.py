"""detect(): tiers, context, the result value, robustness, and the dev-set metrics."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

from helpdesk.crisis import CrisisHit, CrisisResult, detect, detect_language

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "tier", "category"),
    [
        ("I want to kill myself", 1, "suicidal_ideation"),
        ("i'm not suicidal but I can't see the point of living", 2, "suicidal_ideation"),
        ("I don't want to kill myself but I think about it", 2, "suicidal_ideation"),
        ("I was suicidal years ago", 2, "suicidal_ideation"),
        ("my friend said she wants to die", 2, "suicidal_ideation"),
        ("what should someone do if they have chest pain?", 2, "chest_pain"),
        ("how many would it take", 2, "overdose"),
        ("how many of my pills would it take to die", 2, "overdose"),
        ("took double dose of my blood thinner", 1, "medication_emergency"),
        ("mi esposo me pega", 1, "abuse"),
        ("tomé todas las pastillas", 1, "overdose"),
        ("no puedo respirar", 1, "breathing"),
        ("me corté", 2, "self_harm"),
        ("the face is drooping and his speech is slurred", 1, "stroke"),
    ],
)
def test_tiers(text: str, tier: int | None, category: str | None) -> None:
    res = detect("", text)
    assert (res.tier, res.category) == (tier, category)


@pytest.mark.parametrize(
    "text",
    [
        "this wait is killing me",
        "dying to know",
        "I could kill for a coffee",
        "my back is killing me",
        "me muero de ganas",
        "me muero de risa",
        "drop dead gorgeous",
        "killer app",
        "is it safe to take ibuprofen with lisinopril",
        "what is the max dose of tylenol per day",
        "my prescription is overdue",
        "the side effects list mentions chest pain, should I worry",
        "I'm choking on the price of these new glasses",
        "Me estoy ahogando en papeleo con la aplicacion de Medicaid.",
        "I'm having a stroke trying to figure out your billing portal.",
        "I'd rather die than pay this late fee, I paid on the 1st.",
        "this heat is going to kill me, my ankles swell in the afternoon",
        "I overdosed on Christmas cookies and my sugar was 190 this morning.",
        "im literally dead 💀 the drs handwriting on my school note",
        "Half my face is numb and droopy from the dental anesthetic this morning.",
        "tuve un infarto en 2018 y me hicieron un cateterismo, estoy bien desde entonces",
        "she had a bad asthma attack 2 yrs ago and was in the PICU, fine since",
        "I've never had any chest pain, dizziness, fainting, or shortness of breath.",
        "no tengo dolor de pecho ni me falta el aire, es solo para revisar",
        "The portal is going to give me a stroke",
        "I can't lift my arm above my head since the shoulder injury, and it wakes me up",
    ],
)
def test_idioms_and_information_do_not_fire(text: str) -> None:
    assert detect("", text).tier is None


@pytest.mark.parametrize(
    "text",
    [
        # a list of denied symptoms ends at a turn, a new subject, a bare comma or "and"
        "No fever, but chest pain since this morning.",
        "no fever or cough and now I can't breathe",
        "no fever or cough and my chest is crushing",
        "no fever or cough, chest pressure since noon",
        "no tengo fiebre y me duele mucho el pecho",
        "no fever, no cough, or chills, just crushing chest pain",
        "Not sleeping, not eating, and I can't breathe when I lie down",
    ],
)
def test_a_symptom_after_a_denied_list_still_fires(text: str) -> None:
    assert detect("", text, learned=False).tier == 1


def test_subject_counts_like_the_body() -> None:
    res = detect("I want to die", "see subject")
    assert res.tier == 1
    assert res.hits[0].field == "subject"


def test_hit_says_where_and_why() -> None:
    body = "Hello.\nI am not suicidal, really."
    res = detect("", body)
    assert res.tier == 2
    hit = res.hits[0]
    assert isinstance(hit, CrisisHit)
    assert body[hit.start : hit.end].lower().endswith("suicidal")
    assert "negated" in hit.reason
    assert res.rule_ids == tuple(dict.fromkeys(h.rule_id for h in res.hits))


def test_html_is_used_only_without_text() -> None:
    html = "<p>I can&rsquo;t breathe</p>"
    assert detect("", "", html).tier == 1
    assert detect("", "refill please", html).tier is None


def test_obfuscation_fires() -> None:
    for text in ["su1c1dal", "s u i c i d e thoughts", "k1ll myself", "unalive", "ovrdosed"]:
        assert detect("", f"i am {text}").tier is not None, text


def test_result_is_frozen() -> None:
    res = detect("", "hello")
    assert res == CrisisResult(None, None, (), res.lexicon_version)
    with pytest.raises(AttributeError):
        res.tier = 1  # type: ignore[misc]


def test_never_raises_on_strange_input() -> None:
    rnd = random.Random(1)
    samples = [
        "",
        "\x00\x01\x02" * 100,
        "\ud800 lone surrogate suicide",
        "<" * 10000,
        "&#99999999; &#x110000; &bogus;",
        "a" * 200_000 + " kill myself",
        "s u i c i d e " * 2000,
    ]
    samples += [bytes(rnd.randrange(256) for _ in range(3000)).decode("latin-1") for _ in range(20)]
    samples += [
        bytes(rnd.randrange(256) for _ in range(3000)).decode("utf-8", "surrogateescape")
        for _ in range(20)
    ]
    for s in samples:
        res = detect(s[:500], s, s)
        assert res.error is None, res.error
    assert detect("", "a" * 200_000 + " kill myself").tier == 1


def test_internal_failure_escalates(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = sys.modules["helpdesk.crisis.detect"]

    def boom(*_: object) -> None:
        raise RuntimeError("x")

    monkeypatch.setattr(mod, "_scan", boom)
    res = detect("", "hello")
    assert res.tier == 2
    assert res.error == "could not check: RuntimeError"


@pytest.mark.parametrize(
    ("text", "lang"),
    [
        ("Hola, necesito cambiar mi cita para el lunes por favor", "es"),
        ("Hi, I need to move my appointment to Monday please", "en"),
        ("", "en"),
        ("12345", "en"),
    ],
)
def test_language(text: str, lang: str) -> None:
    assert detect_language(text) == lang


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crisis_bench", ROOT / "bench" / "classify.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Floors per labelled set. devset: written with the first detector; fresh: written by
# the next author before changing rules (its later half after the first round of rule
# work, so it also measured that round); blind: written by a colleague without seeing the
# rules (its misses were then fixed in general ways, so it is now a regression floor).
_FLOORS = {
    "fresh.jsonl": (0.98, 0.80),
    "blind.jsonl": (0.98, 0.80),
}


@pytest.mark.parametrize("name", sorted(_FLOORS))
def test_labelled_set_metrics(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench()
    path = ROOT / "tests" / "data" / "crisis" / name
    if not path.exists():
        pytest.skip(f"{name} not written yet")
    rows = bench.load_devset(path)
    m = bench.evaluate(rows)
    with capsys.disabled():
        print(f"\n{name}\n" + bench.report(m))
    recall, precision = _FLOORS[name]
    assert m["recall"] >= recall
    assert m["precision"] >= precision


def test_devset_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench()
    rows = bench.load_devset()
    assert len(rows) >= 150
    cats = {r["category"] for r in rows if r["category"]}
    assert len(cats) == 10
    m = bench.evaluate(rows)
    with capsys.disabled():
        print("\n" + bench.report(m))
    assert m["recall"] >= 0.98
    assert m["precision"] >= 0.80


@pytest.mark.parametrize(
    "text",
    [
        # a joke with nothing earnest beside it
        "this app is trash i want to die lol",
        "if i have to do one more blood draw i'm gonna kms lmao jk",
        "ya me volvio loca el portal, ya me quiero morir jaja",
        "I'm dead 😂😂 your reminder says my appointment is with Dr. Undefined",
        # a symptom denied, even with a first-person word between the cue and the hit
        "No me falta el aire, no tengo fiebre, es por la tos verdad?",
        "no tengo hinchazon en la cara ni me cuesta respirar, nomas me pica",
    ],
)
def test_jokes_and_denied_symptoms_do_not_fire(text: str) -> None:
    assert detect("", text, learned=False).tier is None


@pytest.mark.parametrize(
    "text",
    [
        "lol im fine 🙃 just kind of tired of existing tbh",  # an earnest cue
        "i took like 30 tylenol tonight lol",  # what was taken, and when
        "i want to die lol, not joking",
        # a medical hit is never a joke: the laugh softens, it does not cancel
        "squeezing in my chest that goes down into my left arm and I'm sweating, "
        "probably just anxiety lol",
    ],
)
def test_a_laugh_does_not_hide_an_earnest_or_medical_hit(text: str) -> None:
    assert detect("", text, learned=False).tier is not None


def test_near_context_may_be_in_the_next_sentence_but_not_denied() -> None:
    # the drug in one sentence, its danger signs in the next
    fired = detect("", "I'm on lithium. Now I'm vomiting and stumbling around confused.")
    assert "en.med.lithium_toxicity" in fired.rule_ids
    # the same signs stated as absent
    quiet = detect("", "Please order my lithium level. I'm feeling stable, no tremors or nausea.")
    assert "en.med.lithium_toxicity" not in quiet.rule_ids


def test_a_title_s_dot_does_not_end_the_sentence() -> None:
    # "Dr." used to cut the sentence, so the pain was not beside the nitro
    text = (
        "I've taken three of the nitroglycerin, five minutes apart like Dr. Fisher said, "
        "and the pain hasn't let up at all."
    )
    res = detect("", text, learned=False)
    assert "en.cp.nitro_not_helping" in res.rule_ids
    assert res.tier == 1


@pytest.mark.parametrize(
    ("text", "tier"),
    [
        # someone else's event, told in Spanish: lowered, never cleared (suicide)
        ("En marzo mi sobrino en Guadalajara se quito la vida, tenia 19 anos.", 2),
        # an emergency visit already made is past, not a page
        ("I went to the ER last Thursday with chest pain and they did an EKG.", 2),
        # the same pain now is not past
        ("I went to the ER last week for chest pain and now the chest pain is back", 1),
        ("Esta aseguranza me va a matar, otra vez me negaron las tiras", None),
        ("I about had a heart attack when I opened the bill for my colonoscopy", None),
        ("Mom is in good spirits, she beat me at rummy last night", None),
    ],
)
def test_past_third_person_and_figures_of_speech(text: str, tier: int | None) -> None:
    assert detect("", text, learned=False).tier == tier


@pytest.mark.parametrize(
    ("text", "tier"),
    [
        # the writer's own overdose, dated and over: history, like a past heart attack
        ("I overdosed on opioids in 2019 and I've been clean for five years", None),
        ("Back in 2015 I was hospitalized after an accidental overdose. Records?", None),
        # the same history beside anything present is still read
        ("I overdosed in 2019 and tonight I'm thinking about doing it again", 1),
        ("I overdosed in 2019 and I feel like that again now", 1),
    ],
)
def test_a_past_overdose_of_the_writer_is_history(text: str, tier: int | None) -> None:
    assert detect("", text, learned=False).tier == tier


@pytest.mark.parametrize(
    ("text", "tier"),
    [
        # a pet's emergency is the vet's
        ("Our parakeet can't seem to breathe right, he's bobbing his tail.", None),
        ("sorry wrong inbox, my cat is choking on a hairball", None),
        # a person in the same sentence keeps the hit
        ("The dog bit my son's face and it is bleeding heavily.", 1),
        ("Our cat scratched me and now my throat is swelling and I can't breathe", 1),
    ],
)
def test_an_animal_s_emergency_is_not_a_page(text: str, tier: int | None) -> None:
    assert detect("", text, learned=False).tier == tier
