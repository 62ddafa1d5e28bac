"""Tiny-GSM generator, GSM8K answer extractor and demo tokenizers."""

from __future__ import annotations

import json
import re

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dllm_cache.demo.tasks import (
    ACTIVITIES,
    BILLS,
    ITEMS,
    MAX_OPERAND,
    MAX_RESULT,
    SHOP_ITEMS,
    TEST_NAMES,
    TRAIN_NAMES,
    WARMUP_SKILLS,
    WARMUP_WEIGHTS,
    WORD_FAMILIES,
    WORD_PROBLEM_FRACTION,
    generate_pair_problems,
    generate_problems,
    names_corpus,
    pair_is_right,
    training_corpus,
)
from dllm_cache.demo.tokenizer import save_tokenizer, special_token_ids, train_tokenizer
from dllm_cache.eval.answers import answers_match, extract_answer, normalize_number

# ---------------------------------------------------------------------------------------------
# Generator


@pytest.fixture(scope="module")
def train_set():
    return generate_problems(2000, "train", seed=0)


@pytest.fixture(scope="module")
def test_set():
    return generate_problems(500, "test", seed=0)


def test_generator_is_deterministic_per_seed():
    a = generate_problems(300, "train", seed=1)
    assert a == generate_problems(300, "train", seed=1)
    assert a != generate_problems(300, "train", seed=2)
    t = generate_problems(100, "test", seed=1)
    assert t == generate_problems(100, "test", seed=1)
    assert t != generate_problems(100, "test", seed=2)


def test_train_and_test_share_no_question(train_set, test_set):
    test_questions = {p.question for p in test_set}
    assert len(test_questions) == len(test_set), "test questions must be unique"
    # Also against the train split of other seeds: the separation is by construction.
    for train in (train_set, generate_problems(1000, "train", seed=7)):
        assert not test_questions & {p.question for p in train}


def test_names_are_reserved_per_split(train_set, test_set):
    assert not {p.name for p in TRAIN_NAMES} & {p.name for p in TEST_NAMES}
    test_names = re.compile(r"\b(" + "|".join(p.name for p in TEST_NAMES) + r")\b")
    train_names = re.compile(r"\b(" + "|".join(p.name for p in TRAIN_NAMES) + r")\b")
    assert not any(test_names.search(p.question) for p in train_set)
    assert not any(train_names.search(p.question) for p in test_set)


def test_answers_end_with_final_line(train_set, test_set):
    for p in train_set + test_set:
        last = p.answer.split("\n")[-1]
        assert last == f"#### {p.final}", p
        assert extract_answer(p.answer) == p.final, p
        assert answers_match(extract_answer(p.answer), p.final)


def test_numbers_are_small_and_non_negative(train_set, test_set):
    for p in train_set + test_set:
        assert all(int(x) <= MAX_OPERAND or int(x) in BILLS for x in re.findall(r"\d+", p.question)), p
        assert all(0 <= int(x) <= MAX_RESULT for x in re.findall(r"-?\d+", p.answer)), p


def test_arithmetic_in_solutions_is_correct(train_set):
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    for p in train_set:
        for a, op, b, r in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", p.answer):
            assert ops[op](int(a), int(b)) == int(r), p
            if op == "/":
                assert int(a) % int(b) == 0, p


def test_mix_and_families(train_set):
    families = {p.family for p in train_set}
    assert families == set(WORD_FAMILIES) | set(WARMUP_SKILLS)
    word = sum(p.family in WORD_FAMILIES for p in train_set) / len(train_set)
    assert abs(word - WORD_PROBLEM_FRACTION) < 0.03
    arith = sum(p.family == "arith" for p in train_set) / len(train_set)
    assert abs(arith - (1 - WORD_PROBLEM_FRACTION) * WARMUP_WEIGHTS["arith"]) < 0.03
    only_words = generate_problems(200, "train", seed=0, word_problem_fraction=1.0)
    assert all(p.family in WORD_FAMILIES for p in only_words)


