"""FLUX_LORA gets what every type has: a run whose dataset and outputs are on S3 (SeaweedFS)
writes its history and report.html, sends its webhooks and is pulled with `launcher pull`;
a bad dataset fails in the preflight, before the (here missing) model would load, writing
nothing; sweeps expand over FLUX fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from train_support import make_config, s3_dataset, train, write_dataset
from webhook_receiver import WebhookReceiver

from kubetune.errors import DataError
from kubetune.layout import read_history
from kubetune.storage import open_store
from launcher.cli.main import main
from launcher.sweeps import expand, parse_axes

pytest_plugins = ["fixtures_models"]  # tiny_flux_dir


@pytest.mark.slow
def test_flux_run_with_s3_data_and_outputs_reports_notifies_and_pulls(
    tmp_path: Path, tiny_flux_dir: Path, s3_env: Any, s3_bucket: str
) -> None:
    data = s3_dataset(tmp_path / "data", s3_bucket)
    storage = {"bucket": s3_bucket, "prefix": "runs", "endpoint_url": s3_env.endpoint}
    with WebhookReceiver() as hook:
        cfg = make_config(
            "FLUX_LORA",
            tiny_flux_dir,
            data,
            tmp_path / "unused" / "flux-e2e",
            storage=storage,
            validation_prompts=["a kbtn picture"],
            validate_every_n_steps=2,
            num_validation_images_per_prompt=1,
            log_every_n_steps=1,
            notify={"webhooks": [{"url": hook.url}]},
        )
        result = train(cfg)
    uri = result.output_uri
    assert uri == f"s3://{s3_bucket}/runs/flux-e2e"
    out = open_store(uri, cfg.storage)
    assert [r["step"] for r in read_history(out)] == [1, 2, 3, 4]
    events = hook.events()
    assert events[0] == "started" and events[-1] == "succeeded"
    assert sorted(events[1:-1]) == ["checkpoint", "checkpoint", "validation", "validation"]
    page = out.get_bytes("report.html").decode()
    assert "completed" in page and page.count("data:image/jpeg;base64,") == 2
    pulled = CliRunner().invoke(main, ["pull", uri, "-o", str(tmp_path / "pulled")])
    assert pulled.exit_code == 0, pulled.output
    assert (tmp_path / "pulled" / "lora.safetensors").read_bytes() == out.get_bytes(
        "final/lora.safetensors"
    )


def test_bad_flux_dataset_fails_in_the_preflight_and_writes_nothing(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data")
    (data / "img-1.png").write_bytes(b"not a png")
    out = tmp_path / "out" / "early"
    cfg = make_config("FLUX_LORA", tmp_path / "no-such-model", data, out)
    with pytest.raises(DataError, match="img-1"):  # not the missing model: data comes first
        train(cfg)
    assert not out.exists() or list(out.iterdir()) == []


def test_a_sweep_over_flux_fields_expands_to_valid_members(tmp_path: Path) -> None:
    cfg = make_config("FLUX_LORA", tmp_path / "m", tmp_path / "d", tmp_path / "out" / "fx")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    axes = parse_axes(["transformer_learning_rate=1e-4,4e-4", "timestep_sampler=shift,uniform"])
    sweep, members = expand(path, (), None, axes)
    assert sweep == "fx" and len(members) == 4
    got = {(m.config.transformer_learning_rate, m.config.timestep_sampler) for m in members}
    assert got == {(1e-4, "shift"), (1e-4, "uniform"), (4e-4, "shift"), (4e-4, "uniform")}
