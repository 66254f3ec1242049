"""Which language a response is written in, by writing system and stopwords (no dependency).

`detect_language(text)` returns an ISO 639-1 code from SUPPORTED_LANGUAGES (the 30 languages of
IFEval's response_language instruction, plus nl, tr, id, sv, ro) or None when unsure.

How: letters are counted per writing system; one system must hold at least 85% of them. Systems
used by one language decide alone (Thai, Hangul, Hebrew, Bengali, Tamil, ...). Japanese is
told from Chinese by kana; Ukrainian and Bulgarian from Russian by their letters (і ї є ґ; ъ
without ы э); Urdu and Persian from Arabic by their extra letters; Hindi, Marathi and Nepali,
and the Latin-script languages, by counts of their most frequent function words. This is
reliable for paragraphs of ordinary prose, weaker on a few words or on code-switched text;
langdetect (what IFEval uses) is not needed for that and would add a dependency whose result
varies with its random seed.
"""

import re
from collections import Counter

_SCRIPT_RANGES = [
    ("latin", 0x0041, 0x024F), ("greek", 0x0370, 0x03FF), ("cyrillic", 0x0400, 0x04FF),
    ("hebrew", 0x0590, 0x05FF), ("arabic", 0x0600, 0x06FF), ("arabic", 0x0750, 0x077F),
    ("devanagari", 0x0900, 0x097F), ("bengali", 0x0980, 0x09FF), ("gurmukhi", 0x0A00, 0x0A7F),
    ("gujarati", 0x0A80, 0x0AFF), ("tamil", 0x0B80, 0x0BFF), ("telugu", 0x0C00, 0x0C7F),
    ("kannada", 0x0C80, 0x0CFF), ("malayalam", 0x0D00, 0x0D7F), ("thai", 0x0E00, 0x0E7F),
    ("latin", 0x1E00, 0x1EFF), ("hangul", 0x1100, 0x11FF), ("kana", 0x3040, 0x30FF),
    ("hangul", 0x3130, 0x318F), ("han", 0x4E00, 0x9FFF), ("hangul", 0xAC00, 0xD7AF),
    ("arabic", 0xFB50, 0xFDFF), ("arabic", 0xFE70, 0xFEFF),
]
_SINGLE_LANGUAGE_SCRIPTS = {"hebrew": "he", "bengali": "bn", "gurmukhi": "pa", "gujarati": "gu",
                            "tamil": "ta", "telugu": "te", "kannada": "kn", "malayalam": "ml",
                            "thai": "th", "hangul": "ko", "greek": "el"}

_STOPWORD_TEXT = {
    "en": "the and of to is in that it for was with as on are be this have not you they",
    "es": "el la de que y en los las del por una es con para se no al su lo como",
    "pt": "o a de que e do da em um uma para com não os as se por mais no na",
    "fr": "le la les de des et est un une du en que qui pour dans pas ne sur au avec",
    "de": "der die und das ist nicht ein eine zu den von mit sich des auf für im dem auch",
    "it": "il la di che e è un una per non sono del della gli con le si nel anche come",
    "pl": "i w na nie się z jest że do to jak ale o co za od po tak są",
    "vi": "và của là có không được những các một trong cho với người này đã",
    "sw": "na ya wa kwa ni za katika la hii kuwa watu au lakini pia sana kama",
    "fi": "ja on ei se että oli hän ovat mutta myös kuin tämä joka tai niin",
    "nl": "de het een en van is dat niet op te zijn voor met die ook maar",
    "tr": "ve bir bu da de için ile çok ne daha gibi olarak var ama ise",
    "id": "yang dan di ini itu dengan untuk tidak dari dalam akan ada juga saya",
    "sv": "och att det är som en på av för med inte den har till jag om",
    "ro": "și de la în că este un o pe cu nu care mai din pentru sunt",
    "hi": "है के में की और से का को हैं यह भी नहीं था कि",
    "mr": "आहे आणि या च्या ते हे की नाही होते आहेत त्या पण",
    "ne": "छ र को मा हो पनि यो गर्न भएको छन् थियो लागि",
}
_STOPWORDS = {lang: set(words.split()) for lang, words in _STOPWORD_TEXT.items()}
_LATIN = ["en", "es", "pt", "fr", "de", "it", "pl", "vi", "sw", "fi", "nl", "tr", "id", "sv", "ro"]
_DEVANAGARI = ["hi", "mr", "ne"]
_VIETNAMESE_LETTERS = set("ăâđêôơưạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹ")

SUPPORTED_LANGUAGES = frozenset(
    list(_SINGLE_LANGUAGE_SCRIPTS.values()) + _LATIN + _DEVANAGARI + ["ja", "zh", "ru", "uk", "bg", "ar", "fa", "ur"])
MIN_SCRIPT_SHARE = 0.85
MAX_CHARS = 10_000  # a prefix this long decides; keeps detection fast on huge inputs


def _script(char: str) -> str | None:
    code = ord(char)
    if code < 0x80:
        return "latin"
    for name, low, high in _SCRIPT_RANGES:
        if low <= code <= high:
            return name
    return None


def _by_stopwords(text: str, candidates: list[str]) -> str | None:
    words = Counter(re.findall(r"\w+", text.lower()))
    hits = {lang: sum(words[w] for w in _STOPWORDS[lang]) for lang in candidates}
    best = max(candidates, key=hits.get)
    return best if hits[best] > 0 else None


def detect_language(text: str) -> str | None:
    """ISO 639-1 code of the language `text` is written in, or None if unsure (see module docstring)."""
    text = text[:MAX_CHARS]
    scripts = Counter(_script(c) for c in text if c.isalpha())
    scripts.pop(None, None)
    total = sum(scripts.values())
    if total == 0:
        return None
    if scripts["kana"] and (scripts["kana"] + scripts["han"]) >= MIN_SCRIPT_SHARE * total:
        return "ja"
    script, count = scripts.most_common(1)[0]
    if count < MIN_SCRIPT_SHARE * total:
        return None
    if script in _SINGLE_LANGUAGE_SCRIPTS:
        return _SINGLE_LANGUAGE_SCRIPTS[script]
    letters = set(text.lower())
    if script == "han":
        return "zh"
    if script == "cyrillic":
        if letters & set("іїєґ"):
            return "uk"
        return "bg" if "ъ" in letters and not letters & set("ыэ") else "ru"
    if script == "arabic":
        if letters & set("ےٹڈڑںھ"):
            return "ur"
        return "fa" if letters & set("پچژگی") else "ar"
    if script == "devanagari":
        return _by_stopwords(text, _DEVANAGARI)
    if script == "latin":
        if sum(c in _VIETNAMESE_LETTERS for c in text.lower()) > 0.05 * total:
            return "vi"
        return _by_stopwords(text, _LATIN)
    return None
