"""KVTuner: search per-layer (key bits, value bits) pairs for the KIVI cache under an average-bit budget.

Based on KVTuner (Li et al., ICML 2025, arXiv 2502.04420; cmd2001/KVTuner). The result is a ``kivi`` spec with one
pair per layer: what ``build_cache`` / ``load_kv_cache`` build at inference. The search, on calibration rows:

1. Objective of a configuration (one pair per layer): each row's first ``prefill`` tokens go through the model
   with the configured cache (one pass), then the rest of the row in a second pass; its next-token distributions
   are compared with the same two passes through a full ``DynamicCache``: ``kl`` = mean KL(full || cache) per
   position, or ``ppl`` = perplexity ratio to the full cache. Lower is better; the full cache scores 0 (kl) or 1
   (ppl). With ``force_quant`` (the default, the authors' ``force_quant`` of ``flexible_quantized_cache.py``) each
   pass attends to its states as the cache holds them once stored: the prompt's own attention already sees its
   quantized keys and values (so the deeper layers' prompt states, and the cache they fill, carry that damage), and
   the second pass sees its older tokens quantized too. Without it each pass attends exactly to its own tokens (the
   cache contract at inference) and only the second pass's view of the prompt is quantized, which hides most of
   the damage on short calibration rows.
2. Layer sensitivity: the objective with one layer at each candidate and every other layer unquantized, a
   layers x candidates table (saved; KVTuner's observation is that keys and some layers matter more: with value-
   heavier candidates in the set, whether keys need the bits is measured, not assumed).
3. Search-space reduction (the paper's inter-layer clustering and intra-layer pair pruning):
   - groups: the layers are clustered into ``groups`` groups by their sensitivity profile (the row of the table, as
     log damage: damage = objective - its full-cache value), Ward agglomerative clustering, so layers that react
     alike to every candidate share a group; a group need not be contiguous (as in the authors' tables);
   - prune: within a group (its rows summed), a candidate that another beats on both bits and sensitivity is
     dropped, leaving at most one pair per bit width (e.g. K8V4 or K4V8, whichever hurts less).
   The search then picks one candidate per group; every layer of a group gets the group's pair.
4. Search over one candidate per group, under ``average_bits`` <= budget (mean over layers of (k + v) / 2):
   - strategy ``exact``: every configuration of the reduced space is measured, the lowest objective within the
     budget wins; ``auto`` picks this when the reduced space has <= ``max_exact`` configurations;
   - strategy ``optuna``: multi-objective NSGA-II (``optuna.samplers.NSGAIISampler``) over (objective, average bits)
     with the budget as a constraint, ``trials`` measured configurations. The first trials are enqueued: the
     configuration that minimises the *sum* of the group sensitivities under the budget (an exact multiple-choice
     knapsack over the group table weighted by group size, ``additive_best``) and every uniform configuration
     within the budget, so the search starts from the best that the table predicts. The winner is the feasible
     trial with the lowest objective.
5. Every measured configuration is kept: the Pareto front (objective vs average bits) is drawn as a PNG.

Deviations from the paper: KVTuner scores configurations on task accuracy (GSM8K through lm-eval) where the
objective here is KL or perplexity to the full cache on calibration rows (a retrieval-accuracy objective is left to
the retrieval task of the KV bench); the authors' layer groups and per-group candidate lists are tables made offline
per model and scheme (``LAYER_GROUPING_CONFIG``, ``SPECIAL_LAYERS`` of ``search_optuna_adaptive.py``), here they are
computed from the measured table on every search (the clustering rule is ours: the authors' code holds only its
result). Under ``force_quant`` the second pass is one chunk, so its tokens see their neighbours quantized as the
cache holds them after the chunk, where token-by-token decoding would still see the last window exact: a slightly
pessimistic view of decoding, which is what the authors' cache does for any multi-token call.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from llm_compress.errors import InputError
from llm_compress.kv.config import average_bits, parse_pair
from llm_compress.kv.kivi import KIVILayer
from llm_compress.kv.spec import model_geometry, normalize_spec

Pairs = tuple[tuple[int, int], ...]
Table = list[dict[str, float]]  # one row per layer (or group): candidate name -> objective


class HeldStatesLayer(KIVILayer):
    """A KIVI layer for calibration under ``force_quant``: a call stores its states first and attends to what is
    held then (quantized outside the exact window, its own tokens included), [B, H_kv, seen + q_len, D]. This
    breaks the cache contract that a call's own rows come back exact, on purpose: it is the authors' force_quant,
    never built for inference."""

    def _update(self, k: torch.Tensor, v: torch.Tensor,
                cache_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.append(k)
        self.v.append(v)
        return self.k.read(k), self.v.read(v)


def calibration_cache(pairs: Pairs, group_size: int, residual: int, force_quant: bool):
    """The per-layer KIVI cache a calibration pass runs with (``HeldStatesLayer``s under ``force_quant``)."""
    from llm_compress.kv.base import KVCache

    layer = HeldStatesLayer if force_quant else KIVILayer
    return KVCache([layer(kb, vb, group_size, residual) for kb, vb in pairs])


@torch.no_grad()
def _two_pass_logits(model, rows: torch.Tensor, prefill: int, cache) -> torch.Tensor:
    """Logits [B, T - prefill, V] of the second pass over rows[:, prefill:], after the prompt went into ``cache``."""
    model(input_ids=rows[:, :prefill], past_key_values=cache, use_cache=True)
    return model(input_ids=rows[:, prefill:], past_key_values=cache, use_cache=True).logits.float()


def make_objective(model, rows: torch.Tensor, prefill: int, objective: str, group_size: int, residual: int,
                   force_quant: bool = True) -> Callable[[Pairs], float]:
    """A function from per-layer pairs to the objective on ``rows`` [B, T] (module docstring, step 1)."""
    from transformers import DynamicCache

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
        logits = _two_pass_logits(model, rows, prefill, calibration_cache(pairs, group_size, residual, force_quant))
        if objective == "ppl":
            return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten()).item() - nll_full)
        return max(0.0, (log_p.exp() * (log_p - F.log_softmax(logits, -1))).sum(-1).mean().item())

    return score


def sensitivity(score: Callable[[Pairs], float], num_layers: int, candidates: list[str]) -> Table:
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


def cluster_layers(table: Table, groups: int, objective: str) -> list[list[int]]:
    """``groups`` groups of layer indices (each sorted, ordered by first layer) whose sensitivity profiles are
    alike: Ward agglomerative clustering of the rows of ``table`` as log damage (step 3). Damage = objective minus
    the full cache's (0 for kl, 1 for ppl), floored at 1e-6 of the table's largest so measurement noise around 0
    (ppl can dip below 1) does not spread the profiles. Deterministic: the first cheapest merge wins a tie."""
    if groups >= len(table):
        return [[layer] for layer in range(len(table))]
    names = list(table[0])
    damage = torch.tensor([[row[n] - (1.0 if objective == "ppl" else 0.0) for n in names] for row in table],
                          dtype=torch.float64)  # [L, C]
    floor = max(damage.max().item() * 1e-6, 1e-12)
    features = damage.clamp(min=floor).log()  # [L, C]
    members = [[layer] for layer in range(len(table))]
    means, sizes = features.clone(), torch.ones(len(table), dtype=torch.float64)
    while len(members) > groups:
        # Ward's cost of merging clusters i and j: the rise in within-cluster squared error, n_i n_j / (n_i + n_j)
        # times the squared distance of their means; [k, k], the diagonal excluded.
        cost = torch.cdist(means, means).square() * (sizes[:, None] * sizes[None, :]) / (sizes[:, None] + sizes)
        cost.fill_diagonal_(math.inf)
        i, j = sorted(divmod(int(cost.argmin()), len(members)))
        means[i] = (means[i] * sizes[i] + means[j] * sizes[j]) / (sizes[i] + sizes[j])
        sizes[i] += sizes[j]
        members[i] += members.pop(j)
        keep = [c for c in range(len(sizes)) if c != j]
        means, sizes = means[keep], sizes[keep]
    return sorted(sorted(m) for m in members)


def group_table(table: Table, groups: list[list[int]]) -> Table:
    """Per group, each candidate's sensitivity summed over the group's layers."""
    return [{name: sum(table[layer][name] for layer in group) for name in table[group[0]]} for group in groups]


def prune_candidates(row: dict[str, float]) -> list[str]:
    """The candidates of ``row`` (name -> sensitivity) that no other beats on both bits and sensitivity (no other
    has <= bits and <= sensitivity, one of them strictly), in ``row``'s order (step 3)."""
    bits = {name: sum(parse_pair(name)) for name in row}

    def beaten(a: str) -> bool:
        return any(bits[b] <= bits[a] and row[b] <= row[a] and (bits[b] < bits[a] or row[b] < row[a]) for b in row)

    return [name for name in row if not beaten(name)]


