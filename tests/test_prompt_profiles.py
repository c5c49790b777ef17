"""Client prompt profiles: Slips' alert-summary-v2 requests rendered from incidents (sections, budgets,
reductions), the offline answers that obey its output rules, the contract checks on good and bad
answers, the context a model needs for the longest request, and the bad inputs named clearly."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from tests.harness.slips_fixture import corpus_of, write_slips_fixture
from tests.harness.tiny_llama import build_tiny_llama
from tests.harness.training import immune_train
from trainer.base_model import load_tokenizer
from trainer.context import publish_context
from trainer.dataset.prepare import (
    PrepareOptions,
    Source,
    chat_token_counter,
    prepare,
    text_token_counter,
)
from trainer.dataset.records import ChatRecord, read_records
from trainer.errors import TrainerError
from trainer.prompts import PROFILES, get_profile
from trainer.prompts.alert_summary import FINAL_BUDGET, REDUCTION_BUDGET, AlertSummaryProfile
from trainer.prompts.contract import AnswerContext, contract_failures, contract_scores, stated_verdict
from trainer.prompts.evidence import digest, parse_evidence
from trainer.prompts.profile import ClientRequest, IncidentFacts, estimate_tokens
from trainer.records import CONTEXT_STEP, EvalReport, RequestFit
from trainer.task_checks import task_scores

SOURCE = "192.168.1.20"
SECTIONS = [
    "INCIDENT METADATA:",
    "CURRENT ALERT EVIDENCE DIGEST:",
    "YOUR TASK:",
    "OUTPUT RULES:",
    "- Prompt version: alert-summary-v2",
]


def _incident(patterns: int, repeats: int = 1) -> IncidentFacts:
    """An incident with ``patterns`` distinct evidence descriptions (each ``repeats`` times)."""
    lines = ["Incident: abc", f"Source IP: {SOURCE} | Timewindow: 4", ""]
    for index in range(patterns):
        lines.append(f"• 10:{index % 60:02d} - Event to 10.1.{index % 250}.9 [HIGH]")
        for copy in range(repeats):
            lines.append(
                f"  - Connection to service svc{index}x at 10.1.{index % 250}.{copy + 2}:443 from {SOURCE}. "
                f"threat level: high. Confidence: 0.8"
            )
    return IncidentFacts(
        incident_id="abc",
        source_ip=SOURCE,
        text="\n".join(lines),
        timewindow="4",
        timeline="2024-04-05 10:00:00 to 2024-04-05 11:00:00",
        threat_level=12.5,
        event_count=patterns * repeats,
    )


def _short_reduction(request: ClientRequest, _: IncidentFacts) -> str:
    return f"Compressed {len(request.items) or len(request.texts)} items of evidence for {SOURCE}."


def test_final_request_has_the_sections_in_order_and_slips_settings() -> None:
    incident = _incident(patterns=3, repeats=4)
    requests = AlertSummaryProfile().requests(incident, _short_reduction)
    assert [r.kind for r in requests] == ["final"]
    final = requests[0]
    assert final.max_tokens == 220 and final.temperature == 0.2
    system, user = final.messages
    assert system["role"] == "system" and "exactly one paragraph of plain text" in system["content"]
    assert "bullet points, markdown, headings or JSON" in system["content"]
    positions = [user["content"].index(section) for section in SECTIONS]
    assert positions == sorted(positions), "the sections are out of order"
    assert user["content"].rstrip().endswith("- Prompt version: alert-summary-v2")
    metadata = user["content"].split("CURRENT ALERT EVIDENCE DIGEST:")[0]
    for line in [
        "- Alert ID: abc",
        f"- Source IP: {SOURCE}",
        "- Timewindow: 4",
        "- Time Range: 2024-04-05 10:00:00 to 2024-04-05 11:00:00",
        "- Accumulated Threat Level: 12.50",
        "- Alert Confidence: 0.80",
        "- Correlated Evidence Records: 12",
        "- Grouped Evidence Patterns: 3",
        "- Completed Reduction Layers: 0",
    ]:
        assert line in metadata, line
    # One digest line per pattern, with its count, severity and sample values (not the source itself).
    digest_block = user["content"].split("CURRENT ALERT EVIDENCE DIGEST:\n")[1].split("\n\nYOUR TASK")[0]
    lines = digest_block.splitlines()
    assert len(lines) == 3 and all("(evidences: 4; severity: high 4" in line for line in lines)
    assert "samples: 10.1.0.2:443, 10.1.0.3:443" in lines[0] and SOURCE not in lines[0].split("samples:")[1]
    # Slips' own estimate: characters / 4 over every message.
    assert final.estimated_tokens == sum(len(m["content"]) for m in final.messages) // 4


def test_an_incident_over_the_budget_is_reduced_in_chunks_that_fit() -> None:
    incident = _incident(patterns=400)
    profile = AlertSummaryProfile()
    items = digest(parse_evidence(incident.text), SOURCE)
    unreduced = profile.final_request(incident, [item.line() for item in items], len(items), 0)
    assert unreduced.estimated_tokens > FINAL_BUDGET  # the case under test
    answered: list[str] = []

    def reduce(request: ClientRequest, facts: IncidentFacts) -> str:
        answered.append(request.label)
        return _short_reduction(request, facts)

    requests = profile.requests(incident, reduce)
    reductions, final = requests[:-1], requests[-1]
    assert final.kind == "final" and all(r.kind == "reduction" for r in reductions)
    chunks = len(reductions)
    assert chunks > 1 and answered == [r.label for r in reductions]
    assert [r.label for r in reductions] == [f"reduce-L1-{i}of{chunks}" for i in range(1, chunks + 1)]
    for request in reductions:
        assert request.max_tokens == 180 and request.estimated_tokens <= REDUCTION_BUDGET
        user = request.messages[1]["content"]
        assert "- Reduction layer: 1" in user and "EVIDENCE SUBSET:" in user
        assert "- Source digest items in this layer: 400" in user
        assert "compress" in request.messages[0]["content"].lower()
    # The chunks cover every digest item once, in order.
    covered = [item.pattern for request in reductions for item in request.items]
    assert covered == [item.pattern for item in items]
    assert final.estimated_tokens <= FINAL_BUDGET
    user = final.messages[1]["content"]
    assert "- Completed Reduction Layers: 1" in user and "- Grouped Evidence Patterns: 400" in user
    assert user.count("Compressed ") == chunks  # the final digest is the reductions' answers


def test_a_smaller_budget_makes_the_same_incident_need_more_reductions() -> None:
    incident = _incident(patterns=40)
    assert len(AlertSummaryProfile().requests(incident, _short_reduction)) == 1
    small = AlertSummaryProfile(input_budget=1200, reduction_budget=900)
    requests = small.requests(incident, _short_reduction)
    assert len(requests) > 2 and all(r.estimated_tokens <= 900 for r in requests[:-1])
    assert requests[-1].estimated_tokens <= 1200


def test_practice_requests_give_small_incidents_a_reduction_layer() -> None:
    profile = AlertSummaryProfile()
    practice = profile.practice_requests(_incident(patterns=8, repeats=3), _short_reduction)
    assert practice and all(r.label.startswith("practice-") for r in practice)
    assert {r.kind for r in practice} == {"reduction", "final"}
    assert "- Completed Reduction Layers: 1" in practice[-1].messages[1]["content"]
    assert profile.practice_requests(_incident(patterns=3), _short_reduction) == []


GOOD = (
    f"The alert for {SOURCE} shows a horizontal port scan of 440 hosts on 443/TCP followed by "
    "connections to a blacklisted address, which is a likely true positive with high risk."
)


@pytest.mark.parametrize(
    ("answer", "finished", "fails"),
    [
        (GOOD, True, []),
        (f"**Source:** {SOURCE}\n**Activity:** port scan. Likely true positive, high risk.", True,
         ["one_paragraph", "plain_text"]),
        (f"- {SOURCE} scanned 440 hosts, a likely true positive with high risk.", True, ["plain_text"]),
        (GOOD.replace(", which", ".\n\nThis"), True, ["one_paragraph"]),
        (GOOD.replace("a likely true positive with", "an event of"), True, ["gives_verdict"]),
        (GOOD.replace(" with high risk", ""), True, ["states_risk"]),
        (GOOD.replace(SOURCE, "the host"), True, ["names_source_ip"]),
        (GOOD, False, ["within_budget"]),
        (json.dumps({"summary": GOOD}), True, ["plain_text"]),
    ],
    ids=["good", "markdown", "bullet", "two-paragraphs", "no-verdict", "no-risk", "no-ip", "cut", "json"],
)  # fmt: skip
def test_the_contract_scores_final_answers(answer: str, finished: bool, fails: list[str]) -> None:
    checks = AlertSummaryProfile().checks("final")
    assert contract_failures(answer, checks, AnswerContext(SOURCE, finished)) == fails
    scores = contract_scores(answer, checks, AnswerContext(SOURCE, finished))
    assert set(scores) == {*checks, "within_budget"}
    assert all(scores[name] == (0.0 if name in fails else 1.0) for name in scores)


def test_a_reduction_must_not_judge() -> None:
    checks = AlertSummaryProfile().checks("reduction")
    context = AnswerContext(SOURCE)
    compressed = "40 evidences of scanning from 10:00 to 10:20 on 443/TCP."
    assert contract_failures(compressed, checks, context) == []
    assert contract_failures(GOOD, checks, context) == ["no_verdict"]


@pytest.fixture(scope="module")
def slips_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Fixture datasets with two hostile records added, and a tiny tokenizer trained on them."""
    root = tmp_path_factory.mktemp("profiles")
    summary, risk = write_slips_fixture(root / "slips", incidents=12)
    for path in (summary, risk):
        rows = json.loads(gzip.decompress(path.read_bytes()))
        bare = {**rows[0], "incident_id": "no-evidence", "dag_analysis": "Incident: x\nThreat Level: 3"}
        rows.append(bare)
        path.write_bytes(gzip.compress(json.dumps(rows).encode()))
    tokenizer = build_tiny_llama(root / "base", corpus_of(summary, risk))
    return summary, risk, tokenizer