def test_training_corpus_yields_questions_then_answers():
    probs = generate_problems(3, "train", seed=0)
    assert list(training_corpus(probs)) == [t for p in probs for t in (p.question, p.answer)]


def test_bad_split_rejected():
    with pytest.raises(ValueError):
        generate_problems(1, "valid", seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="held_out_phrasing applies to the test split only"):
        generate_problems(1, "train", seed=0, held_out_phrasing=0.5)
    with pytest.raises(ValueError, match="fractions"):
        generate_problems(1, "test", seed=0, held_out_phrasing=1.5)


_NAMES = {p.name for p in TRAIN_NAMES + TEST_NAMES}
_PRONOUNS = {"he", "she", "He", "She"}


def _phrasing(question: str) -> str:
    """The question's template: numbers, things and pronouns replaced by placeholders, and names
    by their order of first appearance (so a phrasing that swaps the roles of two people differs)."""
    things = set(ITEMS) | set(SHOP_ITEMS) | {a for act in ACTIVITIES for a in act}
    names: dict[str, str] = {}
    out = []
    for w in re.findall(r"\w+|[^\w\s]", question):
        if w.isdigit():
            out.append("N")
        elif w in things or w + "s" in things:
            out.append("X")
        elif w in _PRONOUNS:
            out.append("P")
        elif w in _NAMES:
            out.append(names.setdefault(w, f"NAME{len(names)}"))
        else:
            out.append(w)
    return " ".join(out)


def test_phrasings_held_out_only_in_the_paraphrase_set(train_set):
    """The default test split asks in the train phrasings (names held out); with
    ``held_out_phrasing=1`` every word problem is phrased as no train problem is."""
    train_phrasings = {_phrasing(p.question) for p in train_set if p.family in WORD_FAMILIES}
    default = [p for p in generate_problems(300, "test", seed=3) if p.family in WORD_FAMILIES]
    assert all(_phrasing(p.question) in train_phrasings for p in default)
    paraphrased = generate_problems(300, "test", seed=3, held_out_phrasing=1.0)
    words = [p for p in paraphrased if p.family in WORD_FAMILIES]
    assert len(words) > 200 and {p.family for p in words} == set(WORD_FAMILIES)
    assert not any(_phrasing(p.question) in train_phrasings for p in words)
    # Warm-up skills are unaffected; answers are still correct GSM8K-format solutions.
    assert all(extract_answer(p.answer) == p.final for p in paraphrased)


# ---------------------------------------------------------------------------------------------
# Answer extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3 + 4 = 7\n#### 7", "7"),
        ("#### 5\nwait, no\n#### 6", "6"),  # the last marker wins
        ("He pays $1,000 in total.\n#### 1,000", "1000"),
        ("#### $18.00", "18"),
        ("#### -2", "-2"),
        ("#### 3.0", "3"),
        ("#### 12.", "12"),
        ("#### 18 dollars", "18"),
        ("So 2 + 3 = 5. The answer is 5.", "5"),  # fallback: last number
        ("She has 1,250 marbles", "1250"),
        ("It drops to -4 degrees", "-4"),
        ("steps 4 then\n#### ", "4"),  # empty marker line: last number before it
        ("#### 3, 9, 14", "3, 9, 14"),  # text answers (tiny-GSM sort / reverse / copy)
        ("#### sun  cat red\n", "sun cat red"),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalize_number_and_match():
    assert normalize_number("1,000") == normalize_number("1000") == "1000"
    assert normalize_number("3.0") == "3"
    assert normalize_number("-2") == "-2"
    assert normalize_number("$0.50") == "0.5"
    with pytest.raises(ValueError):
        normalize_number("3, 9")
    assert answers_match("1000", "1,000")
    assert answers_match("3", "3.00")
    assert not answers_match("4", "3")
    assert not answers_match(None, "3")
    assert answers_match("sun cat red", "sun cat red")
    assert not answers_match("sun red cat", "sun cat red")
    assert not answers_match("39, 14", "3, 9, 14")


