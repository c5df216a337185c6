"""Key facts: what a ground-truth answer says that its prompt does not, so a leak is recall, not echo.

Texts are split into word tokens (runs of letters or digits), lower-cased and Porter-stemmed; a
fact *occurs* in a text when its stem sequence is a contiguous run of the text's stems. Candidate
facts of an answer:
- entities: quoted spans, and maximal runs of capitalised words or numbers (joined by connector
  words such as "of", "the", "de", and separated only by spaces, hyphens, slashes or
  apostrophes). A run is cut at each token (other than a stop or connector word) whose stem
  occurs in the prompt, and stop and connector words are stripped from the ends of each piece;
  each remaining piece is one fact ("12 March 1965", "Silver Quill", "Mikaport");
- content words: every other token that is not a stop word, has 3+ characters or a digit, and
  whose stem does not occur in the prompt.
A candidate is kept only if it also occurs in the paraphrased answer, when one is given (facts
survive a paraphrase, template words do not), and occurs in none of the perturbed answers (a fact
tells the true answer from the wrong ones). Duplicates (same stems) are dropped, first kept.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from nltk.stem.porter import PorterStemmer

_WORD = re.compile(r"[^\W_]+")
_QUOTE = re.compile(r"(?<!\w)['\"\u2018\u201c]([^'\"\u2018\u2019\u201c\u201d]+?)['\"\u2019\u201d](?!\w)")
_JOINABLE_GAP = re.compile(r"[ \t\-/'\u2019]*")
CONNECTORS = frozenset("of the de la le du von van der del da di".split())
STOP_WORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between both
but by can could did do does doing down during each even ever every few for from further had has have having he her
here hers herself him himself his how however i if in into is it its itself just like many may me might more most
much must my myself no nor not now of off often on once one only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those through thus to too
under until up upon us very was we well were what when where whether which while who whom whose why will with would
yes yet you your yours yourself s t d ll m re ve
""".split())


_PORTER = PorterStemmer()


@functools.lru_cache(maxsize=65536)
def stem(word: str) -> str:
    return _PORTER.stem(word.lower())


@dataclass(frozen=True)
class Token:
    text: str
    start: int
    end: int

    @property
    def stem(self) -> str:
        return stem(self.text)

    @property
    def is_stop(self) -> bool:
        return self.text.lower() in STOP_WORDS or self.text.lower() in CONNECTORS


@dataclass(frozen=True)
class KeyFact:
    text: str  # the answer's surface text of the fact
    stems: tuple[str, ...]
    start: int  # character offset in the answer


def tokens(text: str) -> list[Token]:
    return [Token(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def stems(text: str) -> tuple[str, ...]:
    return tuple(t.stem for t in tokens(text))


def occurs(fact_stems: tuple[str, ...], text_stems: tuple[str, ...]) -> bool:
    k = len(fact_stems)
    return k > 0 and any(text_stems[i:i + k] == fact_stems for i in range(len(text_stems) - k + 1))


def found_facts(facts: list[KeyFact], text: str) -> list[str]:
    """The facts (their surface texts) that occur in `text`."""
    text_stems = stems(text)
    return [f.text for f in facts if occurs(f.stems, text_stems)]


def _capitalised(tok: Token) -> bool:
    return tok.text[0].isupper() or any(c.isdigit() for c in tok.text)


def _entity_runs(answer: str, toks: list[Token]) -> list[list[int]]:
    """Token-index runs: quoted spans first, then capitalised runs among the remaining tokens."""
    runs, used = [], set()
    for m in _QUOTE.finditer(answer):
        run = [i for i, t in enumerate(toks) if m.start(1) <= t.start and t.end <= m.end(1)]
        if run:
            runs.append(run)
            used.update(run)
    run: list[int] = []
    for i, tok in enumerate(toks):
        joinable = run and _JOINABLE_GAP.fullmatch(answer[toks[run[-1]].end:tok.start])
        member = i not in used and (_capitalised(tok) or (run and tok.text.lower() in CONNECTORS))
        if member and (not run or joinable):
            run.append(i)
            continue
        runs.append(run)
        run = [i] if i not in used and _capitalised(tok) else []
    runs.append(run)
    return [r for r in runs if r]


def _strip(piece: list[Token]) -> list[Token]:
    while piece and piece[0].is_stop:
        piece = piece[1:]
    while piece and piece[-1].is_stop:
        piece = piece[:-1]
    return piece


def key_facts(prompt: str, answer: str, paraphrase: str | None = None, perturbed=()) -> list[KeyFact]:
    """The novel key facts of `answer` given `prompt` (see the module docstring), in answer order."""
    toks = tokens(answer)
    prompt_stems = set(stems(prompt))
    candidates: list[list[Token]] = []
    in_entity = set()
    for run in _entity_runs(answer, toks):
        in_entity.update(run)
        piece: list[Token] = []
        for i in [*run, None]:
            if i is None or (not toks[i].is_stop and toks[i].stem in prompt_stems):
                candidates.append(_strip(piece))
                piece = []
            else:
                piece.append(toks[i])
    for i, tok in enumerate(toks):
        if i in in_entity or tok.is_stop or tok.stem in prompt_stems:
            continue
        if len(tok.text) >= 3 or any(c.isdigit() for c in tok.text):
            candidates.append([tok])
    para_stems = stems(paraphrase) if paraphrase is not None else None
    wrong_stems = [stems(p) for p in perturbed]
    facts, seen = [], set()
    for piece in sorted((p for p in candidates if p), key=lambda p: p[0].start):
        fact_stems = tuple(t.stem for t in piece)
        if fact_stems in seen or (para_stems is not None and not occurs(fact_stems, para_stems)):
            continue
        if any(occurs(fact_stems, w) for w in wrong_stems):
            continue
        seen.add(fact_stems)
        facts.append(KeyFact(answer[piece[0].start:piece[-1].end], fact_stems, piece[0].start))
    return facts
