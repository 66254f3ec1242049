"""A deterministic corpus of realistic responses for every IFEval instruction family.

`corpus(seed)` yields (instruction_id, kwargs, response) with a few hundred responses per family:
passing and failing ones, short and long, markdown, and prose in the 30 languages of IFEval's
response_language instruction (Hindi, Marathi, Korean with English words in parentheses, short
Italian lines among them). Responses are assembled from hand-written pieces by a seeded RNG, with
the arguments drawn near the response's own counts so that both outcomes are common.
"""

import json
import random
import re

ENGLISH = [
    "The Great Barrier Reef is the largest coral reef system in the world.",
    "It stretches for over 2,300 kilometers along the coast of Queensland, Australia.",
    "Dr. Smith, who studied the reef for 20 years, says it is under threat.",
    "Rising sea temperatures cause coral bleaching, e.g. the events of 2016 and 2017.",
    "What can we do about it?",
    "Quite a lot, actually!",
    "Reducing emissions is the first step... but local action matters too.",
    "The U.S. and Australia signed an agreement in Jan. 2020.",
    "Tourism brings about $6.4 billion a year to the region.",
    "Mr. Johnson's team counted 1,625 species of fish.",
    "I think we should visit before it's too late.",
    "Honestly? It was the best trip of my life!!!",
    "The water was 28.5 degrees Celsius at noon.",
    "My grandmother always said: \"Take only pictures, leave only footprints.\"",
    "Prof. Lee (University of Sydney) disagrees with this view.",
    "They arrived at 3 p.m. and left at 5 p.m. on the same day.",
    "This is important: do not touch the coral.",
    "Snorkeling is easy; diving requires a license.",
    "Sneakers are not allowed on the boat, so bring sandals.",
    "The sun was bright, the sky was clear, and the sea was calm.",
    "We saw turtles, sharks and a manta ray.",
    "According to the guide, the reef is 500,000 years old.",
    "She asked, \"Is it safe to swim here?\"",
    "Yes. It is safe if you follow the rules.",
    "In 1975 the government created the Great Barrier Reef Marine Park.",
    "Some scientists, i.e. marine biologists, monitor it every month.",
    "However, funding has been cut twice since 2019.",
    "NASA satellites also track the water temperature.",
    "DON'T forget your sunscreen!",
    "The boat left at 7 a.m. sharp.",
]

MARKDOWN = [
    "## Overview\nThe reef is home to thousands of species.",
    "* First point about the reef\n* Second point about tourism\n* Third point about climate",
    "- apples\n- bananas\n- cherries",
    "1. Book the tour.\n2. Pack sunscreen.\n3. Enjoy the reef.",
    "**Important:** bring water.",
    "*Note:* the tour may be cancelled in bad weather.",
    "| Species | Count |\n|---|---|\n| Fish | 1625 |\n| Coral | 600 |",
    "```python\nprint(\"hello\")\n```",
    "> A quote from the guide.",
    "---",
    "***Bold and italic*** text here.",
    "* **Fish:** 1,625 species\n* **Coral:** 600 species",
    "Visit [the official website] for details.",
    "### Conclusion\nProtect the reef!",
]