def _prepare(slips_data: tuple[Path, Path, Path], out: Path, **options: object):
    summary, risk, tokenizer = slips_data
    loaded = load_tokenizer(str(tokenizer))
    return prepare(
        [Source.parse(f"slips-summary={summary}"), Source.parse(f"slips-risk={risk}")],
        out,
        chat_token_counter(loaded),
        PrepareOptions(max_tokens=4096, eval_fraction=0.25, **options),  # type: ignore[arg-type]
        text_token_counter(loaded),
    )


def test_prepare_renders_the_profile_with_answers_that_obey_it(slips_data, tmp_path) -> None:
    result = _prepare(slips_data, tmp_path / "out", prompt_profile="alert-summary-v2")
    records = [*read_records(result.train), *read_records(result.eval)]
    profile = get_profile("alert-summary-v2")
    finals = [r for r in records if r.meta["request"] == "final"]
    assert len(finals) == 12 and {r.group for r in finals} == {r.group for r in records}
    for record in records:
        assert record.meta["profile"] == "alert-summary-v2" and record.task == "slips-summary"
        user = record.messages[-2].content
        assert user.rstrip().endswith("- Prompt version: alert-summary-v2")
        context = AnswerContext(record.meta["source_ip"])
        assert contract_failures(record.answer, profile.checks(record.meta["request"]), context) == []
        assert int(record.meta["max_tokens"]) in (220, 180)
        prompt = [m.model_dump() for m in record.messages[:-1]]
        assert int(record.meta["estimated_tokens"]) == estimate_tokens(prompt)
    # The offline composition: one plain paragraph that opens with the verdict, the risk and the source.
    opening = re.compile(r"^(Likely true positive|Likely false positive|Uncertain), \w+ risk: (\S+) shows ")
    assert all((m := opening.match(r.answer)) and m[2] == r.meta["source_ip"] for r in finals)
    # The record without evidence lines is reported by id, not rendered.
    problems = result.stats["problems"]
    assert any("incident no-evidence has no evidence lines" in p for p in problems), problems
    # The context the longest request needs, in the model's own tokens.
    fit = RequestFit.model_validate(result.stats["requests"])
    assert fit.profile == "alert-summary-v2" and fit.max_tokens == 220
    assert fit.context_needed % CONTEXT_STEP == 0
    needed = fit.longest_prompt_tokens + 220
    assert needed <= fit.context_needed < needed + CONTEXT_STEP
    assert result.stats["options"]["prompt_profile"] == "alert-summary-v2"


