"""KVTuner: search per-layer (key bits, value bits) pairs for the KIVI cache under an average-bit budget.

Based on KVTuner (Li et al., ICML 2025, arXiv 2502.04420; cmd2001/KVTuner). The result is a ``kivi`` spec with one
pair per layer: what ``build_cache`` / ``load_kv_cache`` build at inference. The search, on calibration rows:

1. Objective of a configuration (one pair per layer): each row's first ``prefill`` tokens go through the model
   with the configured cache (one pass), then the rest of the row in a second pass that attends to what the cache
   kept of the prompt (quantized past, exact recent window) and exactly to itself; its next-token distributions are
   compared with the same two passes through a full ``DynamicCache``: ``kl`` = mean KL(full || cache) per position,
   or ``ppl`` = perplexity ratio to the full cache. Lower is better; the full cache scores 0 (kl) or 1 (ppl).
2. Layer sensitivity: the objective with one layer at each candidate and every other layer unquantized, a
   layers x candidates table (saved; KVTuner's observation is that keys and some layers matter more).
3. Search over one candidate per layer, under ``average_bits`` <= budget (mean over layers of (k + v) / 2):
   - strategy ``exact``: every configuration is measured (candidates ** layers of them), the lowest objective within
     the budget wins; ``auto`` picks this when candidates ** layers <= ``max_exact``;
   - strategy ``optuna``: multi-objective NSGA-II (``optuna.samplers.NSGAIISampler``) over (objective, average bits)
     with the budget as a constraint, ``trials`` measured configurations. The first trials are enqueued: the
     configuration that minimises the *sum* of the layer sensitivities under the budget (an exact multiple-choice
     knapsack over the table, ``additive_best``) and every uniform configuration within the budget, so the search
     starts from the best that the table predicts. The winner is the feasible trial with the lowest objective.
4. Every measured configuration is kept: the Pareto front (objective vs average bits) is drawn as a PNG.

Deviations from the paper: KVTuner scores candidates on task accuracy (GSM8K) and clusters layers into groups by
hand-made per-model tables before the search; here the objective is KL or perplexity to the full cache on
calibration rows, and every layer is its own group. The candidate set and the KIVI scheme (keys per channel,
values per token, a full-precision residual window) are the paper's defaults.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from llm_compress.errors import InputError
from llm_compress.kv.config import average_bits, parse_pair
from llm_compress.kv.spec import model_geometry, normalize_spec

Pairs = tuple[tuple[int, int], ...]


@torch.no_grad()
def _two_pass_logits(model, rows: torch.Tensor, prefill: int, cache) -> torch.Tensor:
    """Logits [B, T - prefill, V] of the second pass over rows[:, prefill:], after the prompt went into ``cache``."""
    model(input_ids=rows[:, :prefill], past_key_values=cache, use_cache=True)
    return model(input_ids=rows[:, prefill:], past_key_values=cache, use_cache=True).logits.float()


def make_objective(model, rows: torch.Tensor, prefill: int, objective: str, group_size: int,
                   residual: int) -> Callable[[Pairs], float]:
    """A function from per-layer pairs to the objective on ``rows`` [B, T] (module docstring, step 1)."""
    from transformers import DynamicCache

    from llm_compress.kv.kivi import KIVICache

    num_layers, _ = model_geometry(model)
    rows = rows.long()
    if not 0 < prefill < rows.shape[1]:
        raise InputError(f"KVTuner: the calibration prompt ({prefill} tokens) must leave tokens to score in rows of "
                         f"{rows.shape[1]}")
    if prefill <= residual:
        raise InputError(f"KVTuner: calibration prompts of {prefill} tokens fit in the full-precision residual window "
                         f"({residual}), so no KV would be quantized and every configuration would score the same; "
                         "lower kv.cache.residual or use longer rows (data.seq_len)")
    full = _two_pass_logits(model, rows, prefill, DynamicCache(config=model.config))
    log_p = F.log_softmax(full, -1)  # [B, T - prefill, V]
    targets = rows[:, prefill + 1:]  # the second pass's last position predicts past the row: not scored for ppl
    nll_full = F.cross_entropy(full[:, :-1].flatten(0, 1), targets.flatten()).item()

    def score(pairs: Pairs) -> float:
        logits = _two_pass_logits(model, rows, prefill, KIVICache(num_layers, [list(p) for p in pairs], group_size,
                                                                  residual))
        if objective == "ppl":
            return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten()).item() - nll_full)
        return max(0.0, (log_p.exp() * (log_p - F.log_softmax(logits, -1))).sum(-1).mean().item())

    return score


def sensitivity(score: Callable[[Pairs], float], num_layers: int, candidates: list[str]) -> list[dict[str, float]]:
    """Per layer, the objective with that layer at each candidate and the others unquantized (step 2)."""
    table = []
    for layer in range(num_layers):
        row = {}
        for name in candidates:
            pairs = [(16, 16)] * num_layers
            pairs[layer] = parse_pair(name)
            row[name] = score(tuple(pairs))
        table.append(row)
    return table


def additive_best(table: list[dict[str, float]], budget: float) -> list[str] | None:
    """The per-layer candidates minimising the sum of ``table`` entries with average bits <= budget (exact DP over
    the total of k + v bits, a multiple-choice knapsack); None when no choice meets the budget."""
    cap = math.floor(2 * len(table) * budget + 1e-9)  # total k + v bits over the layers
    best: dict[int, tuple[float, list[str]]] = {0: (0.0, [])}
    for row in table:
        nxt: dict[int, tuple[float, list[str]]] = {}
        for used, (cost, names) in best.items():
            for name, s in row.items():
                total = used + sum(parse_pair(name))
                if total <= cap and (total not in nxt or cost + s < nxt[total][0]):
                    nxt[total] = (cost + s, names + [name])
        best = nxt
    return min(best.values(), key=lambda cn: cn[0])[1] if best else None


def _search_exact(score, num_layers: int, candidates: list[str]) -> list[dict]:
    """Every configuration, measured (over budget too: they draw the whole Pareto curve)."""
    trials = []
    for names in itertools.product(candidates, repeat=num_layers):
        pairs = tuple(parse_pair(n) for n in names)
        trials.append({"candidates": list(names), "avg_bits": average_bits(list(pairs)), "objective": score(pairs)})
    return trials


def _search_optuna(score, num_layers: int, candidates: list[str], budget: float, trials: int, seed: int,
                   table: list[dict[str, float]]) -> list[dict]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, trials // 3)))
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    seeds = [additive_best(table, budget)] + [[c] * num_layers for c in candidates
                                              if average_bits([parse_pair(c)]) <= budget]
    for names in [s for i, s in enumerate(seeds) if s is not None and s not in seeds[:i]][:trials]:
        study.enqueue_trial({f"layer_{i}": n for i, n in enumerate(names)})
    seen: dict[tuple[str, ...], float] = {}

    def run(trial) -> tuple[float, float]:
        names = tuple(trial.suggest_categorical(f"layer_{i}", candidates) for i in range(num_layers))
        pairs = tuple(parse_pair(n) for n in names)
        bits = average_bits(list(pairs))
        trial.set_user_attr("avg_bits", bits)
        trial.set_constraint("budget", bits - budget)  # feasible when <= 0
        if names not in seen:  # NSGA-II proposes repeats; measuring is deterministic
            seen[names] = score(pairs)
        return seen[names], bits

    study.optimize(run, n_trials=trials)
    return [{"candidates": [t.params[f"layer_{i}"] for i in range(num_layers)], "avg_bits": t.user_attrs["avg_bits"],
             "objective": t.values[0]} for t in study.trials if t.values is not None]


def pareto_front(trials: list[dict]) -> list[dict]:
    """The trials no other trial beats on both objective and average bits, by increasing bits."""
    front, best = [], math.inf
    for t in sorted(trials, key=lambda t: (t["avg_bits"], t["objective"])):
        if t["objective"] < best:
            front.append(t)
            best = t["objective"]
    return front


def search(model, rows: torch.Tensor, spec: dict, prefill: int, *, seed: int = 0) -> dict:
    """Run the KVTuner search ``spec`` (method kvtuner) on calibration ``rows`` [B, T] with prompts of ``prefill``
    tokens. Returns {"spec": the chosen per-layer kivi spec (with a ``search`` record), "sensitivity": table,
    "trials": every measured configuration, "front": its Pareto front}."""
    spec = normalize_spec(spec)
    if spec["method"] != "kvtuner":
        raise InputError(f"KVTuner search needs a kvtuner spec, got method {spec['method']!r}")
    num_layers, _ = model_geometry(model)
    candidates, budget = spec["candidates"], float(spec["budget"])
    score = make_objective(model, rows, prefill, spec["objective"], spec["group_size"], spec["residual"])
    table = sensitivity(score, num_layers, candidates)
    space = len(candidates) ** num_layers
    how = spec["strategy"] if spec["strategy"] != "auto" else ("exact" if space <= spec["max_exact"] else "optuna")
    if how == "exact":
        trials = _search_exact(score, num_layers, candidates)
    else:
        trials = _search_optuna(score, num_layers, candidates, budget, spec["trials"], seed, table)
    feasible = [t for t in trials if t["avg_bits"] <= budget + 1e-9]
    best = min(feasible, key=lambda t: (t["objective"], t["avg_bits"]))
    record = {"method": "kvtuner", "objective": spec["objective"], "budget": budget, "strategy": how,
              "space": space, "trials": len(trials), "measured": len({tuple(t["candidates"]) for t in trials}),
              "candidates": candidates, "chosen": best["candidates"], "avg_bits": best["avg_bits"],
              "value": best["objective"], "calib_rows": int(rows.shape[0]), "calib_tokens": int(rows.shape[1]),
              "prefill": int(prefill)}
    chosen = normalize_spec({"method": "kivi", "bits": [list(parse_pair(n)) for n in best["candidates"]],
                             "group_size": spec["group_size"], "residual": spec["residual"], "search": record})
    return {"spec": chosen, "sensitivity": table, "trials": trials, "front": pareto_front(trials)}


def plot_pareto(result: dict, path: str | Path) -> Path:
    """Objective vs average bits of every measured configuration, the Pareto front, the budget and the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec, trials, front = result["spec"]["search"], result["trials"], result["front"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter([t["avg_bits"] for t in trials], [t["objective"] for t in trials], s=12, color="C0", alpha=0.5,
               label=f"measured ({len(trials)})")
    ax.plot([t["avg_bits"] for t in front], [t["objective"] for t in front], color="C1", drawstyle="steps-post",
            marker="o", ms=4, label="Pareto front")
    ax.scatter([rec["avg_bits"]], [rec["value"]], s=90, facecolors="none", edgecolors="C3", lw=2, label="chosen",
               zorder=3)
    ax.axvline(rec["budget"], color="grey", ls="--", lw=1, label=f"budget {rec['budget']:g} bits")
    ax.set_xlabel("average KV bits per element (mean over layers of (k + v) / 2)")
    ax.set_ylabel("KL(full || cache) per token" if rec["objective"] == "kl" else "perplexity / full cache's")
    ax.set_title(f"KVTuner ({rec['strategy']}, {rec['measured']} of {rec['space']} configurations measured)",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
