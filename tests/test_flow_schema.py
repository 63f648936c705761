"""The flow's typed parameters (what the Prefect UI shows as a form) and the deployment it serves."""

from __future__ import annotations

from stages.config import parse_recipe


def test_flow_parameters_are_a_typed_schema_with_choices_and_descriptions():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import compress

    schema = parameter_schema(compress)
    assert list(schema.properties) == ["recipe", "run_name", "artifacts_dir"]
    distill = schema.definitions["DistillConfig"]["properties"]
    # the divergence is a union keyed on its name: each choice shows its own parameters with their ranges
    choices = distill["divergence"]["discriminator"]["mapping"]
    assert {"forward_kl", "reverse_kl", "js", "sinkhorn"} <= set(choices)
    assert "KL(teacher || student)" in distill["divergence"]["description"]
    alpha = schema.definitions["SkewKL"]["properties"]["alpha"]
    assert (alpha["default"], alpha["minimum"], alpha["exclusiveMaximum"]) == (0.1, 0, 1)
    assert set(schema.definitions["Sinkhorn"]["properties"]) == {"name", "epsilon", "iterations", "debias", "reduction"}
    assert "W4A4KV4" in schema.definitions["RTNConfig"]["properties"]["setting"]["description"]
    assert "kl_top" in schema.definitions["OSTQuantConfig"]["properties"]["loss"]["enum"]


def test_recipe_deployment_with_a_schedule_builds():
    from flows.pipeline import compress

    dep = compress.to_deployment(name="nightly", cron="0 2 * * *",
                                 parameters={"recipe": parse_recipe({}).model_dump(mode="json"), "run_name": "n"})
    assert dep.name == "nightly" and dep.schedules and dep.parameters["run_name"] == "n"


def test_cli_help_for_every_command(capsys):
    import pytest

    from flows.cli import build_parser

    parser = build_parser()
    for cmd in ("demo", "run", "validate", "runs", "show", "serve"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: compress " + cmd in capsys.readouterr().out


def test_validate_prints_the_resolved_recipe(capsys):
    from flows.cli import main

    from tests.conftest import ROOT

    assert main(["validate", str(ROOT / "configs" / "demo.yaml"), "--set", "distill.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out
    assert "stages: bootstrap -> select -> data -> distill -> quantize -> kv -> evaluate -> export" in out