FOREIGN = {
    "hi": ["मैं आपके खानपान की गुणवत्ता के बारे में एक छोटी समीक्षा लिख रहा हूं।",
           "भोजन स्वादिष्ट था और सेवा बहुत तेज़ थी।", "अगली बार मैं अपने परिवार के साथ फिर से आऊंगा।"],
    "mr": ["आज सकाळी मी बाजारात गेलो होतो आणि तिथे खूप गर्दी होती.",
           "भाज्यांचे भाव वाढले आहेत, त्यामुळे लोक नाराज आहेत.", "तरीही मी ताजी फळे विकत घेतली."],
    "ne": ["हामी हिजो काठमाडौं उपत्यकाको भ्रमणमा गएका थियौं।", "त्यहाँका मन्दिरहरू धेरै पुराना र सुन्दर छन्।",
           "म फेरि त्यहाँ जान चाहन्छु।"],
    "ko": ["인공지능(Artificial Intelligence)은 현대 사회에서 중요한 역할을 하고 있습니다.",
           "특히 자연어 처리(NLP) 기술은 번역과 요약에 널리 사용됩니다.", "앞으로 더 많은 분야에서 활용될 것입니다."],
    "it": ["Ciao, come stai?", "Oggi piove molto.", "La pizza era buonissima!", "Andiamo al mare domani."],
    "es": ["El cambio climático es uno de los mayores desafíos de nuestro tiempo.",
           "Los gobiernos deben actuar con rapidez para reducir las emisiones.", "¿Qué podemos hacer nosotros?"],
    "pt": ["O Brasil é o maior país da América do Sul.", "A sua cultura é muito diversa e rica.",
           "Você já visitou o Rio de Janeiro?"],
    "ar": ["تعتبر القراءة من أهم العادات التي يجب أن نحرص عليها.", "فهي توسع مدارك الإنسان وتزيد من معرفته."],
    "fr": ["La tour Eiffel est l'un des monuments les plus visités au monde.",
           "Elle a été construite pour l'Exposition universelle de 1889.", "C'est magnifique, n'est-ce pas ?"],
    "ru": ["Москва — столица России и крупнейший город страны.", "Здесь находится множество музеев и театров."],
    "de": ["Der Schwarzwald ist ein bekanntes Mittelgebirge im Südwesten Deutschlands.",
           "Viele Touristen wandern dort im Sommer.", "Das Wetter ist oft wechselhaft."],
    "ja": ["日本の四季はとても美しいです。", "春には桜が咲き、秋には紅葉が見られます。"],
    "bn": ["বাংলাদেশ একটি নদীমাতৃক দেশ।", "এখানে অনেক নদী রয়েছে এবং মানুষ মাছ ধরতে ভালোবাসে।"],
    "uk": ["Київ є столицею України і одним з найстаріших міст Європи.", "Місто відоме своїми церквами та парками."],
    "th": ["ประเทศไทยมีชื่อเสียงด้านอาหารที่อร่อยและวัฒนธรรมที่หลากหลาย", "นักท่องเที่ยวจำนวนมากมาเยือนทุกปี"],
    "ur": ["پاکستان ایک خوبصورت ملک ہے جس کے شمالی علاقے پہاڑوں سے بھرے ہوئے ہیں۔",
           "یہاں کے لوگ بہت مہمان نواز ہیں۔"],
    "ta": ["தமிழ் உலகின் மிகப் பழமையான மொழிகளில் ஒன்றாகும்.", "இதன் இலக்கியம் மிகவும் வளமானது."],
    "te": ["హైదరాబాద్ తెలంగాణ రాష్ట్ర రాజధాని.", "ఇక్కడ బిర్యానీ చాలా ప్రసిద్ధి చెందింది."],
    "bg": ["София е столицата на България и най-големият град в страната.",
           "Градът е разположен в подножието на планината Витоша."],
    "pl": ["Kraków jest jednym z najstarszych miast w Polsce.", "Każdego roku odwiedzają go miliony turystów."],
    "he": ["ירושלים היא עיר עתיקה וחשובה לשלוש דתות.", "מיליוני תיירים מבקרים בה בכל שנה."],
    "fa": ["ایران کشوری با تاریخ و فرهنگ بسیار غنی است.", "شهرهای اصفهان و شیراز از جاذبه‌های مهم گردشگری هستند."],
    "vi": ["Hà Nội là thủ đô của Việt Nam với lịch sử hơn một nghìn năm.", "Phở là món ăn nổi tiếng nhất ở đây."],
    "sw": ["Kiswahili ni lugha inayozungumzwa na watu wengi katika Afrika Mashariki.",
           "Ni lugha rasmi nchini Kenya na Tanzania."],
    "kn": ["ಬೆಂಗಳೂರು ಕರ್ನಾಟಕದ ರಾಜಧಾನಿಯಾಗಿದೆ.", "ಇದನ್ನು ಭಾರತದ ಸಿಲಿಕಾನ್ ವ್ಯಾಲಿ ಎಂದು ಕರೆಯುತ್ತಾರೆ."],
    "gu": ["ગુજરાત ભારતના પશ્ચિમ ભાગમાં આવેલું રાજ્ય છે.", "અહીંના લોકો વેપાર માટે જાણીતા છે."],
    "pa": ["ਪੰਜਾਬ ਨੂੰ ਪੰਜ ਦਰਿਆਵਾਂ ਦੀ ਧਰਤੀ ਕਿਹਾ ਜਾਂਦਾ ਹੈ।", "ਇੱਥੇ ਦੇ ਲੋਕ ਬਹੁਤ ਮਿਹਨਤੀ ਹਨ।"],
    "ml": ["കേരളം ദൈവത്തിന്റെ സ്വന്തം നാട് എന്നറിയപ്പെടുന്നു.", "ഇവിടെ ധാരാളം കായലുകളും തെങ്ങുകളും ഉണ്ട്."],
    "fi": ["Suomi on tunnettu tuhansista järvistään ja kauniista luonnostaan.", "Talvella täällä on hyvin kylmää."],
    "zh": ["长城是中国古代的伟大建筑之一。", "每年都有成千上万的游客来参观。"],
}
IFEVAL_LANGUAGES = sorted(set(FOREIGN) - {"zh"} | {"en"})

