"""A corpus of varied strings for comparing tokenizers with their reference libraries (tests and benchmark).

Prose in many scripts, code, CJK, emoji with ZWJ sequences, combining marks, right-to-left text, control
characters, special-token text, long runs (past Meta's 25k-character and 400k-character cuts) and random Unicode
drawn with a fixed seed. `corpus()` is deterministic; `random_id_lists` draws id sequences (split UTF-8, special
tokens) for decode checks.
"""

from __future__ import annotations

import random

PROSE = [
    "The capital of France is Paris.",
    "Don't stop believing; it's what we'll do, isn't it? I'm sure they've gone and you'd agree.",
    "Le cœur a ses raisons que la raison ne connaît point. Ça va très bien, merci !",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. Straße, Maß, Fußgängerübergänge.",
    "¿Dónde está la biblioteca? ¡Qué día tan bonito! El niño comió piña.",
    "Москва — столица России. Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο. Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "العربية لغة جميلة، وهي من أكثر اللغات انتشاراً في العالم. مرحبا بكم!",
    "עברית היא שפה שמית. שלום עולם, מה שלומך היום?",
    "हिन्दी भारत की एक प्रमुख भाषा है। नमस्ते दुनिया!",
    "বাংলা ভাষা দক্ষিণ এশিয়ার একটি ভাষা। আমি তোমাকে ভালোবাসি।",
    "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ สวัสดีครับ ยินดีต้อนรับ",
    "北京是中国的首都。我爱自然语言处理，分词很有意思！",
    "東京は日本の首都です。ひらがな、カタカナ、漢字を混ぜて書きます。ｶﾀｶﾅ半角もある。",
    "서울은 대한민국의 수도입니다. 안녕하세요, 반갑습니다!",
    "Tiếng Việt có nhiều dấu thanh: à á ả ã ạ, ư ơ ê ô đ. Xin chào thế giới!",
    "İstanbul'da ılık bir akşam; şöyle güzel, öğle ç ğ ı ş ü ö.",
    "ქართული ენა ძალიან ლამაზია. გამარჯობა!",
    "Հայերենը հնդեվրոպական լեզու է։ Բարեւ աշխարհ։",
    "አማርኛ የኢትዮጵያ ቋንቋ ነው። ሰላም ለዓለም።",
    "தமிழ் ஒரு பழமையான மொழி. வணக்கம் உலகம்!",
    "Ελληνικά, русский, English, 中文, 日本語, 한국어 and עברית in one line.",
    "Numbers: 0 1 12 123 1234 12345 3.14159 -2.5e-10 1,000,000 ١٢٣ ४५६ 七八九 ⅫⅣ ½ ²³",
    "Punctuation!!! ??? ... --- *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}} ||| \\\\ /// ~~~ ```",
    "URL https://example.com/path?q=1&x=%20y#frag and mail someone@example.org, path C:\\Users\\me\\file.txt",
]

CODE = [
    'def f(x: int) -> int:\n    """Double."""\n    return 2 * x  # comment\n',
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    'const greet = (name) => `Hello, ${name}!`;\nconsole.log(greet("world"));\n',
    '{"key": [1, 2.5, null, true], "nested": {"a": "b\\n"}, "unicode": "\\u00e9"}',
    '<html>\n  <body class="main">\n    <p>Hi &amp; bye</p>\n  </body>\n</html>\n',
    '#!/bin/bash\nset -euo pipefail\nfor f in *.txt; do echo "$f" | wc -l; done\n',
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;",
    'fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!("{:?}", v);\n}\n',
    "    \n\t\t\n   x = [i**2 for i in range(10) if i % 2 == 0]\r\n",
    "import numpy as np\n\nA = np.zeros((3, 4), dtype=np.float32)\nprint(A.shape)  # (3, 4)\n",
]

EMOJI = [
    "👨‍👩‍👧‍👦 family, 👩🏽‍💻 coder, 🏳️‍🌈 flag, 🧑🏿‍🤝‍🧑🏻 people",
    "Flags 🇫🇷🇩🇪🇯🇵🇺🇸 and keycaps 1️⃣ #️⃣ *️⃣, skin tones 👍🏻👍🏼👍🏽👍🏾👍🏿",
    "😀😃😄😁😆😅🤣😂🙂🙃 ❤️ ♥ ☺️ ✌️ 🫠 🫶🏽",
    "🏴󠁧󠁢󠁳󠁣󠁴󠁿 Scotland tag sequence, 👁️‍🗨️ eye in bubble",
]

COMBINING = [
    "e\u0301 a\u0300 o\u0308 n\u0303 c\u0327",  # decomposed accents
    "Z\u0351\u036b\u0343a\u0310\u0313l\u0335g\u0334o\u0336 text with stacked marks",
    "\u1100\u1161\u11a8 decomposed Hangul, \u0915\u094d\u0937 Devanagari conjunct",
    "\u0041\u030a \u00c5 \u212b three forms of Å",
    "ﬁ ﬂ ﬀ ligatures, ＡＢＣ fullwidth, ℌ𝔢𝔩𝔩𝔬 math letters, 𝟙𝟚𝟛",
]

RTL_AND_CONTROL = [
    "abc \u202eolleh\u202c def",  # right-to-left override
    "\u200fمرحبا\u200e hello \u2067عربي\u2069",
    "tab\tnewline\ncarriage\rreturn\r\nvertical\x0bform\x0cfeed",
    "nul\x00byte, bell\x07, escape\x1b[31mred\x1b[0m, delete\x7f",
    "zero\u200bwidth\u200cjoiner\u200dnbsp\u00a0thin\u2009ideographic\u3000space",
    "\ufeffBOM at start, line\u2028separator, para\u2029separator, soft\u00adhyphen",
    "\x01\x02\x03\x04\x05\x06\x08\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1c\x1d\x1e\x1f",
]

