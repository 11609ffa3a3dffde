"""llm4all's thin shared core: configs, results table, training loop, models, data, evaluation, plotting,
and low-precision arithmetic (``common.lowp``)."""