KEYWORDS = ["reef", "sneaker", "sun", "coral", "tourism", "fish", "boat", "climate", "water", "guide", "age"]


def _prose(rng: random.Random, sentences: int) -> str:
    return " ".join(rng.choice(ENGLISH) for _ in range(sentences))


def _paragraph(rng: random.Random) -> str:
    """One paragraph: English prose, markdown, or a foreign language (one in five)."""
    kind = rng.random()
    if kind < 0.6:
        return _prose(rng, rng.randint(1, 5))
    if kind < 0.8:
        return rng.choice(MARKDOWN)
    return " ".join(FOREIGN[rng.choice(sorted(FOREIGN))])


def _response(rng: random.Random, max_paragraphs: int = 4) -> str:
    paragraphs = [_paragraph(rng) for _ in range(rng.randint(1, max_paragraphs))]
    return rng.choice(["\n\n", "\n", " "]).join(paragraphs)


def _near(rng: random.Random, value: int) -> int:
    return max(1, value + rng.randint(-2, 2))


def _relation(rng: random.Random) -> str:
    return rng.choice(["less than", "at least"])


def _insert(rng: random.Random, text: str, words: list[str]) -> str:
    tokens = text.split(" ")
    for word in words:
        tokens.insert(rng.randint(0, len(tokens)), word)
    return " ".join(tokens)


def _case(rng: random.Random, word: str) -> str:
    return rng.choice([word, word.capitalize(), word.upper(), word + "s", word + ".", "(" + word + ")"])


# ----------------------------------------------------------------------------- one generator per family


def keywords_existence(rng):
    keywords = rng.sample(KEYWORDS, rng.randint(1, 3))
    present = [_case(rng, k) for k in keywords if rng.random() < 0.8]
    return {"keywords": keywords}, _insert(rng, _response(rng), present)


def keywords_frequency(rng):
    keyword = rng.choice(KEYWORDS)
    frequency = rng.randint(1, 5)
    words = [_case(rng, keyword) for _ in range(_near(rng, frequency) - 1)]
    return {"keyword": keyword, "frequency": frequency, "relation": _relation(rng)}, _insert(rng, _response(rng), words)


def keywords_forbidden_words(rng):
    words = rng.sample(KEYWORDS, rng.randint(1, 3))
    used = [rng.choice([w, w.upper(), w + "s", "un" + w, w + "-like"]) for w in words if rng.random() < 0.4]
    return {"forbidden_words": words}, _insert(rng, _response(rng), used)


