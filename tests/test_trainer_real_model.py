"""The trainer on real pretrained weights: SmolLM2-135M-Instruct from its GGUF (converted back to a
trainable model and checked against llama.cpp), a few LoRA steps, a q8_0 export whose tokenizer must
match the base GGUF's, and llama-cpp-python running the result. The full recipe is bench/real_finetune.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.admission import verify_manifest
from shared.artifacts import sha256_file
from shared.gguf import read_gguf_header
from shared.signing import Envelope, write_private_key
from tests.harness.edge import (
    DEVICE,
    FLEET,
    HOST_ARCH,
    TOPICS,
    ServingOptions,
    running_daemon,
    sign_manifest,
    write_edge_config,
)
from tests.harness.load import LoadClients
from tests.harness.slips_fixture import write_slips_fixture
from tests.harness.training import immune_train, write_publish_config
from trainer.base_model import PARITY_TOLERANCE, load_tokenizer, parity_check, require_parity, resolve_base
from trainer.dataset.records import read_records
from trainer.errors import TrainerError
from trainer.tokenizer_fidelity import PROBES, check_fidelity, gguf_reference

pytestmark = pytest.mark.timeout(900)

#: What export --adapter-base q4_k_m names SmolLM2-135M-Instruct.Q4_1.gguf requantized.
DEVICE_BASE = "SmolLM2-135M-Instruct.q4_k_m.gguf"

SAMPLES = [
    [
        {"role": "system", "content": "You are a network security analyst."},
        {"role": "user", "content": "Source IP 192.168.1.113 scanned 440 hosts on port 443/TCP [HIGH]."},
        {"role": "assistant", "content": "192.168.1.113 is running a horizontal port scan: high risk."},
    ],
    [
        {"role": "user", "content": "Summarise: 12 connections to blacklisted IP 43.230.175.19 without DNS."},
        {
            "role": "assistant",
            "content": "The host repeatedly contacts a blacklisted address, likely malware.",
        },
    ],
]

REAL_TRAIN_TOML = """
base_model = "{base}"
train_file = "data/train.jsonl"
output_dir = "run"
max_seq_length = 320
seed = 5

[lora]
r = 8
alpha = 16