# ---------------------------------------------------------------------------------------------
# Tokenizer

VOCAB = 1536  # small: 990 of it goes to the numbers 10..999


@pytest.fixture(scope="module")
def corpus():
    return list(training_corpus(generate_problems(300, "train", seed=0)))


@pytest.fixture(scope="module")
def toks(corpus):
    return {fam: train_tokenizer(corpus, fam, vocab_size=VOCAB) for fam in ("llada", "dream")}


@pytest.fixture(scope="module")
def samples():
    return generate_problems(20, "train", seed=3) + generate_problems(20, "test", seed=3)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_tokenizer_round_trip(toks, samples, family):
    tok = toks[family]
    assert len(tok) <= VOCAB
    for p in samples:
        for text in (p.question, p.answer, p.question + "\n" + p.answer):
            assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_numbers_are_single_tokens(toks, family):
    tok = toks[family]
    for i in range(1000):
        assert len(tok.encode(str(i))) == 1, i
    # With a leading space (the form inside sentences): guaranteed for 0..99.
    for i in range(100):
        assert len(tok.encode(f" {i}")) == 1, i
    ids = tok.encode("3 + 14 = 17\n#### 17")
    assert tok.convert_ids_to_tokens(ids) == ["3", "Ġ+", "Ġ14", "Ġ=", "Ġ17", "Ċ", "####", "Ġ17"]


def test_special_token_ids_are_stable(toks):
    llada, dream = toks["llada"], toks["dream"]
    assert special_token_ids(llada, "llada") == {"mask": 2, "eos": 0, "pad": 0, "bos": 1, "eot": 5}
    assert llada.convert_ids_to_tokens(list(range(6))) == [
        "<|endoftext|>",
        "<|startoftext|>",
        "<|mdm_mask|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    assert (llada.bos_token_id, llada.eos_token_id, llada.pad_token_id, llada.mask_token_id) == (1, 0, 0, 2)
    assert special_token_ids(dream, "dream") == {"mask": 4, "eos": 0, "pad": 0, "bos": 0, "eot": 2}
    assert dream.convert_ids_to_tokens(list(range(5))) == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|beginoftext|>",
        "<|mask|>",
    ]
    assert (dream.bos_token_id, dream.eos_token_id, dream.pad_token_id, dream.mask_token_id) == (0, 0, 0, 4)
    # Special tokens are never split and are dropped by skip_special_tokens.
    ids = llada.encode("<|mdm_mask|><|mdm_mask|>x<|eot_id|>")
    assert ids[:2] == [2, 2] and ids[-1] == 5
    assert llada.decode(ids, skip_special_tokens=True) == "x"


def test_tokenizer_training_is_deterministic(corpus, toks):
    again = train_tokenizer(corpus, "llada", vocab_size=VOCAB)
    assert again.get_vocab() == toks["llada"].get_vocab()


def test_tokenizer_rejects_bad_arguments(corpus):
    with pytest.raises(ValueError):
        train_tokenizer(corpus, "llada", vocab_size=1000)
    with pytest.raises(ValueError):
        train_tokenizer(corpus, "gpt", vocab_size=VOCAB)  # type: ignore[arg-type]