SPECIAL_TEXT = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|python_tag|>",
    "<|image|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_5|>",
    "<|reserved_special_token_245|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eot|>",
    "<|eom|>",
    "<|python_start|>",
    "<|vision_reserved_special_token_100|>",
    "<|reasoning_thinking_start|>",
    "<s>",
    "</s>",
    "<unk>",
    "<repo_name>",
    "<file_sep>",
    "<jupyter_code>",
    "<|im_start",
    "im_end|>",
    "<|eot_id",
    "< |eot_id|>",
]

WORDS = ["the", "of", "and", "to", "in", "is", "was", "he", "for", "it", "with", "as", "his", "on", "be", "at"]


def _special_mixes(rng: random.Random) -> list[str]:
    mixes = []
    for special in SPECIAL_TEXT:
        mixes += [
            f"Hello{special}world",
            f" {special} ",
            f"{special}\n{special}",
            f"a{special}{special}b",
            f"{special}user\nHi there{special}\n",
        ]
    for _ in range(60):
        parts = rng.choices(SPECIAL_TEXT + WORDS + [" ", "\n", "  "], k=rng.randint(2, 12))
        mixes.append("".join(parts))
    # chat transcripts, as the templates write them
    mixes.append(
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    mixes.append(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    mixes.append("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] More [/INST]")
    return mixes


def _variants(text: str) -> list[str]:
    """Variants that move word boundaries and whitespace around."""
    return [
        text,
        " " + text,
        text + " ",
        "  " + text + "\n",
        text.upper(),
        text.lower(),
        text.replace(" ", "\n"),
        text.replace(" ", "  "),
        text.replace(" ", "\t"),
        "\n\n" + text + "\r\n",
        text[: len(text) // 2],
        text[len(text) // 3 :],
    ]


def _random_unicode(rng: random.Random, n: int) -> list[str]:
    # Blocks weighted towards what text holds; surrogates (not encodable) are never drawn.
    ranges = [
        (0x20, 0x7E),
        (0x00, 0x1F),
        (0xA0, 0x24F),
        (0x300, 0x36F),
        (0x370, 0x52F),
        (0x590, 0x6FF),
        (0x900, 0xDFF),
        (0x1100, 0x11FF),
        (0x2000, 0x206F),
        (0x2100, 0x2BFF),
        (0x3000, 0x30FF),
        (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0xE000, 0xF8FF),
        (0xFB00, 0xFFFD),
        (0x10000, 0x1FAFF),
        (0x20000, 0x2FFFF),
        (0xE0000, 0xE007F),
        (0xF0000, 0x10FFFF),
    ]
    strings = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 40)):
            low, high = rng.choice(ranges)
            chars.append(chr(rng.randint(low, high)))
        strings.append("".join(chars))
    return strings


def _mixed(rng: random.Random, n: int) -> list[str]:
    """Random concatenations of pieces of the other groups."""
    pool = PROSE + CODE + EMOJI + COMBINING + RTL_AND_CONTROL + SPECIAL_TEXT
    strings = []
    for _ in range(n):
        pieces = rng.sample(pool, rng.randint(2, 4))
        cuts = [piece[rng.randint(0, len(piece) // 2) :] for piece in pieces]
        strings.append(rng.choice(["", " ", "\n", "\t"]).join(cuts))
    return strings


def long_runs() -> list[str]:
    """Long texts: runs around Meta's 25k-character cut and one text past its 400k-character chunking."""
    prose = " ".join(PROSE)
    return [
        "a" * 25_000,
        "a" * 25_001,
        "ab" * 30_000,
        " " * 26_000 + "x",
        "x" + "\n" * 30_000,
        "1234567890" * 6_000,
        "€" * 27_000,
        "😀" * 26_000,
        ("word " * 5) + "z" * 60_000 + " end",
        "\t " * 13_000 + "tail" + " " * 40_000,
        (prose + "\n") * (410_000 // (len(prose) + 1) + 1),
    ]


def corpus(seed: int = 0) -> list[str]:
    """About 2,700 strings across scripts and edge cases, the same on every call."""
    rng = random.Random(seed)
    strings = []
    for text in PROSE + CODE + EMOJI + COMBINING + RTL_AND_CONTROL:
        strings += _variants(text)
    strings += SPECIAL_TEXT + _special_mixes(rng)
    strings += ["", " ", "\n", "  ", "\t", "\r\n", "a", "A", "0", "'", "'s", "I'm", "DON'T", "x" * 100, " " * 100]
    strings += _random_unicode(rng, 900)
    strings += _mixed(rng, 900)
    strings += long_runs()
    return strings


def random_id_lists(vocab_size: int, n: int, seed: int = 0, special_ids: list[int] | None = None) -> list[list[int]]:
    """`n` random id sequences [pos] (1 to 30 ids): any id, so multi-byte characters come split and special
    tokens land anywhere."""
    rng = random.Random(seed)
    lists = []
    for _ in range(n):
        ids = [rng.randrange(vocab_size) for _ in range(rng.randint(1, 30))]
        if special_ids:
            for _ in range(rng.randint(0, 3)):
                ids.insert(rng.randint(0, len(ids)), rng.choice(special_ids))
        lists.append(ids)
    return lists
