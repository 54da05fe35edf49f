"""Sweeps: expansion into stable, labelled runs; submission to the fake API server (Kueue
queueing) and one after another with the local backend; `list --sweep`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from k8s_fake import FakeKube
from kube_configs import config_dict

from kubetune.config import config_hash, output_uri, run_name
from kubetune.errors import ConfigError, UserError
from launcher.backends.local import LocalBackend
from launcher.cli.main import main
from launcher.sweep_runs import submit_sweep, sweep_statuses, sweep_table
from launcher.sweeps import LABEL_SWEEP, expand, member_name, parse_axes

AXES = ("optimizer.learning_rate=1e-4,5e-5", "lora_rank_dim=4,16")


def _write(tmp_path: Path, storage: bool = True, **job: object) -> Path:
    data = config_dict("SD_LORA", **job)
    data["optimizer"] = {"optimizer_type": "AdamW", "learning_rate": 1e-3}
    data["storage"].pop("credentials_secret")  # (the Secret check is tested elsewhere)
    if not storage:
        del data["storage"]
        data["base_output_dir"] = str(tmp_path / "out" / "my-run")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_product_becomes_stable_labelled_runs(tmp_path: Path) -> None:
    sweep, members = expand(_write(tmp_path), (), None, parse_axes(AXES))
    assert sweep == "my-run" and len(members) == 4
    values = {(m.config.optimizer.learning_rate, m.config.lora_rank_dim) for m in members}
    assert values == {(1e-4, 4), (1e-4, 16), (5e-5, 4), (5e-5, 16)}
    names = [m.run for m in members]
    assert len(set(names)) == 4 and all(n.startswith("my-run-") for n in names)
    assert [run_name(m.config) for m in members] == names
    for member in members:
        labels = member.config.job.labels
        assert labels[LABEL_SWEEP] == "my-run"
        assert labels["sweep.kubetune.io/lora_rank_dim"] == str(member.config.lora_rank_dim)
        assert output_uri(member.config) == f"s3://kubetune/kubetune/{member.run}"
    again = expand(_write(tmp_path), (), None, parse_axes(tuple(reversed(AXES))))[1]
    assert {m.run: config_hash(m.config) for m in again} == {
        m.run: config_hash(m.config) for m in members
    }
    assert member_name("x", {"a": "1", "b": "2"}) == member_name("x", {"b": "2", "a": "1"})


def test_local_members_write_under_the_base_output_dir(tmp_path: Path) -> None:
    _, members = expand(_write(tmp_path, storage=False), (), None, parse_axes(AXES[:1]))
    for member in members:
        assert output_uri(member.config) == str(tmp_path / "out" / "my-run" / member.run)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("lora_rank_dim", "use KEY=V1,V2"),
        ("lora_rank_dim=4,", "use KEY=V1,V2"),
        ("=4,8", "use KEY=V1,V2"),
    ],
)
def test_bad_sweep_specs_are_one_line_user_errors(spec: str, words: str) -> None:
    with pytest.raises(UserError, match=words):
        parse_axes([spec])


def test_a_list_of_values_may_hold_commas(tmp_path: Path) -> None:
    """`KEY=[...]` (a YAML / JSON list) sweeps values that contain commas: prompts, lists."""
    prompts = ["a cat, sitting", "a dog, running"]
    axes = parse_axes([
        'validation_prompts=[["a cat, sitting", "a dog, running"], [one]]',
        "lora_rank_dim=[4, 16]",
        'seed=["1"]',
    ])  # fmt: skip
    assert [a.values for a in axes] == [
        ('["a cat, sitting", "a dog, running"]', '["one"]'),
        ("4", "16"),
        ('"1"',),  # a quoted string stays a string
    ]
    sweep, members = expand(_write(tmp_path), ("validate_every_n_steps=5",), None, axes[:2])
    assert {(tuple(m.config.validation_prompts), m.config.lora_rank_dim) for m in members} == {
        (tuple(prompts), 4), (tuple(prompts), 16), (("one",), 4), (("one",), 16)
    }  # fmt: skip
    plain = parse_axes(["lora_rank_dim=4,16"])
    assert plain[0].values == axes[1].values  # same values, same run names as before
    single = parse_axes(["validation_prompts.0=[a photo, of a cat]"])
    assert single[0].values == ("a photo", "of a cat")


@pytest.mark.parametrize("spec", ["lora_rank_dim=[4, 16", "lora_rank_dim=[]", "k=[4, ]]"])
def test_a_bad_list_of_values_is_a_one_line_user_error(spec: str) -> None:
    with pytest.raises(UserError, match=r"--sweep .*\[V1, V2"):
        parse_axes([spec])


def test_a_bad_value_fails_before_anything_is_submitted(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["submit", str(_write(tmp_path)), "--sweep", "lora_rank_dim=4,many", "--kubeconfig",
         str(tmp_path / "nowhere")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "lora_rank_dim" in result.output and "valid integer" in result.output
    with pytest.raises(ConfigError):
        expand(_write(tmp_path), (), None, parse_axes(["lora_rank_dim=4,many"]))


@pytest.mark.slow
def test_cluster_sweep_queues_every_run_and_resubmit_is_a_no_op(tmp_path: Path) -> None:
    with FakeKube() as fake:
        kubeconfig = str(fake.write_kubeconfig(tmp_path / "kubeconfig"))
        config = str(_write(tmp_path, queue_name="gpu-queue"))
        args = ["submit", config, *sum((["--sweep", a] for a in AXES), []), "--format", "json",
                "--kubeconfig", kubeconfig, "--namespace", "default"]  # fmt: skip
        first = CliRunner().invoke(main, args)
        assert first.exit_code == 0, first.output
        doc = json.loads(first.stdout)
        assert doc["sweep"] == "my-run" and len(doc["runs"]) == 4
        assert all(r["submit"]["created"] for r in doc["runs"])
        again = json.loads(CliRunner().invoke(main, args).stdout)
        assert not any(r["submit"]["created"] for r in again["runs"])
        listed = CliRunner().invoke(
            main, ["list", "--sweep", "my-run", "--kubeconfig", kubeconfig, "-n", "default"]
        )
        assert listed.exit_code == 0, listed.output
        lines = listed.output.splitlines()
        assert lines[0].split() == ["RUN", "PHASE", "STEP", "LOSS", "lora_rank_dim",
                                    "optimizer.learning_rate"]  # fmt: skip
        assert len(lines) == 5 and all(" Suspended " in line for line in lines[1:])
        status = CliRunner().invoke(
            main, ["status", "--sweep", "my-run", "--kubeconfig", kubeconfig, "-n", "default"]
        )
        assert status.exit_code == 0, status.output
        assert status.output == listed.output  # the same side-by-side table
        neither = CliRunner().invoke(main, ["status", "--kubeconfig", kubeconfig])
        assert neither.exit_code == 2 and "RUN or --sweep" in neither.output


STAND_IN = """
import json, os, sys, time, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
out = cfg["base_output_dir"]; os.makedirs(out, exist_ok=True)
log = os.environ["SWEEP_LOG"]
with open(log, "a") as f: f.write(f"start {cfg['job']['name']}\\n")
time.sleep(0.3)
progress = {"state": "completed", "step": 3, "total_steps": 3,
            "loss": cfg["optimizer"]["learning_rate"]}
