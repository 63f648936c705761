"""The stage interface: what every stage of the chain declares, in its own module under :mod:`llm_compress.pipeline`.

A stage is a subclass of :class:`Stage` with a few class attributes and methods (all but ``name`` and ``run``
optional)::

    class QuantizeStage(Stage):
        name = "quantize"                  # its folder in a run: <run>/quantize
        sections = {"quantize": QuantizeConfig}  # recipe sections it owns: pydantic models, in its cache key
        reads = ("models.dtype",)          # other recipe fields it reads, also in its key
        makes_model = True                 # its "model" output is the next stage's model
        libraries = ("torch", "transformers")

        def rules(self, recipe): ...       # consistency across sections, pure: raise ValueError (a RecipeError)
        def check(self, recipe): ...       # user input, before any work, without torch (compress validate too)
        def inputs(self, recipe, up): ...  # {name: path or hub id}, from upstream outputs or the recipe
        def run(self, ctx): ...            # the algorithm; writes into ctx.out_dir, returns a StageResult

and one line in the registry (:data:`llm_compress.pipeline.STAGES`), whose order is the run order. The pipeline
derives everything else: the recipe's sections (:class:`llm_compress.config.Recipe`), which stages run
(``enabled``), the cache key (owned sections + ``reads`` + extra ``config`` + input digests + the stage's code
version + the versions of its ``libraries``), the manifest and the atomic publish (:mod:`llm_compress.runner`).

Rules: a stage module imports no torch at module level (validation must stay cheap; ``run`` imports what it
needs), never imports Prefect, and reads only its sections, its ``reads`` and the inputs it declares, so its key
covers everything it depends on (tests/test_keys.py records what each stage reads and checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from llm_compress.errors import InputError

if TYPE_CHECKING:
    from llm_compress.result import StageResult

# What stage methods take: an instance of llm_compress.config.Recipe, the model assembled from the registry's stages,
# which therefore cannot be imported here or in the registry; annotations name it through this alias.
Recipe = Any


@dataclass(frozen=True)
class Env:
    """Facts of the machine a run resolves once and keys stages by: ``device`` is 'cpu' or 'cuda', never 'auto'."""

    device: str

    @staticmethod
    def resolve(recipe: Recipe) -> Env:
        device = recipe.runtime.device
        if device == "auto":
            import torch  # only a run resolves 'auto'; validation never gets here

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return Env(device=device)


class Upstream:
    """What a stage sees of the finished stages before it: their manifests, by stage name."""

    def __init__(self, recipe: Recipe, done: dict[str, dict], model_stages: tuple[str, ...] = ()):
        self.recipe, self.done = recipe, done
        self.model_stages = model_stages  # stages whose "model" output is the next model, in run order

    def __contains__(self, stage: str) -> bool:
        return stage in self.done

    def out(self, stage: str, name: str) -> str:
        """Path of output ``name`` of the finished ``stage``."""
        try:
            return self.done[stage]["outputs"][name]["path"]
        except KeyError:
            raise InputError(f"stage '{stage}' has no output '{name}' in this run") from None

    @property
    def teacher(self) -> str:
        m = self.recipe.models
        return self.out("bootstrap", "teacher") if m.teacher == "embedded" else m.teacher

    @property
    def tokenizer(self) -> str:
        m = self.recipe.models
        return m.tokenizer or (self.out("bootstrap", "tokenizer") if m.teacher == "embedded" else m.teacher)

    def models(self) -> dict[str, str]:
        """Every model of the run in pipeline order (name -> ref): the student checkpoint if one is given, then
        each finished model-making stage's output. The teacher is not in it."""
        out = {} if self.recipe.models.student == "derive" else {"student": self.recipe.models.student}
        out.update({s: self.out(s, "model") for s in self.model_stages if s in self.done})
        return out

    @property
    def model(self) -> str:
        """The model the next model stage starts from: the last one made, else the student or the teacher."""
        models = self.models()
        return list(models.values())[-1] if models else self.teacher


@dataclass
class Call:
    """One stage as a run executes it: what defines it (config + inputs) and its cache key."""

    stage: str
    config: dict
    inputs: dict[str, str]
    input_digests: dict[str, str] = field(default_factory=dict)
    key: str = ""
    device: str = "cpu"  # resolved (never 'auto')
    code: str = ""  # the stage's code version (in the key)
    libraries: dict[str, str] = field(default_factory=dict)  # versions of the stage's libraries (in the key)


@dataclass
class Context:
    """What ``Stage.run`` gets: the recipe, its call, where to write, and where shared caches live."""

    recipe: Recipe
    call: Call
    out_dir: Path  # a temporary folder the runner renames into <run>/<stage> once run returns
    artifacts_root: Path

    @property
    def inputs(self) -> dict[str, str]:
        return self.call.inputs

    @property
    def device(self) -> str:
        return self.call.device

    def cache_dir(self, kind: str) -> Path:
        """A folder shared by every run under the same artifacts root (``.cache/<kind>``)."""
        return self.artifacts_root / ".cache" / kind


class Stage:
    """Base of every stage: defaults for the optional parts; see the module docstring."""

    name: ClassVar[str]  # also its folder in a run: <run>/<name>
    sections: ClassVar[dict[str, type]] = {}  # recipe sections it owns: section name -> pydantic model
    unkeyed: ClassVar[tuple[str, ...]] = ()  # owned sections left out of the key (judged after the run, not used in it)
    reads: ClassVar[tuple[str, ...]] = ()  # other recipe fields it reads, dotted ('models', 'models.dtype'): in the key
    makes_model: ClassVar[bool] = False  # outputs "model", which later stages take as their model
    libraries: ClassVar[tuple[str, ...]] = ()  # distributions whose versions are in the key
    uses_runtime: ClassVar[bool] = True  # seed and resolved device are in the key

    def enabled(self, recipe: Recipe) -> bool:
        return bool(getattr(recipe, self.name).enabled)

    def rules(self, recipe: Recipe) -> None:
        """Consistency between its sections and the rest of the recipe, checked whenever a recipe is validated
        (pure: no files, no torch): raise ValueError naming the fields."""

    def check(self, recipe: Recipe) -> None:
        """Cheap checks of user input (paths, model type, vocabulary): raise InputError naming the field."""

    def inputs(self, recipe: Recipe, up: Upstream) -> dict[str, str]:
        return {}

    def config(self, recipe: Recipe, up: Upstream, env: Env) -> dict[str, Any]:
        """What defines the stage besides its inputs: its sections and ``reads``, resolved, plus seed and device."""
        cfg: dict[str, Any] = {s: getattr(recipe, s).model_dump(mode="json")
                               for s in self.sections if s not in self.unkeyed}
        for path in self.reads:
            value: Any = recipe
            for part in path.split("."):
                value = getattr(value, part)
            cfg[path] = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
        if self.uses_runtime:
            cfg["runtime"] = {"seed": recipe.runtime.seed, "device": env.device}
        return cfg

    def run(self, ctx: Context) -> StageResult:
        raise NotImplementedError

    def after(self, recipe: Recipe, up: Upstream) -> None:
        """Checks of the stage's own finished result that can stop the run (the evaluate stage's gates)."""

    def __repr__(self) -> str:
        return f"<stage {self.name}>"
