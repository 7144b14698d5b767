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


WIDE = ("Genesis", "Exodus", "Psalms", "Proverbs", "Isaiah", "Acts", "Romans", "Revelation")


def test_wide_calibration_split_books():
    books = data.split_books("calibration-wide")
    assert books == WIDE and "calibration-wide" in data.BALANCED
    # disjoint by book from the evaluation split, and no synoptic gospel (parallel to Luke)
    assert not set(books) & {"Matthew", "Mark", "Luke", "John"}
    assert data.split_books("calibration") == ("Genesis", "Exodus")       # unchanged
    assert data.part_lengths("calibration-wide", 2048) == [256] * 8
    assert data.part_lengths("calibration-wide", 2051) == [257, 257, 257] + [256] * 5
    assert data.part_lengths("calibration", 2048) == [2048]


def test_wide_split_shares_no_long_substring_with_evaluation():
    wide, ev = data.load_split("calibration-wide"), data.load_split("evaluation")
    hits = [i for i in range(0, len(ev) - 100, 50) if ev[i:i + 100] in wide]
    assert not hits, f"shared text: {ev[hits[0]:hits[0] + 100]!r}"


def test_wide_split_tokens_come_from_every_book(smollm2):
    _, tok = smollm2
    n = 8 * 40 + 3
    ids = data.load_tokens(tok, "calibration-wide", n)
    lengths = data.part_lengths("calibration-wide", n)
    assert ids.shape == (1, n) and lengths == [41, 41, 41] + [40] * 5
    books = data.load_books()
    pos = 0
    for book, k in zip(WIDE, lengths):
        piece = ids[0, pos:pos + k].tolist()
        assert piece == tok(books[book], add_special_tokens=False)["input_ids"][:k]
        pos += k
    assert tok.decode(ids[0, :lengths[0]]).startswith("In the beginning")
    assert tok.decode(ids[0, sum(lengths[:7]):]).startswith("This is the Revelation of Jesus Christ")
    # offset: the same share from token 10 of every book
    shifted = data.load_tokens(tok, "calibration-wide", 16, offset=10)
    assert shifted[0, :2].tolist() == ids[0, 10:12].tolist()
    # the plain splits still take a prefix
    assert data.load_tokens(tok, "calibration", 64).tolist() == \
        [tok(data.load_split("calibration"), add_special_tokens=False)["input_ids"][:64]]
    # 4096 tokens (the K = 8 per-part searches): 512 from the start of every book; held out the same
    assert data.part_lengths("calibration-wide", 4096) == [512] * 8
    big = data.load_tokens(tok, "calibration-wide", 4096)
    assert big.shape == (1, 4096) and big[0, :n].tolist() != ids[0].tolist()
    assert big[0, 512:512 + 41].tolist() == tok(books["Exodus"], add_special_tokens=False)["input_ids"][:41]
    assert data.load_tokens(tok, "holdout", 4096).shape == (1, 4096)
    with pytest.raises(ValueError, match="cannot take"):
        data.load_tokens(tok, "calibration-wide", 10**6)
    with pytest.raises(ValueError, match="cannot take"):
        data.load_tokens(tok, "calibration-wide", 4)                      # 0 tokens for some books


def test_holdout_split_is_disjoint_from_calibration_and_evaluation():
    books = data.split_books("holdout")
    assert len(books) == 8 and "holdout" in data.BALANCED
    others = set(WIDE) | set(data.split_books("calibration")) | set(data.split_books("evaluation"))
    assert not set(books) & others
    assert not set(books) & {"Matthew", "Mark", "1 John", "2 John", "3 John"}
    held, ev = data.load_split("holdout"), data.load_split("evaluation")
    hits = [i for i in range(0, len(ev) - 100, 50) if ev[i:i + 100] in held]
    assert not hits, f"shared text: {ev[hits[0]:hits[0] + 100]!r}"
    assert data.part_lengths("holdout", 2048) == [256] * 8
