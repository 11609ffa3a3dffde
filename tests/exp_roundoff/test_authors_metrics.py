"""The authors' metrics (sbudzinskiy/lowprec-llm-inference, src/exp_helper.py): the absolute l-inf error of a
token (``abs_linf``, max over the hidden dim of |x^ - x|) and the smallest l2 norm of a reference token
(``min_token_l2``). Oracle: numpy on the lockstep batch itself, read off the decoder layers and the logits by
forward hooks of the test (the tracer's first half is the float64 reference, the second the emulated run)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from common.lowp.tracer import Policy, Tracer, find_layers, token_errors, token_norms
from common.results import load_results


def _brute(doubled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(abs_linf per token, reference l2 per token) of one doubled (2B, T, d) activation, by numpy."""
    n = doubled.shape[0] // 2
    ref = doubled[:n].reshape(-1, doubled.shape[-1])
    test = doubled[n:].reshape(-1, doubled.shape[-1])
    return np.abs(test - ref).max(axis=1), np.sqrt((ref * ref).sum(axis=1))


class _HookedTracer(Tracer):
    """A Tracer that also keeps every decoder layer's doubled output (reference + emulated halves)."""

    seen: list[dict] = []

    def run_batches(self, batches):
        outs: dict[int, list[np.ndarray]] = {}
        _, layers = find_layers(self.model)

        def hook(i):
            def fn(module, args, output):
                h = output[0] if isinstance(output, tuple) else output
                outs.setdefault(i, []).append(h.detach().cpu().numpy().copy())
            return fn
        handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
        try:
            res = super().run_batches(batches)
        finally:
            for h in handles:
                h.remove()
        _HookedTracer.seen.append({"n_layers": len(layers), "outs": outs, "res": res})
        return res


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tracer_abs_linf_and_token_norms_match_numpy(arch):
    from exp_roundoff.models import build_model

    model = build_model(arch, vocab_size=64, d_model=16, n_layers=2, n_heads=2, seq_len=16, seed=3)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    _HookedTracer.seen = []
    res = _HookedTracer(model, Policy.uniform("bf16"), keep_token_values=True).run(ids)
    outs = _HookedTracer.seen[-1]["outs"]
    for layer in range(2):
        abs_linf, norms = _brute(outs[layer][0])
        got = res.token_values[(layer, "block_out", "forward", "abs_linf")].numpy()
        np.testing.assert_allclose(got, abs_linf, rtol=1e-12, atol=0)
        assert abs_linf.max() > 0  # bf16 changed something: the check is not 0 == 0
        np.testing.assert_allclose(res.token_values[(layer, "block_out", "reference", "l2")].numpy(), norms,
                                   rtol=1e-12)
        assert res.get(layer, "block_out", "reference", "l2")["min"] == pytest.approx(norms.min(), rel=1e-12)
        assert res.get(layer, "block_out", "forward", "abs_linf")["max"] == pytest.approx(abs_linf.max(), rel=1e-12)
    # the logits: the tracer's own reference / emulated logits against numpy
    lr, lt = res.logits_ref.numpy(), res.logits_test.numpy()
    np.testing.assert_allclose(res.token_values[(2, "logits", "forward", "abs_linf")].numpy(),
                               np.abs(lt - lr).max(axis=1), rtol=1e-12)
    np.testing.assert_allclose(res.token_values[(2, "logits", "reference", "l2")].numpy(),
                               np.linalg.norm(lr, axis=1), rtol=1e-12)


def test_token_errors_abs_linf_and_norms_ignore_masked_entries():
    ref = torch.tensor([[3.0, -float("inf"), -4.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    test = torch.tensor([[2.5, -float("inf"), -4.25], [0.0, 0.125, 0.0]], dtype=torch.float64)
    out = token_errors(ref, test)
    assert out["abs_linf"].tolist() == [0.5, 0.125]
    assert token_norms(ref).tolist() == [5.0, 0.0]
    assert out["rel_l2"][1].item() == float("inf")  # a zero reference token: why min_token_l2 is reported


def _rows(table: str) -> pd.DataFrame:
    df = load_results()
    return df[df["table"] == table]


def test_depth_and_meanmedian_rows_match_numpy(monkeypatch):
    """The stages' abs_linf / min_token_l2 rows equal numpy over the last block of every trace they ran."""
    import exp_roundoff.run as run

    monkeypatch.setattr(run, "Tracer", _HookedTracer)
    _HookedTracer.seen = []
    assert run.main(["--profile", "quick", "--stage", "depth", "depth.archs=[gpt2]", "depth.depths=[2]",
                     "depth.n_inits=2", "depth.precisions=[bf16]", "depth.real_model=none", "depth.d_model=16",
                     "depth.seq_len=8", "depth.batch=2"]) == 0
    traces = list(_HookedTracer.seen)
    assert len(traces) == 2
    abs_linf, norms = map(np.concatenate, zip(*(_brute(t["outs"][1][0]) for t in traces)))
    vals = _rows("depth").set_index("metric")["value"]
    assert vals["abs_linf_max"] == pytest.approx(abs_linf.max(), rel=1e-12)
    assert vals["abs_linf_mean"] == pytest.approx(abs_linf.mean(), rel=1e-12)
    assert vals["abs_linf_median"] == pytest.approx(np.median(abs_linf), rel=1e-12)
    assert vals["min_token_l2"] == pytest.approx(norms.min(), rel=1e-12)

    _HookedTracer.seen = []
    assert run.main(["--profile", "quick", "--stage", "meanmedian", "meanmedian.n_inits=3",
                     "meanmedian.n_layers=2", "meanmedian.init_gains=[3.0]", "meanmedian.precisions=[bf16]",
                     "meanmedian.seq_len=8"]) == 0
    traces = list(_HookedTracer.seen)
    abs_linf, norms = map(np.concatenate, zip(*(_brute(t["outs"][1][0]) for t in traces)))
    mm = _rows("mean_vs_median")
    a = mm[mm["p.error"] == "abs_linf"].set_index("metric")["value"]
    assert a["token_max"] == pytest.approx(abs_linf.max(), rel=1e-12)
    assert a["token_p99"] == pytest.approx(np.quantile(abs_linf, 0.99), rel=1e-12)
    ref = mm[mm["metric"] == "min_token_l2"]
    assert len(ref) == 1 and ref["value"].iloc[0] == pytest.approx(norms.min(), rel=1e-12)
