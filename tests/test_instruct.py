"""`python -m finetune` on datasets, through TRL: the loss on the answers only, packing that keeps examples apart,
DPO with its default reference model for every version, and the errors a dataset can meet."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset

import modeling_diff
from conftest import ROOT, tiny_config
from finetune import instruct
from finetune.__main__ import main
from finetune.recipe import finetune
from test_trainer import byte_level_tokenizer

EXAMPLES = ROOT / "examples" / "data"
# A chat template in the shape of SmolLM2's: a generation prompt opens the assistant's turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|endoftext|>{{ message['role'] }}\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)
QUIET = {"disable_tqdm": True}


@pytest.fixture(scope="module")
def tokenizer():
    files = [Path(shutil.__file__)] + sorted(EXAMPLES.glob("*.jsonl"))
    tokenizer = byte_level_tokenizer(files)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def folder_of(tmp_path, tokenizer, version, name=None) -> Path:
    folder = tmp_path / (name or f"model-{version}")
    torch.manual_seed(0)
    config = tiny_config(diff_version=version, vocab_size=len(tokenizer), eos_token_id=0)
    modeling_diff.DiffLlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def trainers(monkeypatch):
    """The TRL trainers the recipe builds, in the order it builds them."""
    made = []
    original = instruct.trl_trainer

    def recording(**kwargs):
        trainer_class, config_class = original(**kwargs)

        class Recorded(trainer_class):
            def __init__(self, *args, **kw):
                super().__init__(*args, **kw)
                made.append(self)

        return Recorded, config_class

    monkeypatch.setattr(instruct, "trl_trainer", recording)
    return made


def run(folder, output, data, **overrides):
    settings = dict(model=folder, output=output, data=data, mode="lora", steps=2, block_size=128, batch_size=4,
                    eval_tokens=512, learning_rate=1e-3, training_args=QUIET)
    return finetune(**{**settings, **overrides})


def labelled_and_unlabelled(batch, tokenizer) -> list[tuple[str, str]]:
    """For each row of a padded batch: the text of the tokens that carry loss, and of those that do not."""
    rows = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        kept = mask.bool()
        rows.append((tokenizer.decode(ids[kept & (labels != -100)]), tokenizer.decode(ids[kept & (labels == -100)])))
    return rows


def test_prompt_completion_data_trains_on_the_completions_only(tmp_path, tokenizer, trainers):
    folder = folder_of(tmp_path, tokenizer, 2)
    metrics = run(folder, tmp_path / "run", EXAMPLES / "instructions.jsonl")
    rows = [json.loads(line) for line in (EXAMPLES / "instructions.jsonl").read_text().splitlines()]
    completions = {row["completion"]: row["prompt"] for row in rows}
    (trainer,) = trainers
    batch = next(iter(trainer.get_train_dataloader()))
    for labelled, unlabelled in labelled_and_unlabelled(batch, tokenizer):
        answer = labelled.removesuffix("<|endoftext|>")
        assert answer in completions, labelled  # every labelled token is the completion's (and its EOS)
        assert unlabelled == completions[answer]  # every prompt token is unlabelled
    assert metrics["data_kind"] == "prompt-completion"
    assert metrics["train_examples"] + metrics["held_out_examples"] == len(rows)
    assert metrics["held_out_loss_after"] < metrics["held_out_loss_before"]
    card = (tmp_path / "run" / "README.md").read_text()
    assert "prompt-completion examples" in card and "perplexity of the answers" in card


def test_chat_data_trains_on_the_last_assistant_message(tmp_path, tokenizer, trainers):
    folder = folder_of(tmp_path, tokenizer, 1)
    metrics = run(folder, tmp_path / "run", EXAMPLES / "chat.jsonl", block_size=512)  # whole conversations
    assert metrics["data_kind"] == "messages"
    answers = {json.loads(line)["messages"][-1]["content"] for line in (EXAMPLES / "chat.jsonl").read_text().splitlines()}
    batch = next(iter(trainers[0].get_train_dataloader()))
    for labelled, unlabelled in labelled_and_unlabelled(batch, tokenizer):
        assert labelled.removesuffix("<|endoftext|>").removesuffix("\n") in answers, labelled
        assert "You write short, correct Python." in unlabelled and unlabelled.endswith("assistant\n")


@pytest.mark.parametrize("version", [1, 2, "dex"])
def test_packed_examples_attend_only_to_themselves(tmp_path, tokenizer, trainers, version):
    """Packed into one row, each example's logits are those it has alone: position ids restart at each example and
    the attention mask transformers builds from them keeps examples apart. Without the restarts they differ."""
    folder = folder_of(tmp_path, tokenizer, version)
    run(folder, tmp_path / "run", EXAMPLES / "instructions.jsonl", packing=True, steps=1, batch_size=4,
        block_size=256)
    batch = next(iter(trainers[0].get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and (batch["position_ids"] == 0).sum() >= 2  # several examples, one row
    model = modeling_diff.DiffLlamaForCausalLM.from_pretrained(folder).eval()
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=batch["input_ids"][:, a:b]).logits[0] for a, b in zip(starts, starts[1:])])
        contaminated = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert (contaminated[starts[1]:] - alone[starts[1]:]).abs().max() > 1e-2  # the check can tell


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("version", [1, 2, "dex"])
def test_dpo_with_the_default_reference_model(tmp_path, tokenizer, trainers, version, mode):
    folder = folder_of(tmp_path, tokenizer, version)
    metrics = run(folder, tmp_path / "run", EXAMPLES / "preferences.jsonl", dpo=True, mode=mode, steps=3,
                  learning_rate=1e-3 if mode == "lora" else 1e-4)
    (trainer,) = trainers
    # Before training the policy is the reference, so every pair's margin is 0 and DPO's loss is log 2.
    assert metrics["held_out_dpo_loss_before"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["held_out_dpo_loss_after"] != pytest.approx(math.log(2), abs=1e-5)
    assert metrics["dpo_beta"] == 0.1
    original = modeling_diff.DiffLlamaForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[5, 17, 40, 99, 3, 64]])
    with torch.no_grad():
        expected = original(ids).logits
        if mode == "full":
            assert metrics["reference_model"] == "modeling_diff.DiffLlamaForCausalLM"
            assert type(trainer.ref_model) is modeling_diff.DiffLlamaForCausalLM
            reference = trainer.ref_model(ids).logits
        else:
            assert metrics["reference_model"] == "the base model with the adapter disabled"
            trainer.model.eval()
            with trainer.model.disable_adapter():
                reference = trainer.model(input_ids=ids).logits
            assert (trainer.model(input_ids=ids).logits - expected).abs().max() > 0  # the adapter trained
    torch.testing.assert_close(reference, expected)  # the reference is the model as loaded, untouched
    card = (tmp_path / "run" / "README.md").read_text()
    assert "Held-out DPO loss: 0.6931 before" in card


def test_a_saved_dataset_folder_uses_its_own_test_split(tmp_path, tokenizer):
    folder = folder_of(tmp_path, tokenizer, 2)
    rows = [json.loads(line) for line in (EXAMPLES / "instructions.jsonl").read_text().splitlines()]
    from datasets import DatasetDict

    DatasetDict({"train": Dataset.from_list(rows[:12]), "test": Dataset.from_list(rows[12:])}).save_to_disk(
        tmp_path / "saved"
    )
    metrics = run(folder, tmp_path / "run", tmp_path / "saved", steps=1)
    assert (metrics["train_examples"], metrics["held_out_examples"]) == (12, 4)


def test_the_held_out_rows_are_chosen_by_content(tmp_path):
    rows = [{"text": f"def f{i}(): return {i}"} for i in range(200)]
    Dataset.from_list(rows).to_json(tmp_path / "a.jsonl")
    Dataset.from_list(rows[::-1] + [{"text": "x = 1"}]).to_json(tmp_path / "b.jsonl")
    kwargs = dict(eval_fraction=0.1, max_eval_examples=1000, preference=False, has_chat_template=False)
    first = instruct.build_instruction_data(tmp_path / "a.jsonl", **kwargs)
    second = instruct.build_instruction_data(tmp_path / "b.jsonl", **kwargs)
    held = {row["text"] for row in first.held_out}
    assert 5 <= len(held) <= 40  # about a tenth
    assert held <= {row["text"] for row in second.held_out}  # a row's side does not depend on the others
    assert not held & {row["text"] for row in first.train}


@pytest.mark.parametrize(
    "data, extra, message",
    [
        ("code", ["--dpo"], "--dpo applies to a dataset"),
        ("preferences.jsonl", [], "pass --dpo to train on them"),
        ("instructions.jsonl", ["--dpo"], "--dpo needs preference data"),
        ("preferences.jsonl", ["--dpo", "--packing"], "--packing applies to instruction data"),
        ("columns.jsonl", [], "a dataset needs one of: prompt + chosen + rejected; prompt + completion; messages; text"),
        ("notes.csv", [], "is a file but not a dataset this recipe reads"),
        ("chat.jsonl", [], "the tokenizer has no chat template"),
    ],
)
def test_dataset_errors_name_the_problem_and_change_nothing(tmp_path, tokenizer, capsys, data, extra, message):
    folder = folder_of(tmp_path, tokenizer, 2)
    if data == "chat.jsonl":  # a tokenizer without a chat template
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "a.py").write_text("x = 1\n")
    (tmp_path / "columns.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": "r", "answer": "b"}\n')
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    path = EXAMPLES / data if (EXAMPLES / data).exists() else tmp_path / data
    with pytest.raises(SystemExit) as exit_:
        main(["--lora", "--model", str(folder), "--data", str(path), "--output", str(tmp_path / "run"), *extra])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
