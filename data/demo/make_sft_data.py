#!/usr/bin/env python3
"""Writes the demo SFT data under data/demo/sft/ (deterministic; Python 3 + Pillow).

The data is meant for the tiny LLaVA fixture (fixtures/tiny-llava: 30x30 CLIP input, 25 tokens
per image, 128 positions), so the task is small and learnable: each image shows one shape
(circle, square, triangle) in one colour (red, green, blue, yellow) on a white or black
background, and every answer is a fixed function of the image and the question.

Outputs (image paths are bare file names, to be joined to `image_root = "data/demo/sft/images"`):

  images/<colour>_<shape>_<background>.png   24 PNG images, 32x32 RGB
  llava.json      LLaVA format (single-turn, two-round and two-image records)
  vlquery.jsonl   vlquery_json format
  flamingo.jsonl  Instruct-Flamingo format (`<img_path>file<img_path>` inline)
  text.jsonl      text format, text-only conversations
  captions.json   LLaVA-format captions, one per image (stage 1: projector pretraining)

Nothing is random: records are chosen by fixed index arithmetic, so running the script again
rewrites byte-identical files. After writing, the records are checked against the rules of
resonance-core/src/data/format.rs (fields, roles, placeholder counts, image files).

Usage (from the repository root or anywhere):

    python3 data/demo/make_sft_data.py            # write data/demo/sft/ and check it
    python3 data/demo/make_sft_data.py --check    # only check the existing files
"""

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent / "sft"
IMAGES = OUT / "images"

SIZE = 32
SHAPES = ["circle", "square", "triangle"]
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 20),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}


class Img:
    """One demo image: its attributes and file name."""

    def __init__(self, shape, colour, background):
        self.shape = shape
        self.colour = colour
        self.background = background
        self.name = f"{colour}_{shape}_{background}.png"


# Fixed order: shape, then colour, then background (index = 8*shape + 2*colour + background).
ALL = [Img(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS]


def find(shape, colour, background):
    return next(
        i for i in ALL if (i.shape, i.colour, i.background) == (shape, colour, background)
    )


def draw(img):
    """Renders one image (no antialiasing: the pixels depend only on the attributes)."""
    im = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[img.background])
    d = ImageDraw.Draw(im)
    fill = COLOURS[img.colour]
    if img.shape == "circle":
        d.ellipse((5, 5, 26, 26), fill=fill)
    elif img.shape == "square":
        d.rectangle((7, 7, 24, 24), fill=fill)
    else:
        d.polygon([(16, 4), (28, 27), (3, 27)], fill=fill)
    return im


# ---------------------------------------------------------------------------------------------
# Questions. Each kind maps an image to (question, answer); answers are lowercase, 1-4 words.

QUESTIONS = [
    ("What colour is the shape?", lambda i: f"{i.colour}."),
    ("What shape is it?", lambda i: f"{i.shape}."),
    ("What colour is the background?", lambda i: f"{i.background}."),
    ("What is in the image?", lambda i: f"a {i.colour} {i.shape}."),
]
# Follow-up questions for the second round of two-round records: (question, answer).
FOLLOW_UPS = [
    ("And its shape?", lambda i: f"{i.shape}."),
    ("And its colour?", lambda i: f"{i.colour}."),
    ("And the background?", lambda i: f"{i.background}."),
]
CAPTION_PROMPT = "Describe the image briefly."
SAME_COLOUR = "Are the two shapes the same colour?"
SAME_SHAPE = "Do both images show the same shape?"


def qa(kind, img):
    q, a = QUESTIONS[kind]
    return q, a(img)


def kind_for(index, offset):
    """Question kind for image `index`; mixes shape, colour and background so that every kind is
    asked about every attribute value."""
    img = ALL[index]
    s = SHAPES.index(img.shape)
    c = list(COLOURS).index(img.colour)
    b = list(BACKGROUNDS).index(img.background)
    return (s + c + 2 * b + offset) % 4


