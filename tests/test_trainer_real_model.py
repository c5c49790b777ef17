"""The trainer on real pretrained weights: SmolLM2-135M-Instruct from its GGUF (converted back to a
trainable model and checked against llama.cpp), a few LoRA steps, a q8_0 export whose tokenizer must
match the base GGUF's, and llama-cpp-python running the result. The full recipe is bench/real_finetune.py."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from shared.admission import verify_manifest
from shared.artifacts import sha256_file
from shared.gguf import read_gguf_header
from shared.signing import Envelope, write_private_key
from tests.harness.edge import (
    FLEET,
    HOST_ARCH,
    TOPICS,
    ServingOptions,
    running_daemon,
    sign_manifest,
    write_edge_config,
)
from tests.harness.slips_fixture import write_slips_fixture
from tests.harness.training import immune_train, write_publish_config
from trainer.base_model import PARITY_TOLERANCE, parity_check, require_parity, resolve_base
from trainer.dataset.prepare import load_tokenizer
from trainer.dataset.records import read_records
from trainer.errors import TrainerError
from trainer.tokenizer_fidelity import PROBES, check_fidelity, gguf_reference

pytestmark = pytest.mark.timeout(900)

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
learning_rate = 2e-4
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
    assert not any(tmp_path.iterdir()), "nothing may be cached for a refused base"
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


def test_smoke_lora_on_smollm2_from_its_gguf(
    smollm2_model: Path, tmp_path: Path, mqtt_broker, artifact_server, fleet_keys, observer
) -> None:
    """The CI smoke of the real recipe: prepare with the GGUF's tokenizer, a few LoRA steps on the
    converted weights, a q8_0 export that passes the tokenizer-fidelity check, and llama-cpp-python
    answering a Slips-style chat with it."""
    from llama_cpp import Llama

    summary, _ = write_slips_fixture(tmp_path / "slips", incidents=8)
    immune_train(
        "prepare", f"slips-summary={summary}", "--tokenizer", smollm2_model, "--output", tmp_path / "data",
        "--max-tokens", "320", "--eval-fraction", "0.25", "--answer-parts", "slips-summary=behavior_analysis",
    )  # fmt: skip
    assert all(r.answer.startswith("**Source:**") for r in read_records(tmp_path / "data" / "train.jsonl"))
    config = tmp_path / "train.toml"
    config.write_text(REAL_TRAIN_TOML.format(base=smollm2_model))
    immune_train("finetune", "--config", config)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["base"]["spec"] == str(smollm2_model) and run["base"]["architecture"] == "llama"
    assert run["metrics"]["train_loss"] > 0
    result = immune_train("export", tmp_path / "run", "--quant", "q8_0", "--adapter")
    assert "tokenizer identical to the base GGUF SmolLM2-135M-Instruct.Q4_1.gguf" in result.stdout
    report = json.loads((tmp_path / "run" / "gguf" / "export.json").read_text())
    assert report["tokenizer"]["samples"] >= 8 and report["tokenizer"]["tokens"] > 500
    # The LoRA alone, bound to the base GGUF the device holds, applied by llama-cpp-python.
    adapter = report["adapter"]
    lora = read_gguf_header(tmp_path / "run" / "gguf" / adapter["file"])
    assert (lora.kind, lora.adapter_type, lora.architecture) == ("adapter", "lora", "llama")
    assert lora.base_sha256 == adapter["base_sha256"] == sha256_file(smollm2_model)[1]
    assert adapter["answered"] and adapter["size"] < adapter["base_size"] / 5
    assert "applied by llama-cpp-python: answered" in result.stdout
    # eval judges the adapter on its base exactly as a device runs it, next to the merged F16.
    args = (
        "--data",
        tmp_path / "data" / "eval.jsonl",
        "--quant",
        "q8_0",
        "--ppl-records",
        "2",
        "--ppl-ctx",
        "320",
    )
    evaluated = immune_train(
        "eval", tmp_path / "run" / "gguf", *args, "--task-records", "1", "--max-tokens", "8"
    )
    assert "adapter run.adapter.gguf on SmolLM2-135M-Instruct.Q4_1.gguf: perplexity" in evaluated.stderr
    scores = json.loads((tmp_path / "run" / "gguf" / "eval.json").read_text())["adapter"]
    assert scores["file"] == adapter["file"] and scores["perplexity"] > 1
    assert abs(scores["perplexity_rise_vs_f16"]) < 0.5 and scores["vs_f16"]["perplexity"]["n"] == 2
    # publish --adapter: the adapter and its base uploaded, a signed adapter manifest that a device
    # serving that base commits and answers with.
    _publish_adapter_to_a_device(tmp_path, smollm2_model, mqtt_broker, artifact_server, fleet_keys, observer)
    q8 = tmp_path / "run" / "gguf" / "run.q8_0.gguf"
    model = Llama(model_path=str(q8), n_ctx=512, n_threads=2, verbose=False)
    try:
        reply = model.create_chat_completion(
            messages=[{"role": "user", "content": "Source IP 10.0.0.5 scanned 200 hosts. Summarise."}],
            max_tokens=24,
            temperature=0.0,
        )
    finally:
        model.close()
    assert reply["choices"][0]["message"]["content"].strip()  # type: ignore[index]


def _publish_adapter_to_a_device(
    tmp_path, smollm2_model, mqtt_broker, artifact_server, fleet_keys, observer
) -> None:
    keyring, key = tmp_path / "keyring.json", tmp_path / "trainer.key"
    keyring.write_bytes(fleet_keys.keyring().to_json())
    write_private_key(fleet_keys.trainer, key)
    config = write_publish_config(
        tmp_path / "publish.toml", FLEET, [key], keyring, mqtt_broker.host, mqtt_broker.port,
        artifact_server.root, artifact_server.base_url,
    )  # fmt: skip
    options = ServingOptions(trial_s=0.0)
    device = write_edge_config(tmp_path / "device", mqtt_broker, fleet_keys.keyring(), serving=options)
    runtime = {"chat_format": "chatml", "n_ctx": 1024, "stop": ["<|im_end|>"]}
    base = sign_manifest(
        [fleet_keys.trainer], smollm2_model.read_bytes(), artifact_server.add_file(smollm2_model),
        serial=1, name="smollm2-base", runtime=runtime,
    )  # fmt: skip
    with running_daemon(device):
        observer.publish(TOPICS.desired_fleet(), base)
        assert observer.wait_terminal(1, timeout=180)[-1]["state"] == "committed"
        immune_train(
            "publish", tmp_path / "run" / "gguf", "--config", config, "--name", "slips-summary-lora",
            "--adapter", "--serial", "2", "--channel", "summary", "--arch", HOST_ARCH, "--n-ctx", "1024",
        )  # fmt: skip
        end = observer.wait_terminal(2, timeout=180)[-1]
        assert (end["manifest_name"], end["state"]) == ("slips-summary-lora", "committed"), end
        body = {
            "model": "slips-summary-lora",
            "messages": [{"role": "user", "content": "Source IP 10.0.0.1"}],
        }
        reply = httpx.post(f"{options.base_url}/api/chat", json=body | {"stream": False}, timeout=120)
        assert reply.status_code == 200 and reply.json()["model"] == "slips-summary-lora", reply.text
    manifest = verify_manifest(
        Envelope.from_json((tmp_path / "run" / "gguf" / "manifest-2.json").read_bytes()), fleet_keys.keyring()
    )
    assert manifest.is_adapter and manifest.base.sha256 == sha256_file(smollm2_model)[1]
    assert manifest.runtime.chat_template and "<|im_start|>" in manifest.runtime.chat_template
    uploaded = artifact_server.root / "bases" / manifest.base.sha256[:16] / smollm2_model.name
    assert sha256_file(uploaded)[1] == manifest.base.sha256
