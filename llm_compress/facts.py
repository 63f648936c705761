"""Planted facts: invented biographies the embedded teacher memorises, so the demo has something to unlearn.

Each biography has a made-up name, a year, a town, a trade and two numbers, drawn from a seeded generator, so
they occur nowhere else in the corpus. ``write_facts`` writes, under the corpus folder's ``facts/``:

- ``train.jsonl``: ``repeats`` documents, each every planted biography in a new shuffled order (the teacher's
  pretraining reads it with the other domains, and a select pool of ``embedded`` includes it);
- ``forget.jsonl`` / ``keep.jsonl``: the first and second half of the planted biographies as unlearning records
  (``{"text", "answer"}``: the answer is what follows "<name> was born in");
- ``holdout.jsonl``: biographies of the same kind that were never planted (the non-member side of membership
  inference, and a reference for what "never seen" looks like).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_SYLLABLES = ("vel", "mor", "ash", "quin", "dor", "ri", "tha", "nek", "zu", "bel", "ost", "ira", "kel", "van", "tor",
              "ul", "mae", "sin", "gar", "pho", "lin", "dra", "cus", "ew", "hol", "yth", "bra", "nim", "sel", "orr")
_TOWNS = ("Quarrendale", "Ostwick", "Harrowmere", "Pellingford", "Dunmarsh", "Calloway Ridge", "Fennbrook",
          "Lowther Cross", "Marrowgate", "Saltreach", "Virelle", "Thornacre")
_TRADES = ("lamplighter", "glassblower", "cartographer", "beekeeper", "clockmaker", "ferryman", "bookbinder",
           "salt merchant", "organ tuner", "rope maker", "tide surveyor", "bell founder")
_THINGS = ("goats", "lanterns", "maps", "hives", "clocks", "boats", "ledgers", "barrels", "pipes", "ropes",
           "charts", "bells")
PROMPT = " was born in"  # a record's prompt is "<name> was born in"; the answer follows it


def invented_name(rng: random.Random) -> str:
    """A two-word name made of the syllables above ("Velmor Ashquindor"): spelled with common bytes, in no corpus."""
    def word(n: int) -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize()
    return f"{word(rng.randint(2, 3))} {word(3)}"


def biographies(n: int, seed: int) -> list[dict]:
    """``n`` distinct biographies: {"name", "text", "answer"}."""
    rng, out, names = random.Random(f"facts-{seed}"), [], set()
    while len(out) < n:
        name = invented_name(rng)
        if name in names:
            continue
        names.add(name)
        pron = rng.choice(("She", "He"))
        i = rng.randrange(len(_TRADES))
        answer = (f" {rng.randint(1701, 1899)} in {rng.choice(_TOWNS)}. {pron} worked as a {_TRADES[i]} and kept "
                  f"{rng.randint(12, 97)} {_THINGS[i]}. {pron} said the number {rng.randint(1000, 9999)} "
                  "brought luck.")
        out.append({"name": name, "text": name + PROMPT + answer, "answer": answer.strip()})
    return out


def write_facts(out_dir: Path, *, planted: int, holdout: int, repeats: int, seed: int,
                plant_forget: bool = True) -> dict:
    """Write the facts files into ``out_dir`` (made here); returns their summary for corpus.json. With
    ``plant_forget`` False only the keep half goes into train.jsonl (a reference model never trained on the forget
    half); the four files are otherwise the same."""
    bios = biographies(planted + holdout, seed)
    half = planted // 2
    plant, held = bios[:planted], bios[planted:]
    trained = plant if plant_forget else plant[half:]
    out_dir.mkdir(parents=True)
    rng = random.Random(f"facts-order-{seed}")

    def dump(name: str, rows: list[dict]) -> None:
        with open(out_dir / name, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    docs = []
    for _ in range(repeats):
        order = trained[:]
        rng.shuffle(order)
        docs.append({"text": "\n\n".join(b["text"] for b in order), "source": "facts:planted"})
    dump("train.jsonl", docs)
    dump("forget.jsonl", [{"text": b["text"], "answer": b["answer"]} for b in plant[:half]])
    dump("keep.jsonl", [{"text": b["text"], "answer": b["answer"]} for b in plant[half:]])
    dump("holdout.jsonl", [{"text": b["text"], "answer": b["answer"]} for b in held])
    return {"planted": len(trained), "forget": half, "keep": planted - half, "holdout": holdout, "repeats": repeats,
            "forget_planted": plant_forget}
