"""The data-side contract suites (dsk.testing.contracts.data): every built-in task, reward, tokenizer and optimizer
passes its suite, and a deliberately broken component of each kind fails it with a message saying what to fix."""

import json
import re

import pytest
import torch
from dsk_tasks.arithmetic import ArithmeticTask
from dsk_tasks.config import ArithmeticConfig
from torch import nn

from dsk.api import build_component
from dsk.data.tokenizers import MARKUP_TOKENS, CharTokenizer
from dsk.testing import builtin_registry
from dsk.testing.contracts.data import check_optimizer, check_reward, check_task, check_tokenizer

REGISTRY = builtin_registry()


def names(kind):
    return REGISTRY.names(kind)


# ---- inputs ---------------------------------------------------------------------------------------------------------


def _jsonl_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [
        {"prompt": f"{a}+{b}=", "completion": f"<answer>{a + b}</answer>", "answer": str(a + b)}
        for a in range(20)
        for b in range(10)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _hf_tokenizer_json(tmp_path):
    """A tiny BPE tokenizer trained here (no downloads), with the R1 tags as added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["12+34=46", "seven plus five is one two", "sept plus cinq égale"] * 20, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def _options(kind, name, tmp_path):
    if (kind, name) == ("task", "jsonl"):
        return {"path": str(_jsonl_file(tmp_path)), "test_percent": 20}
    if (kind, name) == ("tokenizer", "hf"):
        return {"path": str(_hf_tokenizer_json(tmp_path))}
    return {}


def _build(kind, name, tmp_path, *args):
    return build_component(REGISTRY, kind, {"type": name, **_options(kind, name, tmp_path)}, *args)


def _task(**options):
    return ArithmeticTask(ArithmeticConfig(languages=["sym", "en", "fr", "de", "es"], **options))


def _text_samples():
    """Prompts and completions of every generator task in every language (accents, R1 tags), plus edge cases."""
    out = ["", " ", "a", "<think></think><answer></answer>"]
    for name in ("arithmetic", "countdown", "modular"):
        task = build_component(REGISTRY, "task", {"type": name, "languages": ["sym", "en", "fr", "de", "es"]})
        for r in task.records("train", 12):
            out += [r["prompt"], r["completion"]]
    return out


def _reward_batch():
    """Completions of real records: the reference, a wrong answer, a bad format, no think block, a truncation."""
    task = _task()
    records = task.records("train", 4) + [{**task.sample("train", 4), "answer": None}]
    completions = [
        records[0]["completion"],
        "<think>1+1=3</think><answer>7</answer>",
        records[2]["completion"].replace("</think>", ""),
        f"<answer>{records[3]['answer']}</answer>",
        records[4]["completion"],
    ]
    columns = {k: [r.get(k) for r in records] for k in ("answer", "language", "task", "key")}
    return task, [r["prompt"] for r in records], completions, columns


# ---- every built-in passes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", names("task"))
def test_every_builtin_task_passes_its_contract(name, tmp_path):
    check_task(_build("task", name, tmp_path), n=120)


@pytest.mark.parametrize("name", names("reward"))
def test_every_builtin_reward_passes_its_contract(name):
    spec = REGISTRY.get("reward", name)
    task, prompts, completions, columns = _reward_batch()
    ids = [[1] * len(c) for c in completions]
    check_reward(
        spec.load(),
        spec.config(),
        prompts,
        completions,
        checker=task.check,
        completion_ids=ids,
        max_completion_length=60,
        **columns,
    )


def test_accuracy_judges_every_completion_with_an_answer():
    spec = REGISTRY.get("reward", "accuracy")
    task, prompts, completions, columns = _reward_batch()
    judged = [a is not None for a in columns["answer"]]
    check_reward(spec.load(), spec.config(), prompts, completions, judged=judged, checker=task.check, **columns)


@pytest.mark.parametrize("name", names("tokenizer"))
def test_every_builtin_tokenizer_passes_its_contract(name, tmp_path):
    samples = _text_samples()
    if name == "hf":  # a 300-token BPE trained on three sentences: its byte-level round trip still covers any text
        samples = samples[:12]
    check_tokenizer(_build("tokenizer", name, tmp_path), samples)


class _Tiny(nn.Module):
    """Matrices (decayed) and vectors (not), as a transformer has: an embedding, a projection, a norm gain."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 6)
        self.norm = nn.Parameter(torch.ones(6))

    def forward(self, x):
        return self.proj(self.embed(x)) * self.norm


@pytest.mark.parametrize("name", names("optimizer"))
def test_every_builtin_optimizer_passes_its_contract(name):
    spec = REGISTRY.get("optimizer", name)
    check_optimizer(lambda model: spec.load()(spec.config(), model), _Tiny)


# ---- broken components fail with what to fix ------------------------------------------------------------------------


class _LeakyTask(ArithmeticTask):
    """Draws both splits from the training problems."""

    def sample(self, split, index):
        return {**super().sample("train", index), "split": split}


class _LenientTask(ArithmeticTask):
    """A checker that accepts any answer."""

    def check(self, record, completion_text):
        return self.extract_answer(completion_text) is not None


class _StatefulTask(ArithmeticTask):
    """Records that depend on how many were drawn before."""

    calls = 0

    def sample(self, split, index):
        _StatefulTask.calls += 1
        return super().sample(split, index + _StatefulTask.calls % 2)


@pytest.mark.parametrize(
    "task, message",
    [
        (_LeakyTask(ArithmeticConfig()), "the train and test splits share"),
        (_LenientTask(ArithmeticConfig()), "check() accepts the wrong completion"),
        (_StatefulTask(ArithmeticConfig()), "must be a pure function of (config, split, index)"),
    ],
)
def test_a_broken_task_fails_with_what_to_fix(task, message):
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_task(task, n=60)


def _short(config, prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)


def _nan(config, prompts, completions, **columns):
    return [float("nan")] + [0.0] * (len(completions) - 1)


def _never(config, prompts, completions, **columns):
    return [None] * len(completions)


def _batch_relative(config, prompts, completions, **columns):
    return [len(c) / max(len(x) for x in completions) for c in completions]


@pytest.mark.parametrize(
    "fn, message",
    [
        (_short, "returned 4 values for 5 completions"),
        (_nan, "value 0 is nan; rewards must be finite"),
        (_never, "returned None for all 5 completions"),
        (_batch_relative, "must not depend on the others"),
    ],
)
def test_a_broken_reward_fails_with_what_to_fix(fn, message):
    _, prompts, completions, columns = _reward_batch()
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_reward(fn, None, prompts, completions, **columns)


class _DropsSpaces(CharTokenizer):
    """Loses every space on encode."""

    def encode(self, text, add_bos=False, add_eos=False):
        return super().encode(text.replace(" ", ""), add_bos=add_bos, add_eos=add_eos)


def test_a_tokenizer_that_drops_characters_fails_with_what_to_fix():
    with pytest.raises(AssertionError, match=re.escape("decode(encode(s)) != s for s = '12 plus")):
        check_tokenizer(_DropsSpaces(), ["12+34=", "12 plus 34 is"])


def test_a_tokenizer_whose_specials_collide_fails():
    tok = CharTokenizer()
    tok.eos_id = tok.bos_id
    with pytest.raises(AssertionError, match="bos_id and eos_id are both"):
        check_tokenizer(tok, ["12+34="])


class _HiddenMomentum(torch.optim.Optimizer):
    """SGD with momentum kept outside ``self.state``, so ``state_dict()`` does not hold it."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})
        self.buffers = {}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.buffers.setdefault(id(p), torch.zeros_like(p))
                buf.mul_(0.9).add_(p.grad)
                p.add_(buf, alpha=-group["lr"])


def _named_groups(model):
    named = list(model.named_parameters())
    return [{"params": [p for _, p in named], "names": [n for n, _ in named]}]


def test_an_optimizer_whose_state_does_not_round_trip_fails_with_what_to_fix():
    with pytest.raises(AssertionError, match=re.escape("the copy's next step differs from the original's")):
        check_optimizer(lambda model: _HiddenMomentum(_named_groups(model)), _Tiny)


class _BF16Momentum(torch.optim.Optimizer):
    """SGD with a BF16 momentum buffer in ``self.state``, loaded by torch's default ``load_state_dict``, which casts
    floating state to the parameter's dtype: the buffer comes back FP32."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buf = state.get("momentum", torch.zeros_like(p, dtype=torch.bfloat16)).float()
                buf.mul_(0.9).add_(p.grad)
                p.add_(buf, alpha=-group["lr"])
                state["momentum"] = buf.to(torch.bfloat16)


def test_an_optimizer_that_loses_its_state_dtype_fails():
    with pytest.raises(AssertionError, match=re.escape("is torch.bfloat16 but torch.float32 after load_state_dict")):
        check_optimizer(lambda model: _BF16Momentum(_named_groups(model)), _Tiny)


def test_an_optimizer_without_group_names_fails_with_what_to_fix():
    with pytest.raises(AssertionError, match=re.escape("every group must carry 'names'")):
        check_optimizer(lambda model: torch.optim.SGD(model.parameters(), lr=0.1), _Tiny)
