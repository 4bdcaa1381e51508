#!/usr/bin/env python3
"""Writes data/demo/dpo/pairs.jsonl: preference pairs (`plain_dpo` format) over the demo images
of data/demo/sft/images (made by make_sft_data.py), data/demo/kto/unpaired.jsonl: the same
answers as unpaired records (`unpaired` format: chosen → label true, rejected → label false), and
data/demo/reward/heldout.jsonl: held-out pairs for a reward model trained on pairs.jsonl — the
same images and questions with wrong answers that pairs.jsonl never rejects for that image, so
ranking them needs the image; and data/demo/reward/ranked.jsonl: ranked lists of three
descriptions per image (`ranked` format: colour and shape right > only the colour right > both
wrong), some given as `scores`, some in Vision-LLM-Alignment's `conversations` layout.
Deterministic; standard library only.

    python3 data/demo/make_dpo_data.py
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
BACKGROUNDS = ["white", "black"]


def main() -> None:
    pairs = []
    i = 0
    for background in BACKGROUNDS:
        for shape in SHAPES:
            for colour in COLOURS:
                image = f"{colour}_{shape}_{background}.png"
                wrong_colour = COLOURS[(COLOURS.index(colour) + 1 + i % 3) % 4]
                wrong_shape = SHAPES[(SHAPES.index(shape) + 1 + i % 2) % 3]
                other_bg = BACKGROUNDS[1 - BACKGROUNDS.index(background)]
                pairs.append({"image": image, "prompt": "What colour is the shape?",
                              "chosen": f"{colour}.", "rejected": f"{wrong_colour}."})
                pairs.append({"image": image, "prompt": "What shape is it?",
                              "chosen": f"{shape}.", "rejected": f"{wrong_shape}."})
                pairs.append({"image": image, "prompt": "What colour is the background?",
                              "chosen": f"{background}.", "rejected": f"{other_bg}."})
                i += 1
    # Two images in one prompt, placed by placeholders.
    for k, (a, b, same) in enumerate([
        ("red_circle_white.png", "red_square_black.png", True),
        ("blue_triangle_white.png", "green_triangle_black.png", False),
        ("yellow_square_black.png", "yellow_circle_white.png", True),
        ("green_circle_white.png", "red_circle_black.png", False),
    ]):
        pairs.append({"images": [a, b], "prompt": "<image>\n<image>\nSame colour?",
                      "chosen": "yes." if same else "no.", "rejected": "no." if same else "yes."})
    # Text only.
    pairs.append({"prompt": "What colour is a banana?", "chosen": "yellow.", "rejected": "blue."})
    pairs.append({"prompt": "What colour is grass?", "chosen": "green.", "rejected": "red."})
    out = HERE / "dpo" / "pairs.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    print(f"wrote {len(pairs)} pairs to {out}")

    heldout = []
    i = 0
    for background in BACKGROUNDS:
        for shape in SHAPES:
            for colour in COLOURS:
                image = f"{colour}_{shape}_{background}.png"
                other_colour = COLOURS[(COLOURS.index(colour) + 1 + (i + 1) % 3) % 4]
                other_shape = SHAPES[(SHAPES.index(shape) + 1 + (i + 1) % 2) % 3]
                heldout.append({"image": image, "prompt": "What colour is the shape?",
                                "chosen": f"{colour}.", "rejected": f"{other_colour}."})
                heldout.append({"image": image, "prompt": "What shape is it?",
                                "chosen": f"{shape}.", "rejected": f"{other_shape}."})
                i += 1
    out = HERE / "reward" / "heldout.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(p) + "\n" for p in heldout))
    print(f"wrote {len(heldout)} held-out pairs to {out}")

    ranked = []
    i = 0
    for background in BACKGROUNDS:
        for shape in SHAPES:
            for colour in COLOURS:
                image = f"{colour}_{shape}_{background}.png"
                wrong_colour = COLOURS[(COLOURS.index(colour) + 1 + i % 3) % 4]
                wrong_shape = SHAPES[(SHAPES.index(shape) + 1 + i % 2) % 3]
                best = f"a {colour} {shape}."
                middle = f"a {colour} {wrong_shape}."
                worst = f"a {wrong_colour} {wrong_shape}."
                if i % 4 == 1:
                    # Scores in a shuffled order: the loader sorts by score.
                    ranked.append({"image": image, "prompt": "Describe the shape.",
                                   "responses": [middle, worst, best], "scores": [5, 1, 9]})
                elif i % 4 == 3:
                    ranked.append({"id": f"ranked-{i}", "image": image, "conversations": [
                        {"from": "human", "value": "<image>\nDescribe the shape."},
                        {"from": "gpt", "value": [best, middle, worst]}]})
                else:
                    ranked.append({"image": image, "prompt": "Describe the shape.",
                                   "responses": [best, middle, worst]})
                i += 1
    out = HERE / "reward" / "ranked.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in ranked))
    print(f"wrote {len(ranked)} ranked lists to {out}")

    unpaired = []
    for p in pairs:
        images = {k: p[k] for k in ("image", "images") if k in p}
        unpaired.append({**images, "prompt": p["prompt"], "completion": p["chosen"], "label": True})
        unpaired.append({**images, "prompt": p["prompt"], "completion": p["rejected"], "label": False})
    out = HERE / "kto" / "unpaired.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in unpaired))
    print(f"wrote {len(unpaired)} unpaired records to {out}")


if __name__ == "__main__":
    main()
