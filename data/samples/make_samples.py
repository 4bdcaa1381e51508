"""Writes tiny preference-data samples in the published layouts into data/samples/.

Run with the reference venv from the repository root (deterministic; rerunning rewrites the same
bytes for the same pyarrow / datasets versions):

    /root/.cache/venv-ref/bin/python data/samples/make_samples.py

Files:
  images/*.png                     small PNGs referred to by path
  vlfeedback.jsonl                 VLFeedback (MMInstruction/VLFeedback) records, `img_path` layout
  vlfeedback.parquet               the same records as a hub Parquet file (HF `datasets` features)
  vlfeedback_expected.json         the pairs VL-RLHF's pairing rule gives for several score margins
                                   (computed here with numpy, independently of the Rust code)
  rlhfv.parquet                    RLHF-V (openbmb/RLHF-V-Dataset) rows, PNG bytes embedded in an
                                   HF `Image` column, `text` a JSON string
  rlhfv.jsonl                      the JSON equivalent (image by path)
  conversational_preference.jsonl  TRL conversational preference records (multi-turn, system,
                                   multi-image, implicit prompt)
  conversational_preference.parquet  TRL layout with an embedded `images` list (zstd-compressed)
  codecs/*.parquet                 a text-only record under gzip, lz4, brotli and no compression
  broken/                          files with one bad record each, for the error tests
"""

import io
import json
import os
import struct
import zlib
from itertools import combinations

import numpy as np
import pyarrow.parquet as pq
from datasets import Dataset, Features, Image, List, Value

HERE = os.path.dirname(os.path.abspath(__file__))


def out(*parts):
    path = os.path.join(HERE, *parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def png_bytes(w, h, rgb):
    """A w x h PNG: a solid colour with a one-pixel black top-left corner (pure stdlib)."""
    rows = []
    for y in range(h):
        row = bytearray(b"\x00")
        for x in range(w):
            row += bytes((0, 0, 0) if (x, y) == (0, 0) else rgb)
        rows.append(bytes(row))

    def chunk(tag, data):
        c = struct.pack(">I", len(data)) + tag + data
        return c + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
        + chunk(b"IEND", b"")
    )


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_parquet(path, records, features, compression="snappy"):
    """A Parquet file as the hub holds it: the Arrow table of an HF dataset (its schema carries
    the `huggingface` features metadata), image paths kept as they are (not embedded)."""
    table = Dataset.from_list(records, features=features).data.table
    pq.write_table(table, path, compression=compression)


# ---------------------------------------------------------------------------------------------
# Images referred to by path

IMAGES = {"cat.png": (12, 8, (200, 120, 40)), "dog.png": (8, 12, (90, 90, 200)), "sign.png": (10, 10, (30, 160, 60))}
for name, (w, h, rgb) in IMAGES.items():
    with open(out("images", name), "wb") as f:
        f.write(png_bytes(w, h, rgb))

# ---------------------------------------------------------------------------------------------
# VLFeedback

ASPECTS = ["Helpfulness", "Ethical Considerations", "Visual Faithfulness"]


def completion(model, response, ratings):
    return {
        "annotations": {
            a: {"Rating": r, "Rationale": f"{a} rationale for {model}."} for a, r in zip(ASPECTS, ratings)
        },
        "model": model,
        "response": response,
    }


VLFEEDBACK = [
    {  # several gaps, non-integer means whose gaps differ in the last bit
        "id": "vlf-1",
        "prompt": "What is the animal doing?",
        "models": ["m-a", "m-b", "m-c", "m-d"],
        "completions": [
            completion("m-a", "The cat is sleeping on a mat.", ["5", "4", "4"]),  # 13/3
            completion("m-b", "A dog runs.", ["4", "4", "3"]),  # 11/3
            completion("m-c", "The cat sits.", ["4", "3", "3"]),  # 10/3
            completion("m-d", "Nothing is there.", ["3", "3", "2"]),  # 8/3
        ],
        "img_path": "images/cat.png",
    },
    {  # one completion rated "N/A" takes part in no pair
        "id": "vlf-2",
        "prompt": "<image>\nDescribe the dog.",
        "models": ["m-a", "m-b", "m-c"],
        "completions": [
            completion("m-a", "A blue dog.", ["5", "5", "5"]),
            completion("m-b", "A cat.", ["N/A", "1", "1"]),
            completion("m-c", "A dog, maybe.", ["3", "5", "4"]),
        ],
        "img_path": "images/dog.png",
    },
    {  # all scored completions tie: no pair
        "id": "vlf-3",
        "prompt": "Read the sign.",
        "models": ["m-a", "m-b"],
        "completions": [
            completion("m-a", "It says STOP.", ["4", "4", "4"]),
            completion("m-b", "It says GO.", ["4", "4", "4"]),
        ],
        "img_path": "images/sign.png",
    },
    {  # a single scored completion: no pair
        "id": "vlf-4",
        "prompt": "What colour is the sign?",
        "models": ["m-a", "m-b"],
        "completions": [
            completion("m-a", "Green.", ["5", "5", "5"]),
            completion("m-b", "Red.", ["2", "N/A", "1"]),
        ],
        "img_path": "images/sign.png",
    },
    {  # ratings with spaces, a large and a small gap
        "id": "vlf-5",
        "prompt": "Is there a cat?",
        "models": ["m-a", "m-b", "m-c"],
        "completions": [
            completion("m-a", "Yes.", [" 5", "5 ", "5"]),
            completion("m-b", "No.", ["1", "2", "1"]),
            completion("m-c", "Probably yes.", ["4", "5", "5"]),
        ],
        "img_path": "images/cat.png",
    },
]

