"""The flow's typed parameters (what the Prefect UI shows as a form) and the deployment it serves."""

from __future__ import annotations

from llm_compress.config import parse_recipe


def test_flow_parameters_are_a_typed_schema_with_choices_and_descriptions():
    from prefect.utilities.callables import parameter_schema

    from llm_compress.flows.pipeline import compress

    schema = parameter_schema(compress)
    assert list(schema.properties) == ["recipe", "run_name", "artifacts_dir", "recipe_path", "until"]
    from llm_compress.pipeline import STAGES

    assert schema.properties["until"]["anyOf"][0]["enum"] == [s.name for s in STAGES]  # a dropdown of the stages
    unlearn = schema.definitions["UnlearnConfig"]["properties"]["method"]["discriminator"]["mapping"]
    assert set(unlearn) == {"shred", "kfade", "gradient_ascent", "gradient_difference", "npo"}
    distill = schema.definitions["DistillConfig"]["properties"]
    # the divergence is a union keyed on its name: each choice shows its own parameters with their ranges
    choices = distill["divergence"]["discriminator"]["mapping"]
    assert {"forward_kl", "reverse_kl", "js", "sinkhorn"} <= set(choices)
    assert "KL(teacher || student)" in distill["divergence"]["description"]
    alpha = schema.definitions["SkewKL"]["properties"]["alpha"]
    assert (alpha["default"], alpha["minimum"], alpha["exclusiveMaximum"]) == (0.1, 0, 1)
    assert set(schema.definitions["Sinkhorn"]["properties"]) == {"name", "epsilon", "iterations", "debias", "reduction"}
    setting = schema.definitions["RTNConfig"]["properties"]["setting"]
    assert "W4A4KV4" in setting["description"]
    # a dropdown of the papers' settings, or any other combination as text (validated by the same grammar)
    common, other = setting["anyOf"]
    assert {"W4A16", "W8A8", "W4A4KV4"} <= set(common["enum"]) and other == {"title": "Other setting", "type": "string"}
    assert "kl_top" in schema.definitions["OSTQuantConfig"]["properties"]["loss"]["enum"]


def test_recipe_deployment_with_a_schedule_builds():
    from llm_compress.flows.pipeline import compress

    dep = compress.to_deployment(name="nightly", cron="0 2 * * *",
                                 parameters={"recipe": parse_recipe({}).model_dump(mode="json"), "run_name": "n"})
    assert dep.name == "nightly" and dep.schedules and dep.parameters["run_name"] == "n"


def test_cli_help_for_every_command(capsys):
    import pytest

    from llm_compress.flows.cli import build_parser

    parser = build_parser()
    for cmd in ("demo", "run", "validate", "runs", "show", "serve"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: compress " + cmd in capsys.readouterr().out


def test_validate_prints_the_resolved_recipe(capsys):
    from llm_compress.flows.cli import main

    from tests.conftest import ROOT

    assert main(["validate", str(ROOT / "configs" / "demo.yaml"), "--set", "distill.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out
    assert "stages: bootstrap -> select -> data -> distill -> unlearn -> quantize -> kv -> evaluate -> export" in out


def test_each_flow_run_gets_its_own_run_folder_name_unless_one_is_given(monkeypatch):
    from llm_compress.flows.cli import default_run_name
    from llm_compress.flows.pipeline import run_name_for
    from llm_compress.config import check_run_name

    recipe = parse_recipe({})
    base = default_run_name(recipe)
    # no flow run (a plain call): the recipe's default, as `compress run` names it
    assert run_name_for(recipe, None) == base and run_name_for(recipe, "mine") == "mine"
    # inside a flow run (faked the way prefect.runtime documents): the flow run's name and id
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__ID", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__NAME", "crafty-owl")
    first = run_name_for(recipe, None)
    assert first == f"{base}-crafty-owl-c3d2e1f0" and run_name_for(recipe, "mine") == "mine"
    # UUIDv7 ids of runs made in one scheduler pass share their leading (timestamp) digits, not their last ones
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__ID", "0f1e2d3c-4b5a-7978-8796-000000000001")
    assert run_name_for(recipe, None) == f"{base}-crafty-owl-00000001"  # another run, another folder
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__NAME", "nightly run #2 / ../" + "x" * 200)  # typed in the UI
    name = check_run_name(run_name_for(parse_recipe({"name": "r" * 80}), None))
    assert len(name) <= 100 and name.endswith("-00000001") and "/" not in name and ".." not in name


def test_serve_leaves_the_run_name_to_each_flow_run(monkeypatch):
    from llm_compress.flows.cli import main
    from llm_compress.flows.pipeline import compress

    from tests.conftest import TINY

    served = []
    monkeypatch.setattr(compress, "serve", lambda **kw: served.append(kw))
    assert main(["serve", str(TINY)]) == 0
    assert "run_name" not in served[-1]["parameters"] and served[-1]["parameters"]["recipe"]["name"] == "tiny"
    assert main(["serve", str(TINY), "--run-name", "fixed"]) == 0
    assert served[-1]["parameters"]["run_name"] == "fixed"
    assert main(["serve", str(TINY), "--run-name", "../x"]) == 2 and len(served) == 2
