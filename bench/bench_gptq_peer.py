"""GPTQ side by side with llm-compressor's GPTQ: same model, same calibration token rows, same settings.

    python bench/bench_gptq_peer.py [--model demo|wide] [--peer-python /work/peers/llmc/bin/python]
                                    [--group-size 128] [--repeats 3] [--threads 1] [--no-extras] [--out ...]

Model: bench_quant's (the demo teacher, or bench/recipes/wide.yaml), built or reused through the same stage calls
and run folder (artifacts/bench-quant-<model>), so a cached teacher is reused. Calibration: the rows the quantize
stage would draw (``calibration_rows`` on the data stage's training tokens, the GPTQ scheme's sample count, the
runtime seed), as token ids; held-out scoring: bench_quant's rows of the data stage's eval tokens (perplexity and
KL(float || quantized) per token).
Setting on both sides: W4A16, symmetric int grid, groups of ``--group-size`` input columns (the largest power of two
that divides every decoder Linear's input size when the requested size does not), lm_head left in float, damping
= the project's percdamp default (llm-compressor's dampening_frac set equal), no act-order, GPTQ block 128, the
same calibration batch size. The project's GPTQ is ``gptq_quantize_model`` with the stage's arguments; llm-compressor
0.14 needs transformers 5, so it runs in its own virtualenv (bench/peer_llmcompressor.py, a subprocess) on the float
checkpoint and rows saved here, and its pack-quantized checkpoint is loaded back here with stock transformers +
compressed-tensors. Wall times: the quantization call only (``gptq_quantize_model`` / ``oneshot``), both tools at
``--threads`` threads, one after the other, median of ``--repeats`` runs; llm-compressor's imports, model load and
save are reported apart. Extras (off with --no-extras): act-order on both sides (project act_order, llm-compressor
actorder static), and the project without true-sequential (one Hessian pass per decoder layer, as llm-compressor).
Writes bench/gptq_peer_<model>.json and .md (a markdown section for bench/RESULTS.md), and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_quant import pinned_base, prepare  # noqa: E402

RECIPES = ("demo", "wide")  # bench_quant.RECIPES' models this bench has run on
PEER_SCRIPT = ROOT / "bench" / "peer_llmcompressor.py"
TITLE = "## GPTQ side by side with llm-compressor (issue: packed exports)"


def pick_group_size(in_sizes: list[int], wanted: int) -> int:
    """``wanted`` if it divides every input size, else the largest power of two <= wanted that does."""
    if all(k % wanted == 0 for k in in_sizes):
        return wanted
    g = 1
    while g * 2 <= wanted and all(k % (g * 2) == 0 for k in in_sizes):
        g *= 2
    return g


def unpack_int4(packed, n_cols: int):
    """compressed-tensors pack-quantized int32 [N, K/8] -> signed codes int8 [N, K] (LSB-first nibbles, +8 offset)."""
    import torch

    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nib = (packed.unsqueeze(-1) >> shifts) & 0xF  # [N, K/8, 8]
    return (nib.reshape(packed.shape[0], -1)[:, :n_cols] - 8).to(torch.int8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(RECIPES), default="demo")
    ap.add_argument("--peer-python", default="/work/peers/llmc/bin/python")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration batch size, both tools")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each tool's main run (median reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--extras", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--artifacts", default=str(ROOT / "artifacts"))
    ap.add_argument("--work", default=None, help="work folder (default: <artifacts>/gptq-peer-<model>)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="only print (and write beside it) the markdown of an existing result file")
    args = ap.parse_args()
    if args.render:
        res = json.loads(Path(args.render).read_text())
        md = markdown(res)
        Path(args.render).with_suffix(".md").write_text(md)
        print(md)
        return
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[k] = str(args.threads)

    import copy

    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file

    from llm_compress.config import parse_recipe
    from llm_compress.data import load_tokens
    from llm_compress.modeling import load_causal_lm, load_tokenizer
    from llm_compress.quantize.apply import calibration_rows
    from llm_compress.quantize.gptq import gptq_quantize_model

    torch.set_num_threads(args.threads)
    when = time.strftime("%Y-%m-%d %H:%M")
    command = "python bench/bench_gptq_peer.py " + " ".join(sys.argv[1:])

    # --- the bench model and its data: bench_quant's recipe edits and run folder (so its cache is shared)
    base = pinned_base(args.model)
    root = Path(args.artifacts).resolve()
    recipe = parse_recipe(base)
    done = prepare(recipe, root, f"bench-quant-{args.model}")
    out = lambda s, o: done[s]["outputs"][o]["path"]  # noqa: E731
    fp = load_causal_lm(out("bootstrap", "teacher"), what="teacher")
    tok = load_tokenizer(out("bootstrap", "teacher"))

    layers = fp.model.layers
    in_sizes = sorted({m.in_features for m in layers.modules() if isinstance(m, torch.nn.Linear)})
    group = pick_group_size(in_sizes, args.group_size)

    # --- the quantize stage's GPTQ scheme (its defaults: percdamp, act_order, samples, skip ...) at this setting
    d = json.loads(json.dumps(base))
    d["quantize"]["scheme"] = {"method": "gptq", "setting": f"W{args.bits}A16", "group_size": group}
    d["export"]["formats"] = ["safetensors"]
    r2 = parse_recipe(d)
    s = r2.quantize.scheme
    if s.act_order or not s.symmetric or s.clip_search:
        raise SystemExit(f"unexpected GPTQ scheme defaults: {s}")
    calib = calibration_rows(Path(out("data", "train")), s.calibration.samples, r2.runtime.seed,
                             vocab_size=fp.get_input_embeddings().num_embeddings)  # [n, T], as the stage draws
    eval_ids = load_tokens(Path(out("data", "eval"))).long()
    eval_ids = eval_ids[: max(1, 16384 // eval_ids.shape[1])]

    work = Path(args.work or root / f"gptq-peer-{args.model}")
    (work / "float").mkdir(parents=True, exist_ok=True)
    fp.save_pretrained(work / "float")
    tok.save_pretrained(work / "float")
    save_file({"input_ids": calib.contiguous()}, str(work / "calib_rows.safetensors"))

    @torch.no_grad()
    def logits_of(model) -> torch.Tensor:
        return torch.cat([model(input_ids=eval_ids[i:i + 8]).logits.float() for i in range(0, len(eval_ids), 8)])

    ref_lp = F.log_softmax(logits_of(fp), -1)

    def score(model) -> dict:
        lq = F.log_softmax(logits_of(model), -1)
        nll = F.nll_loss(lq[:, :-1].flatten(0, 1), eval_ids[:, 1:].flatten()).item()
        kl = (ref_lp.exp() * (ref_lp - lq)).sum(-1).mean().item()
        return {"ppl": math.exp(nll), "kl": kl}

    names = [n for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    fp_w = {n: fp.get_submodule(n).weight.detach().float().clone() for n in names}

    def rel_errors(model) -> dict:
        return {n: ((fp_w[n] - model.get_submodule(n).weight.detach().float()).norm()
                    / fp_w[n].norm().clamp_min(1e-12)).item() for n in names}

    fp_score = score(fp)
    print(f"{args.model}: float ppl {fp_score['ppl']:.3f}; group size {group} (input sizes {in_sizes}); "
          f"{len(calib)} calibration rows x {calib.shape[1]} tokens; percdamp {s.percdamp}", flush=True)

    # --- the project's GPTQ
    def project(act_order: bool, true_sequential: bool = True, keep: bool = True):
        m = copy.deepcopy(fp)
        codes: dict = {}
        t = time.perf_counter()
        gptq_quantize_model(m, calib, args.bits, group, s.symmetric, act_order, s.percdamp, s.clip_search,
                            skip=tuple(s.skip), batch_size=args.batch_size, true_sequential=true_sequential,
                            codes=codes)
        secs = time.perf_counter() - t
        return (m, codes, secs) if keep else secs

    # --- llm-compressor's GPTQ, in its own venv
    peer_env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    peer_env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                    TOKENIZERS_PARALLELISM="false")

    def peer(actorder: str, tag: str) -> dict:
        dest = work / tag
        cmd = [args.peer_python, str(PEER_SCRIPT), "--model-dir", str(work / "float"),
               "--rows", str(work / "calib_rows.safetensors"), "--out", str(dest), "--bits", str(args.bits),
               "--group-size", str(group), "--damp", str(s.percdamp), "--actorder", actorder,
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        p = subprocess.run(cmd, env=peer_env, cwd=str(ROOT), capture_output=True, text=True)
        (work / f"{tag}.log").write_text(p.stdout + p.stderr)
        if p.returncode != 0:
            raise SystemExit(f"peer run failed ({p.returncode}); see {work / f'{tag}.log'}:\n{p.stderr[-3000:]}")
        return json.loads((dest / "peer.json").read_text())

    def load_peer(tag: str, proj_codes: dict):
        """llm-compressor's checkpoint through stock transformers (+ compressed-tensors); checks and code stats."""
        from transformers import AutoModelForCausalLM

        ck = work / tag / "checkpoint"
        m = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()
        with torch.no_grad():
            m(input_ids=eval_ids[:1])  # compressed-tensors >= 0.15 decompresses the whole model on first forward
        st = load_file(str(ck / "model.safetensors"))
        fq = load_file(str(work / tag / "fakequant.safetensors"))
        check = {"max_abs_vs_peer_fakequant": 0.0, "max_abs_vs_dequant_of_codes": 0.0}
        equal = total = 0
        first, later = [], []  # llm-compressor scale / project scale: first group of each row, the other groups
        for n in names:
            w = m.get_submodule(n).weight.detach().float()
            k = w.shape[1]
            c = unpack_int4(st[f"{n}.weight_packed"], k) if args.bits == 4 else None
            sc = st[f"{n}.weight_scale"].float()  # [N, K/G]
            check["max_abs_vs_peer_fakequant"] = max(check["max_abs_vs_peer_fakequant"],
                                                     (w - fq[f"{n}.weight"].float()).abs().max().item())
            if c is not None:
                deq = c.float() * sc.repeat_interleave(group, dim=1)
                check["max_abs_vs_dequant_of_codes"] = max(check["max_abs_vs_dequant_of_codes"],
                                                           (w - deq).abs().max().item())
                pc, ps, _ = proj_codes[n]
                equal += int((pc == c).sum())
                total += c.numel()
                ratio = sc / ps[..., 0].clamp_min(1e-12)  # [N, groups]
                first.append(ratio[:, 0])
                later.append(ratio[:, 1:].flatten())
        extra = {}
        if total:
            first_r, later_r = torch.cat(first), torch.cat(later)
            exact = lambda x: (x - 7 / 7.5).abs().lt(1e-6).float().mean().item()  # noqa: E731
            extra = {"codes_equal_to_project": equal / total,
                     "scale_ratio_first_group_exact": exact(first_r),
                     "later_groups": later_r.numel(),
                     "scale_ratio_later_groups_median": later_r.median().item() if later_r.numel() else None,
                     "scale_ratio_later_groups_exact": exact(later_r) if later_r.numel() else None}
        qc = json.loads((ck / "config.json").read_text()).get("quantization_config", {})
        return m, check, extra, qc

    rows = []

    def add(label: str, model, secs, extra: dict | None = None, rel: dict | None = None) -> dict:
        sc = score(model)
        rel = rel if rel is not None else rel_errors(model)
        row = {"run": label, "ppl": round(sc["ppl"], 4), "ppl_ratio": round(sc["ppl"] / fp_score["ppl"], 5),
               "kl": round(sc["kl"], 6), "mean_rel_error": round(sum(rel.values()) / len(rel), 6),
               "seconds": secs, **(extra or {})}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    # main runs, one tool after the other; the timed repeats follow, alternating, never concurrently
    pm, pcodes, psec = project(act_order=False)
    pe = peer("none", "llmc")
    p_times, l_times = [psec], [pe["seconds"]["oneshot"]]
    for _ in range(args.repeats - 1):
        p_times.append(project(act_order=False, keep=False))
        l_times.append(peer("none", "llmc-repeat")["seconds"]["oneshot"])
    proj_row = add("project GPTQ", pm, round(statistics.median(p_times), 2),
                   {"seconds_all": [round(t, 2) for t in p_times]})
    lm, lcheck, lextra, qcfg = load_peer("llmc", pcodes)
    llmc_row = add("llm-compressor GPTQ", lm, round(statistics.median(l_times), 2),
                   {"seconds_all": [round(t, 2) for t in l_times], **lextra, "reload_check": lcheck,
                    "peer_seconds": pe["seconds"], "peer_mean_rel_error": pe["mean_rel_error"]})
    del lm
    if args.extras:
        am, acodes, asec = project(act_order=True)
        add("project GPTQ, act_order", am, round(asec, 2))
        ape = peer("static", "llmc-static")
        alm, acheck, aextra, _ = load_peer("llmc-static", acodes)
        add("llm-compressor GPTQ, actorder static", alm, ape["seconds"]["oneshot"],
            {**aextra, "reload_check": acheck, "peer_seconds": ape["seconds"]})
        del alm
        nm, _, nsec = project(act_order=False, true_sequential=False)
        add("project GPTQ, true_sequential off", nm, round(nsec, 2))

    cfg = fp.config
    meta = {"model": args.model, "when": when, "command": command,
            "params": sum(p.numel() for p in fp.parameters()),
            "config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                    "num_attention_heads", "num_key_value_heads", "vocab_size")},
            "linear_input_sizes": in_sizes, "group_size": group, "group_size_requested": args.group_size,
            "bits": args.bits, "symmetric": s.symmetric, "percdamp": s.percdamp, "act_order": s.act_order,
            "skip": list(s.skip), "gptq_block_size": 128, "true_sequential": True,
            "calibration_rows": len(calib), "seq_len": int(calib.shape[1]), "calibration_seed": r2.runtime.seed,
            "calibration_batch_size": args.batch_size, "eval_tokens": int(eval_ids.numel()),
            "fp_ppl": round(fp_score["ppl"], 4), "threads": args.threads, "repeats": args.repeats,
            "machine": platform.platform(), "cpu_count": os.cpu_count(),
            "versions_main": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                              "compressed-tensors": __import__("compressed_tensors").__version__},
            "versions_peer": pe["versions"], "peer_quantization_config": qcfg}
    ratios = {"ppl_project_over_llmc": round(proj_row["ppl"] / llmc_row["ppl"], 5),
              "seconds_project_over_llmc": round(proj_row["seconds"] / llmc_row["seconds"], 3)}
    res = {"meta": meta, "ratios": ratios, "results": rows}
    path = Path(args.out or ROOT / "bench" / f"gptq_peer_{args.model}.json")
    path.write_text(json.dumps(res, indent=2))
    md = markdown(res)
    path.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {path} and {path.with_suffix('.md')}")