def _chat(tok, question: str) -> str:
    return tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def test_chat_templates_render_family_prompts(toks):
    q = "What is 3 + 4?"
    assert _chat(toks["llada"], q) == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 3 + 4?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert _chat(toks["dream"], q) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    )
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]
    assert (
        toks["dream"]
        .apply_chat_template(system, tokenize=False, add_generation_prompt=True)
        .startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    )
    # The rendered prompt tokenizes with each special token as one id and round-trips.
    for fam, tok in toks.items():
        text = _chat(tok, q)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        if fam == "llada":
            assert ids[:2] == [1, 3] and ids[-3] == 4
        else:
            assert ids[0] == 1 and tok.convert_ids_to_tokens(ids[-2:]) == ["assistant", "Ċ"]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_save_load_round_trip(toks, samples, tmp_path, family):
    tok = toks[family]
    save_tokenizer(tok, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tok.chat_template
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    for loaded in (
        PreTrainedTokenizerFast.from_pretrained(tmp_path),
        AutoTokenizer.from_pretrained(tmp_path),
    ):
        assert loaded.get_vocab() == tok.get_vocab()
        for p in samples[:10]:
            assert loaded.encode(p.question) == tok.encode(p.question)
            chat = _chat(tok, p.question)
            assert _chat(loaded, p.question) == chat
            assert (
                loaded(chat, add_special_tokens=False)["input_ids"]
                == tok(chat, add_special_tokens=False)["input_ids"]
            )
        for attr in ("bos_token", "eos_token", "pad_token", "mask_token"):
            assert getattr(loaded, attr) == getattr(tok, attr)
            assert getattr(loaded, attr + "_id") == getattr(tok, attr + "_id")
        assert special_token_ids(loaded, family) == special_token_ids(tok, family)
        assert loaded.chat_template == tok.chat_template


def test_names_corpus_makes_names_single_tokens(corpus):
    tok = train_tokenizer(corpus + names_corpus(), "llada", vocab_size=2048)
    for p in TEST_NAMES + TRAIN_NAMES:
        assert len(tok.encode(p.name)) == 1 and len(tok.encode(" " + p.name)) == 1, p.name


def test_pseudo_names_are_train_only_and_never_test_names():
    probs = generate_problems(3000, "train", seed=0, pseudo_name_fraction=0.5)
    test_names = {p.name for p in TEST_NAMES}
    words = {w.strip(".,?") for p in probs for w in p.question.split()}
    assert not words & test_names
    assert sum(p.question.split()[0] not in {n.name for n in TRAIN_NAMES} for p in probs) > 500
    # off by default: the stream the tokenizer is trained on does not change
    assert generate_problems(300, "train", seed=1) == generate_problems(
        300, "train", seed=1, pseudo_name_fraction=0.0
    )
    with pytest.raises(ValueError, match="train split only"):
        generate_problems(10, "test", seed=0, pseudo_name_fraction=0.5)


def test_pair_problems():
    """Split a total in two: deterministic per seed, names held out, several right answers."""
    train = generate_pair_problems(400, "train", seed=0)
    assert (
        train == generate_pair_problems(400, "train", seed=0) != generate_pair_problems(400, "train", seed=1)
    )
    test = generate_pair_problems(300, "test", seed=0)
    assert len({p.question for p in test}) == 300 and not {p.question for p in test} & {
        p.question for p in train
    }
    test_names = re.compile(r"\b(" + "|".join(p.name for p in TEST_NAMES) + r")\b")
    assert not any(test_names.search(p.question) for p in train)
    for p in train + test:
        a, b = map(int, p.final.split(", "))
        assert p.answer == f"{a} + {b} = {a + b} {p.answer.split()[5]}\n#### {a}, {b}"
        assert str(a + b) in p.question and pair_is_right(extract_answer(p.answer), a + b)
    # More unique test questions than exist: a clear error, not an endless loop.
    with pytest.raises(RuntimeError, match="could not draw 5000 unique test problems"):
        generate_pair_problems(5000, "test", seed=0)
    # The first number is a free choice: many splits of one total occur.
    assert len({p.final for p in train if p.final.endswith(", " + str(10 - int(p.final.split(",")[0])))}) >= 5


@pytest.mark.parametrize(
    ("prediction", "total", "right"),
    [
        ("4, 5", 9, True),
        ("1, 8", 9, True),
        ("4, 4", 9, False),
        ("9, 0", 9, False),
        ("4", 9, False),
        ("4, 5, 0", 9, False),
        ("a, b", 9, False),
        (None, 9, False),
    ],
)
def test_pair_is_right(prediction, total, right):
    assert pair_is_right(prediction, total) is right
