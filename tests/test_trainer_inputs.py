"""Trainer input handling without training: importers, the token budget, the split, and every bad input
(malformed lines, empty data, missing chat template, missing GGUF, wrong keys) named clearly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shared.config import MqttSettings
from shared.manifest import Quantization
from shared.signing import write_private_key
from tests.harness.slips_fixture import corpus_of, write_slips_fixture
from tests.harness.tiny_llama import build_tiny_llama
from tests.harness.training import immune_train
from trainer.base_model import load_tokenizer
from trainer.dataset.prepare import (
    PrepareOptions,
    Source,
    chat_token_counter,
    fit_budget,
    prepare,
)
from trainer.dataset.records import read_records
from trainer.errors import TrainerError
from trainer.export_folder import find_gguf
from trainer.publish import PublishRequest, PublishSettings, publish
from trainer.records import ExportedFile, ExportReport
from trainer.store_upload import StoreSettings
from trainer.tokenizer_fidelity import FidelityReport

SHARED_SLIPS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "slips"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tokenizer")
    summary, risk = write_slips_fixture(root / "slips", incidents=8)
    return build_tiny_llama(root / "base", corpus_of(summary, risk))


@pytest.fixture(scope="module")
def counter(tokenizer_dir: Path):
    return chat_token_counter(load_tokenizer(str(tokenizer_dir)))


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD_LINES = [
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": "Is 10.0.0.1 scanning?"},
                {"role": "assistant", "content": "Yes."},
            ]
        }
    ),
    json.dumps({"instruction": "Rate the risk", "input": "port scan from 10.0.0.2", "output": "High."}),
    json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}),
]


def test_generic_formats_are_imported_and_duplicates_dropped(tmp_path, counter) -> None:
    data = _jsonl(tmp_path / "chat.jsonl", [*GOOD_LINES, GOOD_LINES[0].replace("Yes.", "  yes. ")])
    result = prepare([Source.parse(str(data))], tmp_path / "out", counter, PrepareOptions(eval_fraction=0.0))
    records = list(read_records(result.train))
    assert result.stats["records"]["duplicates"] == 1 and len(records) == 3
    alpaca = records[1]
    assert (
        alpaca.messages[0].content == "Rate the risk\n\nport scan from 10.0.0.2" and alpaca.answer == "High."
    )
    assert [m.role for m in records[2].messages] == ["user", "assistant"]


def test_malformed_lines_are_reported_with_line_numbers(tmp_path, counter, tokenizer_dir) -> None:
    bad = [
        GOOD_LINES[0],
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps(["a", "list"]),
        json.dumps({"prompt": "unknown format"}),
    ]
    data = _jsonl(tmp_path / "bad.jsonl", bad)
    result = prepare(
        [Source.parse(f"chat={data}")], tmp_path / "out", counter, PrepareOptions(eval_fraction=0)
    )
    problems = result.stats["problems"]
    assert [p.split(":")[1] for p in problems] == ["2", "3", "4", "5", "6"]
    assert "not JSON" in problems[0] and "at least 2 items" in problems[1] and "role" in problems[2]
    assert "expected a JSON object" in problems[3] and "unknown format" in problems[4]
    assert result.stats["records"]["train"] == 1
    # --strict: the first bad line is fatal, named by file and line.
    run = immune_train(
        "prepare", f"chat={data}", "--tokenizer", tokenizer_dir, "-o", tmp_path / "s", "--strict", check=False
    )
    assert run.returncode == 1 and "bad.jsonl:2: not JSON" in run.stderr


def test_empty_and_missing_inputs_are_refused(tmp_path, counter) -> None:
    empty = _jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(TrainerError, match="no usable records: the inputs are empty"):
        prepare([Source.parse(str(empty))], tmp_path / "out", counter, PrepareOptions())
    junk = _jsonl(tmp_path / "junk.jsonl", ["{oops"])
    with pytest.raises(TrainerError, match=r"no usable records: junk.jsonl:1: not JSON"):
        prepare([Source.parse(str(junk))], tmp_path / "out", counter, PrepareOptions())
    with pytest.raises(TrainerError, match="no such Slips dataset file"):
        prepare(
            [Source.parse(f"slips-risk={tmp_path / 'nope.json.gz'}")],
            tmp_path / "o",
            counter,
            PrepareOptions(),
        )
    not_a_list = tmp_path / "obj.json"
    not_a_list.write_text('{"incidents": []}')
    with pytest.raises(TrainerError, match="expected a JSON array of incidents, got dict"):
        prepare([Source.parse(f"slips-summary={not_a_list}")], tmp_path / "o", counter, PrepareOptions())


def test_tokenizer_without_chat_template_is_refused(tmp_path, tokenizer_dir) -> None:
    tokenizer = load_tokenizer(str(tokenizer_dir))
    tokenizer.chat_template = None
    with pytest.raises(TrainerError, match="has no chat template") as error:
        chat_token_counter(tokenizer)
    assert error.value.reason == "missing-chat-template"


def test_long_incidents_are_cut_to_the_budget_with_a_marker(tmp_path, counter) -> None:
    _, risk = write_slips_fixture(tmp_path / "slips", incidents=4)
    result = prepare(
        [Source.parse(f"slips-risk={risk}")],
        tmp_path / "out",
        counter,
        PrepareOptions(max_tokens=400, eval_fraction=0),
    )
    records = list(read_records(result.train))
    assert records and all(r.truncated for r in records)
    for record in records:
        assert counter([m.model_dump() for m in record.messages]) <= 400
        assert "[... incident truncated by immune-train:" in record.messages[0].content
    assert fit_budget(records[0], counter, 400) == (
        records[0],
        counter([m.model_dump() for m in records[0].messages]),
    )
    assert fit_budget(records[0], counter, 100) is None  # not even the answer fits
    with pytest.raises(TrainerError, match="all 4 records exceed 100 tokens even with the incident cut"):
        prepare([Source.parse(f"slips-risk={risk}")], tmp_path / "o", counter, PrepareOptions(max_tokens=100))


def test_export_folder_without_gguf_is_named(tmp_path) -> None:
    (tmp_path / "run.f16.gguf").write_bytes(b"GGUF")
    with pytest.raises(TrainerError, match=r"no q4_k_m GGUF \(found: run.f16.gguf\)"):
        find_gguf(tmp_path, Quantization.Q4_K_M)
    with pytest.raises(TrainerError, match="no such export folder"):
        find_gguf(tmp_path / "missing", Quantization.Q8_0)


def test_export_folder_gguf_is_the_one_export_recorded(tmp_path) -> None:
    """Bug: eval and publish took the first ``*.q4_k_m.gguf`` in the folder, which after
    ``export --adapter-base q4_k_m`` was the requantized base (its name sorts first), not the
    merged model: the recipe's "merged q4_k_m" scores were the base's."""
    for name in ("run.f16.gguf", "run.q4_k_m.gguf", "SmolLM2-135M-Instruct.q4_k_m.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    files = [
        ExportedFile(quant=quant, file=f"run.{quant.value}.gguf", size=4, sha256="0" * 64, tensor_types={})
        for quant in (Quantization.F16, Quantization.Q4_K_M)
    ]
    ExportReport(files=files, tokenizer=FidelityReport(reference="base", samples=1, tokens=1)).write(
        tmp_path / "export.json"
    )
    assert find_gguf(tmp_path, Quantization.Q4_K_M) == tmp_path / "run.q4_k_m.gguf"
    with pytest.raises(TrainerError, match=r"export.json records no q8_0 GGUF \(it has f16, q4_k_m\)"):
        find_gguf(tmp_path, Quantization.Q8_0)


def _settings(tmp_path: Path, keys: list[Path], keyring: Path) -> PublishSettings:
    return PublishSettings(
        fleet="lab",
        trainer_keys=keys,
        keyring_file=keyring,
        mqtt=MqttSettings(port=9),  # never reached: every case here fails first
        store=StoreSettings(base_url="http://127.0.0.1:9/models", directory=tmp_path / "store"),
    )


@pytest.fixture
def evaluated_export(tmp_path: Path) -> Path:
    export = tmp_path / "gguf"
    export.mkdir()
    (export / "m.q4_k_m.gguf").write_bytes(b"GGUF" + bytes(64))
    scores = {"perplexity": 9.0, "perplexity_rise_vs_f16": 0.02, "accepted": True, "tasks": {}}
    refused = {"perplexity": 9.9, "perplexity_rise_vs_f16": 0.3, "accepted": False, "tasks": {}}
    report = {
        "baseline": "f16",
        "max_ppl_rise": 0.1,
        "records": {"perplexity": 4, "tasks": 0},
        "quants": {"q4_k_m": {"file": "m.q4_k_m.gguf", **scores}, "q8_0": {"file": "m.q8_0.gguf", **refused}},
    }
    (export / "eval.json").write_text(json.dumps(report))
    return export


def test_publish_refuses_wrong_keys_before_uploading(tmp_path, evaluated_export, fleet_keys) -> None:
    keyring = tmp_path / "keyring.json"
    keyring.write_bytes(fleet_keys.keyring().to_json())
    request = PublishRequest(evaluated_export, Quantization.Q4_K_M, "slips/m", serial=3)
    for name, key, pattern in [
        ("operator.key", fleet_keys.operator, "has role operator, manifests need a trainer key"),
        ("stranger.key", fleet_keys.stranger, "is not in the keyring"),
    ]:
        path = tmp_path / name
        write_private_key(key, path)
        with pytest.raises(TrainerError, match=pattern):
            publish(_settings(tmp_path, [path], keyring), request)
    with pytest.raises(TrainerError, match="trainer key file not found"):
        publish(_settings(tmp_path, [tmp_path / "absent.key"], keyring), request)
    assert not (tmp_path / "store").exists(), "nothing may be uploaded with a bad key"
    # Threshold 2: one trainer key is not enough.
    strict = tmp_path / "strict-keyring.json"
    strict.write_bytes(fleet_keys.keyring(trainer=2).to_json())
    write_private_key(fleet_keys.trainer, tmp_path / "trainer.key")
    with pytest.raises(TrainerError, match="needs 2 distinct trainer keys, 1 given"):
        publish(_settings(tmp_path, [tmp_path / "trainer.key"], strict), request)


def test_publish_refuses_unevaluated_and_refused_quants(tmp_path, evaluated_export, fleet_keys) -> None:
    keyring = tmp_path / "keyring.json"
    keyring.write_bytes(fleet_keys.keyring().to_json())
    write_private_key(fleet_keys.trainer, tmp_path / "trainer.key")
    settings = _settings(tmp_path, [tmp_path / "trainer.key"], keyring)
    refused = PublishRequest(evaluated_export, Quantization.Q8_0, "slips/m", serial=3)
    with pytest.raises(TrainerError, match=r"q8_0: perplexity rise \+30.0% vs F16 exceeds the bound 10.0%"):
        publish(settings, refused)
    with pytest.raises(TrainerError, match="q5_k_m was not evaluated"):
        publish(settings, PublishRequest(evaluated_export, Quantization.Q5_K_M, "slips/m", serial=3))
    (evaluated_export / "eval.json").unlink()
    with pytest.raises(TrainerError, match="no evaluation report"):
        publish(settings, refused)


@pytest.mark.skipif(
    not SHARED_SLIPS.is_dir(), reason=f"the real Slips datasets are not here ({SHARED_SLIPS})"
)
def test_real_slips_datasets_prepare_without_leakage(tmp_path, counter) -> None:
    sources = [
        Source.parse(f"slips-summary={SHARED_SLIPS / 'summarization_dataset_v3.json.gz'}"),
        Source.parse(f"slips-risk={SHARED_SLIPS / 'risk_dataset.json.gz'}"),
    ]
    result = prepare(sources, tmp_path / "out", counter, PrepareOptions(max_tokens=8192))
    stats = result.stats
    train, held_out = list(read_records(result.train)), list(read_records(result.eval))
    assert stats["records"]["imported"] == 1064 and stats["skipped_inputs"] == 0
    assert len(train) + len(held_out) == 1064 - stats["records"]["too_long"]
    assert {r.group for r in train}.isdisjoint({r.group for r in held_out})
    assert 0.08 < len({r.group for r in held_out}) / 532 < 0.12
    assert stats["tokens"]["train"]["max"] <= 8192 and stats["truncated"] > 0
    assert all(r.meta["source_ip"] for r in train + held_out)
    assert not any("LLM query failed" in r.answer for r in train + held_out)
    # The teachers' error messages ("Behavior analysis failed: Error code: 429 ...") are not answers.
    assert not any(re.search(r"(analysis|assessment) failed:", r.answer) for r in train + held_out)


@pytest.mark.parametrize(
    "text",
    [
        # Seen in the real summarization dataset (75 gpt_4o answers) and the risk dataset.
        "Behavior analysis failed: Error code: 429 - {'error': {'message': 'You exceeded your quota'}}",
        "Behavior analysis failed: peer closed connection without sending complete message body",
        "Risk assessment failed: <html>\r\n<head><title>502 Bad Gateway</title></head>",
        "Cause analysis failed: <html>\r\n<head><title>504 Gateway Time-out</title></head>",
        "LLM query failed - timeout",
    ],
)
def test_teacher_error_messages_are_not_answers(text: str) -> None:
    from trainer.dataset.slips import clean_answer

    assert clean_answer(text) is None


def test_a_real_answer_mentioning_a_failure_is_kept() -> None:
    from trainer.dataset.slips import clean_answer

    text = "**Source:** 10.0.0.5\n**Activity:** SSH login failed: 40 attempts against 10.0.0.9"
    assert clean_answer(text) == text


def test_answer_parts_choose_what_the_model_learns(tmp_path, counter) -> None:
    summary, _ = write_slips_fixture(tmp_path / "slips", incidents=6)
    parts = {"slips-summary": ("behavior_analysis",)}
    options = PrepareOptions(max_tokens=1024, eval_fraction=0.0, answer_parts=parts)
    result = prepare([Source.parse(f"slips-summary={summary}")], tmp_path / "out", counter, options)
    answers = [r.answer for r in read_records(result.train)]
    assert answers and all(a.startswith("**Source:**") for a in answers)
    assert result.stats["options"]["answer_parts"] == {"slips-summary": ["behavior_analysis"]}
    with pytest.raises(TrainerError, match="unknown answer part 'verdict' for slips-summary"):
        prepare(
            [Source.parse(f"slips-summary={summary}")], tmp_path / "bad", counter,
            PrepareOptions(answer_parts={"slips-summary": ("verdict",)}),
        )  # fmt: skip


def test_teacher_preference_decides_whose_answer_is_learned(tmp_path, tokenizer_dir) -> None:
    """`prepare --teacher` (repeatable, best first): by default gpt_4o's answer is learned and
    gpt4o_mini's only where gpt_4o's failed (every 6th fixture incident); naming gpt4o_mini first
    learns its answer for every incident. Records say which teacher answered."""
    summary, _ = write_slips_fixture(tmp_path / "slips", incidents=12)

    def teachers_of(out: Path, *options: str) -> dict[str, int]:
        args = ["prepare", f"slips-summary={summary}", "--tokenizer", tokenizer_dir, "-o", out]
        immune_train(*args, "--eval-fraction", "0", *options)
        stats = json.loads((out / "stats.json").read_text())
        learned = [r.teacher for r in read_records(out / "train.jsonl")]
        assert {t: learned.count(t) for t in set(learned)} == stats["teachers"]
        return stats["teachers"]

    assert teachers_of(tmp_path / "default") == {"gpt_4o": 10, "gpt4o_mini": 2}
    preferred = teachers_of(tmp_path / "mini-first", "--teacher", "gpt4o_mini", "--teacher", "gpt_4o")
    assert preferred == {"gpt4o_mini": 12}
