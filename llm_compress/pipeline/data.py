"""The data stage: read, tokenize and pack the training and held-out documents. Algorithm: :mod:`llm_compress.data`.

Training documents are the DSIR selection when select ran, else ``data``'s source; held-out ones always come
from ``data``. A `datasets` dataset is keyed by its content (local folder) or resolved commit (hub id).
"""

from __future__ import annotations

from pathlib import Path

from llm_compress.errors import InputError
from llm_compress.refs import PATH_PREFIXES, is_local_ref
from llm_compress.stage import Context, Env, Stage, Upstream



class Data(Stage):
    name = "data"
    reads = ("data", "models.revision", "models.trust_remote_code")  # data: the frame's section, keyed here
    libraries = ("tokenizers", "transformers", "datasets", "safetensors", "torch")
    uses_runtime = False

    def enabled(self, recipe) -> bool:
        return True

    def check(self, recipe) -> None:
        d, tok = recipe.data, recipe.models.tokenizer
        if d.source == "files":
            missing = [p for p in d.train + d.eval if not Path(p).is_file()]
            if missing:
                raise InputError(f"data file(s) not found: {', '.join(missing)}")
        # a dataset name may be a hub id with or without an org ("Salesforce/wikitext", "wikitext"): only a
        # name written as a path must exist here
        if d.source == "hf" and d.hf.name.startswith(PATH_PREFIXES) and not Path(d.hf.name).expanduser().exists():
            raise InputError(f"data.hf.name: dataset folder not found: {d.hf.name}")
        if tok and is_local_ref(tok) and not Path(tok).expanduser().exists():
            raise InputError(f"models.tokenizer: not found: {tok}")

    def inputs(self, recipe, up: Upstream) -> dict[str, str]:
        d = recipe.data
        inputs = {"tokenizer": up.tokenizer}
        if "select" in up:
            inputs["selected"] = up.out("select", "selected")
        if d.source == "embedded":
            inputs["corpus"] = up.out("bootstrap", "corpus")
        elif d.source == "files":
            inputs.update({f"train{i}": p for i, p in enumerate(d.train)})
            inputs.update({f"eval{i}": p for i, p in enumerate(d.eval)})
        else:  # a datasets dataset: a local folder (keyed by content) or a hub id (keyed by its commit)
            inputs["dataset"] = d.hf.name
        return inputs

    def config(self, recipe, up: Upstream, env: Env) -> dict:
        cfg = super().config(recipe, up, env)
        if "select" in up:
            cfg["train_text_field"] = recipe.select.dsir.text_field
        return cfg

    def run(self, ctx: Context):
        from llm_compress import data
        from llm_compress.modeling import load_tokenizer

        i, m = ctx.inputs, ctx.recipe.models
        tok = load_tokenizer(i["tokenizer"], trust_remote_code=m.trust_remote_code, revision=m.revision)
        return data.run(ctx.recipe.data, tok, ctx.out_dir, Path(i["corpus"]) if "corpus" in i else None,
                        selected=Path(i["selected"]) if "selected" in i else None,
                        selected_text_field=ctx.call.config.get("train_text_field", "text"))


STAGE = Data()