def pair(k, same_colour):
    """A deterministic pair of distinct images; same colour (different shape) or not."""
    a = ALL[(k * 7) % len(ALL)]
    colours = list(COLOURS)
    shape_b = SHAPES[(SHAPES.index(a.shape) + 1 + k % 2) % 3]
    colour_b = a.colour if same_colour else colours[(colours.index(a.colour) + 1 + k % 3) % 4]
    bg_b = list(BACKGROUNDS)[(k // 2) % 2]
    return a, find(shape_b, colour_b, bg_b)


def shape_pair(k, same_shape):
    """A deterministic pair of distinct images; same shape (different colour) or not."""
    a = ALL[(k * 11 + 3) % len(ALL)]
    colours = list(COLOURS)
    shape_b = a.shape if same_shape else SHAPES[(SHAPES.index(a.shape) + 1 + k % 2) % 3]
    colour_b = colours[(colours.index(a.colour) + 1 + k % 3) % 4]
    bg_b = list(BACKGROUNDS)[k % 2]
    return a, find(shape_b, colour_b, bg_b)


def yes_no(flag):
    return "yes." if flag else "no."


# ---------------------------------------------------------------------------------------------
# Datasets


def llava_records():
    recs = []

    def add(image, turns):
        convs = []
        for q, a in turns:
            convs.append({"from": "human", "value": q})
            convs.append({"from": "gpt", "value": a})
        recs.append({"id": f"llava-{len(recs):03d}", "image": image, "conversations": convs})

    # 24 single-turn records, one per image.
    for n, img in enumerate(ALL):
        q, a = qa(kind_for(n, 0), img)
        add(img.name, [("<image>\n" + q, a)])
    # 10 two-round records.
    for k in range(10):
        img = ALL[(k * 5) % len(ALL)]
        first = 0 if k % 2 == 0 else 1  # colour first, or shape first
        q1, a1 = qa(first, img)
        fq, fa = FOLLOW_UPS[2 if k % 5 == 4 else (0 if first == 0 else 1)]
        add(img.name, [("<image>\n" + q1, a1), (fq, fa(img))])
    # 6 two-image records: same colour? (3 yes, 3 no)
    for k in range(6):
        same = k % 2 == 0
        a, b = pair(k, same)
        add([a.name, b.name], [("<image>\n<image>\n" + SAME_COLOUR, yes_no(same))])
    return recs


def vlquery_records():
    recs = []

    def add(image, turns, placeholder):
        convs = []
        for j, (q, a) in enumerate(turns):
            if j == 0 and placeholder:
                q = "<image>\n" + q
            convs.append({"from": "user", "value": q})
            convs.append({"from": "assistant", "value": a})
        recs.append({"image": image, "conversations": convs})

    # Every fifth record has no `<image>` placeholder: format.rs then puts the image at the
    # start of the first user turn (the same place the placeholder would put it).
    # 24 single-turn records, one per image, question kinds shifted against llava.json.
    for n, img in enumerate(ALL):
        add(img.name, [qa(kind_for(n, 1), img)], placeholder=len(recs) % 5 != 4)
    # 6 two-round records.
    for k in range(6):
        img = ALL[(k * 5 + 2) % len(ALL)]
        first = 1 if k % 2 == 0 else 0
        q1, a1 = qa(first, img)
        fq, fa = FOLLOW_UPS[1 if first == 1 else 2]
        add(img.name, [(q1, a1), (fq, fa(img))], placeholder=len(recs) % 5 != 4)
    return recs


def flamingo_records():
    recs = []

    def tag(img):
        return f"<img_path>{img.name}<img_path>"

    # 16 single-image records.
    for k in range(16):
        img = ALL[(k * 7) % len(ALL)]
        q, a = qa(kind_for((k * 7) % len(ALL), 2), img)
        recs.append({"input": f"{tag(img)}\n{q}", "output": a})
    # 4 two-image records: same shape? (2 yes, 2 no)
    for k in range(4):
        same = k % 2 == 1
        a, b = shape_pair(k, same)
        recs.append({"input": f"{tag(a)}\n{tag(b)}\n{SAME_SHAPE}", "output": yes_no(same)})
    return recs


TEXT_QA = [
    ("What colour is a banana?", "yellow."),
    ("What colour is grass?", "green."),
    ("What colour is the sky?", "blue."),
    ("What colour is snow?", "white."),
    ("What colour is coal?", "black."),
    ("What colour is a strawberry?", "red."),
    ("What colour is a lemon?", "yellow."),
    ("What colour is a leaf?", "green."),
    ("What colour is the sea?", "blue."),
    ("What colour is milk?", "white."),
    ("How many sides does a triangle have?", "three."),
    ("How many sides does a square have?", "four."),
    ("How many corners does a circle have?", "none."),
    ("What is two plus two?", "four."),
    ("What is one plus two?", "three."),
    ("What is five minus three?", "two."),
    ("What is three plus three?", "six."),
    ("What is four minus four?", "zero."),
]
TEXT_MULTI = [
    [("What colour is a tomato?", "red."), ("And a lemon?", "yellow.")],
    [("What is one plus one?", "two."), ("And two plus three?", "five.")],
]


def text_records():
    recs = []
    for turns in [[t] for t in TEXT_QA] + TEXT_MULTI:
        msgs = []
        for q, a in turns:
            msgs.append({"role": "user", "content": q})
            msgs.append({"role": "assistant", "content": a})
        recs.append({"messages": msgs})
    return recs


def caption_records():
    return [
        {
            "id": f"cap-{n:03d}",
            "image": img.name,
            "conversations": [
                {"from": "human", "value": "<image>\n" + CAPTION_PROMPT},
                {"from": "gpt", "value": f"a {img.colour} {img.shape} on {img.background}."},
            ],
        }
        for n, img in enumerate(ALL)
    ]


# ---------------------------------------------------------------------------------------------
# Writing


def dumps(rec):
    return json.dumps(rec, ensure_ascii=True)


def write_text(path, text):
    with open(path, "w", encoding="ascii", newline="\n") as f:
        f.write(text)


def write_json_array(path, recs):
    """A JSON array with one record per line."""
    write_text(path, "[\n" + ",\n".join(dumps(r) for r in recs) + "\n]\n")


def write_jsonl(path, recs):
    write_text(path, "".join(dumps(r) + "\n" for r in recs))


DATASETS = [
    # (file, format, records function, writer)
    ("llava.json", "llava", llava_records, write_json_array),
    ("vlquery.jsonl", "vlquery_json", vlquery_records, write_jsonl),
    ("flamingo.jsonl", "flamingo", flamingo_records, write_jsonl),
    ("text.jsonl", "text", text_records, write_jsonl),
    ("captions.json", "llava", caption_records, write_json_array),
]


def generate():
    IMAGES.mkdir(parents=True, exist_ok=True)
    for img in ALL:
        draw(img).save(IMAGES / img.name, format="PNG", compress_level=9)
    for name, _fmt, make, write in DATASETS:
        write(OUT / name, make())


# ---------------------------------------------------------------------------------------------
# Checking (mirrors resonance-core/src/data/format.rs)

ROLES = {
    "llava": ("conversations", "from", "value", {"human": "user", "gpt": "assistant",
                                                  "system": "system", "user": "user",
                                                  "assistant": "assistant"}),
    "vlquery_json": ("conversations", "from", "value", {"user": "user", "assistant": "assistant",
                                                         "system": "system", "human": "user",
                                                         "gpt": "assistant"}),
    "text": ("messages", "role", "content", {"user": "user", "assistant": "assistant",
                                             "system": "system"}),
}


def load(path):
    text = path.read_text(encoding="ascii")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def check_record(fmt, rec):
    """Returns (roles, images, placeholders) of one record, raising on anything format.rs
    would reject."""
    assert isinstance(rec, dict), "record is not an object"
    if fmt == "flamingo":
        assert isinstance(rec.get("input"), str), "input"
        assert isinstance(rec.get("output"), str), "output"
        pieces = rec["input"].split("<img_path>")
        assert len(pieces) % 2 == 1, "unbalanced <img_path>"
        assert "<img_path>" not in rec["output"], "image in output"
        images = pieces[1::2]
        return ["user", "assistant"], images, len(images)
    turns_key, role_key, value_key, names = ROLES[fmt]
    image_key = "images" if fmt == "text" else "image"
    raw = rec.get(image_key)
    images = [] if raw is None else [raw] if isinstance(raw, str) else raw
    assert isinstance(images, list) and all(isinstance(i, str) and i for i in images), image_key
    turns = rec.get(turns_key)
    assert isinstance(turns, list) and turns, turns_key
    roles, placeholders = [], 0
    for t in turns:
        assert isinstance(t, dict), "turn is not an object"
        assert t.get(role_key) in names, f"unknown role {t.get(role_key)!r}"
        assert isinstance(t.get(value_key), str), value_key
        roles.append(names[t[role_key]])
        placeholders += t[value_key].count("<image>")
    if placeholders == 0 and images and fmt != "text":
        placeholders = len(images)  # placed at the start of the first user turn
    return roles, images, placeholders


def check():
    names = {img.name for img in ALL}
    found = {p.name for p in IMAGES.glob("*.png")}
    assert found == names, f"image files differ: {sorted(found ^ names)}"
    for name, fmt, _make, _write in DATASETS:
        recs = load(OUT / name)
        for n, rec in enumerate(recs):
            where = f"{name} record {n}"
            try:
                roles, images, placeholders = check_record(fmt, rec)
            except AssertionError as e:
                raise AssertionError(f"{where}: {e}") from None
            assert placeholders == len(images), (
                f"{where}: {len(images)} images, {placeholders} placeholders"
            )
            expect = ["user", "assistant"] * (len(roles) // 2 + 1)
            ok = roles == expect[: len(roles)] and roles[-1] == "assistant"
            assert ok, f"{where}: roles {roles}"
            for i in images:
                assert (IMAGES / i).is_file(), f"{where}: missing image {i}"
            assert json.dumps(rec, ensure_ascii=True).isascii()
        print(f"{name:15} {fmt:13} {len(recs):3} records ok")
    print(f"images/         {len(names):3} png files ok")


if __name__ == "__main__":
    if sys.argv[1:] not in ([], ["--check"]):
        sys.exit(__doc__)
    if not sys.argv[1:]:
        generate()
    check()
