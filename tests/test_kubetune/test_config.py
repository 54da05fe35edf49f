"""The config schema: valid configs round-trip, invalid ones name the exact field path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kubetune.config import (
    PIPELINE_TYPES,
    config_hash,
    config_to_yaml,
    load_config,
    output_uri,
    parse_config,
    run_name,
)
from kubetune.errors import ConfigError
from launcher.cli.main import main
from launcher.config_files import starter_config, validate_file

DATA = Path(__file__).parents[1] / "data"
ROOT = Path(__file__).parents[2]
BAD = sorted((DATA / "bad" / "config").glob("*.yaml"))
SAMPLES = sorted((DATA / "invoke_samples").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _expectation(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} needs an '# expect:' header"
    return first.removeprefix("# expect: ")


def test_bad_corpus_is_large_enough() -> None:
    assert len(BAD) >= 50


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_invalid_config_names_field_path(path: Path) -> None:
    expect = _expectation(path)
    result = validate_file(str(path))
    assert not result.valid
    text = "\n".join(result.errors)
    if expect.startswith("~"):
        assert expect[1:] in text
    else:
        assert f": {expect}: " in text, text
    for line in result.errors:
        assert line.startswith(f"{path}:"), "every problem names the file and line"
        assert "\n" not in line and "Traceback" not in line


@pytest.mark.parametrize("path", BAD[::9], ids=lambda p: p.stem)
def test_invalid_config_exits_2_through_cli(path: Path) -> None:
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert result.output.count("error: ") >= 1


@pytest.mark.parametrize("path", SAMPLES + EXAMPLES, ids=lambda p: p.stem)
def test_valid_configs_round_trip(path: Path) -> None:
    cfg = load_config(path)
    again = parse_config(config_to_yaml(cfg))
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    # Every field from the file survives the round trip unchanged; a relative local path
    # comes back absolute, under the file's folder (kubetune.config.paths).
    raw = yaml.safe_load(path.read_text())
    dumped = yaml.safe_load(config_to_yaml(cfg))
    for key, value in raw.items():
        if key == "base_output_dir":
            assert dumped[key] == os.path.normpath(path.parent / value), key
        elif isinstance(value, (str, bool, int)) and not isinstance(dumped[key], float):
            assert dumped[key] == value, key


def test_sample_configs_cover_every_type() -> None:
    upstream = sorted((DATA / "invoke_training_samples").glob("*.yaml"))
    assert {load_config(p).type for p in SAMPLES + upstream} == set(PIPELINE_TYPES)


@pytest.mark.parametrize(
    "name", ["sdxl_lora_masks_gnome_1x24gb", "sdxl_textual_inversion_masks_gnome_1x24gb"]
)
def test_invoke_training_mask_samples_validate_unchanged(name: str) -> None:
    """invoke-training's two `use_masks` samples, copied byte for byte, validate as written."""
    path = DATA / "invoke_samples" / f"{name}.yaml"
    result = validate_file(str(path), local_data=False)  # their data is not in this repo
    assert result.valid, result.errors
    cfg = load_config(path)
    assert cfg.use_masks is True
    assert cfg.data_loader.dataset.type == "IMAGE_CAPTION_JSONL_DATASET"


@pytest.mark.parametrize("pipeline_type", PIPELINE_TYPES)
def test_starter_config_validates_and_round_trips(pipeline_type: str, tmp_path: Path) -> None:
    out = tmp_path / "c.yaml"
    result = CliRunner().invoke(main, ["init", "--type", pipeline_type, "-o", str(out)])
    assert result.exit_code == 0, result.output
    cfg = load_config(out)
    assert cfg.type == pipeline_type
    assert out.read_text() == starter_config(pipeline_type)
    assert parse_config(config_to_yaml(cfg)) == cfg


def test_all_problems_reported_at_once_with_lines() -> None:
    text = (
        "type: SD_LORA\n"
        "base_output_dir: out/x\n"
        "max_train_steps: 10\n"
        "max_train_epochs: 1\n"
        "save_every_n_steps: 5\n"
        "learnign_rate: 3\n"
        "data_loader:\n"
        "  type: IMAGE_CAPTION_SD_DATA_LOADER\n"
        "  dataset: {type: IMAGE_CAPTION_DIR_DATASET, dataset_dir: d}\n"
        "  resolution: -8\n"
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text, name="c.yaml")
    problems = err.value.problems
    assert (
        "c.yaml:6: learnign_rate: unknown key; did you mean 'optimizer.learning_rate'?"
        not in problems
    )  # a typo of a nested key is not an exact nested field
    assert any(p.startswith("c.yaml:6: learnign_rate: unknown key") for p in problems)
    assert any(
        p.startswith("c.yaml:10: data_loader.resolution: must be positive") for p in problems
    )
    assert len(problems) == 2  # the cross-field rule runs once the fields are valid


