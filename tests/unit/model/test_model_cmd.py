"""``dsk generate`` and ``dsk convert`` through the CLI runner."""

import json

import pytest
import torch

from dsk.data.tokenizers import CharTokenizer
from dsk.model.hf import save_dsk
from tests.unit.model.tiny import tiny_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = CharTokenizer()
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_dsk(
        tiny_model(dtype=torch.float32, vocab_size=tok.vocab_size), path, extra={"tokenizer": json.loads(tok.to_json())}
    )
    return str(path)


def test_generate_json_reports_completions_and_speed(dsk_cli, ckpt):
    r = dsk_cli(
        [
            "generate",
            ckpt,
            "--prompt",
            "12+3=",
            "--prompt",
            "ab",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
            "--json",
        ]
    )
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert [c["prompt"] for c in payload["completions"]] == ["12+3=", "ab"]
    assert all(len(c["tokens"]) <= 4 and isinstance(c["text"], str) for c in payload["completions"])
    assert payload["tokens_per_s"] > 0 and payload["speculation"] is None


def test_greedy_speculative_generation_matches_plain_greedy_and_reports_acceptance(dsk_cli, ckpt):
    args = ["generate", ckpt, "--prompt", "12+3=", "--prompt", "7", "--prompt", "ab*c", "--max-new-tokens", "6"]
    args += ["--temperature", "0", "--json"]
    plain = json.loads(dsk_cli(args).stdout)
    r = dsk_cli([*args, "--speculative", "mtp"])
    assert r.exit_code == 0, r.output
    spec = json.loads(r.stdout)
    assert [c["tokens"] for c in spec["completions"]] == [c["tokens"] for c in plain["completions"]]
    stats = spec["speculation"]
    assert 0.0 <= stats["acceptance_rate"] <= 1.0 and stats["verify_steps"] >= 1
    assert stats["drafted"] == sum(c["drafted"] for c in spec["completions"])
    assert spec["tokens_per_s"] > 0 and plain["tokens_per_s"] > 0


def test_speculative_sampling_runs_the_batch_at_a_temperature_and_reports_acceptance_in_the_text(dsk_cli, ckpt):
    args = ["generate", ckpt, "--prompt", "12+3=", "--prompt", "9", "--max-new-tokens", "5", "--speculative", "mtp"]
    r = dsk_cli([*args, "--temperature", "0.8", "--top-p", "0.9", "--json"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["temperature"] == 0.8 and len(payload["completions"]) == 2
    assert all(len(c["tokens"]) <= 5 for c in payload["completions"])
    r = dsk_cli([*args, "--temperature", "0.8"])
    assert r.exit_code == 0, r.output
    assert "tokens/s" in r.stdout and "mtp draft acceptance" in r.stdout


@pytest.mark.parametrize("speculative", [[], ["--speculative", "mtp"]])
def test_repeat_times_several_runs_of_the_same_output_and_reports_their_median(dsk_cli, ckpt, speculative):
    args = ["generate", ckpt, "--prompt", "12+3=", "--max-new-tokens", "4", "--temperature", "0.9", *speculative]
    once = json.loads(dsk_cli([*args, "--json"]).stdout)
    r = dsk_cli([*args, "--repeat", "3", "--json"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    # every run starts from the same seed: the sampled output is the single run's
    assert [c["tokens"] for c in payload["completions"]] == [c["tokens"] for c in once["completions"]]
    runs = payload["seconds_runs"]
    assert payload["repeat"] == 3 and len(runs) == 3 and payload["seconds"] == sorted(runs)[1]
    assert payload["tokens_per_s"] == pytest.approx(payload["tokens"] / payload["seconds"], rel=0.02)  # rounded
    assert once["repeat"] == 1 and len(once["seconds_runs"]) == 1
    text = dsk_cli([*args, "--repeat", "2"])
    assert text.exit_code == 0 and "the median of 2 runs" in text.stdout
    bad = dsk_cli([*args, "--repeat", "0"])
    assert bad.exit_code == 2 and "--repeat" in bad.output


def test_generate_text_output_ends_with_a_summary(dsk_cli, ckpt):
    r = dsk_cli(["generate", ckpt, "--prompt", "7*", "--max-new-tokens", "3", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("7*") and "tokens/s" in r.stdout


def test_generate_on_a_missing_checkpoint_exits_2_naming_it(dsk_cli, tmp_path):
    r = dsk_cli(["generate", str(tmp_path / "missing"), "--prompt", "x", "--tokenizer", "char"])
    assert r.exit_code == 2
    assert "missing" in r.stderr and "Traceback" not in r.output


def test_generate_without_a_tokenizer_asks_for_one(dsk_cli, tmp_path):
    save_dsk(tiny_model(), tmp_path / "m")
    r = dsk_cli(["generate", str(tmp_path / "m"), "--prompt", "x"])
    assert r.exit_code == 2 and "--tokenizer" in r.stderr


def test_speculative_with_a_drafter_no_component_offers_exits_2_listing_those_offered(dsk_cli, ckpt, tmp_path):
    r = dsk_cli(["generate", ckpt, "--prompt", "1", "--speculative", "medusa"])
    assert r.exit_code == 2 and "'medusa' (offered: mtp)" in r.stderr and "Traceback" not in r.output
    save_dsk(tiny_model(dtype=torch.float32, vocab_size=CharTokenizer().vocab_size, mtp=None), tmp_path / "plain")
    r = dsk_cli(["generate", str(tmp_path / "plain"), "--prompt", "1", "--tokenizer", "char", "--speculative", "mtp"])
    assert r.exit_code == 2 and "offered: none" in r.stderr


def test_convert_round_trip_and_refusal_to_overwrite(dsk_cli, ckpt, tmp_path):
    hf = str(tmp_path / "hf")
    r = dsk_cli(["convert", ckpt, hf, "--to", "hf", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["to"] == "hf"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "deepseek_v3"
    r = dsk_cli(["convert", ckpt, hf, "--to", "hf"])
    assert r.exit_code == 2 and "--force" in r.stderr
    assert dsk_cli(["convert", ckpt, hf, "--to", "hf", "--force"]).exit_code == 0


def test_convert_of_a_broken_checkpoint_exits_2_naming_the_file(dsk_cli, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    r = dsk_cli(["convert", str(tmp_path / "bad"), str(tmp_path / "out"), "--to", "dsk"])
    assert r.exit_code == 2
    assert "bad/config.json" in r.stderr and "Traceback" not in r.output