def test_the_risk_profile_keeps_the_risk_answer(slips_data, tmp_path) -> None:
    result = _prepare(slips_data, tmp_path / "out", prompt_profile="risk-v1")
    records = [*read_records(result.train), *read_records(result.eval)]
    assert records and all(r.task == "slips-risk" and r.meta["request"] == "final" for r in records)
    assert all("**Risk Level:**" in r.answer for r in records)
    assert [m.role for m in records[0].messages] == ["user", "assistant"]


def test_the_published_context_comes_from_the_profile() -> None:
    fit = RequestFit.of("alert-summary-v2", 220, [("a:final", 1000, 800), ("b:final", 3617, 1875)])
    assert fit.longest_request == "b:final" and fit.context_needed == 3840  # 3617 + 220, to 256s
    assert fit.max_ratio_to_estimate == pytest.approx(1.929, abs=1e-3)
    report = EvalReport(baseline="f16", max_ppl_rise=0.1, records={}, quants={}, requests=fit)
    assert publish_context(report, None) == 3840
    assert publish_context(report, 8192) == 8192
    with pytest.raises(TrainerError, match=r"--n-ctx 2048 is smaller than the 3840 tokens") as refused:
        publish_context(report, 2048)
    assert refused.value.reason == "context-too-small" and "b:final" in str(refused.value)
    # Without a profile's fit there is nothing to derive from: the given value or the default.
    plain = report.model_copy(update={"requests": None})
    assert publish_context(plain, 2048) == 2048 and publish_context(plain, None) == 4096


