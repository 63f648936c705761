"""Recipe validation: bad recipes fail before any work, naming the field and the allowed values."""

from __future__ import annotations

import pytest

from llm_compress.config import apply_overrides, load_recipe, parse_recipe
from llm_compress.errors import RecipeError


def write(tmp_path, text: str):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_demo_and_example_recipes_validate():
    from tests.conftest import ROOT

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_recipe(path)


def test_defaults_are_the_embedded_demo():
    r = parse_recipe({})
    assert r.models.teacher == "embedded" and r.data.source == "embedded" and r.uses_embedded
    assert r.distill.divergence.name == "forward_kl" and r.quantize.scheme.method == "rtn"


def test_malformed_yaml_names_line(tmp_path):
    with pytest.raises(RecipeError, match=r"malformed YAML at line 3, column 2"):
        load_recipe(write(tmp_path, "distill:\n  steps: 1\n lr: 2\n"))


def test_not_a_mapping(tmp_path):
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_unknown_field_lists_allowed_fields(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, "distill:\n  stepz: 3\n"))
    msg = str(e.value)
    assert "distill.stepz: unknown field in distill" in msg and "steps" in msg and "divergence" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(RecipeError, match=r"distil: unknown field; allowed: .*distill"):
        load_recipe(write(tmp_path, "distil:\n  steps: 3\n"))


def test_bad_choice_names_allowed_values(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, "models:\n  dtype: int3\n"))
    assert "models.dtype" in str(e.value) and "'float32'" in str(e.value) and "int3" in str(e.value)


def test_unknown_divergence(tmp_path):
    with pytest.raises(RecipeError, match=r"distill.divergence: Input tag 'euclid' .* "
                                          r"expected tags: 'forward_kl', 'reverse_kl', 'js'"):
        load_recipe(write(tmp_path, "distill:\n  divergence: euclid\n"))


