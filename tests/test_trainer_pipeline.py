"""The trainer end to end on CPU: a tiny Llama goes through prepare -> Unsloth finetune -> offline GGUF
export -> llama-cpp-python eval -> signed publish, and a real edge daemon verifies and serves it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from shared.admission import verify_manifest
from shared.signing import Envelope, write_private_key
from tests.harness.edge import (
    FLEET,
    HOST_ARCH,
    TOPICS,
    ServingOptions,
    retained_message,
    running_daemon,
    write_edge_config,
)
from tests.harness.training import TinyRun, immune_train, tiny_run, train_tiny, write_publish_config
from trainer.dataset.records import read_records
from trainer.gguf_check import smoke_generate, tensor_types

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    run = tiny_run(tmp_path_factory.mktemp("tiny-training"))
    train_tiny(run, steps=60)
    return run


def test_prepare_splits_by_incident_and_prefers_usable_teachers(trained: TinyRun) -> None:
    stats = json.loads((trained.data / "stats.json").read_text())
    train = list(read_records(trained.data / "train.jsonl"))
    held_out = list(read_records(trained.data / "eval.jsonl"))
    assert stats["records"]["imported"] == 48 and stats["records"]["too_long"] == 0
    assert len(train) + len(held_out) == 48 and len(held_out) == 12  # 25% of 24 incidents, both tasks
    assert not {r.group for r in train} & {r.group for r in held_out}, "an incident is in both splits"
    # Every 6th incident's best summary teacher failed: the next one in the preference list answers.
    assert stats["teachers"] == {"gpt_4o": 44, "gpt4o_mini": 4}
    assert all("```" not in r.answer and "LLM query failed" not in r.answer for r in train + held_out)
    assert {r.task for r in held_out} == {"slips-summary", "slips-risk"}
    summary = next(r for r in train if r.task == "slips-summary")
    assert [m.role for m in summary.messages] == ["system", "user", "assistant"]
    # Same seed, same split.
    again = trained.root / "again"
    immune_train(
        "prepare", f"slips-summary={trained.summary_data}", f"slips-risk={trained.risk_data}",
        "--tokenizer", trained.base, "--output", again,
        "--max-tokens", trained.max_tokens, "--eval-fraction", "0.25",
    )  # fmt: skip
    assert (again / "eval.jsonl").read_bytes() == (trained.data / "eval.jsonl").read_bytes()


def test_finetune_records_the_run(trained: TinyRun) -> None:
    run = json.loads((trained.run_dir / "run.json").read_text())
    assert run["seed"] == 11 and run["load_in_4bit"] is False  # no GPU here: 16-bit LoRA
    assert run["config"]["lora"]["r"] == 8 and run["records"] == {"train": 36, "eval": 12}
    assert len(run["data_sha256"]) == 64 and run["versions"]["unsloth"] == "2026.10.9"
    assert run["metrics"]["train_loss"] > 0
    # Training changed the model, for the better: the held-out loss fell from before the first step.
    assert run["metrics"]["eval_loss"] < run["metrics"]["eval_loss_before"], run["metrics"]
    assert (trained.run_dir / "adapter" / "adapter_config.json").is_file()


def test_export_writes_the_asked_quantizations_that_llama_cpp_runs(trained: TinyRun) -> None:
    files = {
        item["quant"]: item for item in json.loads((trained.gguf_dir / "export.json").read_text())["files"]
    }
    assert set(files) == {"f16", "q8_0", "q4_k_m"}
    q8 = tensor_types(trained.gguf_dir / files["q8_0"]["file"])
    q4 = tensor_types(trained.gguf_dir / files["q4_k_m"]["file"])
    assert set(q8) == {"Q8_0", "F32"}
    assert q4.get("Q4_K", 0) > q4.get("Q6_K", 0) > 0 and "Q5_0" not in q4  # a real K-quant, no fallback
    smoke_generate(trained.gguf_dir / files["q4_k_m"]["file"])  # raises when llama-cpp-python cannot run it
    assert not (trained.gguf_dir / "merged_16bit").exists()


def test_eval_compares_each_quant_with_f16(trained: TinyRun) -> None:
    report = json.loads((trained.gguf_dir / "eval.json").read_text())
    quants = report["quants"]
    assert quants["f16"]["perplexity_rise_vs_f16"] == 0.0
    for name in ("q8_0", "q4_k_m"):
        assert quants[name]["perplexity"] > 1.0 and quants[name]["accepted"] is True
        assert {
            "rouge_l", "names_source_ip", "gives_verdict", "same_layout", "within_budget", "no_prompt_echo"
        } <= set(quants[name]["tasks"])  # fmt: skip


def test_export_refuses_a_tokenizer_other_than_the_bases(
    trained: TinyRun, smollm2_model: Path, tmp_path: Path
) -> None:
    """The run record names SmolLM2's GGUF as the base of the tiny model's adapter: the export is
    refused (the vocabularies differ), and no export.json is written."""
    copy = tmp_path / "run"
    shutil.copytree(trained.run_dir / "adapter", copy / "adapter")
    run = json.loads((trained.run_dir / "run.json").read_text())
    run["config"]["base_model"] = str(smollm2_model)
    (copy / "run.json").write_text(json.dumps(run))
    result = immune_train("export", copy, "--quant", "q8_0", check=False)
    assert result.returncode == 1 and "REJECTED (tokenizer-mismatch)" in result.stderr, result.stderr
    assert "has 384 tokens, its base SmolLM2-135M-Instruct.Q4_1.gguf 49152" in result.stderr
    assert not (copy / "gguf" / "export.json").exists()


@pytest.fixture(scope="module")
def broken(trained: TinyRun) -> Path:
    """A copy of the export whose "q4_k_m" file is the F16 model with its output projection zeroed:
    it predicts every token with probability 1/vocab, so any trained model beats it."""
    from gguf import GGUFReader

    strict = trained.root / "strict-gguf"
    shutil.copytree(trained.gguf_dir, strict)
    (strict / "eval.json").unlink(missing_ok=True)
    broken = next(strict.glob("*.q4_k_m.gguf"))
    shutil.copyfile(next(strict.glob("*.f16.gguf")), broken)
    reader = GGUFReader(broken, "r+")
    names = {tensor.name for tensor in reader.tensors}
    projection = "output.weight" if "output.weight" in names else "token_embd.weight"  # tied embeddings
    for tensor in reader.tensors:
        if tensor.name == projection:
            tensor.data[...] = 0
    del reader  # flush the memory map
    return broken


def _eval(export: Path, trained: TinyRun, *extra: str | Path, check: bool = True):  # type: ignore[no-untyped-def]
    return immune_train(
        "eval", export, "--data", trained.data / "eval.jsonl", "--ppl-records", "4", "--threads", "1",
        *extra, check=check,
    )  # fmt: skip


def test_eval_refuses_a_file_worse_than_f16(trained: TinyRun, broken: Path) -> None:
    """The gate, made deterministic: a bound of 0 must refuse the zeroed file, and the table says so."""
    from gguf import GGUFReader

    vocab = next(int(t.shape[-1]) for t in GGUFReader(broken).tensors if t.name == "token_embd.weight")
    result = _eval(broken.parent, trained, "--quant", "q4_k_m", "--max-ppl-rise", "0", "--task-records", "0")
    report = json.loads((broken.parent / "eval.json").read_text())["quants"]
    assert report["f16"]["perplexity"] < vocab  # the trained model beats a uniform guess
    assert report["q4_k_m"]["perplexity"] > report["f16"]["perplexity"]
    assert report["q4_k_m"]["accepted"] is False
    assert "REFUSED" in result.stdout


@pytest.fixture(scope="module")
def compared(trained: TinyRun, broken: Path) -> subprocess.CompletedProcess[str]:
    """The export evaluated against the zeroed model as its baseline (what publish's gate reads)."""
    return _eval(
        trained.gguf_dir, trained, "--quant", "q8_0,q4_k_m", "--max-ppl-rise", "0.5", "--task-records", "3",
        "--baseline", broken, "--baseline-label", "zeroed",
    )  # fmt: skip


def test_eval_compares_with_a_baseline_on_the_same_incidents(
    trained: TinyRun, broken: Path, compared: subprocess.CompletedProcess[str]
) -> None:
    """Against the zeroed model as baseline, the trained model is better in perplexity beyond noise;
    every task metric is compared pairwise on the same incidents, with its spread."""
    result = compared
    comparison = json.loads((trained.gguf_dir / "eval.json").read_text())["comparison"]
    assert comparison["label"] == "zeroed" and comparison["file"] == str(broken)
    for quant in ("f16", "q8_0", "q4_k_m"):
        metrics = comparison["quants"][quant]
        assert metrics["perplexity"]["verdict"] == "better", metrics["perplexity"]
        assert metrics["perplexity"]["challenger"] < metrics["perplexity"]["baseline"]
        assert {"rouge_l", "names_source_ip", "gives_verdict", "within_budget"} <= set(metrics)
        assert all(m["n"] == 3 and m["stderr"] >= 0 for name, m in metrics.items() if name != "perplexity")
    assert "q8_0 vs zeroed" in result.stdout and "better" in result.stdout


def test_eval_refuses_a_baseline_that_is_not_a_gguf(trained: TinyRun, tmp_path: Path) -> None:
    not_gguf = tmp_path / "champion.bin"
    not_gguf.write_bytes(b"PK\x03\x04 not a model")
    for baseline, message in [
        (not_gguf, "the baseline must be a GGUF model file"),
        (tmp_path / "absent.gguf", "no such baseline file"),
    ]:
        result = _eval(trained.gguf_dir, trained, "--quant", "q8_0", "--baseline", baseline, check=False)
        assert result.returncode == 1 and "REJECTED (bad-baseline)" in result.stderr
        assert message in result.stderr


def test_publish_gate_refuses_a_challenger_below_the_champion(
    trained: TinyRun, broken: Path, tmp_path: Path, fleet_keys
) -> None:
    """The zeroed file as challenger, the trained F16 as champion: refused before anything is uploaded,
    with the comparison named; without a comparison in eval.json a configured gate refuses too."""
    _eval(
        broken.parent, trained, "--quant", "q4_k_m", "--max-ppl-rise", "100", "--task-records", "0",
        "--baseline", trained.gguf_dir / "run.f16.gguf", "--baseline-label", "champion",
    )  # fmt: skip
    keyring = tmp_path / "keyring.json"
    keyring.write_bytes(fleet_keys.keyring().to_json())
    key = tmp_path / "trainer.key"
    write_private_key(fleet_keys.trainer, key)
    store = tmp_path / "store"
    config = write_publish_config(
        tmp_path / "publish.toml", FLEET, [key], keyring, "127.0.0.1", 9, store, "http://127.0.0.1:9/m",
        gate={"perplexity": 0.05},
    )  # fmt: skip
    args = ("publish", broken.parent, "--config", config, "--name", "slips/tiny", "--quant", "q4_k_m")
    result = immune_train(*args, check=False)
    assert result.returncode == 1 and "REJECTED (champion-better)" in result.stderr, result.stderr
    assert "q4_k_m scores below the champion" in result.stderr and "perplexity" in result.stderr
    assert "q4_k_m vs champion" in result.stdout  # the comparison is printed
    assert not store.exists(), "nothing may be uploaded for a refused challenger"
    (broken.parent / "eval.json").write_text(
        json.dumps({**json.loads((broken.parent / "eval.json").read_text()), "comparison": None})
    )
    result = immune_train(*args, check=False)
    assert "REJECTED (no-baseline)" in result.stderr and "--baseline" in result.stderr


def test_finetune_resumes_from_its_checkpoint(trained: TinyRun, tmp_path: Path) -> None:
    copy = TinyRun(tmp_path, trained.summary_data, trained.risk_data, trained.base)
    shutil.copytree(trained.data, copy.data)
    shutil.copytree(trained.run_dir / "checkpoints", copy.run_dir / "checkpoints")
    shutil.rmtree(copy.run_dir / "checkpoints" / "checkpoint-60")  # as if stopped after step 30
    # Two more steps are enough to show where training picks up (and cost little).
    result = immune_train("finetune", "--config", copy.write_config(steps=32, save_steps=30), "--resume")
    # The progress bar starts at step 31: the first 30 steps came from the checkpoint, not retraining.
    assert re.search(r"(?<![0-9])31/32 \[", result.stderr) and not re.search(
        r"(?<![0-9])1/32 \[", result.stderr
    )
    run = json.loads((copy.run_dir / "run.json").read_text())
    assert run["resumed"] is True and (copy.run_dir / "adapter").is_dir()


def _loopback_publish_config(  # type: ignore[no-untyped-def]
    tmp_path: Path, fleet_keys, broker, store, gate: dict[str, float] | None = None
) -> Path:
    """publish.toml for the test broker and artifact server, with a trainer key of the fleet's keyring."""
    keyring = tmp_path / "keyring.json"
    keyring.write_bytes(fleet_keys.keyring().to_json())
    key = tmp_path / "trainer.key"
    write_private_key(fleet_keys.trainer, key)
    return write_publish_config(
        tmp_path / "publish.toml", FLEET, [key], keyring, broker.host, broker.port,
        store.root, store.base_url, gate=gate,
    )  # fmt: skip


def test_published_model_is_verified_and_served_by_a_daemon(
    trained: TinyRun,
    compared: subprocess.CompletedProcess[str],
    tmp_path,
    mqtt_broker,
    artifact_server,
    fleet_keys,
    observer,
) -> None:
    config = _loopback_publish_config(
        tmp_path, fleet_keys, mqtt_broker, artifact_server, gate={"perplexity": 0.0, "rouge_l": 0.0}
    )
    options = ServingOptions()
    device = write_edge_config(tmp_path / "device", mqtt_broker, fleet_keys.keyring(), serving=options)
    with running_daemon(device):
        result = immune_train(
            "publish", trained.gguf_dir, "--config", config,
            "--name", "slips/tiny:q4_k_m", "--quant", "q4_k_m", "--serial", "7",
            "--arch", HOST_ARCH, "--run-dir", trained.run_dir, "--n-ctx", "1024",
        )  # fmt: skip
        assert "slips/tiny:q4_k_m" in result.stdout and TOPICS.desired_fleet() in result.stdout
        end = observer.wait_terminal(1, timeout=180)[-1]
        assert end["state"] == "committed", end
        reply = httpx.post(
            f"{options.base_url}/api/chat",
            json={"model": "slips", "messages": [{"role": "user", "content": "Source IP 10.0.0.1"}],
                  "stream": False, "options": {"num_predict": 8}},
            timeout=60,
        )  # fmt: skip
        assert reply.status_code == 200 and reply.json()["model"] == "slips/tiny:q4_k_m"
    published = json.loads((trained.gguf_dir / "published.json").read_text())
    served = artifact_server.root / "slips_tiny_q4_k_m" / "7" / "run.q4_k_m.gguf"
    assert published["serial"] == 7 and served.is_file() and published["url"].endswith("/7/run.q4_k_m.gguf")
    envelope = Envelope.from_json((trained.gguf_dir / "manifest-7.json").read_bytes())
    manifest = verify_manifest(envelope, fleet_keys.keyring())
    assert manifest.runtime.chat_template and "<|im_start|>" in manifest.runtime.chat_template
    assert manifest.runtime.stop == ["<|im_end|>"] and manifest.compatibility.cpu_arch == [HOST_ARCH]
    assert manifest.provenance.eval["q4_k_m"].perplexity_rise_vs_f16 is not None
    assert (
        manifest.provenance.dataset_sha256
        == json.loads((trained.run_dir / "run.json").read_text())["data_sha256"]
    )
    assert manifest.provenance.hyperparameters["lora.r"] == 8
    # The champion/challenger comparison the gate passed travels in the signed provenance.
    comparison = manifest.provenance.comparison
    assert comparison is not None and comparison.baseline == "zeroed"
    assert comparison.margins == {"perplexity": 0.0, "rouge_l": 0.0}
    assert comparison.metrics["perplexity"].verdict == "better"


def test_profile_eval_scores_the_contract_and_publish_takes_its_context(
    trained: TinyRun, tmp_path: Path, mqtt_broker, artifact_server, fleet_keys
) -> None:
    """The trained export evaluated through alert-summary-v2's own requests: the contract checks are
    metrics, the longest request is reported, and publish gives the manifest the context it needs
    (a smaller --n-ctx is refused before anything is uploaded)."""
    data = tmp_path / "profiled"
    immune_train(
        "prepare", f"slips-summary={trained.summary_data}", f"slips-risk={trained.risk_data}",
        "--tokenizer", trained.base, "--output", data, "--max-tokens", "4096", "--eval-fraction", "0.25",
        "--prompt-profile", "alert-summary-v2",
    )  # fmt: skip
    fit = json.loads((data / "stats.json").read_text())["requests"]
    export = tmp_path / "gguf"
    shutil.copytree(trained.gguf_dir, export)
    (export / "eval.json").unlink(missing_ok=True)
    result = immune_train(
        "eval", export, "--data", data / "eval.jsonl", "--quant", "q4_k_m", "--max-ppl-rise", "0.5",
        "--ppl-records", "2", "--task-records", "3", "--threads", "1",
    )  # fmt: skip
    report = json.loads((export / "eval.json").read_text())
    # Every generated answer is kept beside eval.json, to read what the scores summarise.
    answers = [json.loads(line) for line in (export / "answers.jsonl").read_text().splitlines()]
    asked = report["records"]["tasks"]
    assert {a["file"] for a in answers} == {"run.f16.gguf", "run.q4_k_m.gguf"} and len(answers) == 2 * asked
    assert all(a["finish"] in ("stop", "length") and isinstance(a["answer"], str) for a in answers)
    tasks = report["quants"]["q4_k_m"]["tasks"]
    assert {"one_paragraph", "plain_text", "gives_verdict", "states_risk", "within_budget"} <= set(tasks)
    assert all(0.0 <= tasks[name] <= 1.0 for name in ("one_paragraph", "plain_text", "gives_verdict"))
    assert report["requests"]["context_needed"] == fit["context_needed"]
    assert f"publish with n_ctx >= {fit['context_needed']}" in " ".join(result.stdout.split())
    config = _loopback_publish_config(tmp_path, fleet_keys, mqtt_broker, artifact_server)
    args = ("publish", export, "--config", config, "--name", "slips/profiled", "--quant", "q4_k_m")
    small = immune_train(*args, "--serial", "3", "--n-ctx", "256", check=False)
    assert small.returncode == 1 and "REJECTED (context-too-small)" in small.stderr, small.stderr
    assert not (artifact_server.root / "slips_profiled").exists()
    immune_train(*args, "--serial", "4", "--arch", HOST_ARCH)
    manifest = verify_manifest(
        Envelope.from_json((export / "manifest-4.json").read_bytes()), fleet_keys.keyring()
    )
    assert manifest.runtime.n_ctx == fit["context_needed"]
    # `--group`: the retained desired state of that group only; the fleet's stays serial 4.
    immune_train(*args, "--serial", "5", "--arch", HOST_ARCH, "--group", "canary")
    assert (
        retained_message(mqtt_broker, TOPICS.desired_group("canary"))
        == (export / "manifest-5.json").read_bytes()
    )
    assert retained_message(mqtt_broker, TOPICS.desired_fleet()) == (export / "manifest-4.json").read_bytes()


def test_export_with_an_importance_matrix(trained: TinyRun, tmp_path: Path) -> None:
    """`export --imatrix`: llama.cpp's own llama-imatrix and llama-quantize (built once from the cached
    tree) measure the run's training prompts and make the k-quant with that matrix; the plain k-quant
    is kept beside it for eval's comparison. Both are real GGUFs llama-cpp-python runs, and they differ."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained.run_dir, run_dir, ignore=shutil.ignore_patterns("gguf"))
    immune_train("export", run_dir, "--quant", "q4_k_m", "--imatrix", "--imatrix-chunks", "2")
    gguf = run_dir / "gguf"
    (q4,) = [f for f in json.loads((gguf / "export.json").read_text())["files"] if f["quant"] == "q4_k_m"]
    assert q4["imatrix_sha256"] and q4["without_imatrix"], q4
    weighted, plain = gguf / q4["file"], gguf / q4["without_imatrix"]
    assert (gguf / "imatrix.gguf").is_file()
    assert weighted.read_bytes() != plain.read_bytes()
    for path in (weighted, plain):
        assert tensor_types(path).get("Q4_K", 0) > 0
        smoke_generate(path)