def markdown(res: dict) -> str:
    m, rows, r = res["meta"], res["results"], res["ratios"]
    proj, llmc = rows[0], rows[1]
    vm, vp = m["versions_main"], m["versions_peer"]
    c = m["config"]
    gnote = (f"group size {m['group_size']}" if m["group_size"] == m["group_size_requested"] else
             f"group size **{m['group_size']}** (the largest power of two dividing every Linear input size "
             f"{m['linear_input_sizes']}; {m['group_size_requested']} does not)")
    lines = [TITLE, "",
             f"`{m['command']}` ({m['when']}; {m['machine']}, {m['threads']} thread per tool, run one after the "
             "other).",
             f"Main venv: torch {vm['torch']}, transformers {vm['transformers']}, compressed-tensors "
             f"{vm['compressed-tensors']}. Peer venv (/work/peers/llmc): llmcompressor {vp['llmcompressor']}, "
             f"torch {vp['torch']}, transformers {vp['transformers']}, compressed-tensors {vp['compressed-tensors']}.",
             "",
             f"Model `{m['model']}` ({m['params']:,} params; hidden {c['hidden_size']}, intermediate "
             f"{c['intermediate_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads / "
             f"{c['num_key_value_heads']} KV heads). Both tools: W{m['bits']}A16 symmetric, {gnote}, lm_head in "
             "float, "
             f"damping {m['percdamp']} of the mean Hessian diagonal, no act-order, GPTQ block 128, the same "
             f"{m['calibration_rows']} calibration rows x {m['seq_len']} token ids (the quantize stage's seeded "
             f"draw, seed {m['calibration_seed']}) in batches of {m['calibration_batch_size']}. Perplexity on "
             f"{m['eval_tokens']:,} held-out tokens (bench_quant's rows); float ppl {m['fp_ppl']}. llm-compressor's "
             "pack-quantized checkpoint is scored after loading it in the main venv with stock transformers.", "",
             "| run | ppl | ppl / float | KL per token | mean ‖W−Q‖/‖W‖ | codes = project's | quantize wall s |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        eq = f"{100 * row['codes_equal_to_project']:.1f} %" if "codes_equal_to_project" in row else ""
        lines.append(f"| {row['run']} | {row['ppl']:.3f} | {row['ppl_ratio']:.4f} | {row['kl']:.5f} | "
                     f"{row['mean_rel_error']:.4f} | {eq} | {row['seconds']:.2f} |")
    ps = llmc["peer_seconds"]
    lines += ["",
              f"Project / llm-compressor: ppl {r['ppl_project_over_llmc']:.4f}, wall time "
              f"{r['seconds_project_over_llmc']:.2f}x (medians of {m['repeats']}: project "
              f"{proj['seconds_all']} s, llm-compressor `oneshot` {llmc['seconds_all']} s). Not in llm-compressor's "
              f"time: imports {ps['import']} s, model + tokenizer load {ps['load']} s, compressed save {ps['save']} s. "
              f"Its checkpoint reloads exactly (max |loaded − its in-memory fake-quantized weight| = "
              f"{llmc['reload_check']['max_abs_vs_peer_fakequant']:.1e}; vs codes x scales "
              f"{llmc['reload_check']['max_abs_vs_dequant_of_codes']:.1e}).", ""]
    dev = max(abs(row["ppl_ratio"] - 1) for row in rows[:2])
    pgap = proj["ppl"] / llmc["ppl"] - 1
    below = [row["run"] for row in rows if row["ppl_ratio"] < 1]
    closer = "closer to" if llmc["mean_rel_error"] < proj["mean_rel_error"] else "farther from"
    nts = next((row for row in rows if row["run"].endswith("true_sequential off")), None)
    text = [
        f"Perplexity moves by at most {100 * dev:.2f} % from float for either tool"
        + (f" ({len(below)} of the {len(rows)} quantized runs even score below float)" if below else "")
        + (f" and the two differ by {100 * abs(pgap):.2f} %, too little to rank them on one held-out set"
           if abs(pgap) < 0.002 else
           f"; the {'project' if pgap < 0 else 'llm-compressor'}'s is {100 * abs(pgap):.2f} % lower")
        + f"; KL to float, the finer measure, is {proj['kl']:.5f} for the project and {llmc['kl']:.5f} for "
        f"llm-compressor ({llmc['kl'] / max(proj['kl'], 1e-12):.2f}x).",
        f"llm-compressor's weights are {closer} the float ones (mean ‖W−Q‖/‖W‖ {llmc['mean_rel_error']:.4f} vs "
        f"{proj['mean_rel_error']:.4f}), and the grids differ as the code says: llm-compressor fixes each group's "
        "int4 scale at max|w| / 7.5 from its min-max observer on the original weight before the sweep "
        "(`GPTQModifier.on_sequential_epoch_end`: `observe`, then `quantize_weight` with the observer's scales), "
        "the project sets it to max|w| / 7 when the sweep reaches the group, from the weights as updated by the "
        "earlier columns. So in the first group of a row, which nothing has updated yet, llm-compressor's scale "
        f"is exactly 7 / 7.5 of the project's ({100 * llmc['scale_ratio_first_group_exact']:.0f} % of rows)"
        + (f", in the {llmc['later_groups']:,} later groups the ratio varies (median "
           f"{llmc['scale_ratio_later_groups_median']:.3f}, {100 * llmc['scale_ratio_later_groups_exact']:.0f} % "
           "exactly 7 / 7.5)" if llmc.get("later_groups") else "")
        + f"; {100 * llmc['codes_equal_to_project']:.1f} % of the integer codes agree.",
        f"The project's call takes {r['seconds_project_over_llmc']:.2f}x llm-compressor's `oneshot` at "
        f"{m['threads']} thread each: the project collects Hessians true-sequentially (q/k/v, o, gate/up, down: four "
        "passes over a layer's calibration inputs, then one to propagate), llm-compressor's sequential pipeline "
        "takes all of a layer's Hessians in one pass, then propagates"
        + (f"; with true_sequential off the project's call takes {nts['seconds']:.2f} s "
           f"({nts['seconds'] / llmc['seconds']:.2f}x, one run)." if nts else "."),
    ]
    lines.append(" ".join(text))
    if len(rows) > 2:
        lines += ["", "Extra rows: act-order on both sides (the project's act_order keeps groups contiguous, as "
                  "llm-compressor's `static`/`weight` order does), and the project with true_sequential off "
                  "(one Hessian pass per decoder layer, as llm-compressor's sequential pipeline); their wall times "
                  "are single runs."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
