"""SFT on chat records: assistant-only masks over multi-turn conversations, packing without attention
across examples, the task-type report, quarantine of bad records, and the GSM8K route.

The tokenizer and the pretrained tiny Llama come from tests/stages/conftest.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers.masking_utils import create_causal_mask

from stages import checkpoint as ckpt
from stages import collect, sft, tokenize, tokenizer
from stages.chat import TASK_TYPES, conversation_ids, prompt_and_response, read_records, record_problem
from stages.pretrain import check_tokenizer, lm_loss
from stages.rewards import correctness, well_formatted
from stages.sft import QUARANTINE, REPORT, SFTConfig, collate, encode_examples, packed_lm_loss
from stages.collect import CollectConfig
from stages.tasks import gsm8k
from stages.token_shards import TokenShards
from stages.tokenize import TokenizeConfig, tokenizer_hash
from stages.tokenizer import TokenizerConfig
from stages.tracking import RecordingTracker

from .conftest import Trained, quiet_train

GSM8K_TRAIN = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "gsm8k" / "train.jsonl"


def chat(*turns: tuple[str, str], task_type: str | None = None) -> dict:
    record = {"messages": [{"role": r, "content": c} for r, c in turns]}
    return record if task_type is None else {**record, "task_type": task_type}


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def tok(pretrained: Trained):
    return ckpt.load_tokenizer(pretrained.checkpoint)


# --- masks -------------------------------------------------------------------------------------


def test_every_assistant_turn_and_only_those_carry_the_loss(tok) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "<answer>4</answer>"}, {"role": "user", "content": "Thanks"}]
    ids, mask = conversation_ids(tok, messages)
    end, assistant = tok.convert_tokens_to_ids("<|end|>"), tok.convert_tokens_to_ids("<|assistant|>")

    def t(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    # Hand-built from the template `<|role|>content<|end|>`: what each stretch of tokens must be.
    expected = [(t("<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>"), 0), (t("Hello!") + [end], 1),
                (t("<|user|>2 + 2?<|end|><|assistant|>"), 0), (t("<answer>4</answer>") + [end], 1),
                (t("<|user|>Thanks<|end|>"), 0)]
    assert ids == [i for piece, _ in expected for i in piece]
    assert mask == [m for piece, m in expected for _ in piece]
    assert t("<answer>4</answer>") == [tok.convert_tokens_to_ids("<answer>"), *t("4"), tok.convert_tokens_to_ids("</answer>")]
    # The whole conversation tokenized at once is the same sequence: the pieces did not split a token.
    assert ids == t(tok.apply_chat_template(messages, tokenize=False))
    starts = [j for j in range(1, len(mask)) if mask[j] and not mask[j - 1]]
    assert len(starts) == 2 and all(ids[j - 1] == assistant for j in starts)


def test_a_single_turn_encodes_as_prompt_and_response_always_did(tok) -> None:
    question, answer = "Ann has 3 apples. She gets 4 more. How many?", "<think>3 + 4 = 7</think> <answer>7</answer>"
    got = conversation_ids(tok, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    assert got == prompt_and_response(tok, question, answer)


# --- packing -----------------------------------------------------------------------------------


def three_examples(tok) -> list[tuple[list[int], list[int]]]:
    convs = [[("user", "What is 2 + 3?"), ("assistant", "<think>2 + 3 = 5</think> <answer>5</answer>")],
             [("system", "Answer in one word."), ("user", "Colour of the sky?"), ("assistant", "Blue")],
             [("user", "Hi"), ("assistant", "Hello, how can I help?"), ("user", "Count to 3"), ("assistant", "1 2 3")]]
    return [conversation_ids(tok, chat(*c)["messages"]) for c in convs]


def test_packed_row_logits_equal_each_example_alone(pretrained: Trained, tok) -> None:
    model = ckpt.load_model(pretrained.checkpoint).eval()
    segments = three_examples(tok)
    width = sum(len(ids) for ids, _ in segments) + 5  # and a little padding
    batch = collate([segments], tok.pad_token_id, width)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        at = 0
        for ids, mask in segments:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(packed[at:at + len(ids)], alone, atol=1e-5, rtol=1e-5)
            at += len(ids)

        # The packed loss is the token mean over all three examples' assistant tokens.
        losses, counts = [], []
        for ids, mask in segments:
            one = collate([[(ids, mask)]], tok.pad_token_id)
            losses.append(lm_loss(model, one)[0].item())
            counts.append(int(one["loss_tokens"].sum()))
        loss, _ = packed_lm_loss(model, batch)
    assert int(batch["loss_tokens"][0]) == sum(counts) == sum(sum(m) for _, m in segments)
    assert loss.item() == pytest.approx(sum(x * n for x, n in zip(losses, counts, strict=True)) / sum(counts), rel=1e-5)


def test_packed_batch_tensors_and_the_block_diagonal_mask_transformers_builds(pretrained: Trained, tok) -> None:
    segments = three_examples(tok)
    lengths = [len(ids) for ids, _ in segments]
    width = sum(lengths) + 4
    batch = collate([segments], tok.pad_token_id, width)
    starts = [sum(lengths[:k]) for k in range(len(lengths))] + [sum(lengths)]
    expected_pos = torch.cat([torch.arange(n) for n in lengths + [4]])
    assert torch.equal(batch["position_ids"][0], expected_pos)
    labels = batch["labels"][0]
    for k, (ids, mask) in enumerate(segments):
        lo = starts[k]
        want = [i if m and (j > 0 or k == 0) else -100 for j, (i, m) in enumerate(zip(ids, mask, strict=True))]
        assert labels[lo:lo + len(ids)].tolist() == want
    assert (labels[sum(lengths):] == -100).all() and (batch["input_ids"][0, sum(lengths):] == tok.pad_token_id).all()

    model = ckpt.load_model(pretrained.checkpoint)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    mask = create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None, cache=None,
                              position_ids=batch["position_ids"])
    block = torch.zeros(width, width, dtype=torch.bool)
    for lo, hi in zip(starts, starts[1:] + [width], strict=True):
        block[lo:hi, lo:hi] = torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril()
    assert mask.shape == (1, 1, width, width) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], block)  # causal within an example, nothing across examples


def record_batches(monkeypatch: pytest.MonkeyPatch, name: str) -> list[dict[str, torch.Tensor]]:
    seen: list[dict[str, torch.Tensor]] = []
    real = getattr(sft, name)

    def spy(model, batch):
        seen.append({k: v.clone() for k, v in batch.items()})
        return real(model, batch)

    monkeypatch.setattr(sft, name, spy)
    return seen


def test_sft_packs_rows_of_seq_len_with_loss_tokens(corpus: Path, pretrained: Trained, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_batches(monkeypatch, "packed_lm_loss")
    result = sft.run(SFTConfig(dataset=corpus, policy=pretrained.checkpoint, output_dir=tmp_path, batch_size=3,
                               packing=True, seq_len=128, train=quiet_train(max_steps=1, warmup_steps=1)))
    (batch,) = seen
    assert batch["input_ids"].shape == (3, 128) and "attention_mask" not in batch
    for pos, labels, n in zip(batch["position_ids"], batch["labels"], batch["loss_tokens"], strict=True):
        assert (pos == 0).sum() >= 3  # several arithmetic examples (~40 tokens each) share the row
        assert int(n) == int((labels[1:] != -100).sum()) > 0
    report = json.loads((tmp_path / REPORT).read_text())
    assert report["packing"]["rows"] * 128 >= report["tokens"] and report["packing"]["fill"] > 0.6
    assert math.isfinite(result.metrics["train/loss"]) and result.metrics["data/packing_fill"] == report["packing"]["fill"]


def test_packed_grad_accum_keeps_the_whole_batch_token_mean(corpus: Path, pretrained: Trained, tmp_path: Path) -> None:
    # Rows carry different numbers of assistant tokens: weighting micro-batches by rows would log
    # (and optimise) a different mean than the one-shot batch.
    losses = {}
    for accum in (1, 3):
        tracker = RecordingTracker()
        sft.run(SFTConfig(dataset=corpus, policy=pretrained.checkpoint, output_dir=tmp_path / str(accum),
                          batch_size=3, packing=True, seq_len=100,
                          train=quiet_train(max_steps=1, warmup_steps=1, grad_accum=accum)), tracker=tracker)
        losses[accum] = tracker.series("train/loss")[0]
    assert losses[3] == pytest.approx(losses[1], rel=1e-5)


# --- messages files: report, quarantine, errors ------------------------------------------------


def test_messages_file_trains_reports_the_task_mix_and_quarantines_bad_records(pretrained: Trained,
                                                                               tmp_path: Path) -> None:
    good = [chat(("user", "Say hi"), ("assistant", "hi"), task_type="chat"),
            chat(("system", "Summarise."), ("user", "A long story about a cat."), ("assistant", "A cat."),
                 ("user", "Shorter"), ("assistant", "Cat."), task_type="summarization"),
            chat(("user", "Pick a colour"), ("assistant", "Red")),  # no task_type -> other
            chat(("user", "2 + 2?"), ("assistant", "<answer>4</answer>"), task_type="closed_qa")]
    lines = [good[0], good[1], good[2],
             {"messages": []},
             chat(("user", "x"), ("bot", "y")),
             chat(("system", "s"), ("user", "only a question")),
             {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]},
             chat(("user", "long"), ("assistant", "word " * 300)),
             "{oops",
             chat(("user", "q"), ("assistant", "a"), task_type="poetry"),
             "",
             good[3]]
    path = write_jsonl(tmp_path / "chats.jsonl", lines)
    with open(path, "ab") as f:  # line 13: not UTF-8
        f.write(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    tracker = RecordingTracker()
    out = tmp_path / "run"
    result = sft.run(SFTConfig(messages=path, policy=pretrained.checkpoint, output_dir=out, batch_size=4,
                               train=quiet_train(max_steps=2, warmup_steps=1)), tracker=tracker)

    quarantined = [json.loads(x) for x in (out / QUARANTINE).read_text().splitlines()]
    assert {q["file"] for q in quarantined} == {str(path)}
    reasons = {q["line"]: q["reason"] for q in quarantined}
    assert sorted(reasons) == [4, 5, 6, 7, 8, 9, 10, 13]
    assert reasons[4] == "empty messages"
    assert "unknown role 'bot'" in reasons[5]
    assert "no assistant turn" in reasons[6]
    assert "messages[1]: content is int, not a string" == reasons[7]
    assert "longer than the context of 128" in reasons[8]
    assert reasons[9].startswith("invalid JSON")
    assert "unknown task_type 'poetry'" in reasons[10]
    assert reasons[13].startswith("invalid UTF-8")
    assert all(len(q["raw"]) <= sft.RAW_CHARS for q in quarantined)

    report = json.loads((out / REPORT).read_text())
    assert report["source"] == "messages" and report["examples"] == 4 and report["quarantined"] == 8
    mix = {t: v["examples"] for t, v in report["task_types"].items()}
    assert mix == {t: (1 if t in ("chat", "summarization", "other", "closed_qa") else 0) for t in TASK_TYPES}
    assert report["task_types"]["chat"]["share"] == 0.25
    # Loss tokens per type: "Cat." and "A cat." turns both count for the summarization record.
    assert report["task_types"]["summarization"]["loss_tokens"] == \
        sum(conversation_ids(ckpt.load_tokenizer(pretrained.checkpoint), good[1]["messages"])[1])
    (step0,) = [m for s, m in tracker.metrics if s == 0]
    assert step0["data/task_type/summarization"] == 1.0 and step0["data/task_type/rewrite"] == 0.0
    assert step0["data/quarantined"] == 8.0 and result.metrics["data/examples"] == 4.0
    assert math.isfinite(result.metrics["train/loss"]) and ckpt.is_complete(out)


def test_parquet_messages_read_like_jsonl(tok, tmp_path: Path) -> None:
    records = [chat(("user", "Say hi"), ("assistant", "hi"), task_type="chat"),
               chat(("user", "Pick"), ("assistant", "Red"), ("user", "Why"), ("assistant", "Because."))]
    pd.DataFrame(records).to_parquet(tmp_path / "chats.parquet")
    rows = list(read_records(tmp_path / "chats.parquet"))
    assert [line for line, _, _ in rows] == [1, 2]
    examples, quarantine = encode_examples(tok, [(str(tmp_path), line, rec, bad) for line, rec, bad in rows], 128)
    assert not quarantine and [e.task_type for e in examples] == ["chat", "other"]
    assert examples[1].ids == conversation_ids(tok, records[1]["messages"])[0]


def test_a_missing_or_useless_messages_file_fails_before_training(pretrained: Trained, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"sft\.messages: .*nope\.jsonl does not exist"):
        sft.run(SFTConfig(messages=tmp_path / "nope.jsonl", policy=pretrained.checkpoint, output_dir=tmp_path / "a"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": []}, chat(("user", "no answer"))])
    with pytest.raises(ValueError, match=r"no trainable examples in messages \(2 quarantined .*bad\.jsonl:1: empty messages"):
        sft.run(SFTConfig(messages=bad, policy=pretrained.checkpoint, output_dir=tmp_path / "b"))
    assert not (tmp_path / "b" / "checkpoints").exists() and not ckpt.is_complete(tmp_path / "b")
    assert len((tmp_path / "b" / QUARANTINE).read_text().splitlines()) == 2


def test_sft_needs_exactly_one_source_of_examples(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="set one of them"):
        SFTConfig(messages=tmp_path, gsm8k=tmp_path, policy=tmp_path, output_dir=tmp_path)
    with pytest.raises(ValueError, match="sft.dataset"):
        SFTConfig(policy=tmp_path, output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"replay_fraction=0\.5 replays pretraining text .*set sft\.tokens="):
        SFTConfig(messages=tmp_path, policy=tmp_path, output_dir=tmp_path, replay_fraction=0.5)


def test_replay_refuses_shards_of_another_tokenizer_before_training(corpus: Path, tokens: Path, pretrained: Trained,
                                                                    tmp_path: Path) -> None:
    # Same vocabulary size and separator, other merges (trained on less text): only the ids differ.
    small = collect.run(CollectConfig(output_dir=tmp_path / "collect", max_builtin_chars=40_000,
                                      arithmetic_problems=50)).dataset
    other_tok = tokenizer.run(TokenizerConfig(dataset=small, output_dir=tmp_path / "tok", vocab_size=1024)).tokenizer_dir
    other = tokenize.run(TokenizeConfig(dataset=corpus, tokenizer=other_tok, output_dir=tmp_path / "shards")).tokens
    assert TokenShards(other).vocab_size == TokenShards(tokens).vocab_size
    cfg = SFTConfig(dataset=corpus, policy=pretrained.checkpoint, output_dir=tmp_path / "sft", batch_size=8,
                    replay_fraction=0.25, tokens=other, train=quiet_train(max_steps=1, warmup_steps=0))
    with pytest.raises(ValueError, match=r"tokenized by another tokenizer .*does not re-encode to its ids"):
        sft.run(cfg)
    assert not (tmp_path / "sft" / "checkpoints").exists()
    # The policy's own shards pass, though its checkpoint carries the tokenizer re-saved (another file hash).
    assert tokenizer_hash(pretrained.checkpoint) != TokenShards(tokens).tokenizer_hash
    check_tokenizer(TokenShards(tokens), pretrained.checkpoint)


def test_default_arithmetic_examples_are_labelled_closed_qa(sft_trained: Trained) -> None:
    report = json.loads((sft_trained.cfg.output_dir / REPORT).read_text())
    assert report["source"] == "arithmetic" and report["quarantined"] == 0
    assert report["task_types"]["closed_qa"]["share"] == 1.0
    assert sft_trained.result.metrics["data/task_type/closed_qa"] == report["examples"] > 400


# --- GSM8K ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not GSM8K_TRAIN.exists(), reason=f"{GSM8K_TRAIN} is not there (shared datasets absent)")
def test_gsm8k_records_have_the_format_the_rewards_verify(tok) -> None:
    problems = gsm8k.load_gsm8k(GSM8K_TRAIN, limit=300)
    records = gsm8k.sft_records(problems)
    assert all(record_problem(r) == "" and r["task_type"] == "closed_qa" for r in records)
    answers = [r["messages"][1]["content"] for r in records]
    assert well_formatted(answers) == [1.0] * len(records)
    assert correctness(answers, answers=[p.answer for p in problems]) == [1.0] * len(records)
    assert all(gsm8k.is_correct(a, p.answer) == 1.0 for a, p in zip(answers, problems, strict=True))
    first = records[0]["messages"]
    assert first[0] == {"role": "user", "content": problems[0].question} and "<<" not in answers[0]
    ids, mask = conversation_ids(tok, first)
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == answers[0] + "<|end|>"


def test_sft_trains_on_a_gsm8k_file(pretrained: Trained, tmp_path: Path) -> None:
    # The real problems run to ~150-300 tokens, past the tiny model's 128: a short file in the same format.
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Tom has 3 pens and buys 2. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
        {"question": "Ann had 9 figs and ate 4. How many are left?", "answer": "9 - 4 = <<9-4=5>>5\n#### 5"},
        {"question": "A box holds 6 eggs. How many in 2 boxes?", "answer": "2 x 6 = <<2*6=12>>12\n#### 12"}])
    out = tmp_path / "run"
    result = sft.run(SFTConfig(gsm8k=path, policy=pretrained.checkpoint, output_dir=out, batch_size=2,
                               train=quiet_train(max_steps=2, warmup_steps=1)))
    report = json.loads((out / REPORT).read_text())
    assert report["source"] == "gsm8k" and report["examples"] == 3 and report["task_types"]["closed_qa"]["share"] == 1
    assert math.isfinite(result.metrics["train/loss"])
    with pytest.raises(FileNotFoundError, match=r"sft\.gsm8k"):
        sft.run(SFTConfig(gsm8k=tmp_path / "none.jsonl", policy=pretrained.checkpoint, output_dir=tmp_path / "x"))
