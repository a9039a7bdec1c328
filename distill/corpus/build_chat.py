"""Build ``chat.jsonl.gz``: the default teacher's own answers to general-English requests (maintainer script; the
result is committed, so nothing is generated at run time).

Usage: ``python distill/corpus/build_chat.py [--conversations N] [--batch B] [--threads T]``.

Why: ``default.jsonl.gz`` is Python documentation, so students distilled on it alone write like API docs and lose
general English (measured in README.md beside this file). The teacher's answers to everyday requests are the
black-box half of the seed's distillation (MiniMind distils SFT data written by a larger model), licence-clean
(SmolLM2 is Apache-2.0) and in the chat format the runtime's ``chat`` uses.

The requests are ``TEMPLATES`` x ``TOPICS``, written for this purpose. The 24 topics of ``outside.jsonl`` (the
text outside the corpus that quality is measured on) were left out on purpose, so that set stays outside.
Sampling: temperature ``TEMPERATURE``, top-k ``TOP_K``, seed 0, batches of left-padded prompts through the teacher
with its KV cache. The same torch, CPU kind and thread count give the same text; another CPU may round the last
bit of a logit differently and so sample a different token.

This script stays as it was so that the committed file can be rebuilt bit for bit. New teacher-written data is made
with ``edgedistill teacher-data`` (``distill/teacher_data.py``, ``distill/generation.py``): the same batched idea in
llama.cpp, with the GGUF teacher in its own quantization, resumable, and a manifest of the run.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import time
from pathlib import Path

HERE = Path(__file__).parent
TEMPERATURE = 0.8
TOP_K = 40
MAX_NEW_TOKENS = 224

TEMPLATES = (
    "Write a short essay about {}.",
    "Explain {} to a curious twelve-year-old.",
    "Write a short story that involves {}.",
    "What are the most important things to know about {}?",
    "Describe {} in a few paragraphs.",
    "Give some practical advice about {}.",
    "Write a friendly letter to a cousin about {}.",
    "What is the history of {}?",
)
# fmt: off
TOPICS = (
    "volcanoes", "the invention of the printing press", "learning a second language", "the history of maps",
    "the water cycle", "keeping chickens", "an afternoon in a city square", "how airplanes fly", "the Roman empire",
    "friendship", "recycling", "the human heart", "planting a vegetable garden", "a long bicycle ride",
    "the moon landing", "coral reefs", "writing a good email", "the game of chess", "a power cut",
    "the first day at a new school", "glaciers", "the telephone", "running a marathon", "a small bookshop",
    "owls", "magnets", "the Silk Road", "rain forests", "public libraries", "a broken umbrella",
    "earthquakes", "the piano", "a new language at school", "electric cars", "the Olympic Games",
    "honesty", "a lost key", "bridges", "dinosaurs", "the metric system",
    "whales", "the history of money", "a quiet morning", "wind power", "the invention of the light bulb",
    "kindness to strangers", "a snowy mountain village", "how maps are made", "penguins", "the Great Wall of China",
    "a birthday surprise", "sleep", "the immune system", "a visit to grandparents", "the Industrial Revolution",
    "deserts", "teamwork", "an old clock", "rivers", "how to study for an exam", "a violin lesson",
    "the invention of the wheel", "volunteering", "a picnic in the park", "the ocean floor", "elephants",
    "the internet", "cleaning a messy room", "the ancient Egyptians", "a stone bridge", "good manners",
    "a fishing trip", "how glass is made", "photography", "a school play", "the history of tea",
    "mountains", "the alphabet", "a newspaper", "a hot air balloon", "forests in winter",
    "the Renaissance", "a family tree", "bicycles", "how the heart pumps blood", "patience",
    "an island", "the first computers", "wolves", "a street musician", "the seasons", "a hospital nurse",
    "a farmer's year", "castles", "how to make a friend", "sundials", "a lost wallet returned", "the desert at night",
    "the postal service", "a village library", "butterflies", "a marathon runner", "the printing of books",
    "an old photograph", "the Amazon river", "a carpenter", "the invention of paper", "submarines",
    "a robot that learns to paint", "growing older", "a summer job", "the history of the bicycle", "a treehouse",
    "ants", "a new neighbour", "the Arctic", "learning to knit", "a mountain rescue", "the history of music",
    "a detective story", "an old sailing ship", "a day without electricity", "making pottery", "a city park",
)
# fmt: on


def requests() -> list[str]:
    """Every template with every topic, topic by topic: ``main`` takes every n-th, so a sample spans all topics."""
    return [template.format(topic) for topic in TOPICS for template in TEMPLATES]


def generate(prompts: list[str], batch: int, log=print) -> list[dict]:
    import torch

    from edgedistill.distill.teacher import load_model, load_tokenizer, resolve_teacher

    source = resolve_teacher("smollm2-135m")
    tokenizer, model = load_tokenizer(source), load_model(source).eval()
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generator = torch.Generator().manual_seed(0)
    records = []
    for first in range(0, len(prompts), batch):
        started = time.time()
        chunk = prompts[first : first + batch]
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in chunk
        ]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
        mask = encoded.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        tokens = encoded.input_ids
        done = torch.zeros(len(chunk), dtype=torch.bool)
        answers = []
        cache = None
        with torch.no_grad():
            for _ in range(MAX_NEW_TOKENS):
                out = model(
                    input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
                )
                cache = out.past_key_values
                logits = out.logits[:, -1].float() / TEMPERATURE
                top = logits.topk(TOP_K, dim=-1)
                pick = torch.multinomial(top.values.softmax(-1), 1, generator=generator)
                token = top.indices.gather(-1, pick).squeeze(-1)
                token = torch.where(done, torch.full_like(token, pad), token)
                answers.append(token)
                done |= token == end
                if bool(done.all()):
                    break
                tokens = token[:, None]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                positions = positions[:, -1:] + 1
        new = torch.stack(answers, dim=-1)
        for prompt, row in zip(chunk, new.tolist()):
            ids = row[: row.index(end)] if end in row else row
            answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if answer:
                turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
                records.append({"conversations": turns})
        log(f"{first + len(chunk)}/{len(prompts)} requests, {new.numel()} positions, {time.time() - started:.0f} s")
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    every = requests()
    step = max(1, len(every) // args.conversations)
    records = generate(every[::step][: args.conversations], args.batch)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as handle:
        for record in records:
            handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    out = HERE / "chat.jsonl.gz"
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(out)
    print(f"wrote {out}: {len(records)} conversations ({len(buffer.getvalue())} bytes)")


if __name__ == "__main__":
    main()