def test_cross_field_rules_reported_together() -> None:
    text = (
        "type: SD_LORA\nbase_output_dir: o\nmax_train_steps: 1\nmax_train_epochs: 1\n"
        "save_every_n_steps: 1\nsave_every_n_epochs: 1\nuse_masks: true\n"
        "data_loader: {type: IMAGE_CAPTION_SD_DATA_LOADER,"
        " dataset: {type: IMAGE_CAPTION_DIR_DATASET, dataset_dir: d}}\n"
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text, name="c.yaml")
    joined = "\n".join(err.value.problems)
    assert "c.yaml:4: max_train_epochs: set only one of" in joined
    assert "c.yaml:6: save_every_n_epochs: set only one of" in joined
    assert "c.yaml:7: use_masks:" in joined


def test_nested_key_at_top_level_suggests_its_section() -> None:
    text = (
        "type: SD_LORA\nbase_output_dir: o\nmax_train_steps: 1\nsave_every_n_steps: 1\n"
        "learning_rate: 0.1\n"
        "data_loader: {type: IMAGE_CAPTION_SD_DATA_LOADER,"
        " dataset: {type: IMAGE_CAPTION_DIR_DATASET, dataset_dir: d}}\n"
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text, name="c.yaml")
    assert err.value.problems == [
        "c.yaml:5: learning_rate: unknown key here; did you mean 'optimizer.learning_rate'?"
    ]


def test_overrides_apply_before_validation() -> None:
    cfg = load_config(
        SAMPLES[0],
        overrides=["max_train_steps=7", "optimizer.learning_rate=0.5", "job.name=Nightly Run"],
    )
    assert cfg.max_train_steps == 7
    assert cfg.optimizer.learning_rate == 0.5
    assert run_name(cfg) == "nightly-run"
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(SAMPLES[0], overrides=["max_train_steps"])


def test_output_uri_with_and_without_storage() -> None:
    cfg = load_config(SAMPLES[0])
    assert output_uri(cfg) == str(SAMPLES[0].parent / "output/sd_lora_pokemon")
    cfg = load_config(SAMPLES[0], overrides=["storage.bucket=runs", "storage.prefix=team/a/"])
    assert output_uri(cfg) == "s3://runs/team/a/sd-lora-pokemon"


def test_config_hash_changes_with_any_field() -> None:
    a = load_config(SAMPLES[0])
    b = load_config(SAMPLES[0], overrides=["seed=2"])
    assert config_hash(a) != config_hash(b)
    assert config_hash(a) == config_hash(load_config(SAMPLES[0]))


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "no such file" in result.output


def test_every_config_field_is_documented() -> None:
    """Field docstrings are the user's documentation (schema descriptions, reference)."""
    from kubetune.config.base import document_fields
    from kubetune.config.loader import all_models

    document_fields(all_models())
    missing = [
        f"{cls.__name__}.{name}"
        for cls in all_models()
        for name, field in cls.model_fields.items()
        if not field.description and name not in ("type", "optimizer_type")
    ]
    assert missing == []


@pytest.mark.parametrize("key", ["tuple[", "SD_LORA", "int", "AdamW", "function-after"])
def test_keys_named_like_union_labels_keep_their_path(key: str) -> None:
    """Found by the fuzzer: pydantic's union branch labels must not swallow real keys."""
    text = SAMPLES[0].read_text() + f"{key!r}: 1\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, name="c.yaml")
    assert any(
        f": {key}: unknown key" in p or f": {key}: not valid" in p for p in err.value.problems
    ), err.value.problems


def test_unknown_keys_are_located_in_the_users_terms() -> None:
    """What the UI lists (not loads) of a reference config: every key the schema does not
    know, as a path into the file (union branch labels left out)."""
    from kubetune.config.loader import unknown_keys

    data = {
        "type": "SD_LORA",
        "base_output_dir": "out",
        "frobnicate": 1,
        "optimizer": {"optimizer_type": "AdamW", "learning_rate": 1e-4, "betas": [0.9, 0.99]},
        "data_loader": {
            "type": "IMAGE_CAPTION_SD_DATA_LOADER",
            "dataset": {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "d", "shuffle": True},
        },
    }
    assert sorted(unknown_keys(data)) == [
        ("data_loader", "dataset", "shuffle"),
        ("frobnicate",),
        ("optimizer", "betas"),
    ]
    del data["frobnicate"], data["optimizer"]["betas"], data["data_loader"]["dataset"]["shuffle"]
    assert unknown_keys(data) == []


def test_bad_type_names_the_line_of_the_type_key() -> None:
    """A starter file opens with comments: the `type:` line is not line 1."""
    text = "# my config\n# more\ntype: SD_LORRA\nbase_output_dir: o\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, name="c.yaml")
    assert err.value.problems[0].startswith("c.yaml:3: type: 'SD_LORRA' is not a pipeline type")


def test_resolved_yaml_reads_type_first_and_kubetune_sections_last() -> None:
    """The run's config.yaml, the report and the UI's Generate Config show this text: it opens
    with `type:` like the user's file, and ends with the job / storage / notify sections."""
    cfg = load_config(ROOT / "examples" / "quickstart.yaml")
    text = config_to_yaml(cfg)
    keys = [line.split(":")[0] for line in text.splitlines() if line[:1].isalpha()]
    assert keys[0] == "type" and keys[-3:] == ["job", "storage", "notify"]
    assert parse_config(text) == cfg


