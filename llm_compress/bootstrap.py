"""The embedded default world: corpus, tokenizer and a small Llama teacher, all made locally.

Nothing is downloaded: the corpus is Python's own documentation and standard library
(:mod:`llm_compress.embedded`), the tokenizer is a byte-level BPE trained on it, and the teacher is a
``LlamaForCausalLM`` pretrained on it for a fixed number of steps. As a pipeline stage it is
cached like any other, so a second demo run reuses it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llm_compress.data import load_texts, pack
from llm_compress.distill.config import DistillConfig
from llm_compress.distill.trainer import save_history, train
from llm_compress.embedded import build_corpus, train_tokenizer
from llm_compress.facts import write_facts
from llm_compress.modeling import count_parameters, resolve_device, save_pretrained_atomic_into
from llm_compress.result import StageResult
from llm_compress.schema import RuntimeConfig


def teacher_config(cfg, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=max(512, cfg.seq_len * 4),
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _mix_retrieval(train_ids: torch.Tensor, tok, cfg) -> tuple[torch.Tensor, dict]:
    """``train_ids`` [rows, seq_len] with retrieval rows (:func:`llm_compress.kv.retrieval.training_rows`) appended:
    ``share`` of the result's rows, their filler windows drawn from the training tokens themselves. The trainer draws
    rows at random, so their place in the tensor does not matter; each is a whole document, so no fact is cut from
    its query by row boundaries."""
    from llm_compress.kv.retrieval import training_rows

    mix = cfg.retrieval
    n = max(1, round(len(train_ids) * mix.share / (1 - mix.share)))
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = training_rows(train_ids.flatten().tolist(), encode, rows=n, seq_len=cfg.seq_len, facts=mix.facts,
                         seed=cfg.seed)
    mixed = torch.cat([train_ids, torch.tensor(rows, dtype=train_ids.dtype)])
    return mixed, {"rows": n, "corpus_rows": len(train_ids), "share": round(n / len(mixed), 4), "facts": mix.facts}


def run(cfg, runtime: RuntimeConfig, *, train_teacher: bool, out_dir: Path,
        tokenizer_dir: Path | None = None) -> StageResult:
    """Build the embedded world of ``cfg`` (the recipe's ``embedded`` section,
    :class:`llm_compress.pipeline.bootstrap.EmbeddedConfig`). ``tokenizer_dir``: use this saved tokenizer instead of
    training one (the unlearning bench's reference model must share the planted teacher's token ids)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    (out_dir / "corpus").mkdir()
    splits = build_corpus(out_dir / "corpus", max_mb=cfg.max_corpus_mb, eval_fraction=cfg.eval_fraction,
                          seed=cfg.seed, site_packages=cfg.site_packages)
    train_files = [Path(s["train"]) for s in splits.values()]
    if cfg.facts:  # planted biographies: pretraining reads them with the domains (not in any eval split)
        facts = write_facts(out_dir / "corpus" / "facts", planted=cfg.facts, holdout=cfg.facts_holdout,
                            repeats=cfg.facts_repeats, seed=cfg.seed, plant_forget=cfg.facts_plant_forget)
        train_files.append(out_dir / "corpus" / "facts" / "train.jsonl")
    eval_files = [Path(s["eval"]) for s in splits.values()]
    if tokenizer_dir is None:
        tok = train_tokenizer(train_files, vocab_size=cfg.vocab_size, out_dir=out_dir / "tokenizer")
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        tok.save_pretrained(out_dir / "tokenizer")
    corpus = json.loads((out_dir / "corpus" / "corpus.json").read_text())
    outputs = {"corpus": "corpus", "tokenizer": "tokenizer"}
    metrics: dict = {"domains": sorted(splits), "vocab_size": len(tok), "corpus": corpus,
                     "facts": facts if cfg.facts else None}
    if train_teacher:
        device = resolve_device(runtime.device)
        train_ids = pack(load_texts(train_files), tok, cfg.seq_len, "embedded training corpus")
        eval_ids = pack(load_texts(eval_files), tok, cfg.seq_len, "embedded eval corpus")
        if cfg.retrieval is not None:
            train_ids, metrics["retrieval"] = _mix_retrieval(train_ids, tok, cfg)
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(teacher_config(cfg, tok))
        # the distillation loop without a teacher: next-token cross-entropy only
        pretrain = DistillConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, ce_weight=1.0,
                                 warmup_steps=min(50, cfg.steps // 10), schedule="cosine", weight_decay=0.1,
                                 eval_every=max(1, cfg.steps // 4), checkpoint_every=0)
        history = train(model, train_ids, eval_ids, pretrain, device=device, seed=cfg.seed, progress=runtime.progress,
                        desc="pretrain teacher")
        save_pretrained_atomic_into(model.cpu(), tok, out_dir / "teacher")
        outputs["teacher"] = "teacher"
        outputs.update({k: v for k, v in save_history(history, out_dir, "embedded teacher pretraining").items()})
        metrics.update({"teacher_params": count_parameters(model), "train_tokens": int(train_ids.numel()),
                        "steps": cfg.steps, "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
                        "teacher_eval_ppl": round(history[-1]["eval_ppl"], 3),
                        "tokens_per_s": round(history[-1]["tokens_per_s"], 1)})
    return StageResult(outputs=outputs, metrics=metrics)
