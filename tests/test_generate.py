"""PyTorch sampling: greedy equals argmax decoding, filters, seeds, stop ids and the context window."""

import pytest
import torch

from gpt.bundle import repeated_ngram_bans
from gpt.config import ModelConfig
from gpt.generate import SamplingConfig, filter_logits, generate, generate_batch
from gpt.model import GPT


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig.preset("tiny", block_size=32)).eval()


def test_greedy_with_cache_equals_recomputing_full_forward(model):
    prompt = [5, 6, 7, 8]
    out = generate(model, prompt, max_new_tokens=20)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt) :]


def test_generation_past_the_context_window_slides(model):
    prompt = list(range(4, 30))  # 26 tokens; 26 + 40 new > block_size 32
    out = generate(model, prompt, max_new_tokens=40)
    assert len(out) == 40
    # Once the cache holds block_size tokens, the next token is predicted from the last block_size - 1.
    filled = len(prompt) + (model.config.block_size - len(prompt))
    ctx = (prompt + out)[:filled]
    with torch.no_grad():
        expected = int(model(torch.tensor([ctx[-(model.config.block_size - 1) :]]))[0, -1].argmax())
    assert out[filled - len(prompt)] == expected


def test_seeded_sampling_is_reproducible_and_varies_with_seed(model):
    a = generate(model, [5, 6], max_new_tokens=30, temperature=1.0, seed=1)
    b = generate(model, [5, 6], max_new_tokens=30, temperature=1.0, seed=1)
    c = generate(model, [5, 6], max_new_tokens=30, temperature=1.0, seed=2)
    assert a == b and a != c


def test_stop_token_ends_generation(model):
    free = generate(model, [5, 6, 7], max_new_tokens=10)
    stop = free[3]
    out = generate(model, [5, 6, 7], max_new_tokens=10, stop_token_ids=(stop,))
    assert out == free[: free.index(stop)]


def test_top_k_keeps_only_k_tokens():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept_all = torch.isfinite(filter_logits(probs.log(), top_p=0.99))
    assert kept_all.tolist() == [[True, True, True, True]]


def test_top_k_1_sampling_equals_greedy(model):
    greedy = generate(model, [9, 10], max_new_tokens=15)
    sampled = generate(model, [9, 10], max_new_tokens=15, temperature=0.8, top_k=1, seed=3)
    assert sampled == greedy


@pytest.mark.parametrize(
    "kw", [dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(max_new_tokens=-1)]
)
def test_invalid_sampling_settings_are_rejected(kw):
    with pytest.raises(ValueError):
        SamplingConfig(**kw)


def test_empty_prompt_is_rejected(model):
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [], max_new_tokens=3)


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15], list(range(4, 24))]  # lengths 7, 1, 3, 20
    batched = generate_batch(model, prompts, max_new_tokens=12)
    assert batched == [generate(model, p, max_new_tokens=12) for p in prompts]
    assert len({len(p) for p in prompts}) == 4 and all(len(b) == 12 for b in batched)


def test_batched_rows_stop_and_slide_independently(model):
    # block_size 32: the 20-token prompt fills the window after 12 new tokens, the others later or never.
    prompts = [list(range(4, 24)), [5, 6], [7, 8, 9, 10]]
    alone = [generate(model, p, max_new_tokens=30) for p in prompts]
    stop = alone[1][4]
    alone_stopped = [generate(model, p, max_new_tokens=30, stop_token_ids=(stop,)) for p in prompts]
    assert generate_batch(model, prompts, max_new_tokens=30) == alone
    assert generate_batch(model, prompts, max_new_tokens=30, stop_token_ids=(stop,)) == alone_stopped
    assert len(alone_stopped[1]) < 30


def test_repeated_ngram_bans_names_the_tokens_that_would_repeat_an_ngram():
    assert repeated_ngram_bans([5, 6, 7, 5, 6], 3) == {7}  # 5 6 7 is there: 5 6 -> 7 is banned
    assert repeated_ngram_bans([5, 6, 5, 8, 5], 2) == {6, 8}
    assert repeated_ngram_bans([5, 6, 7], 1) == {5, 6, 7}
    assert repeated_ngram_bans([5, 6], 3) == set() and repeated_ngram_bans([5, 5, 5], 0) == set()


def has_repeated_ngram(ids: list[int], n: int) -> bool:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


def test_no_repeat_ngram_guard_breaks_a_greedy_loop_and_changes_nothing_before_it(model):
    plain = generate(model, [5, 6, 7], max_new_tokens=40)
    assert has_repeated_ngram(plain, 3)  # random weights loop: the case the guard exists for
    guarded = generate(model, [5, 6, 7], max_new_tokens=40, no_repeat_ngram_size=3)
    assert len(guarded) == 40 and not has_repeated_ngram(guarded, 3)
    first = next(i for i in range(3, 41) if has_repeated_ngram(plain[:i], 3))  # first repeat ends here
    assert guarded[: first - 1] == plain[: first - 1]
    batched = generate_batch(model, [[5, 6, 7], [9]], max_new_tokens=40, no_repeat_ngram_size=3)
    assert batched[0] == guarded  # per row, as alone
