"""Post-training quantization methods side by side on models the project trains.

    python bench/bench_quant.py [--model demo|wide] [--settings W4A16 W4A8 W4A4KV4] [--methods ...] [--seeds 0 1 2]
                                [--threads N] [--device cpu|cuda] [--out ...]

Models (trained by the bootstrap stage, cached under artifacts/ like any stage):
- demo: the demo teacher (configs/demo.yaml: 4 layers, hidden 128, 4 heads / 2 KV heads (GQA), 300 steps);
- wide: bench/recipes/wide.yaml (6 layers, hidden 192, 6 heads, no GQA, 900 steps): a differently-shaped model
  trained for longer.
For each W/A/KV setting every method quantizes a fresh copy of the full-precision model; activations and KV are
fake-quantized per token (KV per head, asymmetric) when it runs. Methods: RTN; GPTQ; bitsandbytes nf4 weights
(blocks of 64, dequantized, with the same A/KV quantizers); hadamard+gptq, OSTQuant's initial random-Hadamard
rotations with nothing learnt (QuaRot-like), to show what the learning adds; OSTQuant (+RTN, +GPTQ). Scores on
the held-out tokens: perplexity ratio to full precision and KL(FP || quantized) per token. Ablation at the last
setting: OSTQuant's calibration loss kl_top vs kl vs mse, and the fixed rotation, for each of ``--seeds``. Also
writes per-layer outlier statistics (max / median |x| of the inputs of q/k/v, gate/up and down_proj) of the FP
model. Calibration: 128 rows of the recipe's (DSIR-selected) training tokens; everything seeded.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPES = {"demo": ROOT / "configs" / "demo.yaml", "wide": ROOT / "bench" / "recipes" / "wide.yaml",
           "long": ROOT / "bench" / "recipes" / "long.yaml"}


def pinned_base(model: str) -> dict:
    """The bench model's recipe (a plain dict) in the world its RESULTS figures were measured in: no planted
    biographies, the prose-only selection, no unlearning (the demo gained all three with the unlearning issue; a
    recipe without them is unchanged)."""
    from llm_compress.config import load_recipe

    base = load_recipe(RECIPES[model]).model_dump(mode="json")
    base["runtime"]["progress"] = False
    base["embedded"]["facts"] = 0
    base["select"]["targets"] = [{"paths": ["embedded:prose"]}]
    base["unlearn"]["enabled"], base["gates"]["max_forget_regain"] = False, None
    return base


def prepare(recipe, root: Path, run: str) -> dict:
    """The bootstrap, select and data stages of ``recipe`` (cached like any stage): their manifests."""
    from llm_compress.pipeline import make_call, run_call

    done: dict = {}
    for stage in ("bootstrap", "select", "data"):
        if stage == "select" and not recipe.select.enabled:
            continue
        done[stage] = run_call(recipe, make_call(recipe, stage, done), root / run, root)
    return done


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(RECIPES), default="demo")
    ap.add_argument("--settings", nargs="*", default=["W4A16", "W4A8", "W4A4KV4"])
    ap.add_argument("--methods", nargs="*",
                    default=["rtn", "gptq", "nf4", "hadamard+gptq", "ostquant+rtn", "ostquant+gptq"])
    ap.add_argument("--ost-steps", type=int, default=100)
    ap.add_argument("--ost-lr", type=float, nargs=2, default=None, metavar=("ROTATE", "SMOOTH"),
                    help="OSTQuant learning rates (default: the recipe defaults)")
    ap.add_argument("--train-weight-quant", action=argparse.BooleanOptionalAction, default=None,
                    help="OSTQuant: fake-quantize weights while learning (default: the recipe's rule)")
    ap.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                    help="seeds of the loss ablation (calibration batch order, random Hadamard init); the main "
                         "table uses seed 0")
    ap.add_argument("--artifacts", default=str(ROOT / "artifacts"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N: where the models are quantized and scored")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from llm_compress.config import parse_recipe
    from llm_compress.data import load_tokens
    from llm_compress.modeling import load_causal_lm
    from llm_compress.quantize.apply import apply, calibration_rows

    torch.set_num_threads(args.threads)
    base = pinned_base(args.model)  # the world these figures were measured in (bench/RESULTS.md)
    root = Path(args.artifacts).resolve()
    recipe = parse_recipe(base)
    t0 = time.perf_counter()
    done = prepare(recipe, root, f"bench-quant-{args.model}")
    prep_s = time.perf_counter() - t0
    out = lambda s, o: done[s]["outputs"][o]["path"]  # noqa: E731
    fp = load_causal_lm(out("bootstrap", "teacher"), what="teacher").to(args.device)
    calib = calibration_rows(Path(out("data", "train")), 128, 0)
    eval_ids = load_tokens(Path(out("data", "eval"))).long()
    eval_ids = eval_ids[: max(1, 16384 // eval_ids.shape[1])].to(args.device)

    @torch.no_grad()
    def logits_of(model) -> torch.Tensor:
        return torch.cat([model(input_ids=eval_ids[i:i + 8]).logits.float() for i in range(0, len(eval_ids), 8)])

    ref = logits_of(fp)  # [N, T, V]
    ref_lp = F.log_softmax(ref, -1)

    def score(model) -> dict:
        lg = logits_of(model)
        lq = F.log_softmax(lg, -1)
        nll = F.nll_loss(lq[:, :-1].flatten(0, 1), eval_ids[:, 1:].flatten()).item()
        kl = (ref_lp.exp() * (ref_lp - lq)).sum(-1).mean().item()
        return {"ppl": math.exp(nll), "kl": kl}

    fp_score = score(fp)
    outliers = activation_outliers(fp, calib[:16].to(args.device))
    print(f"{args.model}: FP ppl {fp_score['ppl']:.3f}  ({sum(p.numel() for p in fp.parameters()):,} params)")

    def scheme(method: str, setting: str, **kw):
        d = json.loads(json.dumps(base))
        # online_hadamard pinned on at every setting, as the recorded figures were measured (its default is now off
        # for weight-only settings)
        if method.startswith("hadamard"):  # OSTQuant's fixed random-Hadamard init, nothing learnt (QuaRot-like)
            cfg = {"method": "ostquant", "weight_quantizer": method.split("+")[1], "steps": 0,
                   "online_hadamard": True, **kw}
        elif method.startswith("ostquant"):
            cfg = {"method": "ostquant", "weight_quantizer": method.split("+")[1], "steps": args.ost_steps,
                   "online_hadamard": True, **kw}
            if args.ost_lr:
                cfg.update(rotate_lr=args.ost_lr[0], smooth_lr=args.ost_lr[1])
            if args.train_weight_quant is not None:
                cfg["train_weight_quant"] = args.train_weight_quant
        else:
            cfg = {"method": method}
        d["quantize"]["scheme"] = {**cfg, "setting": setting, "group_size": None}
        d["export"]["formats"] = ["safetensors"]
        return parse_recipe(d).quantize.scheme

    def run_one(method: str, setting: str, seed: int = 0, ablation: bool = False, **kw) -> dict:
        m = copy.deepcopy(fp)
        t = time.perf_counter()
        if method == "nf4":
            rec = nf4_weights(m, setting, scheme("rtn", setting))
        else:
            rec = apply(m, scheme(method, setting, **kw), calib, seed=seed)
        secs = time.perf_counter() - t
        s = score(m)
        row = {"setting": setting, "method": method, "seed": seed, **({"ablation": True} if ablation else {}), **kw,
               "ppl": round(s["ppl"], 3),
               "ppl_ratio": round(s["ppl"] / fp_score["ppl"], 4), "kl": round(s["kl"], 5), "seconds": round(secs, 1)}
        met = rec.get("metrics", {})
        for k in ("qsur_mean_before", "qsur_mean_after", "calib_loss_first", "calib_loss_last"):
            if k in met:
                row[k] = met[k]
        print(json.dumps(row), flush=True)
        return row

    rows = [run_one(m, s) for s in args.settings for m in args.methods]
    if args.ablation:
        # At the hardest setting: each calibration loss, and the fixed rotation it starts from, over several seeds
        # (one seed cannot rank them on models this small). Seed 0 of kl_top is the main table's row.
        low = args.settings[-1]
        for seed in args.seeds:
            if seed != 0:
                rows.append(run_one("hadamard+gptq", low, seed, ablation=True))
                rows.append(run_one("ostquant+gptq", low, seed, loss="kl_top", ablation=True))
            rows += [run_one("ostquant+gptq", low, seed, loss=loss, ablation=True) for loss in ("kl", "mse")]
    meta = {"model": args.model, "fp_ppl": round(fp_score["ppl"], 3), "params": sum(p.numel() for p in fp.parameters()),
            "config": {k: getattr(fp.config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                          "num_attention_heads", "num_key_value_heads", "vocab_size")},
            "teacher_steps": base["embedded"]["steps"], "eval_tokens": int(eval_ids.numel()),
            "calibration_rows": len(calib), "ost_steps": args.ost_steps, "ablation_seeds": args.seeds,
            "train_weight_quant": args.train_weight_quant,
            "ost_lr": args.ost_lr,
            "prepare_seconds": round(prep_s, 1),
            "machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": args.device + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda")
                                     else ""), "when": time.strftime("%Y-%m-%d %H:%M")}
    path = Path(args.out or ROOT / "bench" / f"quant_{args.model}.json")
    path.write_text(json.dumps({"meta": meta, "outliers": outliers, "results": rows}, indent=2))
    print(f"wrote {path}")


def nf4_weights(model, setting: str, scheme) -> dict:
    """bitsandbytes NF4 (blocks of 64) on every decoder linear, dequantized back; A/KV as the setting says."""
    import bitsandbytes.functional as bnbf
    import torch

    from llm_compress.quantize.fakequant import attach_fake_quant

    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                q, state = bnbf.quantize_4bit(mod.weight.data.contiguous(), blocksize=64, quant_type="nf4")
                mod.weight.data.copy_(bnbf.dequantize_4bit(q, state).to(mod.weight.dtype))
    qs = scheme.quant_setting()
    if qs.a_bits < 16 or qs.kv_bits < 16:
        attach_fake_quant(model, qs)
    return {}


def activation_outliers(model, ids) -> dict:
    """max |x| / median |x| of the inputs of q/k/v (attn_in), gate/up (mlp_in) and down_proj, per layer."""
    import torch

    stats, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        for site, mod in (("attn_in", layer.self_attn.q_proj), ("mlp_in", layer.mlp.gate_proj),
                          ("down_in", layer.mlp.down_proj)):
            def hook(m, a, key=f"layer{i}.{site}"):
                x = a[0].detach().abs().float()
                stats[key] = {"max": round(x.max().item(), 3), "median": round(x.median().item(), 4),
                              "max_over_median": round((x.max() / x.median().clamp_min(1e-12)).item(), 1)}
            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return stats


if __name__ == "__main__":
    main()
