"""The launcher's config commands: validate / init / schema, --help, and a light import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
from click.testing import CliRunner

from kubetune.config import PIPELINE_TYPES
from launcher.cli.main import main

DATA = Path(__file__).parents[1] / "data"
GOOD = DATA / "invoke_samples" / "sd_lora_pokemon_1x8gb.yaml"
BAD = DATA / "bad" / "config" / "001-unknown-top-key.yaml"
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate")


def test_launcher_import_stays_light() -> None:
    code = (
        "import sys, launcher.cli.main, launcher.config_files, kubetune.config\n"
        "from click.testing import CliRunner\n"
        f"CliRunner().invoke(launcher.cli.main.main, ['validate', {str(GOOD)!r}])\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_validate_ok_prints_summary_and_exits_0() -> None:
    result = CliRunner().invoke(main, ["validate", str(GOOD)])
    assert result.exit_code == 0
    assert result.output.startswith(f"ok: {GOOD}: SD_LORA run 'sd-lora-pokemon': 4000 steps")


def test_validate_json_for_ci() -> None:
    result = CliRunner().invoke(main, ["validate", "--format", "json", str(GOOD), str(BAD)])
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert doc["valid"] is False
    good, bad = doc["results"]
    assert good["valid"] and good["type"] == "SD_LORA" and good["run_name"] == "sd-lora-pokemon"
    assert not bad["valid"] and "learnig_rate" in bad["errors"][0]


def test_validate_reads_stdin() -> None:
    result = CliRunner().invoke(main, ["validate", "-"], input=GOOD.read_text())
    assert result.exit_code == 0 and "ok: <stdin>" in result.output
    result = CliRunner().invoke(main, ["validate", "-"], input="type: NOPE\n")
    assert result.exit_code == 2 and "<stdin>:1: type:" in result.output


def test_validate_set_override() -> None:
    result = CliRunner().invoke(main, ["validate", "--set", "train_batch_size=0", str(GOOD)])
    assert result.exit_code == 2 and "train_batch_size" in result.output


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "cfg.yaml"
    out.write_text("keep me")
    result = CliRunner().invoke(main, ["init", "--type", "SD_LORA", "-o", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output
    assert out.read_text() == "keep me"
    result = CliRunner().invoke(main, ["init", "--type", "sd_lora", "-o", str(out), "--force"])
    assert result.exit_code == 0 and out.read_text().startswith("# kubetune config")


def test_init_unknown_type_is_usage_error() -> None:
    result = CliRunner().invoke(main, ["init", "--type", "SD_DREAMBOOTH"])
    assert result.exit_code == 2 and "SD_DREAMBOOTH" in result.output


def test_schema_is_json_schema_with_all_types(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    assert CliRunner().invoke(main, ["schema", "-o", str(out)]).exit_code == 0
    schema = json.loads(out.read_text())
    text = json.dumps(schema)
    for pipeline_type in PIPELINE_TYPES:
        assert pipeline_type in text
    # Field docstrings are the user's documentation: they land in the schema.
    assert "Checkpoint every N steps" in text
    assert schema["discriminator"]["propertyName"] == "type"


def test_every_command_help_teaches_with_an_example() -> None:
    for command in ("validate", "init", "schema"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "Example" in result.output, command
    assert "Exit status" in CliRunner().invoke(main, ["--help"]).output


def test_help_does_not_build_the_schema() -> None:
    """`launcher --help` and the cluster commands' parsing stay fast: the pydantic schema,
    the kubernetes client and obstore load only when a command needs them."""
    code = (
        "import sys, launcher.cli.main\n"
        "print(sorted(m for m in ('kubetune.config', 'kubernetes', 'obstore', 'pydantic')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _options(command: Any, prefix: str = "") -> list[tuple[str, Any]]:
    found = [(prefix + command.name, p) for p in command.params if isinstance(p, click.Option)]
    for sub in getattr(command, "commands", {}).values():
        found += _options(sub, prefix + command.name + " ")
    return found


def test_dash_o_always_names_a_path_and_the_format_is_always_format() -> None:
    """One meaning per flag across every command: ``-o`` writes a file or folder,
    ``--format`` picks text or json."""
    options = _options(main)
    dash_o = [(cmd, p) for cmd, p in options if "-o" in p.opts]
    formats = [(cmd, p) for cmd, p in options if "--format" in p.opts]
    assert {cmd.split()[-1] for cmd, _ in dash_o} >= {"init", "schema", "report", "pull"}
    assert [cmd for cmd, p in dash_o if not isinstance(p.type, click.Path)] == []
    assert [cmd for cmd, p in options if isinstance(p.type, click.Choice)
            and "json" in p.type.choices and "--format" not in p.opts] == []  # fmt: skip
    assert {cmd.split()[-1] for cmd, _ in formats} >= {"validate", "submit", "status", "pull"}


def test_validate_says_which_datasets_it_did_not_read(tmp_path: Path) -> None:
    """A dataset in object storage or on the Hub is not read by `validate` (no network): the
    ok line is followed by a note naming the field and where it is and that `--data` reads
    it, so an 'ok' is not taken for 'the bucket exists'; JSON lists them as `unchecked`."""
    import yaml
    from kube_configs import config_dict

    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump(config_dict()))
    result = CliRunner().invoke(main, ["validate", str(config)])
    assert result.exit_code == 0 and result.stdout.startswith(f"ok: {config}:")
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: {config}: data_loader.dataset.dataset_dir: s3://kubetune/data/cats not read "
        "(in object storage or on the Hub); `launcher validate --data` reads it"
    ]
    doc = json.loads(CliRunner().invoke(main, ["validate", "--format", "json", str(config)]).stdout)
    assert doc["results"][0]["unchecked"] == ["data_loader.dataset.dataset_dir"]
    hub = CliRunner().invoke(main, ["validate", str(GOOD)])
    assert "data_loader.dataset.dataset_name: lambdalabs/pokemon" in hub.stderr