json.dump(progress, open(os.path.join(out, "progress.json"), "w"))
with open(log, "a") as f: f.write(f"end {cfg['job']['name']}\\n")
"""


def test_local_sweep_runs_one_after_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a stand-in runner (the real one is exercised in test_train / test_people_e2e):
    this checks the launcher's sequencing, not training."""
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    monkeypatch.setenv("SWEEP_LOG", str(tmp_path / "order.log"))
    backend = LocalBackend(home=tmp_path / "home", entrypoint=[sys.executable, str(script)])
    sweep, members = expand(_write(tmp_path, storage=False), (), None, parse_axes(AXES[:1]))
    doc, ok = submit_sweep(sweep, members, backend, wait=False, echo=lambda _: None, poll=0.05)
    assert ok and [r["status"]["phase"] for r in doc["runs"]] == ["Succeeded", "Succeeded"]
    order = (tmp_path / "order.log").read_text().split()
    first, second = members[0].run, members[1].run
    assert order == ["start", first, "end", first, "start", second, "end", second]
    table = sweep_table(sweep_statuses(backend, "my-run"))
    assert len(table) == 3 and "3/3" in table[1] and "optimizer.learning_rate" in table[0]
    assert {line.split()[3] for line in table[1:]} == {"0.0001", "5e-05"}