write_jsonl(out("vlfeedback.jsonl"), VLFEEDBACK)

RATING = {"Rating": Value("string"), "Rationale": Value("string")}
VLF_FEATURES = Features(
    {
        "id": Value("string"),
        "prompt": Value("string"),
        "models": List(Value("string")),
        "completions": List(
            {
                "annotations": {a: RATING for a in ["Helpfulness", "Ethical Considerations", "Visual Faithfulness"]},
                "model": Value("string"),
                "response": Value("string"),
            }
        ),
        "img_path": Value("string"),
    }
)
write_parquet(out("vlfeedback.parquet"), VLFEEDBACK, VLF_FEATURES)


def vl_rlhf_pairs(record, margin):
    """VL-RLHF's pairing rule (utils/data.py, make_vlfeedback_paired_dataset), restated."""
    comps = record["completions"]
    by_gap = {}
    for i, j in combinations(range(len(comps)), 2):
        try:
            s1 = np.mean([float(v["Rating"]) for v in comps[i]["annotations"].values()])
            s2 = np.mean([float(v["Rating"]) for v in comps[j]["annotations"].values()])
        except ValueError:
            continue
        if s1 > s2:
            pair = (comps[i]["response"], comps[j]["response"])
        elif s2 > s1:
            pair = (comps[j]["response"], comps[i]["response"])
        else:
            continue
        by_gap.setdefault(abs(s1 - s2), []).append(pair)
    if not by_gap:
        return []
    if margin == -1:
        return by_gap[max(by_gap)]
    return [p for gap, pairs in by_gap.items() if gap >= margin for p in pairs]


expected = {
    str(m): [
        {"id": r["id"], "chosen": c, "rejected": rj}
        for r in VLFEEDBACK
        for c, rj in vl_rlhf_pairs(r, m)
    ]
    for m in [-1, 0, 0.5, 1, 3]
}
with open(out("vlfeedback_expected.json"), "w", encoding="utf-8") as f:
    json.dump(expected, f, indent=1)
    f.write("\n")

# ---------------------------------------------------------------------------------------------
# RLHF-V

EMBEDDED = [png_bytes(6, 4, (250, 0, 0)), png_bytes(4, 6, (0, 0, 250)), png_bytes(5, 5, (0, 250, 0))]


def rlhfv(idx, question, chosen, rejected, image):
    return {
        "ds_name": "RLHF-V",
        "image": image,
        "text": json.dumps({"question": question, "chosen": chosen, "rejected": rejected}),
        "origin_dataset": "sample",
        "origin_split": json.dumps({"model": "muffin", "type": "detailed description"}),
        "idx": idx,
        "image_path": f"coco/COCO_train2014_{idx:012d}.jpg",
    }


RLHFV = [
    rlhfv(0, "What is in the image?", "A red rectangle.", "A red circle on a table.", {"bytes": EMBEDDED[0], "path": "red.png"}),
    rlhfv(1, "Describe the image in detail.", "A blue rectangle, taller than wide.", "A blue car.", {"bytes": EMBEDDED[1], "path": "blue.png"}),
    rlhfv(2, "<image>\nWhat colour dominates?", "Green.", "Purple.", {"bytes": EMBEDDED[2], "path": "green.png"}),
    # Same bytes as row 0: one cache file for both.
    rlhfv(3, "Is it red?", "Yes.", "No.", {"bytes": EMBEDDED[0], "path": "red_again.png"}),
    # No embedded bytes: the image's path is resolved against the image root.
    rlhfv(4, "What animal is it?", "A dog.", "A horse.", {"bytes": None, "path": "images/dog.png"}),
]
RLHFV_FEATURES = Features(
    {
        "ds_name": Value("string"),
        "image": Image(),
        "text": Value("string"),
        "origin_dataset": Value("string"),
        "origin_split": Value("string"),
        "idx": Value("int64"),
        "image_path": Value("string"),
    }
)
write_parquet(out("rlhfv.parquet"), RLHFV, RLHFV_FEATURES)