def additive_best(table: Table, budget: float, sizes: list[int] | None = None) -> list[str] | None:
    """The per-row candidates minimising the sum of ``table`` entries with average bits <= budget, row i standing for
    ``sizes[i]`` layers (default 1): an exact DP over the total of k + v bits over the layers, a multiple-choice
    knapsack; None when no choice meets the budget."""
    sizes = sizes or [1] * len(table)
    cap = math.floor(2 * sum(sizes) * budget + 1e-9)  # total k + v bits over the layers
    best: dict[int, tuple[float, list[str]]] = {0: (0.0, [])}
    for row, size in zip(table, sizes):
        nxt: dict[int, tuple[float, list[str]]] = {}
        for used, (cost, names) in best.items():
            for name, s in row.items():
                total = used + sum(parse_pair(name)) * size
                if total <= cap and (total not in nxt or cost + s < nxt[total][0]):
                    nxt[total] = (cost + s, names + [name])
        best = nxt
    return min(best.values(), key=lambda cn: cn[0])[1] if best else None


def per_layer(groups: list[list[int]], names: list[str] | tuple[str, ...]) -> list[str]:
    """Each layer's candidate when group g takes ``names[g]``."""
    out = [""] * sum(len(g) for g in groups)
    for group, name in zip(groups, names):
        for layer in group:
            out[layer] = name
    return out