@pytest.mark.parametrize("text, match", [
    ("unlearn:\n  enabled: true\n  method: {method: shred, forget_share: 1.5}\n", "unlearn.method.shred.forget_share"),
    ("unlearn:\n  enabled: true\n  method: {method: kfade, trust_region: 0}\n", "unlearn.method.kfade.trust_region"),
    ("unlearn:\n  enabled: true\n  method: forget_everything\n", "unlearn.method: Input tag 'forget_everything'"),
    ("gates:\n  max_forget_regain: 0.1\n", "judge unlearning but unlearn.enabled is false"),
    ("models: {teacher: /nowhere}\nunlearn:\n  enabled: true\n", "planted in the embedded teacher only"),
])
def test_bad_unlearn_section_is_refused_naming_the_field(tmp_path, text, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(write(tmp_path, text))


@pytest.mark.parametrize("text, field", [
    ("distill:\n  temperature: -1\n", "distill.temperature"),
    ("distill:\n  ce_weight: 1.5\n", "distill.ce_weight"),
    ("quantize:\n  scheme: {method: rtn, setting: W9A16}\n", "setting"),
    ("quantize:\n  scheme: {method: gptq, setting: W4A5KV}\n", "setting"),
    ("quantize:\n  scheme: {method: ostquant, loss: l1}\n", "loss"),
    ("quantize:\n  scheme: {method: rtn, group_size: 48}\n", "group_size"),
    ("kv:\n  cache: {method: kvtuner, budget: 1.5}\n", "below the cheapest candidate"),
    ("kv:\n  cache: {method: kvtuner, strategy: grid}\n", "strategy"),
    ("name: ../escape\n", "name"),
    ("name: a/b\n", "name"),
    ("data:\n  source: files\n", "data"),
    ("embedded:\n  hidden_size: 100\n  num_heads: 6\n", "embedded"),
])
def test_bad_values_name_the_field(tmp_path, text, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        load_recipe(write(tmp_path, text))


def test_enabled_select_needs_targets_and_k(tmp_path):
    with pytest.raises(RecipeError, match="select.raw, select.targets and select.dsir.k"):
        load_recipe(write(tmp_path, "select:\n  enabled: true\n"))
    with pytest.raises(RecipeError, match=r"select.dsir.k"):
        load_recipe(write(tmp_path, "select:\n  enabled: true\n  targets: [{paths: [a]}]\n  dsir: {buckets: 3}\n"))


def test_divergence_parameters_are_typed_per_divergence(tmp_path):
    r = load_recipe(write(tmp_path, "distill:\n  divergence: {name: skew_kl, alpha: 0.2}\n"))
    assert r.distill.divergence.name == "skew_kl" and r.distill.divergence.alpha == 0.2
    assert load_recipe(write(tmp_path, "distill:\n  divergence: gjsd\n")).distill.divergence.beta == 0.5  # shorthand
    with pytest.raises(RecipeError, match=r"distill.divergence.skew_kl.alpha: Input should be less than 1"):
        load_recipe(write(tmp_path, "distill:\n  divergence: {name: skew_kl, alpha: 1.5}\n"))
    with pytest.raises(RecipeError, match=r"distill.divergence.js.beta: unknown field"):
        load_recipe(write(tmp_path, "distill:\n  divergence: {name: js, beta: 0.5}\n"))
    with pytest.raises(RecipeError, match=r"divergence_params was replaced by typed fields"):
        load_recipe(write(tmp_path, "distill:\n  divergence: skew_kl\n  divergence_params: {alpha: 0.2}\n"))


def test_derived_student_needs_distillation(tmp_path):
    with pytest.raises(RecipeError, match="derive"):
        load_recipe(write(tmp_path, "distill:\n  enabled: false\n"))


def test_overrides_are_parsed_as_yaml():
    data = apply_overrides({}, ["distill.steps=5", "quantize.scheme.group_size=null", "export.formats=[onnx]"])
    r = parse_recipe(data)
    assert r.distill.steps == 5 and r.quantize.scheme.group_size is None and r.export.formats == ["onnx"]
    with pytest.raises(RecipeError, match="expected section.key=value"):
        apply_overrides({}, ["distill.steps"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_group_suffix_of_the_setting_is_the_group_size(tmp_path):
    # "W4A16g128" used to keep group_size unset, so RTN and GPTQ quantized per channel under a g128 label.
    for method in ("rtn", "gptq", "ostquant"):
        text = f"quantize:\n  scheme: {{method: {method}, setting: W4A16g128}}\nexport: {{enabled: false}}\n"
        r = load_recipe(write(tmp_path, text))
        s = r.quantize.scheme
        assert (s.setting, s.group_size, s.quant_setting().w_group_size) == ("W4A16", 128, 128)
    with pytest.raises(RecipeError, match="names group size 64 but group_size is 128"):
        load_recipe(write(tmp_path, "quantize:\n  scheme: {setting: W4A16g64, group_size: 128}\n"))


def test_kv_cache_is_typed_per_method_and_checked_by_the_caches_own_rules(tmp_path):
    r = load_recipe(write(tmp_path, "kv:\n  enabled: true\n  cache: {bits: [2, 4], group_size: 16, residual: 32}\n"))
    assert (r.kv.cache.method, r.kv.cache.bits, r.kv.cache.group_size) == ("kivi", [2, 4], 16)  # kivi by default
    r = load_recipe(write(tmp_path, "kv:\n  enabled: true\n  cache: {method: minicache, bits: [4, 4]}\n"))
    assert r.kv.cache.method == "minicache" and r.kv.cache.t == 0.6
    for text, msg in (("{bits: [3, 4]}", "KIVI key bits must be one of"),
                      ("{group_size: 32, residual: 48}", "residual must be a positive multiple of the group size"),
                      ("{method: minicache, gamma: -1}", r"gamma must lie in \[0, 1\]"),
                      ("{method: sink, window: 0}", "window must be an integer >= 1")):
        with pytest.raises(RecipeError, match=msg):
            load_recipe(write(tmp_path, f"kv:\n  enabled: true\n  cache: {text}\n"))
    with pytest.raises(RecipeError, match="kv.cache.sink.t: unknown field"):
        load_recipe(write(tmp_path, "kv:\n  enabled: true\n  cache: {method: sink, t: 0.5}\n"))