def keywords_letter_frequency(rng):
    response = _response(rng)
    letter = rng.choice("abcdefghijklmnopqrstuvwxyz")
    count = response.lower().count(letter)
    return {"letter": rng.choice([letter, letter.upper()]), "let_frequency": _near(rng, count),
            "let_relation": _relation(rng)}, response


def language_response_language(rng):
    language = rng.choice(sorted(FOREIGN) + ["en"] * 4)
    sentences = ENGLISH if language == "en" else FOREIGN[language]
    kind = rng.random()
    if kind < 0.5:
        response = " ".join(rng.sample(sentences, rng.randint(1, len(sentences) if language != "en" else 6)))
    elif kind < 0.65:
        response = rng.choice(sentences)  # one short line
    elif kind < 0.8:
        response = "## " + rng.choice(sentences) + "\n\n* " + "\n* ".join(sentences[:3])
    else:  # mixed with English
        response = " ".join(sentences) + " " + _prose(rng, rng.randint(1, 3))
    requested = language if rng.random() < 0.6 and language in IFEVAL_LANGUAGES else rng.choice(IFEVAL_LANGUAGES)
    return {"language": requested}, response


def length_constraints_number_sentences(rng):
    return {"num_sentences": rng.randint(1, 20), "relation": _relation(rng)}, _response(rng, 6)


def length_constraints_number_paragraphs(rng):
    paragraphs = [_prose(rng, rng.randint(1, 3)) for _ in range(rng.randint(1, 5))]
    divider = rng.choice(["\n***\n", "\n\n***\n\n", " *** ", "\n* * *\n", "***", "\n****\n"])
    text = divider.join(paragraphs)
    roll = rng.random()
    if roll < 0.15:
        text = "***\n" + text
    elif roll < 0.3:
        text = text + "\n***"
    elif roll < 0.4:
        text = text.replace(divider, divider + divider, 1)  # an empty paragraph in the middle
    return {"num_paragraphs": _near(rng, len(paragraphs))}, text


def length_constraints_number_words(rng):
    response = _response(rng, 5)
    return {"num_words": _near(rng, len(re.findall(r"\w+", response))), "relation": _relation(rng)}, response


def length_constraints_nth_paragraph_first_word(rng):
    paragraphs = [_paragraph(rng) for _ in range(rng.randint(1, 5))]
    nth = rng.randint(1, len(paragraphs))
    first_word = rng.choice(["reef", "however", "dr", "the", "sneakers"])
    if rng.random() < 0.6:
        prefix = rng.choice([first_word, first_word.capitalize(), '"' + first_word.capitalize(), "'" + first_word,
                             first_word + ",", "**" + first_word + "**", first_word.upper() + "!", first_word + "s"])
        paragraphs[nth - 1] = prefix + " " + paragraphs[nth - 1]
    separator = rng.choice(["\n\n", "\n\n", "\n\n\n", "\n \n"])
    return {"num_paragraphs": max(nth, _near(rng, len(paragraphs))) if rng.random() < 0.3 else len(paragraphs),
            "nth_paragraph": nth, "first_word": first_word}, separator.join(paragraphs)


def detectable_content_number_placeholders(rng):
    slots = ["[name]", "[address]", "[ date ]", "[Company Name]", "[]", "[x", "[1]", "[[nested]]", "[line\nbreak]"]
    used = [rng.choice(slots) for _ in range(rng.randint(0, 5))]
    return {"num_placeholders": rng.randint(1, 4)}, _insert(rng, _response(rng), used)