[training]
max_steps = 3
# High for LoRA, so that three steps visibly change the model (the smoke checks that they did).
learning_rate = 2e-3
warmup_ratio = 0.0
batch_size = 1
gradient_accumulation = 1
logging_steps = 1
save_steps = 100
gradient_checkpointing = false
"""


def test_gguf_base_converts_and_matches_llama_cpp(smollm2_model: Path, tmp_path: Path) -> None:
    """SmolLM2 from its Q4_1 GGUF: a trainable Llama with its BPE tokenizer and ChatML template, whose
    perplexity on the samples matches llama-cpp-python's on the same file and tokens; cached after."""
    source = resolve_base(str(smollm2_model), SAMPLES, cache_dir=tmp_path)
    assert source.gguf == smollm2_model.resolve() and source.converted is not None
    folder = Path(source.load_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "<|im_start|>" in load_tokenizer(str(folder)).chat_template
    parity = source.converted.parity
    assert parity.tokens > 40 and abs(parity.gap) <= PARITY_TOLERANCE, parity
    assert source.converted.tokenizer.tokens > 40  # the rebuilt tokenizer matched llama.cpp's
    # The GGUF's special tokens, not transformers' guess (it made <|im_start|> the EOS).
    tokenizer = load_tokenizer(str(folder))
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert config["eos_token_id"] == 2
    again = resolve_base(str(smollm2_model), [], cache_dir=tmp_path)  # no samples needed: cached
    assert again.load_path == source.load_path and again.converted == source.converted
    # Weights that do not behave like the GGUF's are refused: the converted model with one layer's
    # attention output zeroed, against llama-cpp-python on the untouched file.
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source.load_path, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
    broken = parity_check(model, smollm2_model, [SAMPLES[0][1]["content"], SAMPLES[1][0]["content"]])
    with pytest.raises(TrainerError, match=r"refusing to train on weights that differ from the GGUF") as e:
        require_parity(broken, smollm2_model, "llama")
    assert e.value.reason == "broken-conversion" and broken.gap > PARITY_TOLERANCE


def test_gemma3_gguf_is_refused_for_its_rebuilt_tokenizer(gemma3_model: Path, tmp_path: Path) -> None:
    """Gemma-3's weights convert correctly (perplexity on llama.cpp's token ids matches), but the
    tokenizer transformers rebuilds from its GGUF cuts words into pieces and drops BOS: "The capital
    of France is" becomes 10 tokens instead of llama.cpp's 6, which is why greedy output in
    transformers degenerates. Training on it would teach other tokens than the device serves."""
    with pytest.raises(TrainerError, match="transformers rebuilds a tokenizer that differs") as caught:
        resolve_base(str(gemma3_model), SAMPLES, cache_dir=tmp_path)
    assert caught.value.reason == "tokenizer-mismatch" and "differs at token" in str(caught.value)
    cached = [path.name for path in tmp_path.iterdir() if path.suffix != ".lock"]  # the lock holds no data
    assert cached == [], "nothing may be cached for a refused base"
    with pytest.raises(TrainerError, match="tokenizer-mismatch|differs from llama.cpp"):
        load_tokenizer(str(gemma3_model))  # prepare refuses it too: its token counts would be wrong


def test_bad_gguf_bases_are_refused_with_the_reason(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    with pytest.raises(TrainerError, match=r"absent\.gguf: no such GGUF file") as missing:
        resolve_base(str(tmp_path / "absent.gguf"), SAMPLES, cache_dir=tmp_path)
    assert missing.value.reason == "missing-base-model"
    odd = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(odd), "rwkv7")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(TrainerError, match=r"architecture 'rwkv7' cannot be trained from a GGUF") as odd_arch:
        resolve_base(str(odd), SAMPLES, cache_dir=tmp_path)
    assert odd_arch.value.reason == "unsupported-architecture"
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(TrainerError, match="magic bytes are not 'GGUF'"):
        resolve_base(str(not_gguf), SAMPLES, cache_dir=tmp_path)


def test_tokenizer_fidelity_refuses_a_different_tokenizer(smollm2_model: Path, gemma3_model: Path) -> None:
    same = gguf_reference(smollm2_model)
    try:
        report = check_fidelity(smollm2_model, same, ["Source IP: 10.0.0.1 → 8.8.8.8:53/UDP"])
    finally:
        same.close()
    assert report.tokens > 50 and report.samples == len(PROBES) + 1
    other = gguf_reference(gemma3_model)
    try:
        with pytest.raises(TrainerError, match=r"tokenizes differently from the base GGUF gemma") as caught:
            check_fidelity(smollm2_model, other, [])
    finally:
        other.close()
    assert caught.value.reason == "tokenizer-mismatch" and "differs at token" in str(caught.value)


@dataclass(frozen=True)
class AdapterRun:
    """One ``immune-train`` run on SmolLM2 up to an evaluated LoRA adapter, with what export and
    eval printed."""

    root: Path
    exported: subprocess.CompletedProcess[str]
    evaluated: subprocess.CompletedProcess[str]

    @property
    def gguf_dir(self) -> Path:
        return self.root / "run" / "gguf"

    @property
    def device_base(self) -> Path:
        """The base the adapter is bound to: the training base requantized to q4_k_m."""
        return self.gguf_dir / DEVICE_BASE


def _train_adapter(root: Path, base: Path, dataset: str, quant: str, *prepare: str) -> AdapterRun:
    """prepare -> a few LoRA steps -> export (merged ``quant`` and the adapter, bound to the base
    requantized to q4_k_m, as the recipe ships it) -> eval, by the CLI."""
    immune_train(
        "prepare", dataset, "--tokenizer", base, "--output", root / "data", "--max-tokens", "320",
        "--eval-fraction", "0.25", *prepare,
    )  # fmt: skip
    config = root / "train.toml"
    config.write_text(REAL_TRAIN_TOML.format(base=base))
    immune_train("finetune", "--config", config)
    exported = immune_train("export", root / "run", "--quant", quant, "--adapter", "--adapter-base", "q4_k_m")
    evaluated = immune_train(
        "eval", root / "run" / "gguf", "--data", root / "data" / "eval.jsonl", "--quant", quant,
        "--ppl-records", "2", "--ppl-ctx", "320", "--task-records", "1", "--max-tokens", "8",
    )  # fmt: skip
    return AdapterRun(root, exported, evaluated)


@pytest.fixture(scope="module")
def summary_run(smollm2_model: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterRun:
    """The summary task's adapter, with a merged q8_0 beside it."""
    root = tmp_path_factory.mktemp("summary-run")
    summary, _ = write_slips_fixture(root / "slips", incidents=8)
    return _train_adapter(
        root, smollm2_model, f"slips-summary={summary}", "q8_0",
        "--answer-parts", "slips-summary=behavior_analysis",
    )  # fmt: skip


@pytest.fixture(scope="module")
def risk_run(smollm2_model: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterRun:
    """The risk task's adapter on the same base (only the F16 merged beside it, for eval)."""
    root = tmp_path_factory.mktemp("risk-run")
    _, risk = write_slips_fixture(root / "slips", incidents=8)
    return _train_adapter(root, smollm2_model, f"slips-risk={risk}", "f16")


def test_smoke_lora_on_smollm2_from_its_gguf(summary_run: AdapterRun, smollm2_model: Path) -> None:
    """The CI smoke of the real recipe: prepare with the GGUF's tokenizer, a few LoRA steps on the
    converted weights, a q8_0 export that passes the tokenizer-fidelity check, and llama-cpp-python
    answering a Slips-style chat with it."""
    from llama_cpp import Llama

    root = summary_run.root
    assert all(r.answer.startswith("**Source:**") for r in read_records(root / "data" / "train.jsonl"))
    run = json.loads((root / "run" / "run.json").read_text())
    assert run["base"]["spec"] == str(smollm2_model) and run["base"]["architecture"] == "llama"
    assert run["metrics"]["train_loss"] > 0
    result = summary_run.exported
    assert "tokenizer identical to the base GGUF SmolLM2-135M-Instruct.Q4_1.gguf" in result.stdout
    report = json.loads((summary_run.gguf_dir / "export.json").read_text())
    assert report["tokenizer"]["samples"] >= 8 and report["tokenizer"]["tokens"] > 500
    # The LoRA alone, bound to the base GGUF the device holds (the training base requantized to
    # q4_k_m), applied by llama-cpp-python.
    adapter = report["adapter"]
    lora = read_gguf_header(summary_run.gguf_dir / adapter["file"])
    assert (lora.kind, lora.adapter_type, lora.architecture) == ("adapter", "lora", "llama")
    assert lora.base_sha256 == adapter["base_sha256"] == sha256_file(summary_run.device_base)[1]
    assert (adapter["base_file"], adapter["trained_on"]) == (DEVICE_BASE, smollm2_model.name)
    assert read_gguf_header(summary_run.device_base).kind == "model"
    assert adapter["answered"] and adapter["size"] < adapter["base_size"] / 5
    printed = " ".join(result.stdout.split())  # the console wraps long lines
    assert f"requantized from {smollm2_model.name}" in printed
    assert "applied by llama-cpp-python: answered" in printed
    # eval judges the adapter on its base exactly as a device runs it, next to the merged F16.
    evaluated = summary_run.evaluated.stderr
    assert f"adapter run.adapter.gguf on {DEVICE_BASE}: perplexity" in evaluated
    scores = json.loads((summary_run.gguf_dir / "eval.json").read_text())["adapter"]
    assert scores["file"] == adapter["file"] and scores["perplexity"] > 1
    assert abs(scores["perplexity_rise_vs_f16"]) < 0.5 and scores["vs_f16"]["perplexity"]["n"] == 2

    def greedy(
        model_path: Path, lora: Path | None = None, messages: list[dict[str, str]] | None = None
    ) -> str:
        model = Llama(
            model_path=str(model_path),
            lora_path=str(lora) if lora else None,
            n_ctx=512,
            n_threads=2,
            verbose=False,
        )
        try:
            reply = model.create_chat_completion(
                messages=messages
                or [{"role": "user", "content": "Source IP 10.0.0.5 scanned 200 hosts. Summarise."}],  # type: ignore[arg-type]
                max_tokens=24,
                temperature=0.0,
            )
        finally:
            model.close()
        return str(reply["choices"][0]["message"]["content"])  # type: ignore[index]

    assert greedy(summary_run.gguf_dir / "run.q8_0.gguf").strip()
    # Training changed what the model says: on a request it was trained on, the adapter on its base
    # answers otherwise than the base alone.
    seen = next(iter(read_records(root / "data" / "train.jsonl")))
    prompt = [m.model_dump() for m in seen.messages[:-1]]
    on_base = greedy(summary_run.device_base, messages=prompt)
    assert greedy(summary_run.device_base, summary_run.gguf_dir / adapter["file"], prompt) != on_base


def test_adapter_is_bound_to_the_training_base_unless_told_and_bad_options_are_refused(
    summary_run: AdapterRun, smollm2_model: Path, tmp_path: Path
) -> None:
    """Without --adapter-base the adapter is bound to the very file it was trained from, and no base
    is written; --adapter-base without --adapter, or naming an unknown type, is refused by name."""
    from trainer.adapter_export import export_adapter
    from trainer.toolchain import prepare_toolchain

    run = tmp_path / "run"
    shutil.copytree(summary_run.root / "run" / "adapter", run / "adapter")
    shutil.copy(summary_run.root / "run" / "run.json", run / "run.json")
    exported = export_adapter(run, prepare_toolchain())
    assert (exported.base_file, exported.trained_on, exported.answered) == (smollm2_model.name, None, True)
    assert exported.base_sha256 == sha256_file(smollm2_model)[1]
    assert [p.name for p in (run / "gguf").iterdir()] == ["run.adapter.gguf"]
    for options, expected in (
        (["--adapter-base", "q4_k_m"], "REJECTED (bad-option): --adapter-base chooses the base"),
        (["--adapter", "--adapter-base", "q9_z"], "REJECTED (bad-quant): unknown quantization 'q9_z'"),
    ):
        result = immune_train("export", run, *options, check=False)
        assert result.returncode == 1 and expected in result.stderr, result.stderr


GEMMA_DEVICE = "pi-2"
SLOW_GATE = '\n[health]\ngolden_prompts = ["Say hello."]\nmin_tokens_per_second = 1000000.0\n'


class Publisher:
    """``immune-train publish --adapter`` of trained runs, and the end each device reports."""

    def __init__(self, tmp_path: Path, broker, server, keys, observer) -> None:
        keyring, key = tmp_path / "keyring.json", tmp_path / "trainer.key"
        keyring.write_bytes(keys.keyring().to_json())
        write_private_key(keys.trainer, key)
        self.configs = {}
        for gate in ("device", "slow"):
            self.configs[gate] = write_publish_config(
                tmp_path / f"publish-{gate}.toml", FLEET, [key], keyring, broker.host, broker.port,
                server.root, server.base_url, extra=SLOW_GATE if gate == "slow" else "",
            )  # fmt: skip
        self.observer = observer

    def publish(self, run: AdapterRun, name: str, channel: str, serial: int, gate: str = "device") -> None:
        immune_train(
            "publish", run.gguf_dir, "--config", self.configs[gate], "--name", name, "--adapter",
            "--serial", str(serial), "--channel", channel, "--arch", HOST_ARCH, "--n-ctx", "1024",
        )  # fmt: skip

    def end(self, device: str, name: str, serial: int) -> dict[str, Any]:
        """The terminal event of ``name`` #``serial`` on ``device``."""

        def found() -> list[dict[str, Any]]:
            return [
                e for e in self.observer.terminal_events()
                if (e["device_id"], e["manifest_name"], e["serial"]) == (device, name, serial)
            ]  # fmt: skip

        return self.observer.wait_for(found, 180, f"{name} #{serial} to end on {device}")[-1]


def _ask(base_url: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Source IP 10.0.0.1"}], "max_tokens": 16}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)


def test_two_trained_adapters_are_published_and_served_from_one_worker(
    summary_run: AdapterRun, risk_run: AdapterRun, gemma3_model: Path,
    tmp_path: Path, mqtt_broker, artifact_server, fleet_keys, observer,
) -> None:  # fmt: skip
    """Two adapters trained by ``immune-train`` on SmolLM2, published by it, served by one daemon
    from the base's one worker; a third hot-added under 4 clients fails no request; a device
    serving another base refuses every one of them (base-mismatch); a version failing the health
    gate signed into its manifest is not served, and the other adapters keep answering."""
    # Two runs requantize the training base to the very same file, so both adapters fit one base.
    base = summary_run.device_base
    assert sha256_file(risk_run.device_base) == sha256_file(base)
    publisher = Publisher(tmp_path, mqtt_broker, artifact_server, fleet_keys, observer)
    smol = ServingOptions(trial_s=2.0)
    gemma = ServingOptions(trial_s=0.0)
    smol_device = write_edge_config(tmp_path / "pi-1", mqtt_broker, fleet_keys.keyring(), serving=smol)
    gemma_device = write_edge_config(
        tmp_path / GEMMA_DEVICE, mqtt_broker, fleet_keys.keyring(), serving=gemma, device=GEMMA_DEVICE
    )
    bases = {
        DEVICE: (base, {"chat_format": "chatml", "n_ctx": 1024, "stop": ["<|im_end|>"]}),
        GEMMA_DEVICE: (gemma3_model, {"chat_format": "gemma", "n_ctx": 1024, "stop": ["<end_of_turn>"]}),
    }
    with running_daemon(smol_device) as daemon, running_daemon(gemma_device):
        for device, (path, runtime) in bases.items():
            envelope = sign_manifest(
                [fleet_keys.trainer], path.read_bytes(), artifact_server.add_file(path), serial=1,
                name="base", runtime=runtime,
            )  # fmt: skip
            observer.publish(TOPICS.desired_device(device), envelope)
            assert publisher.end(device, "base", 1)["state"] == "committed"
        router = daemon.data.router
        worker = router.active.worker

        publisher.publish(summary_run, "slips-summary", "summary", 1)
        publisher.publish(risk_run, "slips-risk", "risk", 1)
        for name in ("slips-summary", "slips-risk"):
            assert publisher.end(DEVICE, name, 1)["state"] == "committed"
            refused = publisher.end(GEMMA_DEVICE, name, 1)
            assert (refused["state"], refused["reason"].split(":")[0]) == ("rejected", "base-mismatch")
            assert f"adapter {name} needs base {base.stem}" in refused["reason"], refused
        assert [a.name for a in router.adapters] == ["slips-risk", "slips-summary"]
        assert all(a.worker is worker for a in router.adapters) and router.active.worker is worker
        for name in ("slips-summary", "slips-risk", "base"):
            reply = _ask(smol.base_url, name)
            assert reply.status_code == 200 and reply.json()["model"] == name, reply.text

        # A third adapter, hot-added while 4 clients use the other two and the base.
        clients = [LoadClients(smol.base_url, clients=1, model=m) for m in ("slips-summary", "slips-risk")]
        with LoadClients(smol.base_url, clients=2, model="base") as load, clients[0], clients[1]:
            for each in (load, *clients):
                each.wait_for_requests(2)
            publisher.publish(summary_run, "slips-triage", "triage", 1)
            assert publisher.end(DEVICE, "slips-triage", 1)["state"] == "committed"
            for each in (load, *clients):
                each.wait_for_requests(2)
        assert [o for each in (load, *clients) for o in each.failures()] == []
        assert router.active.worker is worker, "the base was reloaded"
        assert [a.name for a in router.adapters] == ["slips-risk", "slips-summary", "slips-triage"]

        # A new version whose signed health gate it cannot pass: not served; the others keep serving.
        publisher.publish(risk_run, "slips-risk", "risk", 2, gate="slow")
        end = publisher.end(DEVICE, "slips-risk", 2)
        assert (end["state"], end["reason"].split(":")[0]) == ("failed", "health-gate-slow"), end
        ledger = daemon.control.ledger
        assert ledger.current("slips-risk").serial == 1 and router.active.worker is worker
        for name in ("slips-summary", "slips-risk", "slips-triage", "base"):
            assert _ask(smol.base_url, name).status_code == 200
    manifest = verify_manifest(
        Envelope.from_json((risk_run.gguf_dir / "manifest-2.json").read_bytes()), fleet_keys.keyring()
    )
    assert manifest.is_adapter and manifest.base.sha256 == sha256_file(base)[1]
    assert manifest.health is not None and manifest.health.min_tokens_per_second == 1e6
    assert manifest.runtime.chat_template and "<|im_start|>" in manifest.runtime.chat_template
    uploaded = artifact_server.root / "bases" / manifest.base.sha256[:16] / base.name
    assert sha256_file(uploaded)[1] == manifest.base.sha256
