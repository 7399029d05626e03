"""Query text -> breed: the normaliser and the breed matcher of filter_clicks.

A click-log query is free text ("Golden Retrievers puppies 1920x1080",
"cute lab picures 2016"). :func:`normalize_query` reduces it to the words that
can name a breed; :class:`BreedMatcher` finds the breed names (and aliases) in
what is left, longest phrase first, on word boundaries.

Breed names and aliases go through the *same* normaliser as queries, so that
"maltese dog" (a breed whose name holds the filler word "dog") still matches
the query "maltese puppies": both normalise to "maltese".
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Mapping, Sequence

# Codes of a query's class besides a breed index (>= 0).
NO_BREED = -1
MULTIPLE_BREEDS = -2

# Words that never help to name a breed. Singular forms: plurals are reduced
# first ("puppies" -> "puppy"), so only the irregular ones are listed twice.
FILLER_WORDS = frozenset({
    "dog", "doggy", "doggie", "puppy", "pup", "breed",
    "picture", "pic", "pix", "image", "photo", "photograph", "foto", "wallpaper",
    "cute", "hd", "jpg", "jpeg", "png",
    # plurals the plural rule cannot reduce, and frequent misspellings
    "pics", "imagenes", "imagen", "imagens", "fotos", "picures", "pictues",
    "pictres", "pitures", "picutres", "imges", "imags", "photoes", "wallpapper", "walpaper",
})
# Fuzzy filler: a token at one edit (insertion, deletion, substitution,
# transposition) from one of these long filler words is filler too ("pictrues",
# "wallpeper"). Only long words: short ones have too many real-word neighbours.
_FUZZY_FILLER = ("picture", "pictures", "images", "photos", "wallpaper", "wallpapers", "puppies")

_APOSTROPHES = re.compile(r"['\u2019\u02bc`]")   # "bernard's" -> "bernards", not "bernard s"
_NON_WORD = re.compile(r"[\W_]+")                  # punctuation, symbols, white space
_NUMBER_LIKE = re.compile(r"^(?:\d+|\d+x\d+|\d+(?:k|p|px|mp)|\d+(?:st|nd|rd|th))$")  # 2016, 1920x1080, 4k, 1080p


def _tokens(text: str) -> list[str]:
    """NFKC, lower case, apostrophes dropped, anything not a letter or digit
    -> a word break."""
    if not text.isascii():  # NFKC leaves ASCII alone: skip it for the common case
        text = unicodedata.normalize("NFKC", text)
    text = text.lower()
    text = _APOSTROPHES.sub("", text)
    return _NON_WORD.sub(" ", text).split()


def _one_edit(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` differ by exactly one edit (Damerau)."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        return len(diff) == 1 or (
            len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    i = next((k for k, (x, y) in enumerate(zip(short, long_)) if x != y), len(short))
    return short[i:] == long_[i + 1:]


def _singular(token: str, vocabulary: Collection[str]) -> str:
    """Reduce a plural to a known word, else apply a cautious generic rule.

    Known words (breed-name words, aliases, filler) are never changed, which
    protects names that end in s ("great pyrenees", "malinois", "lhasa apso",
    "basset"). An unknown token takes the first candidate that is a known word
    ("collies" -> "collie", "huskies" -> "husky", "beagles" -> "beagle");
    otherwise the generic rule drops a final s except after s, u or i
    ("retrievers" -> "retriever", but "kuvasz", "lotus", "basis" stay).
    """
    if token in vocabulary or token in FILLER_WORDS or len(token) <= 3 or not token.endswith("s"):
        return token
    candidates = []
    if token.endswith("ies"):
        candidates += [token[:-3] + "y", token[:-1]]
    candidates.append(token[:-1])
    if token.endswith("es"):
        candidates.append(token[:-2])
    for cand in candidates:
        if cand in vocabulary or cand in FILLER_WORDS:
            return cand
    if token.endswith("ies"):
        return token[:-3] + "y"
    if token[-2] in "siu":
        return token
    return token[:-1]


def _is_filler(token: str, vocabulary: Collection[str]) -> bool:
    if token in vocabulary:  # a breed word always wins over filler
        return False
    if token in FILLER_WORDS or _NUMBER_LIKE.match(token) or len(token) == 1:
        return True  # single characters: the x of "1920 x 1080", stray letters
    return len(token) >= 6 and any(_one_edit(token, w) for w in _FUZZY_FILLER)


def normalize_query(query: str, vocabulary: Collection[str] = frozenset()) -> str:
    """Normalise a search query to the words that can name a breed.

    Steps: Unicode NFKC and lower case; apostrophes dropped; every other
    character that is not a letter or digit becomes a space; white space
    collapsed; plurals reduced (see :func:`_singular`); filler words dropped
    (dog, puppy, pictures, images, photo, wallpaper, cute, ..., their plurals
    and misspellings such as "picures", "pictues", "imagenes"); numbers dropped
    (years such as 2016, sizes such as 1920x1080, 4k, 1080p) and stray single
    characters.

    ``vocabulary`` holds the words that must survive unchanged (the words of
    breed names and aliases); :class:`BreedMatcher` passes its own.

    >>> normalize_query("Golden Retrievers Puppies 1920x1080")
    'golden retriever'
    >>> normalize_query("cute lab picures (2016)!")
    'lab'
    """
    words = (_normalize_token(t, vocabulary) for t in _tokens(query))
    return " ".join(w for w in words if w)


def _normalize_token(token: str, vocabulary: Collection[str]) -> str:
    """A token's singular form, or "" when it is filler."""
    word = _singular(token, vocabulary)
    return "" if _is_filler(word, vocabulary) else word


