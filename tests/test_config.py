"""The config tree: presets, dotted overrides, and errors that name the key and the fix."""

import subprocess
import sys

import pytest
import yaml

from megaapo.config import CONFIG_DIR, ConfigError, MegaapoConfig, load_config, to_dict, to_yaml

PRESETS = ["demo", "apo_view_r1_3b", "stepgrpo_r1vl", "grpo", "dapo", "drgrpo", "rloo", "reinforce_pp"]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads(name):
    cfg = load_config(name)
    assert isinstance(cfg, MegaapoConfig)
    assert (CONFIG_DIR / f"{name}.yaml").is_file()
    assert cfg.algo.name == {"demo": "apo", "apo_view_r1_3b": "apo", "stepgrpo_r1vl": "stepgrpo"}.get(name, name)


def test_paper_presets_carry_the_papers_numbers():
    apo = load_config("apo_view_r1_3b")
    assert (apo.algo.kl_coef, apo.algo.adv_eps, apo.algo.stcr_base, apo.rollout.n_samples) == (1e-3, 1e-9, 1.00001, 8)
    assert apo.algo.dads and apo.algo.stcr and apo.algo.updates_per_batch == 16
    assert apo.optim.betas == [0.9, 0.95] and apo.optim.min_lr == 1e-7 and apo.reward.functions == \
        {"accuracy": 1.0, "format": 0.5}
    step = load_config("stepgrpo_r1vl")
    assert (step.algo.kl_coef, step.algo.adv_eps, step.rollout.n_samples, step.rollout.temperature) == \
        (0.04, 1e-4, 4, 1.2)
    assert step.reward.functions == {"step_rar": 1.0, "step_rvr": 1.0}  # the preset replaced the default mapping
    assert load_config("dapo").algo.clip_eps_high == 0.28


def test_overrides_and_types():
    cfg = load_config("grpo", ["algo.kl_coef=0.01", "rollout.stop=['</answer>']", "optim.betas=[0.9,0.95]",
                               "reward.functions.format=0"])
    assert cfg.algo.kl_coef == 0.01 and cfg.rollout.stop == ["</answer>"] and cfg.optim.betas == [0.9, 0.95]
    assert cfg.reward.functions == {"accuracy": 1.0, "format": 0}
    whole = load_config("grpo", ["reward.functions={step_rvr: 1}"])
    assert whole.reward.functions == {"step_rvr": 1}
    assert yaml.safe_load(to_yaml(cfg))["algo"]["kl_coef"] == 0.01
    assert to_dict(cfg.algo)["kl_coef"] == 0.01


@pytest.mark.parametrize("override,message", [
    ("algo.kl_cof=0.1", "unknown key 'algo.kl_cof' (did you mean 'algo.kl_coef'?)"),
    ("algoo.kl_coef=0.1", "unknown key 'algoo' (did you mean 'algo'?)"),
    ("algo.kl_coef=abc", "algo.kl_coef"),
    ("algo.kl_estimator=k4", "algo.kl_estimator='k4' is not one of k1, k2, k3 (did you mean 'k3'?)"),
    ("optim.lr=-1", "optim.lr=-1.0 is out of range: must be > 0.0"),
    ("rollout.top_p=1.5", "rollout.top_p=1.5 is out of range"),
    ("reward.functions.acuracy=1", "unknown reward 'acuracy' (did you mean 'accuracy'?)"),
    ("algo=3", "'algo' is a section"),
    ("rollout.n_samples=1", "need at least 2 responses"),
    ("data.synth.tasks=[cound]", "unknown task 'cound' (did you mean 'count'?)"),
    ("kl_coef", "not of the form section.key=value"),
    ("rollout.sync_backend=ipc", "rollout.sync_backend=ipc does not fit rollout.mode=disaggregated"),
    ("rollout.sync_backend=mpi", "rollout.sync_backend"),
    ("rollout.partial=true", "rollout.partial=true continues sequences across weight updates"),
    ("rollout.stale_batches=skip", "rollout.stale_batches='skip' is not one of wait, drop"),
])
def test_bad_overrides_fail_with_a_clear_message(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("grpo", [override])
    assert message in str(e.value)


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'grpo'"):
        load_config("grpoo")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo:\n  kl_coeff: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'algo.kl_coeff' \(did you mean 'algo.kl_coef'"):
        load_config(str(bad))


def test_cli_config_prints_resolved_yaml_and_rejects_typos():
    ok = subprocess.run([sys.executable, "-m", "megaapo.cli", "config", "configs/apo_view_r1_3b.yaml",
                         "algo.kl_coef=0.01"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    resolved = yaml.safe_load(ok.stdout)
    assert resolved["algo"]["kl_coef"] == 0.01 and resolved["algo"]["name"] == "apo"
    assert set(resolved) == {"model", "data", "rollout", "algo", "reward", "optim", "parallel", "trainer", "logging",
                             "checkpoint", "sft", "eval"}
    bad = subprocess.run([sys.executable, "-m", "megaapo.cli", "config", "apo_view_r1_3b", "algo.kl_cof=0.01"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "did you mean 'algo.kl_coef'" in bad.stderr and "Traceback" not in bad.stderr


def test_train_dry_run_prepares_model_and_data(tmp_path):
    run = subprocess.run([sys.executable, "-m", "megaapo.cli", "train", "demo", f"trainer.output_dir={tmp_path}",
                          "trainer.dry_run=true", "data.synth.n_train=16", "data.synth.n_eval=4"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "train rows: 16, held-out rows: 4" in run.stdout and "dry run" in run.stdout
    assert (tmp_path / "tiny_model" / "model.safetensors").is_file() and (tmp_path / "config.yaml").is_file()
    missing = subprocess.run([sys.executable, "-m", "megaapo.cli", "train", "grpo", "model.path=/no/such/model",
                              f"trainer.output_dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "model.path='/no/such/model' has no config.json" in missing.stderr


def test_one_megatron_core_version_for_every_supported_python():
    """Every Python the package admits resolves the megatron-core the tests run (a split pin once gave Python 3.12,
    the GPU images' Python, a release no test had run)."""
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    supported = SpecifierSet(project["requires-python"])
    pythons = [f"3.{m}" for m in range(8, 16) if f"3.{m}.0" in supported]
    assert pythons == ["3.10", "3.11", "3.12"]
    pins = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "megatron-core"]
    for py in pythons:
        chosen = [str(r.specifier) for r in pins if r.marker is None or r.marker.evaluate({"python_version": py})]
        assert chosen == [f"=={version('megatron-core')}"], (py, chosen)


def test_colocated_async_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="max_staleness=1 needs engines on GPUs of their own: a colocated engine "
                                          "shares the learner's GPU and sleeps while it trains"):
        load_config("grpo", ["rollout.mode=colocated", "trainer.device=auto", "rollout.max_staleness=1"])
    assert load_config("grpo", ["rollout.max_staleness=2"]).rollout.max_staleness == 2