# JSON equivalent: no embedded bytes; `image` null → `image_path` (what VL-RLHF reads).
RLHFV_JSON = [
    {**rlhfv(10, "What is shown?", "A cat.", "A dog.", None), "image_path": "images/cat.png"},
    {**rlhfv(11, "Which animal?", "A dog.", "A cat.", None), "image": {"bytes": None, "path": "images/dog.png"}},
]
write_jsonl(out("rlhfv.jsonl"), RLHFV_JSON)

# ---------------------------------------------------------------------------------------------
# TRL conversational preference


def text(t):
    return {"type": "text", "text": t}


IMG = {"type": "image"}

CONV = [
    {
        "images": ["images/cat.png"],
        "prompt": [{"role": "user", "content": [IMG, text("What animal is this?")]}],
        "chosen": [{"role": "assistant", "content": [text("A cat.")]}],
        "rejected": [{"role": "assistant", "content": [text("A dog.")]}],
    },
    {  # system turn, multi-turn, two images in the first user turn
        "images": ["images/cat.png", "images/dog.png"],
        "prompt": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [IMG, IMG, text("Compare the two pictures.")]},
            {"role": "assistant", "content": "The first is orange, the second blue."},
            {"role": "user", "content": "Which one is taller?"},
        ],
        "chosen": [{"role": "assistant", "content": "The second."}],
        "rejected": [{"role": "assistant", "content": "The first."}],
    },
    {  # implicit prompt: the common leading messages of chosen and rejected
        "images": ["images/sign.png"],
        "chosen": [
            {"role": "user", "content": "<image>\nWhat colour is the sign?"},
            {"role": "assistant", "content": "Green."},
        ],
        "rejected": [
            {"role": "user", "content": "<image>\nWhat colour is the sign?"},
            {"role": "assistant", "content": "Red."},
        ],
    },
    {  # text only
        "prompt": [{"role": "user", "content": "Say hello."}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "No."}],
    },
]
write_jsonl(out("conversational_preference.jsonl"), CONV)

# Parquet as TRL's vision datasets (e.g. trl-lib/rlaif-v): content items as structs, images
# embedded in an `images` list of HF Images.
MSG = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})
CONV_FEATURES = Features({"prompt": MSG, "chosen": MSG, "rejected": MSG, "images": List(Image())})


def item(x):
    return x if "text" in x else {"type": "image", "text": None}


CONV_PQ = [
    {
        "prompt": [{"role": "user", "content": [item(IMG), item(IMG), text("Which is red?")]}],
        "chosen": [{"role": "assistant", "content": [text("The first.")]}],
        "rejected": [{"role": "assistant", "content": [text("The second.")]}],
        "images": [{"bytes": EMBEDDED[0], "path": None}, {"bytes": EMBEDDED[1], "path": None}],
    },
    {
        "prompt": [{"role": "user", "content": [item(IMG), text("Colour?")]}],
        "chosen": [{"role": "assistant", "content": [text("Green.")]}],
        "rejected": [{"role": "assistant", "content": [text("Blue.")]}],
        "images": [{"bytes": EMBEDDED[2], "path": None}],
    },
]
write_parquet(out("conversational_preference.parquet"), CONV_PQ, CONV_FEATURES, compression="zstd")

# The text-only records once per further codec the hub's files use (snappy and zstd are above).
TEXT_ONLY = [
    {
        "prompt": [{"role": "user", "content": [text("Say hello.")]}],
        "chosen": [{"role": "assistant", "content": [text("Hello!")]}],
        "rejected": [{"role": "assistant", "content": [text("No.")]}],
    }
]
for codec in ["gzip", "lz4", "brotli", "none"]:
    features = Features({"prompt": MSG, "chosen": MSG, "rejected": MSG})
    write_parquet(out("codecs", f"conversational_{codec}.parquet"), TEXT_ONLY, features, compression=codec)

# ---------------------------------------------------------------------------------------------
# Broken files: one bad record each.

# Row 2: `text` is not JSON.
bad = [dict(r) for r in RLHFV[:3]]
bad[1]["text"] = "{question: unquoted"
write_parquet(out("broken", "rlhfv_bad_text.parquet"), bad, RLHFV_FEATURES)

# Line 2: a rating that is a list (not a number or a numeric string).
bad = json.loads(json.dumps(VLFEEDBACK[:2]))
bad[1]["completions"][2]["annotations"]["Visual Faithfulness"]["Rating"] = [4]
write_jsonl(out("broken", "vlfeedback_bad_rating.jsonl"), bad)

# Line 3: the chosen answer is a user message.
bad = json.loads(json.dumps(CONV))
bad[2]["chosen"][1]["role"] = "user"
write_jsonl(out("broken", "conversational_bad_role.jsonl"), bad)

for root, _, files in os.walk(HERE):
    for name in sorted(files):
        if not name.endswith(".py"):
            p = os.path.join(root, name)
            print(f"{os.path.relpath(p, HERE)}: {os.path.getsize(p)} bytes")
