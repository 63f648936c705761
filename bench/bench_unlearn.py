"""Unlearning bench: SHRED, K-FADE and the baselines on a teacher that has memorised its planted biographies,
against the retrained reference (the same teacher never trained on the forget half), before and after 4-bit
quantization.

    python bench/bench_unlearn.py                 # trains the two teachers once (artifacts/bench-unlearn/), ~15 min
    python bench/bench_unlearn.py --from-json     # redraw the plot and the table from bench/unlearn.json

Both teachers are the embedded world's Llama (4 layers, 128 wide) pretrained for ``--steps`` steps on the embedded
corpus with 16 invented biographies planted 300 times (``embedded.facts``); the reference plants the keep half only
(``facts_plant_forget: false``). Every method unlearns the 8 forget biographies from the planted teacher at three
strengths; each result is then quantized with GPTQ at W4A16 (group 32) and W4A4KV4 (group 32, activations and KV
fake-quantized per token), and every model is probed with :mod:`llm_compress.unlearn.metrics` on the forget and keep
sets (Min-K% AUC against the 16 never-planted biographies) and on 64 held-out general rows (perplexity, KL to the
planted teacher). Writes bench/unlearn.json, bench/unlearn_pareto.png and prints the markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GRID = [  # (label, method section): three strengths each, the other fields at their defaults
    *[(f"shred-P{p}", {"method": "shred", "forget_share": p}) for p in (0.1, 0.2, 0.3)],  # 80 steps, lr 1e-4
    *[(f"kfade-{e}", {"method": "kfade", "trust_region": e}) for e in (0.003, 0.01, 0.03)],  # 3 steps
    *[(f"ga-{n}", {"method": "gradient_ascent", "steps": n}) for n in (5, 10, 20)],  # lr 1e-4
    *[(f"gd-{n}", {"method": "gradient_difference", "steps": n}) for n in (10, 20, 40)],
    *[(f"npo-{n}", {"method": "npo", "steps": n}) for n in (10, 20, 40)],
]
SETTINGS = ("W4A16", "W4A4KV4")


def teacher(folder: Path, steps: int, plant_forget: bool, tokenizer_dir: Path | None = None) -> Path:
    from llm_compress import bootstrap
    from llm_compress.pipeline.bootstrap import EmbeddedConfig
    from llm_compress.schema import RuntimeConfig

    if not (folder / "teacher" / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(folder.name + ".tmp")
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        cfg = EmbeddedConfig(steps=steps, facts_plant_forget=plant_forget)
        bootstrap.run(cfg, RuntimeConfig(device="cpu", progress=False), train_teacher=True, out_dir=tmp,
                      tokenizer_dir=tokenizer_dir)
        shutil.rmtree(folder)
        tmp.rename(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench-unlearn"))
    ap.add_argument("--steps", type=int, default=800, help="teacher pretraining steps")
    ap.add_argument("--out", default=str(ROOT / "bench" / "unlearn.json"))
    ap.add_argument("--from-json", action="store_true")
    ap.add_argument("--only", nargs="*", help="labels of GRID to run (default: all)")
    ap.add_argument("--grid", help="JSON list of [label, unlearn.method section] replacing GRID (for tuning)")
    a = ap.parse_args()
    out = Path(a.out)
    if a.from_json:
        res = json.loads(out.read_text())
    else:
        grid = [tuple(x) for x in json.loads(a.grid)] if a.grid else GRID
        res = run(Path(a.work), a.steps, a.only, grid)
        out.write_text(json.dumps(res, indent=1))
    plot(res, out.with_name("unlearn_pareto.png"))
    print(table(res))


def run(work: Path, steps: int, only: list[str] | None, grid: list = GRID) -> dict:
    import torch

    from llm_compress.quantize.config import QuantizeConfig

    from llm_compress.schema import ModelsConfig, RuntimeConfig

    from llm_compress.unlearn.config import UnlearnConfig
    from llm_compress.data import load_texts, pack, save_tokens
    from llm_compress.modeling import load_causal_lm, load_tokenizer, save_pretrained_atomic_into
    from llm_compress.quantize.apply import run as quantize
    from llm_compress.unlearn import build, load_sets, measure, summary
    from llm_compress.unlearn.base import UnlearnData
    from llm_compress.unlearn.metrics import utility_metrics

    torch.set_num_threads(2)
    t0 = time.time()
    planted = teacher(work / "planted", steps, True)
    reference = teacher(work / "reference", steps, False, planted / "tokenizer")  # the same token ids
    tok = load_tokenizer(str(planted / "tokenizer"))
    corpus = planted / "corpus"
    domains = ("prose", "code", "docstrings")
    train = pack(load_texts([corpus / d / "train.jsonl" for d in domains]), tok, 128, "bench train")
    g = torch.Generator().manual_seed(0)
    general = train[torch.randperm(len(train), generator=g)[:64]].long()  # [64, 128] retain / K-FAC / calibration
    held = pack(load_texts([corpus / d / "eval.jsonl" for d in domains]), tok, 128, "bench eval")[:64].long()
    calib = work / "calib.safetensors"
    save_tokens(general.int(), calib)
    ucfg = UnlearnConfig()
    facts = corpus / "facts"
    sets = load_sets({k: str(facts / f"{k}.jsonl") for k in ("forget", "keep", "holdout")}, tok, ucfg, 512)
    original = load_causal_lm(str(planted / "teacher")).eval()

    def probe(model) -> dict:
        return {**summary(measure(model, sets, tok, ucfg)),
                "utility": utility_metrics(model, original, held, batch_size=8)}

    def quantized(model_dir: Path, label: str) -> dict:
        figures = {}
        for setting in SETTINGS:
            qdir = work / "models" / f"{label}-{setting}"
            if not (qdir / "model" / "config.json").is_file():
                import shutil

                shutil.rmtree(qdir, ignore_errors=True)
                qdir.mkdir(parents=True)
                qcfg = QuantizeConfig(scheme={"method": "gptq", "setting": setting, "group_size": 32,
                                              "calibration": {"samples": 32}})
                quantize(qcfg, ModelsConfig(), RuntimeConfig(device="cpu", progress=False), model_dir=model_dir,
                         out_dir=qdir, calib_path=calib)
            figures[setting] = probe(load_causal_lm(str(qdir / "model")).eval())
        return figures

    res = {"teacher_steps": steps, "records": {k: len(v) for k, v in sets.items()}, "models": {}}
    res["models"]["original"] = {"float": probe(original), **quantized(planted / "teacher", "original")}
    ref = load_causal_lm(str(reference / "teacher")).eval()
    res["models"]["reference"] = {"float": probe(ref)}
    for label, section in grid:
        if only and label not in only:
            continue
        t = time.time()
        cfg = UnlearnConfig(enabled=False, method=section).method
        model = copy.deepcopy(original).train()
        history = build(cfg)(model, UnlearnData(forget=sets["forget"], general=general), seed=0)
        model.eval()
        mdir = work / "models" / label
        import shutil

        shutil.rmtree(mdir, ignore_errors=True)
        save_pretrained_atomic_into(model, tok, mdir)
        res["models"][label] = {"method": section, "seconds": round(time.time() - t, 1), "float": probe(model),
                                "last": history[-1] if history else None, **quantized(mdir, label)}
        print(f"{label}: {time.time() - t:.0f} s", flush=True)
    res["seconds"] = round(time.time() - t0)
    return res


def _row(name: str, variant: str, f: dict) -> str:
    fo, ke, u = f["forget"], f["keep"], f["utility"]
    return (f"| {name} | {variant} | {fo['rouge_l']:.3f} | {fo['answer_prob']:.3f} | {fo['extraction_strength']:.3f} | "
            f"{fo['mink_auc']:.3f} | {ke['rouge_l']:.3f} | {ke['answer_prob']:.3f} | {u['ppl']:.2f} | "
            f"{u.get('kl_to_original', 0):.4f} |")


def table(res: dict) -> str:
    lines = ["| model | weights | forget ROUGE-L | forget answer prob | forget extraction | Min-K% AUC | "
             "keep ROUGE-L | keep answer prob | held-out ppl | KL to original |", "|---|---|" + "---|" * 8]
    for name, m in res["models"].items():
        for variant in ("float", *SETTINGS):
            if variant in m:
                lines.append(_row(name, variant, m[variant]))
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """Top: forget ROUGE-L vs held-out perplexity (utility); bottom: forget vs keep answer probability
    (selectivity); one column per weight setting; the reference model as a star and dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9), sharey="row")
    base = res["models"]["original"]["float"]["utility"]["ppl"]
    ref = res["models"]["reference"]["float"]
    colors = {"shred": "C0", "kfade": "C1", "ga": "C2", "gd": "C3", "npo": "C4"}
    panels = (("forget", "rouge_l", "forget-set ROUGE-L (greedy continuation)"),
              ("forget", "answer_prob", "forget-set answer probability"))
    for row, (part, metric, ylabel) in enumerate(panels):
        for ax, variant in zip(axes[row], ("float", *SETTINGS)):
            for name, m in res["models"].items():
                if variant not in m:
                    continue
                f = m[variant]
                x = f["utility"]["ppl"] / base if row == 0 else f["keep"]["answer_prob"]
                fam = name.split("-")[0]
                ax.scatter(x, f[part][metric], color=colors.get(fam, "k"), marker="o" if fam in colors else "*",
                           s=50 if fam in colors else 160)
                ax.annotate(name, (x, f[part][metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.axhline(ref[part][metric], color="grey", ls="--", lw=1, label="reference (never saw the forget set)")
            if row == 0:
                ax.axvline(1.02, color="grey", ls=":", lw=1, label="+2 % perplexity")
                ax.set_xlabel("held-out perplexity / original's (float)")
                ax.set_title(f"{variant}: forgetting vs utility")
            else:
                ax.axvline(ref["keep"]["answer_prob"], color="grey", ls=":", lw=1, label="reference's keep set")
                ax.set_xlabel("keep-set answer probability (must stay high)")
                ax.set_title(f"{variant}: forgetting vs the keep set")
        axes[row][0].set_ylabel(ylabel)
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