class BreedMatcher:
    """Find the breeds a query names.

    Each breed name and alias is normalised like a query into a phrase (a
    tuple of words). :meth:`match` scans the normalised query left to right
    and at each position takes the longest phrase that starts there, so that
    "bernese mountain dog" wins over a shorter overlapping name and a breed
    word inside a longer name ("bull" in "boston bull") is not a match of its
    own. Matching is on whole words: "lab" does not match "labrador".

    Args:
        breeds: breed names; a breed's code is its index in this sequence.
        aliases: extra word or phrase -> breed name (must be in ``breeds``).

    Raises:
        ValueError: a breed or alias normalises to nothing, two breeds
            normalise to the same phrase, an alias names an unknown breed or
            clashes with another breed's phrase.
    """

    def __init__(self, breeds: Sequence[str], aliases: Mapping[str, str] | None = None) -> None:
        self.breeds = list(breeds)
        aliases = dict(aliases or {})
        unknown = sorted({b for b in aliases.values() if b not in self.breeds})
        if unknown:
            raise ValueError(f"aliases name breeds missing from the breed list: {unknown}")
        # Words that the normaliser must leave alone: those of the names, less
        # the filler ("dog" of "maltese dog" stays filler, so that the query
        # "maltese puppies" and the name both normalise to "maltese").
        self.vocabulary = frozenset(
            w for name in [*self.breeds, *aliases] for w in _tokens(name)) - FILLER_WORDS
        self._token_cache: dict[str, str] = {}
        self._phrases: dict[tuple[str, ...], int] = {}
        named = [(name, i, "breed") for i, name in enumerate(self.breeds)]
        named += [(alias, self.breeds.index(b), "alias") for alias, b in aliases.items()]
        for text, code, kind in named:
            phrase = tuple(self.normalize(text).split())
            if not phrase:
                raise ValueError(f"{kind} {text!r} normalises to nothing (only filler words?)")
            other = self._phrases.setdefault(phrase, code)
            if other != code:
                raise ValueError(f"{kind} {text!r} normalises to {' '.join(phrase)!r}, "
                                 f"the phrase of breed {self.breeds[other]!r}")
        self._max_len = max((len(p) for p in self._phrases), default=0)

    def normalize(self, query: str) -> str:
        """:func:`normalize_query` with this matcher's vocabulary."""
        # Same steps as normalize_query, with the per-token work cached: a
        # log's distinct queries are many, its distinct words far fewer.
        words = []
        for token in _tokens(query):
            word = self._token_cache.get(token)
            if word is None:
                word = self._token_cache[token] = _normalize_token(token, self.vocabulary)
            if word:
                words.append(word)
        return " ".join(words)

    def match(self, query: str) -> tuple[int, ...]:
        """Codes of the distinct breeds named in ``query``, in order of appearance."""
        words = self.normalize(query).split()
        found: list[int] = []
        i = 0
        while i < len(words):
            for n in range(min(self._max_len, len(words) - i), 0, -1):
                code = self._phrases.get(tuple(words[i:i + n]))
                if code is not None:
                    if code not in found:
                        found.append(code)
                    i += n
                    break
            else:
                i += 1
        return tuple(found)

    def classify(self, query: str) -> int:
        """The breed code of a query naming one breed, else NO_BREED or MULTIPLE_BREEDS."""
        found = self.match(query)
        if not found:
            return NO_BREED
        return found[0] if len(found) == 1 else MULTIPLE_BREEDS
