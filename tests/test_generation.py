"""The generation stack on a tiny model: pipelines, greedy, sampling, beam search, streaming, chat templates."""

import threading

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TextIteratorStreamer, pipeline

from conftest import tiny_config
from modeling_diff import DiffLlamaForCausalLM

WORDS = "the a cat dog sat on mat ran to house big small red blue and then def return print if else for in".split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )


@pytest.fixture(scope="module", params=[1, 2], ids=["v1", "v2"])
def model(request, tokenizer):
    torch.manual_seed(0)
    config = tiny_config(
        diff_version=request.param, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    return DiffLlamaForCausalLM(config).eval()


def test_text_generation_pipeline_is_greedy_and_deterministic(model, tokenizer):
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    kwargs = dict(max_new_tokens=6, do_sample=False, return_full_text=False)
    first = generator("the cat sat", **kwargs)[0]["generated_text"]
    assert first == generator("the cat sat", **kwargs)[0]["generated_text"] and first.split()
    ids = tokenizer("the cat sat", return_tensors="pt").input_ids
    direct = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert tokenizer.decode(direct[0, ids.shape[1] :], skip_special_tokens=True).split() == first.split()


def test_sampling_is_seeded(model, tokenizer):
    ids = tokenizer("a dog ran", return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=8, do_sample=True, top_k=10, temperature=1.5)
    torch.manual_seed(3)
    a = model.generate(ids, **kwargs)
    torch.manual_seed(3)
    b = model.generate(ids, **kwargs)
    assert torch.equal(a, b)


def test_beam_search_scores_at_least_as_well_as_greedy(model, tokenizer):
    ids = tokenizer("the big house", return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, output_scores=True, return_dict_in_generate=True)
    greedy = model.generate(ids, do_sample=False, **kwargs)
    beam = model.generate(ids, num_beams=4, do_sample=False, length_penalty=0.0, **kwargs)

    def log_likelihood(sequence):
        logits = model(sequence).logits.log_softmax(-1)[0, ids.shape[1] - 1 : -1]
        return logits.gather(-1, sequence[0, ids.shape[1] :, None]).sum().item()

    assert log_likelihood(beam.sequences) >= log_likelihood(greedy.sequences) - 1e-4


def test_streamer_yields_the_generated_text(model, tokenizer):
    inputs = tokenizer("the red cat", return_tensors="pt")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**inputs, streamer=streamer, max_new_tokens=6, do_sample=False)
    thread = threading.Thread(target=model.generate, kwargs=kwargs)
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    full = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = tokenizer.decode(full[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert streamed.split() == expected.split()


def test_chat_template_generation(model, tokenizer, tmp_path):
    messages = [{"role": "user", "content": "the cat sat on the mat"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(ids["input_ids"][0]).endswith("<|assistant|>")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4 or out[0, -1].item() == tokenizer.eos_token_id
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    reply = generator(messages, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert reply[0] == messages[0] and reply[-1]["role"] == "assistant"


def test_batched_pipeline_with_left_padding_equals_single_prompts(model, tokenizer):
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["the cat", "a big red dog ran to the", "print if"]
    batched = generator(prompts, max_new_tokens=5, do_sample=False, batch_size=3)
    for prompt, result in zip(prompts, batched):
        alone = generator(prompt, max_new_tokens=5, do_sample=False)[0]["generated_text"]
        assert result[0]["generated_text"] == alone


def test_device_map_auto_with_offload_gives_the_same_logits(tmp_path):
    model = DiffLlamaForCausalLM(tiny_config(num_hidden_layers=4)).eval()
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(1, 128, (1, 8))
    expected = model(ids).logits
    size = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    split = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model",
        device_map="auto",
        max_memory={"cpu": int(size * 2.5)},
        offload_folder=str(tmp_path / "offload"),
    ).eval()
    placements = set(split.hf_device_map.values())
    assert "disk" in placements and "cpu" in placements, split.hf_device_map
    assert not any(k.endswith("self_attn") or ".mlp" in k for k in split.hf_device_map), "layers must stay whole"
    torch.testing.assert_close(split(ids).logits, expected, atol=1e-5, rtol=1e-5)