def detectable_content_postscript(rng):
    marker = rng.choice(["P.S.", "P.P.S", "P.S.", "Note:"])
    ending = rng.choice(["P.S. Don't forget the sunscreen.", "p.s. see you soon", "P. S. Thanks!",
                         "P.P.S I almost forgot.", "P.P.S. One more thing.", "PS: bring water",
                         "**P.S.** Call me.", "Note: the tour starts early.", "", "", "note that it rains"])
    return {"postscript_marker": marker}, _response(rng) + "\n\n" + ending


def detectable_format_number_bullet_lists(rng):
    styles = ["* item", "- item", "  * indented", "*italic line*", "**bold line**", "-5 degrees at night",
              "* ", "---", "1. numbered", "• dot", "-\titem", "*\nnext"]
    lines = [rng.choice(styles) for _ in range(rng.randint(0, 6))]
    body = "\n".join(lines)
    text = rng.choice([_prose(rng, 2) + "\n" + body, body, body + "\n\n" + _prose(rng, 1)])
    return {"num_bullets": _near(rng, len(lines))}, text


def detectable_format_constrained_response(rng):
    option = rng.choice(["My answer is yes.", "My answer is no.", "My answer is maybe.", "My answer is yes",
                         "my answer is no.", "Yes.", "My answer is: yes."])
    return {}, rng.choice([option, option + " " + _prose(rng, 2), _prose(rng, 2) + "\n\n" + option])


def detectable_format_number_highlighted_sections(rng):
    spans = ["*highlighted section*", "**bold section**", "* *", "** **", "*a*b*", "***x***", "*multi\nline*",
             "**", "*one*"]
    used = [rng.choice(spans) for _ in range(rng.randint(0, 5))]
    return {"num_highlights": rng.randint(1, 4)}, _insert(rng, _response(rng), used)


def detectable_format_multiple_sections(rng):
    splitter = rng.choice(["Section", "SECTION", "PARAGRAPH", "Part", "Day"])
    count = rng.randint(1, 5)
    header = rng.choice(["{s} {i}", "{s} {i}:", "{S} {i}", "{s}{i}", "{s} {i}.", "{s} X", "**{s} {i}**"])
    sections = [header.format(s=splitter, S=splitter.lower(), i=i + 1) + "\n" + _prose(rng, rng.randint(1, 2))
                for i in range(count)]
    return {"section_spliter": splitter, "num_sections": _near(rng, count)}, "\n\n".join(sections)


def detectable_format_json_format(rng):
    payload = {"reef": "Great Barrier Reef", "length_km": 2300, "species": ["fish", "coral"]}
    dumped = json.dumps(payload, indent=rng.choice([None, 2]))
    return {}, rng.choice([dumped, "```json\n" + dumped + "\n```", "```\n" + dumped + "\n```",
                           "```JSON\n" + dumped + "\n```", "Here is the JSON:\n" + dumped, dumped[:-1],
                           dumped + "\nHope this helps!", "  " + dumped + "  ", "[1, 2, 3]", "\"just a string\""])


def detectable_format_title(rng):
    title = rng.choice(["<<The Great Reef>>", "<<poem of joy>>", "<< >>", "<<>>", "<<a\nb>>", "<<<Deep>>>",
                        "< <spaced> >", "<<Title", "Title>>", "**<<Bold Title>>**"])
    return {}, rng.choice([title + "\n\n" + _response(rng), _response(rng), _response(rng) + " " + title])


def combination_two_responses(rng):
    first, second = _prose(rng, 2), _prose(rng, 2)
    return {}, rng.choice([first + "\n******\n" + second, first + "\n******\n" + first, first + "******" + second,
                           "******\n" + first + "\n******\n" + second, first + "\n******\n" + second + "\n******",
                           first + "\n******\n\n******\n" + second, first + "\n*******\n" + second, first,
                           first + "\n******\n" + second + "\n******\n" + first])


def combination_repeat_prompt(rng):
    prompt = rng.choice(["Write a short poem about the sea.", "What is the capital of France?",
                         "Describe the Great Barrier Reef in 3 sentences."])
    start = rng.choice([prompt, prompt.upper(), "  " + prompt, prompt[:-1], "Sure! " + prompt, prompt.lower()])
    return {"prompt_to_repeat": prompt}, start + "\n" + _response(rng)


