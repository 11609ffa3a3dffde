"""Model-based quality and coverage scores: ASK-LLM and the Density sampler (Sachdeva et al., arXiv 2402.09668).

ASK-LLM score = P("yes") at the first answer position under an instruction model, with the paper's prompt
(as reproduced by nano-askllm), summing the single-token spellings of "yes" ("yes", "Yes", " yes", " Yes").
Prompts are *left*-padded with position ids from the attention mask, so a document's score does not depend
on the batch it is in (nano-askllm's right padding gets shorter prompts wrong).

Density: score(x) = mean_y exp(-||x - y||^2 / (2 bandwidth^2)) over L2-normalised embeddings, computed
exactly in chunks (the paper approximates the same kernel sum with an LSH sketch to reach billions of
documents; at our scale the exact sum is cheap). Sampling is inverse-propensity: p(x) ∝ 1 / score(x),
without replacement.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ASKLLM_PROMPT = (
    "###\n{datapoint}\n###\n\n"
    "Does the previous paragraph demarcated within ### and ### contain informative signal for pre-training a "
    "large-language model? An informative datapoint should be well-formatted, contain some usable knowledge of "
    "the world, and strictly NOT have any harmful, racist, sexist, etc. content.\n\n"
    "OPTIONS:\n- yes\n- no"
)


def answer_token_ids(tokenizer: Any, word: str) -> list[int]:
    """Ids of the spellings of `word` ("yes" / "no": lower, capitalised, with and without a leading space)
    that are one token in this vocabulary."""
    spellings = (word, word.capitalize(), " " + word, " " + word.capitalize())
    ids = {tuple(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in spellings}
    single = sorted({i[0] for i in ids if len(i) == 1})
    if not single:
        raise ValueError(f"no spelling of '{word}' is a single token in this tokenizer; ASK-LLM needs one")
    return single


def yes_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the spellings of "yes" that are one token in this vocabulary."""
    return answer_token_ids(tokenizer, "yes")


def askllm_prompts(tokenizer: Any, texts: list[str], max_doc_tokens: int = 256) -> list[str]:
    """The paper's prompt around each document (cut to `max_doc_tokens` tokens); chat template if any."""
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"][:max_doc_tokens]
        prompt = ASKLLM_PROMPT.format(datapoint=tokenizer.decode(ids))
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
        else:
            prompt += "\nANSWER:"
        out.append(prompt)
    return out


def askllm_probs(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 4,
                 max_doc_tokens: int = 256, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(P(yes), P(no)) per document at the answer position (float64 arrays in [0, 1])."""
    import torch
    from tqdm.auto import tqdm

    yes, no = yes_token_ids(tokenizer), answer_token_ids(tokenizer, "no")
    prompts = askllm_prompts(tokenizer, texts, max_doc_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    p_yes, p_no = [], []
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc="ASK-LLM", unit="batch", disable=not progress or len(starts) < 2):
        enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[i:i + batch_size]]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros(len(enc), width, dtype=torch.long)
        for j, e in enumerate(enc):          # left padding: the answer position is the last column for all
            ids[j, width - len(e):] = torch.tensor(e)
            mask[j, width - len(e):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        probs = torch.softmax(logits, -1).double()
        p_yes.append(probs[:, yes].sum(-1).numpy())
        p_no.append(probs[:, no].sum(-1).numpy())
    if not p_yes:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(p_yes), np.concatenate(p_no)


def askllm_scores(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 4,
                  max_doc_tokens: int = 256) -> np.ndarray:
    """P(yes) per document (float64 array in [0, 1]): the paper's score."""
    return askllm_probs(model, tokenizer, texts, batch_size, max_doc_tokens)[0]


def normalised_yes(p_yes: np.ndarray, p_no: np.ndarray) -> np.ndarray:
    """P(yes) / (P(yes) + P(no)): the answer restricted to the two options. Under a small instruction model
    most of the mass sits on neither word (SmolLM2: ~11 % on "yes"), and the raw P(yes) then also measures how
    willing the model is to answer at all; the ratio removes that. 0.5 where both are 0."""
    p_yes, p_no = np.asarray(p_yes, dtype=np.float64), np.asarray(p_no, dtype=np.float64)
    total = p_yes + p_no
    return np.divide(p_yes, total, out=np.full_like(total, 0.5), where=total > 0)


MARKUP = ("<div class=\"nav\"><ul><li><a href=\"/home\">Home</a></li><li><a href=\"/login\">Login</a></li>"
          "</ul></div> var x=function(a){return a&&a.b||{}}; $(document).ready(function(){init();}); ")


def planted_documents(good: list[str], seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``good`` documents (label 1) and as many bad ones made from them (label 0), cycling through four
    kinds a quality score should rank below prose: word salad (the document's words shuffled), letter noise
    (random lowercase letters and spaces, same length), one phrase repeated, and markup/script boilerplate."""
    rng = np.random.default_rng(seed)
    bad = []
    for i, text in enumerate(good):
        words = text.split()
        kind = i % 4
        if kind == 0:
            bad.append(" ".join(rng.permutation(words)))
        elif kind == 1:
            letters = rng.choice(list("abcdefghijklmnopqrstuvwxyz     "), size=len(text))
            bad.append("".join(letters))
        elif kind == 2:
            bad.append(" ".join((words[:5] or ["the"]) * max(1, len(words) // 5)))
        else:
            bad.append((MARKUP * (1 + len(text) // len(MARKUP)))[: len(text)])
    return list(good) + bad, np.array([1] * len(good) + [0] * len(bad))


def pairwise_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Share of (good, bad) pairs that the score orders correctly, ties counting one half (= ROC AUC, the
    Mann-Whitney U statistic over n_good x n_bad)."""
    from scipy.stats import mannwhitneyu

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    good, bad = scores[labels == 1], scores[labels == 0]
    if not len(good) or not len(bad):
        raise ValueError("pairwise_accuracy needs at least one good and one bad document")
    return float(mannwhitneyu(good, bad).statistic / (len(good) * len(bad)))


def kernel_density(emb: np.ndarray, bandwidth: float = 0.5, chunk: int = 1024) -> np.ndarray:
    """Mean Gaussian kernel similarity of each (L2-normalised) embedding to all embeddings, itself included."""
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    out = np.empty(len(x))
    for i in range(0, len(x), chunk):
        sq = np.clip(2 - 2 * x[i:i + chunk] @ x.T, 0, None)   # ||a - b||^2 for unit vectors
        out[i:i + chunk] = np.exp(-sq / (2 * bandwidth ** 2)).mean(1)
    return out


def density_sample(scores: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Indices of k documents sampled without replacement with p ∝ 1/density (inverse propensity)."""
    if not 0 < k <= len(scores):
        raise ValueError(f"k must be in 1..{len(scores)}, got {k}")
    w = 1.0 / np.asarray(scores, float)
    return np.sort(np.random.default_rng(seed).choice(len(w), size=k, replace=False, p=w / w.sum()))