def test_a_mistyped_choice_suggests_the_closest_one() -> None:
    text = (
        "type: SD_LORA\nbase_output_dir: o\nmax_train_steps: 1\nsave_every_n_steps: 1\n"
        "lr_scheduler: constant_warmup\nmixed_precision: BF16\n"
        "data_loader:\n  type: IMAGE_CAPTION_SD_DATA_LOADER\n"
        "  dataset: {type: IMAGE_CAPTION_DIR_DATASET, dataset_dir: d}\n"
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text, name="c.yaml")
    problems = err.value.problems
    assert problems[0].startswith("c.yaml:5: lr_scheduler: did you mean 'constant_with_warmup'?")
    assert problems[1].startswith("c.yaml:6: mixed_precision: did you mean 'bf16'?")
    assert "(got 'BF16')" in problems[1] and "'fp16'" in problems[1]  # the choices stay


def test_a_bad_override_is_blamed_on_the_set_not_the_file() -> None:
    """The file is fine; `--set` put the mistake in: the line names the --set, not a file
    line (the unknown key is on no line of the file; line 1 or its parent's line misleads)."""
    with pytest.raises(ConfigError) as err:
        load_config(
            ROOT / "examples" / "quickstart.yaml",
            overrides=["max_train_step=5", "optimizer.learning_rate=abc"],
        )
    problems = err.value.problems
    assert "--set max_train_step=5: max_train_step: unknown key; did you mean" in problems[0]
    assert problems[1].startswith("--set optimizer.learning_rate=abc: optimizer.learning_rate: ")
    assert len(problems) == 2


def test_a_set_that_conflicts_with_the_file_names_the_set_and_how_to_clear_the_file(
    tmp_path: Path,
) -> None:
    """invoke-training's samples give `max_train_epochs`; `--set max_train_steps=4` for a
    short try was blamed on the file's (fine) max_train_epochs line, with no word of how to
    drop it from the command line."""
    config = tmp_path / "epochs.yaml"
    text = (ROOT / "examples" / "quickstart.yaml").read_text()
    config.write_text(text.replace("max_train_steps: 40", "max_train_epochs: 3"))
    with pytest.raises(ConfigError) as err:
        load_config(config, overrides=["max_train_steps=4"])
    (problem,) = err.value.problems
    line = text.splitlines().index("max_train_steps: 40") + 1
    assert problem.startswith("--set max_train_steps=4: max_train_epochs: set only one of")
    assert f"{config}:{line} sets max_train_epochs" in problem
    assert "add --set max_train_epochs=null" in problem
    assert load_config(config, overrides=["max_train_steps=4", "max_train_epochs=null"])


def test_a_missing_dataset_from_a_set_is_blamed_on_the_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's dataset is fine; the folder a --set names (relative to the working folder)
    is missing: the error names the --set, not the file's dataset_dir line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
    override = "data_loader.dataset.dataset_dir=nowhere"
    result = validate_file(str(ROOT / "examples" / "quickstart.yaml"), overrides=[override])
    (problem,) = result.errors
    assert problem.startswith(f"--set {override}: data_loader.dataset.dataset_dir: ")
    assert str(tmp_path / "nowhere") in problem
    out = CliRunner().invoke(
        main, ["submit", "--local", str(ROOT / "examples" / "quickstart.yaml"), "--set", override]
    )
    assert out.exit_code == 2 and f"--set {override}: " in out.output, out.output
    assert not (tmp_path / "home" / "runs").exists()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_shipped_examples_validate_without_warnings(path: Path) -> None:
    """A newcomer's first `launcher validate examples/*.yaml` shows no advice to act on."""
    result = validate_file(str(path), local_data=False)
    assert result.valid and result.warnings == [], result.warnings


def test_a_model_path_that_is_neither_a_folder_nor_a_hub_name_fails_validate(
    tmp_path: Path,
) -> None:
    """`model: models/sd15/v1` (a folder that is not there) passed `validate` and
    `submit --local`, and the run failed 20 s later, after the libraries loaded, with
    `models/sd15/v1: no such file or directory`. A Hub name (`org/name`) is not checked."""
    text = (ROOT / "examples" / "quickstart.yaml").read_text()
    text = text.replace("data_loader:", "vae_model: my-org/my-vae\ndata_loader:")
    config = tmp_path / "run.yaml"
    config.write_text(text.replace("model: builtin:tiny-sd", "model: models/sd15/v1"))
    (tmp_path / "sample_data").symlink_to(ROOT / "examples" / "sample_data")
    result = validate_file(str(config))
    line = text.splitlines().index(next(s for s in text.splitlines() if s.startswith("model:")))
    assert result.errors == [
        f"{config}:{line + 1}: model: models/sd15/v1: no such file or folder beside the "
        "config, and not a Hugging Face Hub name (org/name)"
    ]
    weights = validate_file(str(config), overrides=["model=/nowhere/sd15.safetensors"])
    assert weights.errors == [
        "--set model=/nowhere/sd15.safetensors: model: /nowhere/sd15.safetensors: "
        "no such file or folder (point it at a diffusers folder, a weights file or a Hub name "
        "(org/name))"
    ]