def startend_end_checker(rng):
    phrase = rng.choice(["Is there anything else I can help with?", "Any other questions?", "Peace out."])
    ending = rng.choice([phrase, phrase.lower(), phrase + "\"", "\"" + phrase + "\"", phrase + "  ", phrase[:-1],
                         phrase + " Thanks!", "**" + phrase + "**"])
    return {"end_phrase": phrase}, _response(rng) + "\n" + ending


def startend_quotation(rng):
    response = _response(rng)
    return {}, rng.choice(['"' + response + '"', response, '"' + response, "  \"" + response + "\"\n", '"', '""',
                           "“" + response + "”"])


def change_case_capital_word_frequency(rng):
    caps = ["NASA", "DON'T", "U.S.A.", "IMPORTANT", "OK", "I", "A", "CAN'T", "NASA's", "COVID-19", "ALL CAPS"]
    used = [rng.choice(caps) for _ in range(rng.randint(0, 8))]
    return {"capital_frequency": rng.randint(1, 8), "capital_relation": _relation(rng)}, \
        _insert(rng, _response(rng), used)


def change_case_english_capital(rng):
    response = _response(rng)
    return {}, rng.choice([response.upper(), response.upper(), response, response.upper() + " ok", "12345",
                           " ".join(FOREIGN["de"]).upper(), " ".join(FOREIGN["ru"]).upper(), "HELLO"])


def change_case_english_lowercase(rng):
    response = _response(rng)
    return {}, rng.choice([response.lower(), response.lower(), response, "Hello " + response.lower(), "12345",
                           " ".join(FOREIGN["es"]).lower(), " ".join(FOREIGN["hi"]), "ok"])


def punctuation_no_comma(rng):
    response = _response(rng)
    return {}, rng.choice([response, response.replace(",", ""), response.replace(",", "，"), response + ","])


FAMILIES = {
    "keywords:existence": keywords_existence,
    "keywords:frequency": keywords_frequency,
    "keywords:forbidden_words": keywords_forbidden_words,
    "keywords:letter_frequency": keywords_letter_frequency,
    "language:response_language": language_response_language,
    "length_constraints:number_sentences": length_constraints_number_sentences,
    "length_constraints:number_paragraphs": length_constraints_number_paragraphs,
    "length_constraints:number_words": length_constraints_number_words,
    "length_constraints:nth_paragraph_first_word": length_constraints_nth_paragraph_first_word,
    "detectable_content:number_placeholders": detectable_content_number_placeholders,
    "detectable_content:postscript": detectable_content_postscript,
    "detectable_format:number_bullet_lists": detectable_format_number_bullet_lists,
    "detectable_format:constrained_response": detectable_format_constrained_response,
    "detectable_format:number_highlighted_sections": detectable_format_number_highlighted_sections,
    "detectable_format:multiple_sections": detectable_format_multiple_sections,
    "detectable_format:json_format": detectable_format_json_format,
    "detectable_format:title": detectable_format_title,
    "combination:two_responses": combination_two_responses,
    "combination:repeat_prompt": combination_repeat_prompt,
    "startend:end_checker": startend_end_checker,
    "startend:quotation": startend_quotation,
    "change_case:capital_word_frequency": change_case_capital_word_frequency,
    "change_case:english_capital": change_case_english_capital,
    "change_case:english_lowercase": change_case_english_lowercase,
    "punctuation:no_comma": punctuation_no_comma,
}


def corpus(per_family: int = 300, seed: int = 0):
    """(instruction_id, kwargs, response) triples, `per_family` for each of the 25 families."""
    for instruction_id, make in FAMILIES.items():
        rng = random.Random(f"{seed}:{instruction_id}")
        for _ in range(per_family):
            kwargs, response = make(rng)
            yield instruction_id, kwargs, response