def test_bad_inputs_are_named(slips_data, tmp_path) -> None:
    with pytest.raises(TrainerError, match=r"unknown prompt profile 'alert-summary-v9' \(known: ") as e:
        get_profile("alert-summary-v9")
    assert e.value.reason == "unknown-profile" and all(name in str(e.value) for name in PROFILES)
    summary, _, tokenizer = slips_data
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    with pytest.raises(TrainerError, match="is not a Slips dataset"):
        loaded = load_tokenizer(str(tokenizer))
        prepare(
            [Source.parse(str(chat))], tmp_path / "x", chat_token_counter(loaded),
            PrepareOptions(prompt_profile="alert-summary-v2"), text_token_counter(loaded),
        )  # fmt: skip
    # Through the CLI: refused before the tokenizer loads, with the known names.
    result = immune_train(
        "prepare", f"slips-summary={summary}", "--tokenizer", tmp_path / "absent", "--output", tmp_path / "o",
        "--prompt-profile", "alert-summary-v9", check=False,
    )  # fmt: skip
    assert result.returncode == 1 and "unknown prompt profile 'alert-summary-v9'" in result.stderr


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("Likely true positive, high risk: 10.0.0.5 scans.", "true positive"),
        ("This is a likely false-positive caused by a backup job.", "false positive"),
        ("The evidence is too thin: uncertain, medium risk.", "uncertain"),
        ("A True  Positive with high urgency.", "true positive"),
        ("The host scanned 440 addresses.", None),
    ],
)
def test_the_stated_verdict_is_read_whatever_its_spelling(text: str, verdict: str | None) -> None:
    assert stated_verdict(text) == verdict


def test_eval_says_whether_a_final_states_the_references_verdict() -> None:
    """`verdict_agrees`: 1.0 when the answer's verdict is the reference's, 0.0 for another or none;
    absent when the reference states none, and for reductions (they must not judge)."""

    def record(answer: str, request: str = "final") -> ChatRecord:
        return ChatRecord(
            id=f"x:{request}",
            group="x",
            task="slips-summary",
            source="fixture",
            meta={"profile": "alert-summary-v2", "request": request, "source_ip": SOURCE},
            messages=[
                {"role": "user", "content": "INCIDENT METADATA"},
                {"role": "assistant", "content": answer},
            ],
        )

    def agrees(reference: str, answer: str, request: str = "final") -> float | None:
        return task_scores(record(reference, request), answer, True, lambda *_: 0.0).get("verdict_agrees")

    benign = f"Likely false positive, low risk: {SOURCE} ran a backup."
    assert agrees(benign, benign.replace("Likely false", "A false")) == 1.0
    assert agrees(benign, GOOD) == 0.0
    assert agrees(benign, GOOD.replace("a likely true positive with", "an event of")) == 0.0
    assert agrees(f"{SOURCE} ran a backup.", GOOD) is None
    assert agrees(benign, GOOD, request="reduction") is None