def _trial(score, groups: list[list[int]], names, seen: dict) -> dict:
    """Measure one configuration (one candidate per group; repeats measured once): its per-layer record."""
    layer_names = per_layer(groups, names)
    pairs = tuple(parse_pair(n) for n in layer_names)
    if tuple(names) not in seen:  # measuring is deterministic
        seen[tuple(names)] = score(pairs)
    return {"candidates": layer_names, "avg_bits": average_bits(list(pairs)), "objective": seen[tuple(names)]}


def _search_exact(score, groups: list[list[int]], options: list[list[str]]) -> list[dict]:
    """Every configuration of the reduced space, measured (over budget too: they draw the whole Pareto curve)."""
    seen: dict = {}
    return [_trial(score, groups, names, seen) for names in itertools.product(*options)]


def _search_optuna(score, groups: list[list[int]], options: list[list[str]], budget: float, trials: int, seed: int,
                   table: Table) -> list[dict]:
    """NSGA-II over one candidate per group (``table``: the groups' pruned sensitivities), seeded (step 4)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, trials // 3)))
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    sizes = [len(g) for g in groups]
    everywhere = [c for c in options[0] if all(c in opt for opt in options)]  # uniform configurations possible
    seeds = [additive_best(table, budget, sizes)] + [[c] * len(groups) for c in everywhere
                                                      if average_bits([parse_pair(c)]) <= budget]
    for names in [s for i, s in enumerate(seeds) if s is not None and s not in seeds[:i]][:trials]:
        study.enqueue_trial({f"group_{g}": n for g, n in enumerate(names)})
    seen: dict = {}
    records: dict[int, dict] = {}

    def run(trial) -> tuple[float, float]:
        names = [trial.suggest_categorical(f"group_{g}", opt) for g, opt in enumerate(options)]
        rec = records[trial.number] = _trial(score, groups, names, seen)
        trial.set_constraint("budget", rec["avg_bits"] - budget)  # feasible when <= 0
        return rec["objective"], rec["avg_bits"]

    study.optimize(run, n_trials=trials)
    return [records[t.number] for t in study.trials if t.values is not None]


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
    tokens. Returns {"spec": the chosen per-layer kivi spec (with a ``search`` record), "sensitivity": the per-layer
    table, "trials": every measured configuration (per-layer candidates), "front": its Pareto front}."""
    spec = normalize_spec(spec)
    if spec["method"] != "kvtuner":
        raise InputError(f"KVTuner search needs a kvtuner spec, got method {spec['method']!r}")
    num_layers, _ = model_geometry(model)
    candidates, budget = spec["candidates"], float(spec["budget"])
    score = make_objective(model, rows, prefill, spec["objective"], spec["group_size"], spec["residual"],
                           spec["force_quant"])
    table = sensitivity(score, num_layers, candidates)
    groups = cluster_layers(table, spec["groups"], spec["objective"])
    options = [prune_candidates(row) if spec["prune"] else list(candidates) for row in group_table(table, groups)]
    space = math.prod(len(opt) for opt in options)
    how = spec["strategy"] if spec["strategy"] != "auto" else ("exact" if space <= spec["max_exact"] else "optuna")
    if how == "exact":
        trials = _search_exact(score, groups, options)
    else:
        reduced = [{n: row[n] for n in opt} for row, opt in zip(group_table(table, groups), options)]
        trials = _search_optuna(score, groups, options, budget, spec["trials"], seed, reduced)
    feasible = [t for t in trials if t["avg_bits"] <= budget + 1e-9]
    best = min(feasible, key=lambda t: (t["objective"], t["avg_bits"]))
    record = {"method": "kvtuner", "objective": spec["objective"], "budget": budget, "strategy": how,
              "force_quant": spec["force_quant"], "groups": groups, "group_candidates": options,
              "space": space, "layer_space": len(candidates) ** num_layers, "trials": len(trials),
              "measured": len({tuple(t["candidates"]) for t in trials}), "candidates": candidates,
              "chosen": best["candidates"], "avg_bits": best["avg_bits"], "value": best["objective"],
              "calib_rows": int(rows.shape[0]), "calib_tokens": int(rows.shape[1]), "prefill": int(prefill)}
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
    ax.set_title(f"KVTuner ({rec['strategy']}, {len(rec['groups'])} layer groups, {rec['measured']} of "
                 f"{rec['space']} configurations measured)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
