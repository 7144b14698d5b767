"""Corpus splits: parsed offline, fixed, disjoint by book and by text."""
import pytest

from llm_compile.eval import data


def test_books_parsed_from_package():
    books = data.load_books()
    assert len(books) == 66
    names = list(books)
    assert names[0] == "Genesis" and names[-1] == "Revelation"
    assert books["Genesis"].startswith("In the beginning God created the heavens and the earth.")
    assert books["Revelation"].endswith("Amen.")
    assert all("`" not in t and "  " not in t for t in books.values())


def test_splits_are_fixed_and_disjoint_by_book():
    cal, ev = data.split_books("calibration"), data.split_books("evaluation")
    assert cal == ("Genesis", "Exodus") and ev == ("Luke", "John")
    assert not set(cal) & set(ev)
    with pytest.raises(ValueError, match="valid splits"):
        data.load_split("test")


def test_splits_share_no_long_substring():
    cal, ev = data.load_split("calibration"), data.load_split("evaluation")
    assert len(cal) > 300_000 and len(ev) > 200_000
    # every 100-character window of the evaluation split (stride 50 covers any shared run of
    # >= 150 chars; the real longest shared run is 58 chars), and a sample of the calibration split
    for text, other in ((ev, cal), (cal, ev)):
        step = 50 if text is ev else 997
        hits = [i for i in range(0, len(text) - 100, step) if text[i:i + 100] in other]
        assert not hits, f"shared text: {text[hits[0]:hits[0] + 100]!r}"


def test_split_tokens(smollm2):
    _, tok = smollm2
    ids = data.load_tokens(tok, "evaluation", 128)
    assert ids.shape == (1, 128)
    assert tok.decode(ids[0]).startswith("Because many have undertaken")
    assert data.split_token_count(tok, "evaluation") > 50_000  # enough for 8k-token runs
    assert data.split_token_count(tok, "calibration") > 50_000
    shifted = data.load_tokens(tok, "evaluation", 64, offset=64)
    assert shifted.tolist()[0] == ids.tolist()[0][64:]
    with pytest.raises(ValueError, match="cannot take"):
        data.load_tokens(tok, "evaluation", 10**7)


def test_prompt_windows(smollm2):
    _, tok = smollm2
    prompts = data.prompt_windows(tok, "evaluation", n=4, prompt_tokens=32)
    assert len(prompts) == 4 and all(p.shape == (1, 32) for p in prompts)
    assert len({tuple(p[0].tolist()) for p in prompts}) == 4
